"""A throwaway TLS certificate for loopback servers (Postgres, the broker) in the benchmarks,
made with the ``cryptography`` package.

The TLS tests need a CA that issues server and client certificates: see
``tests/fixtures/certs.py``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

__all__ = ["self_signed_cert"]


def self_signed_cert(directory: Path) -> tuple[str, str]:
    """Write ``server.crt`` and ``server.key`` into *directory*: a self-signed certificate for
    ``localhost`` and ``127.0.0.1`` (both as subject alternative names, so a client that
    verifies the host accepts it) that is also its own CA (usable as the client's root
    certificate); valid from five minutes ago for a day. Return the two paths (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)
