"""python -m broker [run|serve|stats|health|settings|pause|resume|reload|top]

commands:
  run, serve  start a broker (the default). Every setting is a flag (--pool-size) or a
              PGBROKER_* variable (PGBROKER_POOL_SIZE); a flag wins. Bad configuration:
              one line on stderr, exit 2. No database at start: one line, exit 1.
  stats       print the broker's GetStats figures (--json: one JSON object).
  health      exit 0 if the broker reports SERVING, 1 otherwise (container health checks).
  settings    print the settings table (Markdown, as in README.md).
  pause       PgBouncer's PAUSE: new work queues, running work finishes (--wait: until none
              runs). Needs an admin identity (PGBROKER_ADMIN_TOKEN, docs/security.md).
  resume      PgBouncer's RESUME.
  reload      PgBouncer's RELOAD: re-read PGBROKER_CONFIG_FILE and secrets, plus key=value
              overrides; a bad value is refused (exit 1) and every setting kept.
  top         a live view of the pools, waiting callers, leases and busiest callers (--once:
              one frame); Ctrl-C ends it.

For the commands that ask a broker, a target that is not host:port is one line on stderr,
exit 2; a refused or failed call is one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from broker.config import (
    SETTINGS,
    ConfigError,
    Setting,
    load_settings,
    lookup,
    markdown_table,
    meaning,
    parse_listen,
    shown_default,
)

_RUN_COMMANDS = ("run", "serve")
_ASKING_COMMANDS = {
    "stats": "print the broker's GetStats figures",
    "health": "exit 0 if the broker reports SERVING, 1 otherwise",
    "pause": "PAUSE: new work queues, running work finishes (admin identity)",
    "resume": "RESUME: queued work starts (admin identity)",
    "reload": "RELOAD: re-read the live settings, with KEY=VALUE overrides (admin identity)",
    "top": "a live view of pools, waiting callers, leases and the busiest callers",
}


def version() -> str:
    """The installed distribution's version; ``unknown`` when run from a source tree that was
    never installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("pgbroker")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _PrintVersion(argparse.Action):
    """``--version``; the package metadata is read only when asked (about 60 ms), not on every
    ``health`` check."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"pgbroker {version()}")
        parser.exit()


def _plain(markdown: str) -> str:
    """Help text for a terminal: no Markdown backticks, and argparse's ``%`` escaped."""
    return markdown.replace("`", "").replace("%", "%%")


def _flag_help(spec: Setting) -> str:
    default = shown_default(spec)
    tail = spec.variable if default == "—" else f"{spec.variable}; default: {default}"
    return _plain(f"{meaning(spec)} [{tail}]")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m broker",
        description="pgbroker: start a broker (run, the default) or ask a running one.",
        epilog="Bad configuration or a bad --target: one line on stderr, exit 2.",
        **_plain_output(),
    )
    parser.add_argument("--version", action=_PrintVersion, help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _RUN_COMMANDS:
        run = commands.add_parser(
            name,
            help="start a broker (the default)" if name == "run" else "same as run",
            description="Start a broker. A flag wins over its PGBROKER_* variable, which wins"
            " over the default. Durations take seconds or a unit (500ms, 5m); byte sizes a"
            " unit too (8MiB). No database at start: one line on stderr, exit 1.",
            **_plain_output(),
        )
        for spec in SETTINGS:
            if spec.option:
                run.add_argument(
                    spec.option, dest=spec.name, metavar=spec.metavar, help=_flag_help(spec)
                )
    for name, text in _ASKING_COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=text, **_plain_output())
        sub.add_argument("--target", help="host:port of the broker (default PGBROKER_LISTEN)")
        timeout = 30.0 if name == "pause" else 3.0
        sub.add_argument(
            "--timeout", type=float, default=timeout, help=f"seconds (default {timeout:g})"
        )
        if name == "stats":
            sub.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "pause":
            sub.add_argument(
                "--wait", action="store_true", help="return once nothing runs (within --timeout)"
            )
        if name == "reload":
            sub.add_argument(
                "overrides",
                nargs="*",
                metavar="KEY=VALUE",
                help="live settings to set until the next reload (pool_size=30)",
            )
        if name == "top":
            sub.add_argument("--once", action="store_true", help="print one frame and exit")
            sub.add_argument(
                "--interval", type=float, default=1.0, help="seconds between frames (default 1)"
            )
    text = "print the settings table (Markdown, as in README.md)"
    commands.add_parser("settings", help=text, description=text, **_plain_output())
    return parser


def _plain_output() -> dict[str, Any]:
    # Python 3.14's argparse colours help by default; help here stays plain text.
    return {"color": False} if sys.version_info >= (3, 14) else {}


