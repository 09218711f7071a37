"""Why a broker could not be reached, in words that name the setting to change.

gRPC reports a connection that never became ready only as a deadline; the reason is in the
text of its last connection error (what a call that does not wait for the channel fails
with: ``failed to connect to all addresses; last error: … Tls handshake failed …``).
`explain` turns that text into the likely cause and its fix. One case that text cannot tell
apart, a plaintext client talking to a TLS broker (gRPC sees only ``Socket closed``), is
settled by `speaks_tls`, a TLS handshake with the standard `ssl` module.

Used by the client (`lambda_client._policy.Link.reach`) and by ``python -m broker
health|stats``; no gRPC import here.
"""

from __future__ import annotations

import re
import socket
import ssl
import time

__all__ = ["DEFAULT_TARGET_NOTE", "explain", "speaks_tls"]

DEFAULT_TARGET_NOTE = (
    "PGBROKER_URL is not set, so the default 127.0.0.1:50051 was used: set PGBROKER_URL to "
    "the broker's address (host:port or dns:///host:port)"
)
# "ipv4:127.0.0.1:50051: Socket closed" in gRPC's "last error" text.
_ADDRESS = re.compile(
    r"\b(?:ipv4:(?P<v4>[0-9.]+)|ipv6:\[?(?P<v6>[0-9a-fA-F:]+?)\]?):(?P<port>\d+):"
)


def explain(last_error: str, *, tls: bool, probe_timeout: float = 0.2) -> str:
    """The likely cause of *last_error* (gRPC's last connection error; empty if none) and
    its fix, for a channel with or without *tls*; empty when there is nothing to add. May
    make one TLS handshake of at most *probe_timeout* seconds (`speaks_tls`; none when less
    than 10 ms are left)."""
    text = last_error
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (
            "TLS handshake failed: the broker's certificate is not signed by a CA this client "
            "trusts: set PGBROKER_TLS_CA_FILE to the CA certificate that signed it (a path or "
            "the PEM text; BrokerClient(root_certificates=...) in code)"
        )
    if "Hostname Verification" in text or "hostname mismatch" in text.lower():
        return (
            "TLS handshake failed: the broker's certificate does not name the host in the "
            "target: set PGBROKER_TLS_SERVER_NAME to a name the certificate holds"
        )
    if tls and "WRONG_VERSION_NUMBER" in text:
        return (
            "TLS handshake failed: the broker answers in plaintext and this client speaks "
            "TLS: unset PGBROKER_TLS, or give the broker a certificate (PGBROKER_TLS_CERT "
            "and PGBROKER_TLS_KEY)"
        )
    if "handshake" in text.lower():
        return f"TLS handshake failed ({_last(text)}): check PGBROKER_TLS and PGBROKER_TLS_CA_FILE"
    if not tls and "Socket closed" in text and probe_timeout > 0.01:
        address = _address(text)
        if address is not None and speaks_tls(*address, timeout=probe_timeout):
            return (
                "the broker speaks TLS and this client plaintext: set PGBROKER_TLS=1 (and "
                "PGBROKER_TLS_CA_FILE to the CA that signed the broker's certificate)"
            )
    if "Connection refused" in text:
        return f"connection refused ({_last(text)}): no broker listens there"
    return f"last error: {_last(text)}" if text else ""


def speaks_tls(host: str, port: int, *, timeout: float = 0.2) -> bool:
    """Whether a TLS handshake with *host*:*port* completes within *timeout* seconds in all
    (any certificate is accepted: this asks which protocol is spoken, not whom to trust)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # gRPC servers refuse a handshake without h2
    ends = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            raw.settimeout(max(0.001, ends - time.monotonic()))  # the handshake's share
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except (OSError, ssl.SSLError):
        return False


def _address(text: str) -> tuple[str, int] | None:
    match = _ADDRESS.search(text)
    if match is None:
        return None
    return match.group("v4") or match.group("v6"), int(match.group("port"))


def _last(text: str) -> str:
    """The interesting tail of gRPC's text: after "last error: " when it is there."""
    return text.rpartition("last error: ")[2].strip()
