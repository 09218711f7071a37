"""Broker settings: one table, one resolver (explicit flag > ``PGBROKER_*`` environment > default).

Each setting is declared once, as a field of `Settings` made with `setting`: its parser,
default, check, help text and PgBouncer equivalent. Everything else comes from that table
(`SETTINGS`): the dataclass, the flags of ``python -m broker run`` (``--pool-size``), the
environment lookup (``PGBROKER_POOL_SIZE``) and the README's table (`markdown_table`, printed by
``python -m broker settings``; tests/broker/test_settings_table.py compares the two). This
module is the only place in the broker that reads the process environment.

`load_settings` reads every setting, validates all of them and raises `ConfigError` listing
each bad value once (``PGBROKER_POOL_SIZE=0: must be at least 1``), so a misconfigured ECS task
fails at start with one line that names what to fix. The database password and the bearer
tokens never appear in a message, a log line or a `repr`.

The parsers of values (durations, byte sizes, host:port, the database URL) are in
`broker.configvalues`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any

from broker.configvalues import (
    MIB,
    SSL_MODES,
    Check,
    DatabaseTarget,
    at_least,
    boolean,
    duration,
    integer,
    is_loopback,
    lowercase,
    one_of,
    parse_database_url,
    parse_listen,
    parse_replica_urls,
    positive,
    size,
    stripped,
    uppercase,
    worker_marker,
)

__all__ = [
    "AUTH_MODES",
    "MIN_POOL_PER_WORKER",
    "SETTINGS",
    "SSL_MODES",
    "ConfigError",
    "DatabaseTarget",
    "Setting",
    "Settings",
    "cgroup_cpu_quota",
    "cgroup_v1_cpu_quota",
    "cpu_max_quota",
    "default_values",
    "load_settings",
    "lookup",
    "markdown_table",
    "meaning",
    "named",
    "origins",
    "parse_database_url",
    "parse_listen",
    "read_config_file",
    "shown_default",
    "task_cpus",
]

ENV_PREFIX = "PGBROKER_"

# Authentication modes (`broker/security/auth.py`); `none` only on a loopback listener.
AUTH_MODES: tuple[str, ...] = ("iam", "token", "none")

# Read routing (broker/flow/routing.py): `explicit` sends only work the caller marked read_only
# to a replica; `auto` also work the SQL plan proves read-only.
ROUTING_MODES = ("explicit", "auto")
# Where a read goes when no replica may take it (down, lagging, behind the caller's position).
REPLICA_FALLBACKS = ("primary", "wait")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SESSION_AUDIT_MODES = ("opaque", "always", "off")
PG_IO_MODES = ("threads", "loop")
OBJECT_ALLOCATORS = ("malloc", "pymalloc")
EVENT_LOOPS = ("uvloop", "asyncio")


class ConfigError(ValueError):
    """One or more settings are invalid; `problems` holds one message per bad value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


# Without a URL, everything comes from the secret (RDS JSON with host, port, dbname); TLS is
# then verified against the system CA store.
SECRET_ONLY_DATABASE = DatabaseTarget(
    host="", port=5432, user="", database="postgres", sslmode="verify-full"
)


# ------------------------------------------------------------------- derived defaults


class _Derived:
    """The default of a setting computed from others (`Setting.derive`)."""

    def __repr__(self) -> str:
        return "DERIVED"


DERIVED: Any = _Derived()


def _database_default(values: Mapping[str, Any]) -> DatabaseTarget:
    if values["database_secret_id"]:
        return SECRET_ONLY_DATABASE
    raise ValueError("is required (postgresql://user:password@host:5432/db)")


def _auth_default(values: Mapping[str, Any]) -> str:
    """`none` on a loopback listener; anything else must be chosen, so a broker reachable from
    the network never runs without authentication."""
    host = values["listen_address"][0]
    if is_loopback(host):
        return "none"
    raise ValueError(
        f"is required when listening on {host!r} (not loopback); supported: {', '.join(AUTH_MODES)}"
    )


def _statement_timeout(values: Mapping[str, Any]) -> float:
    # A lease may last as long as a batch may run, so neither style holds a connection longer.
    return float(values["statement_timeout"])


def _pool_size(values: Mapping[str, Any]) -> int:
    return int(values["pool_size"])


def _half_of_admitted(values: Mapping[str, Any]) -> int:
    # Half of what the broker admits, so one caller cannot fill the queue.
    return (values["pool_size"] + values["max_waiting"]) // 2


# cgroup v2: the CPU quota of the process's cgroup and of each one above it. A Fargate task's
# vCPUs and Docker's ``--cpus`` become this quota; the CPUs the process sees stay the host's.
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"