def main(argv: Sequence[str] | None = None) -> int:
    entry = argv is None  # this process is `python -m broker`, not a caller of main()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if command in _RUN_COMMANDS:
        flags = {spec.name: getattr(args, spec.name, None) for spec in SETTINGS}
        return _run(flags, argv, entry=entry)
    if command == "settings":
        sys.stdout.write(markdown_table())
        return 0
    from broker.security.tls import TlsConfigError

    try:
        target = _target(args.target)
    except ValueError as exc:  # bad usage, like run's configuration errors: one line, exit 2
        print(f"pgbroker: {exc}", file=sys.stderr)
        return 2
    try:
        if command == "stats":
            return _stats(target, args.timeout, args.json)
        if command == "health":
            return _health(target, args.timeout)
        return _operate(command, target, args)
    except TlsConfigError as exc:  # a PGBROKER_TLS_* variable names no usable PEM
        print(f"pgbroker: {exc}", file=sys.stderr)
        return 1


class _StoppedAtStart(BaseException):
    """SIGTERM arrived before the broker's own signal handling took over. A BaseException,
    like KeyboardInterrupt: an ``except Exception`` in a module being imported must not
    swallow it."""


def _stop_at_start(signum: int, frame: object) -> None:
    raise _StoppedAtStart


def _run(flags: dict[str, str | None], argv: Sequence[str], *, entry: bool = False) -> int:
    """Serve; with ``--workers N`` > 1 start N worker processes instead (broker/front/workers.py),
    unless this process is one of them.

    SIGTERM at any point of start-up exits 0 with a line saying what it stopped: until
    `broker.front.server.serve` or the supervisor handles signals itself (a container stopped
    while the broker loads its modules must not exit 143 with an empty log).

    As the process's entry point (*entry*), it first restarts itself with the configured
    object allocator (`broker.front.memory.exec_with_malloc`), before any thread starts."""
    import signal

    signal.signal(signal.SIGTERM, _stop_at_start)
    # PgBouncer's control signals (reload, pause, resume) would kill a broker that has not
    # installed its handlers yet (their default action); ignored until `serve` handles them.
    for control in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(control, signal.SIG_IGN)
    phase = "reading the configuration"
    try:
        settings = load_settings(flags)
        if entry:
            from broker.front.memory import exec_with_malloc

            exec_with_malloc(settings.object_allocator)
        phase = "loading modules"
        from broker.front.server import run, serve, setup_logging  # grpc only when serving
        from broker.front.workers import supervise, worker_role

        logger = setup_logging(settings.log_level)
        role = worker_role(settings) if settings.workers > 1 else None
        if role is not None:
            logger.append_keys(worker=role.index)  # on every line, modules' loggers included
        phase = "starting"
        if settings.workers > 1 and role is None:
            return supervise(settings, argv, flags)
        return run(settings, serve(settings, role, flags))
    except ConfigError as exc:
        print(f"pgbroker: bad configuration: {exc}", file=sys.stderr)
        return 2
    except _StoppedAtStart:
        print(
            json.dumps(
                {
                    "level": "INFO",
                    "message": f"SIGTERM while {phase}: start-up stopped, nothing was serving",
                    "service": "pgbroker",
                }
            ),
            flush=True,
        )
        return 0


