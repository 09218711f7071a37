"""``python -m broker [run|serve|stats|health]``.

* ``run`` (alias ``serve``, the default): start a broker. Every setting is a flag
  (``--pool-size``) or a ``PGBROKER_*`` variable (``PGBROKER_POOL_SIZE``); a flag wins.
  Bad configuration: one line on stderr, exit 2. No database at start: one line, exit 1.
* ``stats``: print the broker's GetStats figures (``--json`` for one JSON object).
* ``health``: exit 0 if the broker reports SERVING, 1 otherwise (container health checks).
  For both, a target that is not host:port is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from broker.config import ConfigError, load_settings, parse_listen

# flag name -> help; each maps to the setting of the same name (PGBROKER_<NAME>).
_RUN_FLAGS = {
    "database_url": "postgresql://user:password@host:5432/db?sslmode=verify-full",
    "listen": "host:port to serve gRPC on (default 127.0.0.1:50051; port 0 picks a free one)",
    "pool_size": "server connections held open (default 20)",
    "max_waiting": "queued requests before RESOURCE_EXHAUSTED (default 2000)",
    "queue_timeout": "seconds a request may wait for a connection (default 30)",
    "statement_timeout": "upper bound per transaction, seconds (default 30)",
    "max_lifetime": "seconds before a server connection is recycled (default 3600)",
    "connect_timeout": "seconds to wait for a database connection (default 10)",
    "shutdown_grace": "seconds in-flight requests get on SIGTERM (default 20)",
    "max_connection_age": "seconds before a client's HTTP/2 connection is recycled (default 300)",
    "max_connection_age_grace": "seconds given to calls on a recycled connection (default 30)",
    "auth": "authentication: iam, token or none (none only on loopback); see docs/security.md",
    "log_level": "DEBUG, INFO, WARNING or ERROR (default INFO)",
    "statement_cache_size": "prepared statements kept per connection (default 100)",
    "max_replicas": "replicas sharing the database; start is refused when pool_size x "
    "max_replicas exceeds max_connections minus reserved slots (default 1)",
    "metrics_interval": "seconds between CloudWatch EMF metric lines on stdout (default 0: off)",
    "workers": "server processes sharing the listen port, each with pool_size // workers "
    "connections (default 1); see docs/broker.md",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m broker", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    for name in ("run", "serve"):
        run = commands.add_parser(name, help="start a broker (default)")
        for flag, text in _RUN_FLAGS.items():
            run.add_argument("--" + flag.replace("_", "-"), dest=flag, help=text)
    for name, text in (("stats", "print pool figures"), ("health", "exit 0 if SERVING")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--target", help="host:port of the broker (default PGBROKER_LISTEN)")
        sub.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
        if name == "stats":
            sub.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if command in ("run", "serve"):
        return _run({k: getattr(args, k, None) for k in _RUN_FLAGS}, argv)
    from broker.security.tls import TlsConfigError

    try:
        target = _target(args.target)
    except ValueError as exc:  # bad usage, like run's configuration errors: one line, exit 2
        print(f"pgbroker: {exc}", file=sys.stderr)
        return 2
    try:
        if command == "stats":
            return _stats(target, args.timeout, args.json)
        return _health(target, args.timeout)
    except TlsConfigError as exc:  # a PGBROKER_TLS_* variable names no usable PEM
        print(f"pgbroker: {exc}", file=sys.stderr)
        return 1


def _run(flags: dict[str, str | None], argv: Sequence[str]) -> int:
    """Serve; with ``--workers N`` > 1 start N worker processes instead (broker/front/workers.py),
    unless this process is one of them."""
    try:
        settings = load_settings(flags)
    except ConfigError as exc:
        print(f"pgbroker: bad configuration: {exc}", file=sys.stderr)
        return 2
    from broker.front.server import serve, setup_logging  # grpc import only when serving
    from broker.front.workers import supervise, worker_role

    logger = setup_logging(settings.log_level)
    role = worker_role() if settings.workers > 1 else None
    if role is not None:
        logger.append_keys(worker=role.index)  # on every line, modules' loggers included
    if settings.workers > 1 and role is None:
        return supervise(settings, argv)
    return asyncio.run(serve(settings, role))


def _target(explicit: str | None) -> str:
    """The address to reach the broker: --target, else PGBROKER_LISTEN (0.0.0.0 -> loopback).

    Raise ValueError naming the flag or variable when it is not host:port."""
    source, text = "--target", explicit
    if not text:
        source, text = "PGBROKER_LISTEN", os.environ.get("PGBROKER_LISTEN") or "127.0.0.1:50051"
    try:
        host, port = parse_listen(text)
    except ValueError as exc:
        raise ValueError(f"{source}={text!r}: {exc}") from None
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _stats(target: str, timeout: float, as_json: bool) -> int:
    import grpc

    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
    from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

    try:
        with _channel(target) as channel:
            reply = pb_grpc.BrokerStub(channel).GetStats(
                pb.GetStatsRequest(), timeout=timeout, metadata=_auth_metadata(target)
            )
    except grpc.RpcError as exc:
        print(f"pgbroker: cannot get stats from {target}: {exc.code().name}", file=sys.stderr)
        return 1
    stats = dict(sorted(reply.stats.items()))
    if as_json:
        print(json.dumps(stats))
    else:
        width = max(map(len, stats), default=0)
        for key, value in stats.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _health(target: str, timeout: float) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with _channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
    except grpc.RpcError as exc:
        print(f"NOT_SERVING ({exc.code().name})")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _channel(target: str) -> Any:
    """A channel to the local broker, built as the client builds one (`lambda_client._config`):
    TLS when the broker serves TLS (``PGBROKER_TLS_CERT``), trusting ``PGBROKER_TLS_CA_FILE``
    (else the certificate itself), with the client certificate of
    ``PGBROKER_TLS_CLIENT_CERT_FILE``/``_KEY_FILE`` for mTLS; the name checked is
    ``PGBROKER_TLS_SERVER_NAME`` when set (the certificate is for a DNS name, not 127.0.0.1).
    Each variable holds a path or the PEM text itself. Raise `TlsConfigError` naming the
    variable of an unusable PEM."""
    from broker.security.tls import TlsConfigError
    from lambda_client._config import ClientConfig, ConfigError, Pem, open_channel

    config = ClientConfig.from_env()
    server_cert = os.environ.get("PGBROKER_TLS_CERT")
    if server_cert:
        config = config.replace(
            tls=True, tls_ca=config.tls_ca or Pem("PGBROKER_TLS_CERT", server_cert)
        )
    else:
        config = config.replace(tls=False)
    try:
        return open_channel(target, config)
    except ConfigError as exc:
        raise TlsConfigError(str(exc)) from None


def _auth_metadata(target: str) -> Sequence[tuple[str, str]]:
    """Credentials for GetStats, from the configuration a client reads (PGBROKER_AUTH,
    PGBROKER_TOKEN, …; see lambda_client/auth.py); with ``token`` and no PGBROKER_TOKEN, the
    first of the broker's own PGBROKER_TOKENS. Health checks need none."""
    from lambda_client._config import ClientConfig
    from lambda_client.auth import auth_for

    config = ClientConfig.from_env()
    if config.auth == "token" and not config.token:
        first = os.environ.get("PGBROKER_TOKENS", "").split(",")[0]
        config = config.replace(token=first.rpartition(":")[2].strip() or None)
    try:
        hook = auth_for(config, default_audience=target)
    except ValueError:
        return ()
    return tuple(hook()) if hook is not None else ()


if __name__ == "__main__":
    sys.exit(main())