def cpu_max_quota(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line (``"200000 100000"``: quota and period in
    microseconds), or None for no quota (``"max 100000"``) or text that is no such line."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _own_cgroup(proc_cgroup: str) -> str:
    """The process's cgroup v2 path (``0::/ecs/task/container``), "/" when unknown."""
    try:
        with open(proc_cgroup, encoding="utf-8") as file:
            for line in file:
                if line.startswith("0::"):
                    return line[3:].strip() or "/"
    except OSError:
        pass
    return "/"


def cgroup_cpu_quota(root: str, proc_cgroup: str) -> tuple[float, str] | None:
    """The smallest ``cpu.max`` quota from the process's cgroup (named in *proc_cgroup*) up to
    the hierarchy's *root*, in CPUs, and the file it came from; None when no level has a quota
    (or no cgroup v2 is mounted)."""
    path = _own_cgroup(proc_cgroup).strip("/")
    found: tuple[float, str] | None = None
    while True:
        file = os.path.join(root, path, "cpu.max") if path else os.path.join(root, "cpu.max")
        try:
            with open(file, encoding="utf-8") as handle:
                quota = cpu_max_quota(handle.read())
        except OSError:
            quota = None
        if quota is not None and (found is None or quota < found[0]):
            found = (quota, file)
        if not path:
            return found
        path = os.path.dirname(path)


def cgroup_v1_cpu_quota(root: str) -> tuple[float, str] | None:
    """cgroup v1's CPU quota (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` of the ``cpu``
    controller mounted under *root*, as a container sees its own), in CPUs, and the file;
    None when it is -1 (no quota) or not there."""
    for controller in ("cpu", "cpu,cpuacct"):
        quota_file = os.path.join(root, controller, "cpu.cfs_quota_us")
        try:
            with (
                open(quota_file, encoding="utf-8") as quota,
                open(
                    os.path.join(root, controller, "cpu.cfs_period_us"), encoding="utf-8"
                ) as period,
            ):
                cpus = cpu_max_quota(f"{quota.read().strip()} {period.read().strip()}")
        except OSError:
            continue
        return (cpus, quota_file) if cpus is not None else None
    return None


def task_cpus() -> tuple[int, str]:
    """CPUs this process may use, at least 1, and why: the cgroup CPU quota rounded up (a
    Fargate task's vCPUs), but no more than the CPUs of its affinity mask."""
    affinity = len(os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(CGROUP_ROOT, PROC_CGROUP) or cgroup_v1_cpu_quota(CGROUP_ROOT)
    if quota is not None and math.ceil(quota[0]) < affinity:
        cpus = max(1, math.ceil(quota[0]))
        return cpus, f"cgroup CPU quota {quota[0]:g} CPUs ({quota[1]}), rounded up"
    return max(1, affinity), f"{affinity} CPUs in the process's affinity mask"


# Connections each worker holds at least when the worker count is the default. A client's
# channel reaches one worker, so it waits for that worker's share of the pool even while
# another worker's connections are idle: a small pool stays whole in one process.
MIN_POOL_PER_WORKER = 4


def _workers_default(values: Mapping[str, Any]) -> int:
    # One process per CPU the task may use (one event loop keeps about one core busy), but
    # each with at least MIN_POOL_PER_WORKER connections.
    pool_size = int(values["pool_size"] or 1)
    return max(1, min(pool_size // MIN_POOL_PER_WORKER, task_cpus()[0]))


# -------------------------------------------------------------------------------- the table


def _listed(choices: tuple[str, ...]) -> str:
    return ", ".join(f"`{choice}`" for choice in choices[:-1]) + f" or `{choices[-1]}`"


_METAVARS: dict[Callable[[str], Any], str] = {
    integer: "N",
    duration: "SECONDS",
    size: "BYTES",
    boolean: "BOOL",
    parse_listen: "HOST:PORT",
    parse_database_url: "URL",
}


@dataclass(frozen=True)
class Setting:
    """One row of the settings table: what `setting` declared, plus its names.

    *name* gives the flag (``--pool-size``, unless *flag* is false) and the variable
    (``PGBROKER_POOL_SIZE``, or the first of *env*); *attribute* is the `Settings` field. A
    *live* one changes on reload (SIGHUP, ``python -m broker reload``); any other needs a
    restart (broker/front/reload.py).
    *default* is `DERIVED` when *derive* computes it from the other settings' values (or
    refuses with a ValueError saying why it is required). *help* is Markdown (plain text in
    ``--help``). A *secret* is never shown in a message or repr; an *internal* one is plumbing
    between the broker's own processes, in neither the flags nor the README.
    """

    name: str
    attribute: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    check: Check | None = None
    derive: Callable[[Mapping[str, Any]], Any] | None = None
    shown_default: str = ""
    pgbouncer: str = ""
    flag: bool = True
    env: tuple[str, ...] = ()
    secret: bool = False
    internal: bool = False
    choices: tuple[str, ...] = ()
    live: bool = False

    @property
    def variable(self) -> str:
        return self.env[0]

    @property
    def option(self) -> str | None:
        """The command-line flag, or None for a setting read from the environment only."""
        return "--" + self.name.replace("_", "-") if self.flag else None

    @property
    def metavar(self) -> str:
        """What ``--help`` shows as the flag's value."""
        if self.choices:
            return "{" + ",".join(self.choices) + "}"
        return _METAVARS.get(self.parse, "TEXT")

    def shown(self, text: str) -> str:
        """*text* as it may appear in a message: never a secret's value."""
        return "<redacted>" if self.secret else repr(text)


def setting(
    parse: Callable[[str], Any],
    default: Any,
    help: str,
    *,
    check: Check | None = None,
    derive: Callable[[Mapping[str, Any]], Any] | None = None,
    shown_default: str = "",
    pgbouncer: str = "",
    name: str = "",
    flag: bool = True,
    env: tuple[str, ...] = (),
    secret: bool = False,
    internal: bool = False,
    choices: tuple[str, ...] = (),
    live: bool = False,
) -> Any:
    """Declare a `Settings` field as a setting (see `Setting` for the arguments); *name*
    defaults to the field's name. With *choices*, the value must be one of them."""
    spec = Setting(
        name=name,
        attribute="",
        parse=parse,
        default=default,
        help=help,
        check=one_of(choices) if choices else check,
        derive=derive,
        shown_default=shown_default,
        pgbouncer=pgbouncer,
        flag=flag and not internal,
        env=env,
        secret=secret,
        internal=internal,
        choices=choices,
        live=live,
    )
    metadata = {"setting": spec}
    # A parsed database target hides its password itself; a token list cannot.
    shown = not secret or parse in (parse_database_url, parse_replica_urls)
    if default is DERIVED:
        return field(repr=shown, metadata=metadata)
    return field(default=default, repr=shown, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the broker process needs, validated. Durations are in seconds, sizes in
    bytes; a limit of 0 is no limit."""

    database: DatabaseTarget = setting(  # noqa: RUF009 (a dataclasses.field, not a value)
        parse_database_url,
        DERIVED,
        "`postgresql://user:pass@host:port/db?sslmode=verify-full` (also `sslrootcert`,"
        " `application_name`); percent-encode `@` `/` `:` `?` `#` in the user name and password",
        name="database_url",
        derive=_database_default,
        shown_default="required, unless `PGBROKER_DATABASE_SECRET_ID`",
        secret=True,
    )
    database_secret_id: str = setting(
        stripped,
        "",
        "Secrets Manager secret in RDS's JSON shape (`username`, `password`, optional `host`,"
        " `port`, `dbname`), re-read when Postgres rejects the password (rotation)",
    )
    database_iam_auth: bool = setting(
        boolean,
        False,
        "the password is an RDS IAM auth token made with the task role (not with"
        " `PGBROKER_DATABASE_SECRET_ID`)",
    )
    replica_urls: tuple[DatabaseTarget, ...] = setting(
        parse_replica_urls,
        (),
        "read replicas, comma-separated URLs as `PGBROKER_DATABASE_URL` (an Aurora reader"
        " endpoint is one URL); a URL without a password uses the primary's credentials."
        ' Targets are named `replica1`, `replica2`, … in this order (docs/broker.md, "Replicas'
        ' and routing")',
        shown_default="none",
        secret=True,
        live=True,
    )
    replica_pool_size: int = setting(
        integer,
        DERIVED,
        "server connections per replica",
        check=at_least(1),
        derive=_pool_size,
        shown_default="`PGBROKER_POOL_SIZE`",
        live=True,
    )
    max_replica_lag: float = setting(
        duration,
        5.0,
        "seconds a replica may lag behind the primary before it leaves the rotation (0: no limit)",
        check=at_least(0),
        live=True,
    )
    replica_fallback: str = setting(
        lowercase,
        "primary",
        "where a read goes when no replica may take it (down, lagging, or behind the caller's"
        " read-your-writes position): `primary` at once, or `wait` up to"
        " `PGBROKER_REPLICA_WAIT` for one, then the primary",
        choices=REPLICA_FALLBACKS,
        live=True,
    )
    replica_wait: float = setting(
        duration,
        1.0,
        "with `PGBROKER_REPLICA_FALLBACK=wait`: seconds a read waits for a replica",
        check=at_least(0),
        live=True,
    )
    replica_check_interval: float = setting(
        duration,
        1.0,
        "seconds between replica health and replay-position checks",
        check=positive,
        live=True,
    )
    routing: str = setting(
        lowercase,
        "explicit",
        "which work goes to a replica: `explicit` (what the caller marks `read_only`) or"
        " `auto` (also SELECTs the SQL plan proves read-only: no locking clause, no"
        " data-modifying CTE, only functions `pg_proc` marks stable or immutable)",
        choices=ROUTING_MODES,
        live=True,
    )
    routing_hook: str = setting(
        stripped,
        "",
        "`module:function` called with the caller and the statements of each batch or"
        " stream; it returns a target name (`primary`, `replica1`, …) or None for the"
        " built-in routing (pgbouncer-rr's `routing_rules`)",
        live=True,
    )
    listen_address: tuple[str, int] = setting(
        parse_listen,
        ("127.0.0.1", 50051),
        "host:port to serve gRPC on (port 0 picks a free one)",
        name="listen",
        shown_default="`127.0.0.1:50051`",
    )
    config_file: str = setting(
        stripped,
        "",
        "a file of `PGBROKER_*=value` lines, read at start and re-read by `reload` (SIGHUP);"
        " a flag or a variable in the environment wins over it",
    )
    pool_size: int = setting(
        integer,
        20,
        "server connections",
        check=at_least(1),
        pgbouncer="default_pool_size",
        live=True,
    )
    max_waiting: int = setting(
        integer,
        2000,
        "queued requests before `RESOURCE_EXHAUSTED`",
        check=at_least(0),
        pgbouncer="max_client_conn",
        live=True,
    )
    queue_timeout: float = setting(
        duration,
        30.0,
        "seconds a request may wait for a connection",
        check=positive,
        pgbouncer="query_wait_timeout",
        live=True,
    )
    statement_timeout: float = setting(
        duration,
        30.0,
        "upper bound per statement/transaction, seconds",
        check=positive,
        live=True,
    )
    # Bounds of a Transact lease (broker/flow/lease.py), so one stuck or frozen Lambda cannot
    # hold a pooled connection; 0 turns one off.
    idle_transaction_timeout: float = setting(
        duration,
        10.0,
        "seconds an interactive transaction (`db.begin()`) may wait for its caller's next"
        " statement before it is rolled back (0: off)",
        check=at_least(0),
        pgbouncer="idle_transaction_timeout",
        live=True,
    )
    transaction_timeout: float = setting(
        duration,
        DERIVED,
        "seconds an interactive transaction may last (0: off)",
        check=at_least(0),
        derive=_statement_timeout,
        shown_default="`PGBROKER_STATEMENT_TIMEOUT`",
        pgbouncer="transaction_timeout",
        live=True,
    )
    max_lifetime: float = setting(
        duration,
        3600.0,
        "seconds before a server connection is recycled",
        check=positive,
        pgbouncer="server_lifetime",
        live=True,
    )
    connect_timeout: float = setting(
        duration,
        10.0,
        "seconds per connect attempt, and to wait for the first connection at start",
        check=positive,
    )
    shutdown_grace: float = setting(
        duration, 20.0, "seconds in-flight requests get after SIGTERM", check=at_least(0)
    )
    max_connection_age: float = setting(
        duration,
        300.0,
        "seconds before a client's HTTP/2 connection gets GOAWAY (clients rebalance)",
        check=positive,
    )
    max_connection_age_grace: float = setting(
        duration, 30.0, "seconds calls on such a connection may still take", check=at_least(0)
    )
    statement_cache_size: int = setting(
        integer, 100, "prepared statements kept per connection", check=at_least(1)
    )
    pg_io: str = setting(
        lowercase,
        "loop",
        "where Postgres I/O runs: `loop` (a small request, or `Transact` step, in a greenlet on"
        " the event loop over a non-blocking socket; large ones and `Stream` fetches on worker"
        " threads) or `threads` (every request on a worker thread)",
        choices=PG_IO_MODES,
    )
    workers: int = setting(
        integer,
        DERIVED,
        "server processes sharing the listen port (`SO_REUSEPORT`), sharing `pool_size`"
        " connections (each at least one); `GetStats` answers with the sum over all of them,"
        " health is per process",
        check=at_least(1),
        derive=_workers_default,
        shown_default="the CPUs the task may use (its cgroup CPU quota rounded up: a Fargate"
        " task's vCPUs; else the affinity mask), at most one per 4 connections of `pool_size`",
    )
    max_replicas: int = setting(
        integer,
        1,
        "replicas sharing the database: start is refused when `pool_size × max_replicas`"
        " exceeds `max_connections` minus reserved slots",
        check=at_least(1),
    )
    metrics_interval: float = setting(
        duration,
        0.0,
        "seconds between CloudWatch EMF metric lines on stdout (0: off)",
        check=at_least(0),
    )
    log_level: str = setting(
        uppercase,
        "INFO",
        f"the lowest level logged: {_listed(LOG_LEVELS)}",
        choices=LOG_LEVELS,
        live=True,
    )
    auth: str = setting(
        lowercase,
        DERIVED,
        f"caller authentication: {_listed(AUTH_MODES)}; `none` only on a loopback listener"
        " (docs/security.md)",
        choices=AUTH_MODES,
        derive=_auth_default,
        shown_default="`none` on loopback, else required",
    )
    # A tarpit (broker/security/tarpit.py): a client that sends its next call as soon as the
    # last is refused slows to its held calls' pace instead of taking the event loop.
    auth_refusal_hold: float = setting(
        duration,
        1.0,
        "seconds a refused call is held on average (each 0.5-1.5x, drawn) before its answer"
        " when its address had 32 or more calls refused in 10 s (0: answer at once;"
        " docs/security.md)",
        check=at_least(0),
    )
    auth_audience: str = setting(
        stripped, "", "iam: the audience clients sign, e.g. the broker's URL (required)"
    )
    iam_allowed_roles: str = setting(
        stripped,
        "",
        "iam: roles admitted, names or ARNs, comma separated, `*` patterns (required)",
        live=True,
    )
    sts_endpoint: str = setting(
        stripped,
        "",
        "iam: the STS endpoint that verifies callers (e.g. a VPC endpoint)",
        shown_default="STS of `AWS_REGION`",
    )
    # A flag would show the tokens to every local user (ps); the environment does not.
    tokens: str = setting(
        stripped,
        "",
        "token: bearer tokens, `label:token` comma separated, at least 16 characters each",
        flag=False,
        secret=True,
        live=True,
    )
    tokens_secret_id: str = setting(
        stripped,
        "",
        "token: Secrets Manager secret holding the tokens, re-read when an unknown one arrives"
        " and on reload",
        live=True,
    )
    # The operator's identity for the Admin RPCs (pause, resume, reload: broker/front/admin.py),
    # never the same as a caller's.
    admin_tokens: str = setting(
        stripped,
        "",
        "bearer tokens of operators for `pause`, `resume`, `reload` and `top` (`label:token`"
        " comma separated, at least 16 characters each; none of `PGBROKER_TOKENS`)",
        flag=False,
        secret=True,
        live=True,
    )
    admin_tokens_secret_id: str = setting(
        stripped,
        "",
        "Secrets Manager secret holding the operators' tokens (as `PGBROKER_TOKENS_SECRET_ID`)",
        live=True,
    )
    admin_roles: str = setting(
        stripped,
        "",
        "iam: roles admitted to `pause`, `resume`, `reload` and `top`, names or ARNs, comma"
        " separated, `*` patterns",
        live=True,
    )
    tls_cert: str = setting(
        stripped, "", "PEM certificate chain (a path or the PEM text) to serve TLS to clients"
    )
    tls_key: str = setting(stripped, "", "its private key (a path or the PEM text)")
    tls_client_ca: str = setting(
        stripped, "", "CA that client certificates must chain to (mTLS; a path or the PEM text)"
    )
    role_map: str = setting(
        stripped,
        "",
        "caller role → Postgres role, set with `SET LOCAL ROLE` per transaction: JSON or"
        " `caller=role,…` (`*` patterns)",
        live=True,
    )
    default_role: str = setting(
        stripped,
        "",
        "Postgres role of callers the role map does not name (else they are refused)",
        live=True,
    )
    session_audit: str = setting(
        lowercase,
        "opaque",
        "session checks: `opaque` (settings reset and the session probed behind every COMMIT,"
        " in the same round trip; a full audit query after `DO`, `CALL`, a non-built-in"
        " function or unparsed SQL), `always` (the full audit after every request too) or"
        " `off` (neither)",
        choices=SESSION_AUDIT_MODES,
        live=True,
    )
    idempotency_ttl: float = setting(
        duration,
        86400.0,
        "seconds an idempotency key (exactly-once retries, docs/broker.md) is kept; a"
        " background sweep deletes expired keys",
        check=positive,
    )
    max_statements: int = setting(
        integer, 1000, "statements per request (0: no limit)", check=at_least(0), live=True
    )
    max_request_bytes: int = setting(
        size, 8 * MIB, "encoded size of a request (0: no limit)", check=at_least(0)
    )
    max_result_rows: int = setting(
        integer,
        1_000_000,
        "rows of all buffered results of one request (streamed rows: no limit; 0: no limit)",
        check=at_least(0),
        live=True,
    )
    max_result_bytes: int = setting(
        size,
        32 * MIB,
        "encoded size of all buffered results of one request (streamed rows: no limit; 0: no"
        " limit)",
        check=at_least(0),
        live=True,
    )
    object_allocator: str = setting(
        lowercase,
        "malloc",
        "allocator of Python objects: `malloc` (the broker restarts itself at start with"
        " `PYTHONMALLOC=malloc`, so memory goes back after big results) or `pymalloc`"
        " (Python's own: less CPU per request, but ~30 MB stays after big results;"
        " docs/performance.md); an explicit `PYTHONMALLOC` wins",
        choices=OBJECT_ALLOCATORS,
    )
    event_loop: str = setting(
        lowercase,
        "uvloop",
        "the asyncio event loop that runs gRPC and the pool: `uvloop` (libuv, less CPU per"
        " call: docs/performance.md) or `asyncio` (the standard library's)",
        choices=EVENT_LOOPS,
    )
    max_inflight_per_caller: int = setting(
        integer,
        DERIVED,
        "running + queued requests of one identity and Lambda function (0: no limit)",
        check=at_least(0),
        derive=_half_of_admitted,
        shown_default="half of `pool_size + max_waiting` ({})",
        live=True,
    )
    queue_weights: str = setting(
        stripped,
        "",
        "share of queued turns per caller when several wait: JSON or `pattern=weight,…` over"
        " function names or identities (`*` patterns; others weigh 1)",
        live=True,
    )
    aws_region: str = setting(
        stripped,
        "",
        "the task's region, for the regional STS endpoint and RDS IAM tokens (set by ECS)",
        flag=False,
        env=("AWS_REGION", "AWS_DEFAULT_REGION"),
    )
    worker: tuple[int, int, int, str] | None = setting(
        worker_marker,
        None,
        "set by the supervisor in each worker's environment (broker/front/workers.py)",
        env=("_PGBROKER_WORKER",),
        internal=True,
    )

    @property
    def listen_host(self) -> str:
        return self.listen_address[0]

    @property
    def listen_port(self) -> int:
        return self.listen_address[1]

    @property
    def listen(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.listen_port}"


def _row(declared: Field[Any]) -> Setting:
    spec: Setting = declared.metadata["setting"]
    name = spec.name or declared.name
    env = spec.env or (ENV_PREFIX + name.upper(),)
    return replace(spec, name=name, attribute=declared.name, env=env)


SETTINGS: tuple[Setting, ...] = tuple(_row(declared) for declared in fields(Settings))
_BY_NAME = {spec.name: spec for spec in SETTINGS}


def named(name: str) -> Setting:
    """The declared setting *name* (``pool_size``); raise KeyError if there is none."""
    return _BY_NAME[name]


# -------------------------------------------------------------------------------- resolving


class _Resolver:
    """Looks each setting up (a reload's override, flag, environment, ``PGBROKER_CONFIG_FILE``,
    then default) and collects problems."""

    def __init__(
        self,
        flags: Mapping[str, Any],
        environ: Mapping[str, str],
        overrides: Mapping[str, str] | None = None,
    ) -> None:
        self.flags = flags
        self.environ = environ
        self.overrides = overrides or {}
        self.problems: list[str] = []
        self.file_path = ""
        self.file: dict[str, str] = {}
        path = self.raw(_BY_NAME["config_file"])[0]
        if path:
            self.file_path = path.strip()
            try:
                self.file = read_config_file(self.file_path)
            except (OSError, ValueError) as exc:
                self.problems.append(f"PGBROKER_CONFIG_FILE={self.file_path!r}: {exc}")

    def raw(self, spec: Setting) -> tuple[str | None, str]:
        """The text of *spec* and where it came from (for messages)."""
        override = self.overrides.get(spec.name)
        if override is not None:
            return override, f"{spec.name} (reload override)"
        flag = self.flags.get(spec.name)
        if flag is not None:
            return str(flag), "--" + spec.name.replace("_", "-")
        for variable in spec.env:
            text = self.environ.get(variable)
            if text:
                return text, variable
        for variable in spec.env:
            text = self.file.get(variable)
            if text:
                return text, f"{variable} (in {self.file_path})"
        return None, spec.variable

    def origin(self, spec: Setting) -> str:
        """Where *spec*'s value comes from: ``override``, ``flag``, ``environment``,
        ``file`` or ``default``."""
        if spec.name in self.overrides:
            return "override"
        if self.flags.get(spec.name) is not None:
            return "flag"
        if any(self.environ.get(variable) for variable in spec.env):
            return "environment"
        if any(self.file.get(variable) for variable in spec.env):
            return "file"
        return "default"

    def value(self, spec: Setting) -> Any:
        """The parsed and checked value; on a problem, the default (None for a derived one).
        `DERIVED` when the setting is not given and *derive* must compute it."""
        text, source = self.raw(spec)
        if text is None:
            return spec.default
        try:
            value = spec.parse(text)
            problem = spec.check(value) if spec.check else None
        except ValueError as exc:
            problem = str(exc)
        if problem:
            # PGBROKER_POOL_SIZE='0' (in /etc/pgbroker.env): must be at least 1
            name, _, where = source.partition(" (")
            where = f" ({where}" if where else ""
            self.problems.append(f"{name}={spec.shown(text)}{where}: {problem}")
            return None if spec.default is DERIVED else spec.default
        return value

    def derive(self, spec: Setting, values: Mapping[str, Any]) -> Any:
        assert spec.derive is not None
        try:
            return spec.derive(values)
        except ValueError as exc:
            self.problems.append(f"{self.raw(spec)[1]} {exc}")
            return None


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve every setting (explicit flag > ``PGBROKER_*`` env > ``PGBROKER_CONFIG_FILE`` >
    default) and validate it.

    *flags* maps setting names (``pool_size``) to values; ``None`` means "not given". *environ*
    defaults to the process environment. *overrides* (a reload's ``key=value``, by setting
    name) win over everything. Raise `ConfigError` with one message per bad or missing value,
    and TypeError for a name in *flags* that is no setting (a caller's bug).
    """
    flags = flags or {}
    unknown = sorted(set(flags) - set(_BY_NAME))
    if unknown:
        raise TypeError(f"unknown settings {unknown}")
    r = _Resolver(flags, os.environ if environ is None else environ, overrides)
    settings = Settings(**_values(r))  # a refused value is its default (or None) until the end
    for check in _CROSS_CHECKS:
        check(settings, r)
    if r.problems:
        raise ConfigError(r.problems)
    return settings


def lookup(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """One setting from the environment (or its default), as `load_settings` would read it.

    Raise `ConfigError` with one line when its value is bad, or when it has no default.
    """
    spec = _BY_NAME[name]
    r = _Resolver({}, os.environ if environ is None else environ)
    r.problems.clear()  # a bad file line about another setting is not this one's problem
    value = r.value(spec)
    if value is DERIVED:
        r.problems.append(f"{spec.variable} is not set")
    if r.problems:
        raise ConfigError(r.problems)
    return value


def origins(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Where each setting's value comes from (`_Resolver.origin`), by setting name."""
    r = _Resolver(flags or {}, os.environ if environ is None else environ, overrides)
    return {spec.name: r.origin(spec) for spec in SETTINGS}


def read_config_file(path: str) -> dict[str, str]:
    """The ``PGBROKER_*=value`` lines of *path* (``PGBROKER_CONFIG_FILE``), by variable.

    The format of a Docker or ECS environment file: one ``NAME=value`` per line, blank lines
    and ``#`` comments ignored, an optional ``export`` and a value in matching single or
    double quotes taken as it is. Raise OSError if the file cannot be read, ValueError naming
    the line for a malformed line or a name that is no setting (a typo must not pass as a
    default)."""
    known = {variable: spec for spec in SETTINGS if not spec.internal for variable in spec.env}
    values: dict[str, str] = {}
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            name, sep, value = text.removeprefix("export ").partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name:
                raise ValueError(f"line {number}: not NAME=value")
            if name not in known or name == "PGBROKER_CONFIG_FILE":
                raise ValueError(f"line {number}: {name} is not a setting")
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[name] = value
    return values


def default_values() -> dict[str, Any]:
    """Every setting's value when nothing is set; a required one is None."""
    return _values(_Resolver({}, {}))


def _values(r: _Resolver) -> dict[str, Any]:
    """Every setting's value by attribute; derived ones after the others."""
    values = {spec.attribute: r.value(spec) for spec in SETTINGS}
    for spec in SETTINGS:
        if values[spec.attribute] is DERIVED:
            values[spec.attribute] = r.derive(spec, values)
    return values


# ------------------------------------------------------------------- checks across settings


def _check_workers(settings: Settings, r: _Resolver) -> None:
    if settings.workers is None or settings.pool_size is None:  # refused already
        return
    if settings.workers > settings.pool_size:
        source = r.raw(_BY_NAME["workers"])[1]
        r.problems.append(
            f"{source}={settings.workers}: more workers than pool_size {settings.pool_size} "
            "(each worker holds at least one of the pool_size connections); "
            "raise PGBROKER_POOL_SIZE or lower PGBROKER_WORKERS"
        )


def _check_auth_listen(settings: Settings, r: _Resolver) -> None:
    if settings.auth == "none" and not is_loopback(settings.listen_host):
        source = r.raw(_BY_NAME["auth"])[1]
        r.problems.append(
            f"{source}=none is only allowed on a loopback listener, not {settings.listen_host!r}"
        )


def _check_tls(settings: Settings, r: _Resolver) -> None:
    if bool(settings.tls_cert) != bool(settings.tls_key):
        r.problems.append("PGBROKER_TLS_CERT and PGBROKER_TLS_KEY must be set together")
    if settings.tls_client_ca and not settings.tls_cert:
        r.problems.append("PGBROKER_TLS_CLIENT_CA (mTLS) needs PGBROKER_TLS_CERT and _KEY")


def _check_role_map(settings: Settings, r: _Resolver) -> None:
    from broker.security.roles import RoleMap

    try:
        RoleMap.parse(settings.role_map, settings.default_role)  # problems now, not at start
    except ValueError as exc:
        r.problems.append(str(exc))


def _check_queue_weights(settings: Settings, r: _Resolver) -> None:
    from broker.security.limits import QueueWeights

    try:
        QueueWeights.parse(settings.queue_weights)
    except ValueError as exc:
        r.problems.append(str(exc))


def _check_authenticator(settings: Settings, r: _Resolver) -> None:
    if settings.auth not in ("iam", "token"):
        return
    from broker.security.auth import authenticator_for_settings

    try:
        authenticator_for_settings(settings)
    except ValueError as exc:
        r.problems.append(str(exc))


def _check_database_credentials(settings: Settings, r: _Resolver) -> None:
    if settings.database_iam_auth and settings.database_secret_id:
        r.problems.append(
            "PGBROKER_DATABASE_IAM_AUTH and PGBROKER_DATABASE_SECRET_ID exclude each other"
        )


def _check_admin(settings: Settings, r: _Resolver) -> None:
    if settings.admin_roles and settings.auth != "iam":
        r.problems.append("PGBROKER_ADMIN_ROLES (IAM roles) needs PGBROKER_AUTH=iam")
    from broker.security.admin import admin_authenticator_for_settings

    try:
        admin_authenticator_for_settings(settings)
    except ValueError as exc:
        r.problems.append(str(exc))


def _check_routing_hook(settings: Settings, r: _Resolver) -> None:
    if not settings.routing_hook:
        return
    module, colon, function = settings.routing_hook.partition(":")
    if not (module.strip() and colon and function.strip()):
        r.problems.append(
            f"PGBROKER_ROUTING_HOOK={settings.routing_hook!r}: must be module:function,"
            " e.g. myapp.routing:route"
        )


_CROSS_CHECKS: tuple[Callable[[Settings, _Resolver], None], ...] = (
    _check_workers,
    _check_auth_listen,
    _check_tls,
    _check_role_map,
    _check_queue_weights,
    _check_authenticator,
    _check_database_credentials,
    _check_admin,
    _check_routing_hook,
)


# ----------------------------------------------------------------------------- documentation


def shown_default(spec: Setting) -> str:
    """The default as the README and ``--help`` show it (Markdown); ``—`` when there is none.
    A ``{}`` in a declared text is the derived value when nothing else is set."""
    value = spec.default
    if spec.shown_default:
        return spec.shown_default.format(default_values()[spec.attribute])
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if spec.parse is size and value and value % MIB == 0:
        return f"`{value // MIB}MiB`"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    return f"`{value}`" if value else "—"


def meaning(spec: Setting) -> str:
    """What the setting does (Markdown), with its PgBouncer equivalent."""
    if spec.pgbouncer:
        return f"{spec.help} (PgBouncer's `{spec.pgbouncer}`)"
    return spec.help


def markdown_table() -> str:
    """The README's settings table (section "The broker"), one row per public setting; its
    last column says whether ``reload`` changes the setting live or it needs a restart."""
    lines = [
        "| variable | flag | meaning | default | on reload |",
        "| --- | --- | --- | --- | --- |",
    ]
    for spec in SETTINGS:
        if spec.internal:
            continue
        variable = " or ".join(f"`{name}`" for name in spec.env)
        option = f"`{spec.option}`" if spec.option else "—"
        reload = "live" if spec.live else "restart"
        lines.append(
            f"| {variable} | {option} | {meaning(spec)} | {shown_default(spec)} | {reload} |"
        )
    return "\n".join(lines) + "\n"