def _target(explicit: str | None) -> str:
    """The address to reach the broker: --target, else PGBROKER_LISTEN (0.0.0.0 -> loopback).

    Raise ValueError naming the flag or variable when it is not host:port."""
    if explicit:
        try:
            host, port = parse_listen(explicit)
        except ValueError as exc:
            raise ValueError(f"--target={explicit!r}: {exc}") from None
    else:
        host, port = lookup("listen")
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
        hint = _failure_hint(exc)
        print(
            f"pgbroker: cannot get stats from {target}: {exc.code().name}"
            + (f": {hint}" if hint else ""),
            file=sys.stderr,
        )
        return 1
    stats = dict(sorted(reply.stats.items()))
    if as_json:
        print(json.dumps(stats))
    else:
        width = max(map(len, stats), default=0)
        for key, value in stats.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _operate(command: str, target: str, args: argparse.Namespace) -> int:
    """pause, resume, reload or top (broker/opsctl.py); a refused or failed call is one line
    on stderr with what to do, exit 1."""
    import grpc

    from broker import opsctl  # grpc and rich only for these commands

    with _channel(target) as channel:
        ask = opsctl.Ask(channel, _admin_metadata(target), _auth_metadata(target), args.timeout)
        try:
            if command == "top":
                return opsctl.top(ask, target, once=args.once, interval=args.interval)
            if command == "reload":
                return opsctl.reload(ask, args.overrides)
            if command == "pause":
                return opsctl.pause(ask, wait=args.wait)
            return opsctl.resume(ask)
        except ValueError as exc:  # a bad KEY=VALUE
            print(f"pgbroker: {command}: {exc}", file=sys.stderr)
            return 2
        except grpc.RpcError as exc:
            hint = _failure_hint(exc, admin=command != "top")
            details = exc.details() or ""
            print(
                f"pgbroker: {command} on {target}: {exc.code().name}: {details}"
                + (f" ({hint})" if hint and hint not in details else ""),
                file=sys.stderr,
            )
            return 1


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
        if hint := _failure_hint(exc):
            print(f"pgbroker: {target}: {hint}", file=sys.stderr)
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
    Without ``PGBROKER_TLS_CERT``, TLS as ``PGBROKER_TLS`` says. Each variable holds a path
    or the PEM text itself. Raise `TlsConfigError` naming the variable of an unusable PEM."""
    from broker.security.tls import TlsConfigError
    from lambda_client._config import ConfigError, Pem, open_channel

    config = _cli_config()
    server_cert = lookup("tls_cert")  # the broker's own setting, read as the broker reads it
    if server_cert:
        config = config.replace(
            tls=True, tls_ca=config.tls_ca or Pem("PGBROKER_TLS_CERT", server_cert)
        )
    # else: TLS only when the client's PGBROKER_TLS asks for it (a broker elsewhere)
    try:
        return open_channel(target, config)
    except ConfigError as exc:
        raise TlsConfigError(str(exc)) from None


def _cli_config() -> Any:
    """The client configuration these commands use (`lambda_client._config.ClientConfig`)."""
    from lambda_client._config import ClientConfig

    return ClientConfig.from_env()


def _failure_hint(exc: Any, *, admin: bool = False) -> str:
    """What to do about a failed admin call: the variable to set for UNAUTHENTICATED, the
    likely cause of a connection that never became ready (TLS mismatch, an untrusted
    certificate, nothing listening: `lambda_client._diagnose.explain`)."""
    import grpc

    from lambda_client._diagnose import explain

    code = exc.code()
    if admin and code is grpc.StatusCode.UNAUTHENTICATED:
        return "set PGBROKER_ADMIN_TOKEN to one of the broker's PGBROKER_ADMIN_TOKENS"
    if admin and code is grpc.StatusCode.PERMISSION_DENIED:
        return ""  # the broker's message says which admin identity it wants
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return (
            "the broker requires credentials: set PGBROKER_AUTH=token with PGBROKER_TOKEN "
            "(one of the broker's PGBROKER_TOKENS), or PGBROKER_AUTH=iam with AWS credentials"
        )
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return "the credentials are valid but not allowed to ask: " + (exc.details() or "")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        config = _cli_config()
        tls = bool(lookup("tls_cert")) or config.tls
        return explain(exc.details() or "", tls=tls)
    return ""


def _auth_metadata(target: str) -> Sequence[tuple[str, str]]:
    """Credentials for GetStats, from the configuration a client reads (PGBROKER_AUTH,
    PGBROKER_TOKEN, …; see lambda_client/auth.py); with ``token`` and no PGBROKER_TOKEN, the
    first of the broker's own PGBROKER_TOKENS. Health checks need none."""
    from lambda_client._config import ClientConfig
    from lambda_client.auth import auth_for

    config = ClientConfig.from_env()
    if config.auth == "token" and not config.token:
        first = (lookup("tokens") or "").split(",")[0]
        config = config.replace(token=first.rpartition(":")[2].strip() or None)
    try:
        hook = auth_for(config, default_audience=target)
    except ValueError:
        return ()
    return tuple(hook()) if hook is not None else ()


def _admin_metadata(target: str) -> Sequence[tuple[str, str]]:
    """Credentials for the Admin RPCs: ``PGBROKER_ADMIN_TOKEN`` (the operator's token), else
    the first of the broker's own ``PGBROKER_ADMIN_TOKENS`` (environment or
    ``PGBROKER_CONFIG_FILE``: the command runs beside the broker), else the client's
    credentials (`_auth_metadata`: an IAM role of ``PGBROKER_ADMIN_ROLES``)."""
    import os

    token = os.environ.get("PGBROKER_ADMIN_TOKEN", "").strip()
    if not token:
        try:
            first = (lookup("admin_tokens") or "").split(",")[0]
        except ConfigError:
            first = ""
        token = first.rpartition(":")[2].strip()
    if token:
        return (("authorization", f"Bearer {token}"),)
    return _auth_metadata(target)


if __name__ == "__main__":
    sys.exit(main())
