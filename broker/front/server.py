"""The grpc.aio server: Broker + grpc.health.v1 + reflection, keepalive, graceful shutdown.

Start: bind the port, open the pool (exit if no database connection within
``connect_timeout``), log ``listening on HOST:PORT`` (a JSON line with ``port``), report
SERVING once every pooled connection is open.

Operator controls (broker/front/admin.py): SIGHUP reloads the live settings
(broker/front/reload.py), SIGUSR1 pauses and SIGUSR2 resumes, as in PgBouncer; the same
controls are the ``pgbroker.v1.Admin`` RPCs, behind the admin identity
(broker/security/admin.py).

Shutdown (SIGTERM/SIGINT, what ECS sends): health NOT_SERVING → stop accepting new RPCs →
in-flight requests finish within ``shutdown_grace`` seconds (then they are cancelled and their
backend queries with them) → close the pool → exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import grpc
from aws_lambda_powertools import Logger
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from broker.config import Settings
from broker.flow.keysweep import KeySweeper, sweep_interval
from broker.flow.routing import load_hook
from broker.front.admin import SIGNALS, AdminService, Controls
from broker.front.fdlimit import DescriptorWatch, raise_nofile
from broker.front.memory import MemoryTrimmer, tune_gc, tune_malloc
from broker.front.metrics import MetricsPublisher
from broker.front.reload import Reloader
from broker.front.replicas import Replicas, connect_for, monitor_connections
from broker.front.service import BrokerService
from broker.front.siblings import Siblings
from broker.front.stream import StreamService, stream_handler
from broker.front.transact import TransactService, transact_handler
from broker.front.workers import WorkerRole, log_listening, worker_pool_size
from broker.pooling.pool import Pool
from broker.pooling.targets import Target, TargetSet
from broker.postgres.audit import read_builtin_functions
from broker.postgres.budget import BudgetExceeded, BudgetProbe
from broker.postgres.credentials import credentials_for
from broker.postgres.keys import store_status
from broker.postgres.probe import FirstConnectionProbe
from broker.security import tls
from broker.security.admin import admin_authenticator_for_settings
from broker.security.auth import authenticator_for_settings
from broker.security.gate import AuthGate
from broker.security.identity import AuthStats
from broker.security.limits import Limits, QueueWeights
from broker.security.roles import RoleMap
from broker.security.tarpit import Tarpit
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

__all__ = ["BrokerServer", "pending_calls_limit", "serve", "setup_logging"]

_T = TypeVar("_T")

log = logging.getLogger("pgbroker.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Broker"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name
# Settings a reload hands to the callers' authenticator (rebuilt when one changes).
_AUTH_SETTINGS = ("tokens", "tokens_secret_id", "iam_allowed_roles")
# Seconds between reporting NOT_SERVING and refusing calls, when clients watch health.
SHUTDOWN_DRAIN = 0.5


def setup_logging(level: str = "INFO") -> Logger:
    """JSON lines on stdout via Powertools' Logger (service "pgbroker"); module loggers
    (``pgbroker.pool``, …) propagate into it. Never pass secrets in ``extra``."""
    return Logger(service="pgbroker", level=level, stream=sys.stdout)


def grpc_options(settings: Settings) -> list[tuple[str, int]]:
    """Server channel options: keepalive and max connection age (clients rebalance)."""
    return [
        # Ping idle clients so connections from frozen/dead Lambda sandboxes are reaped.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept client keepalive pings as often as every 10 s without calls in flight.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # No BDP probe: gRPC sends a PING with the first data after an idle spell to size its
        # receive window, so nearly every call of a Lambda (one after an idle spell) cost a
        # PING and its ACK each way. A fixed 4 MiB window instead: the default 64 KiB
        # without the probe made a 6 MiB request over an 11 ms round trip 1.6x slower
        # (docs/performance.md). The client's channel options do the same.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 4 << 20),
        # GOAWAY after this age so clients re-resolve and spread onto new replicas.
        ("grpc.max_connection_age_ms", int(settings.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace * 1000)),
        # Never share a port with another process (a second broker must fail to bind), except
        # with --workers N > 1, whose workers share it on purpose (broker/front/workers.py).
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        # Above PGBROKER_MAX_REQUEST_BYTES, so a request just over it gets the broker's
        # LIMIT_EXCEEDED message instead of gRPC's.
        ("grpc.max_receive_message_length", limits_for(settings).grpc_max_receive_bytes()),
        # Calls gRPC has received but the event loop has not picked up yet (grpc.aio takes
        # them one at a time): past 1,000 of them gRPC cancels new calls at random
        # (random early detection), all of them past 3,000, and the client sees a bare
        # CANCELLED it cannot retry safely. A burst of new Lambda sandboxes (a call plus a
        # health watch each) crosses that while the loop is busy. The broker's own queue
        # (PGBROKER_MAX_WAITING → QUEUE_FULL with RetryInfo) must be the limit that bites.
        ("grpc.server.max_pending_requests", pending_calls_limit(settings)),
        ("grpc.server.max_pending_requests_hard_limit", 2 * pending_calls_limit(settings)),
    ]


def pending_calls_limit(settings: Settings) -> int:
    """How many received calls gRPC may hold for the event loop before it starts cancelling
    them: a health watch and a call for each of ``max_waiting`` waiting callers and the pool,
    twice over, and never below gRPC's default (1,000)."""
    return max(1000, 4 * (settings.max_waiting + settings.pool_size))


def limits_for(settings: Settings) -> Limits:
    """The request/result limits of *settings* (broker/security/limits.py)."""
    return Limits(
        max_statements=settings.max_statements,
        max_request_bytes=settings.max_request_bytes,
        max_result_rows=settings.max_result_rows,
        max_result_bytes=settings.max_result_bytes,
        max_inflight_per_caller=settings.max_inflight_per_caller,
    )


class _HandlerRecorder:
    """Stands in for a server to `add_BrokerServicer_to_server`: keeps the method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers.update(handlers)


def broker_method_handlers(
    servicer: Any,
    add: Callable[[Any, Any], None] = pb_grpc.add_BrokerServicer_to_server,
) -> dict[str, grpc.RpcMethodHandler]:
    """The generated method handlers of *servicer*, by method name (``Execute``, …); *add* is
    the generated ``add_…Servicer_to_server`` of its service."""
    recorder = _HandlerRecorder()
    add(servicer, recorder)
    if not recorder.handlers:
        raise RuntimeError("generated code did not register method handlers")
    return recorder.handlers


class BrokerServer:
    """One broker process: the pool, the gRPC server and their lifecycle."""

    def __init__(
        self,
        settings: Settings,
        worker: WorkerRole | None = None,
        *,
        flags: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """*flags* and *environ* are what *settings* were resolved from (the command line's
        flags; the process environment when None): a reload resolves them again."""
        if worker is not None:
            settings = worker.apply(settings)
        # Built first: a restarted worker starts with the overrides of the last reload.
        self.reloader = Reloader(
            settings, flags, environ=environ, adjust=worker.apply if worker is not None else None
        )
        if worker is not None:
            settings = self.reloader.restore(
                worker.overrides_in_effect(), why=f"worker {worker.index}"
            )
        self.settings = settings
        self.worker = worker
        self.worker_index = worker.index if worker is not None else 0
        self.flags, self.environ = flags, environ
        self.port = 0
        self.phase = "created"  # what start() is doing, for a SIGTERM during it
        self.pool = self._pool(settings)
        self.targets = TargetSet(Target("primary", self.pool))
        # The read replicas, their monitor and the routing (broker/front/replicas.py).
        self.replicas = Replicas(settings, self.credentials, self.budget_probe, self.targets)
        self.router = self.replicas.router
        self.metrics: MetricsPublisher | None = None
        # Caller authentication (broker/security/): Broker methods only; health stays open.
        self.auth_stats = AuthStats()
        self.authenticator = authenticator_for_settings(settings, self.auth_stats)
        self.service = BrokerService(
            self.pool,
            settings.statement_timeout,
            limits=limits_for(settings),
            auth_stats=self.auth_stats,
            role_map=RoleMap.parse(settings.role_map, settings.default_role),
            session_audit=settings.session_audit,
            idempotency_ttl=settings.idempotency_ttl,
            router=self.router,
        )
        self.key_sweeper = KeySweeper(self.pool, sweep_interval(settings.idempotency_ttl))
        self.transact = TransactService(
            self.service,
            idle_transaction_timeout=settings.idle_transaction_timeout,
            transaction_timeout=settings.transaction_timeout,
        )
        self.service.stats_sources.append(self.transact.get_stats)
        self.stream = StreamService(
            self.service,
            idle_timeout=settings.idle_transaction_timeout,
            stats=self.service.stream_stats,
        )
        if worker is not None:
            self.service.extra_stats = {
                "worker": worker.index,
                "workers": settings.workers,
                "worker_pid": os.getpid(),
            }
        self._serving_task: asyncio.Task[None] | None = None
        self._descriptor_watch: DescriptorWatch | None = None
        # Gives freed result memory back to the kernel (broker/front/memory.py).
        self.trimmer = MemoryTrimmer()
        self._stopped = asyncio.Event()
        self._controls()
        self.siblings = self._siblings()

    def _controls(self) -> None:
        """PAUSE/RESUME/RELOAD (broker/front/admin.py) and the operators' authenticator."""
        settings, worker = self.settings, self.worker
        self.admin_auth = admin_authenticator_for_settings(
            settings, self.authenticator, self.auth_stats
        )
        self.gate: AuthGate | None = None
        self.admin_gate: AuthGate | None = None
        self.reloader.add_applier(self._apply_settings, check=self._check_budget)
        replicas = self.replicas
        self.reloader.add_applier(replicas.apply, check=replicas.check, undo=replicas.undo)
        supervisor = os.getppid() if worker is not None else None
        self.controls = Controls(self.pool, self.reloader, supervisor)
        if worker is not None:
            # The broker's state, for this worker (a restart) and for those that start later.
            self.controls.record = worker.record_overrides
            if worker.starts_paused():
                self.controls.pause(f"worker {worker.index} started while the broker is paused")
        self.admin = AdminService(
            self.controls, self.service.get_stats, self.service.inflight, self.transact.holds
        )

    async def _reload_from_sibling(self, overrides: dict[str, str]) -> str:
        """A sibling's reload with key=value overrides reaching this worker (--workers N)."""
        outcome = await self.controls.reload(overrides, why="forwarded by a sibling worker")
        return outcome.message

    def _siblings(self) -> Siblings | None:
        """With --workers N: GetStats and ShowCallers answer for every worker
        (broker/front/siblings.py)."""
        worker = self.worker
        if worker is None or not worker.sibling_dir or self.settings.workers < 2:
            return None
        siblings = Siblings(
            worker.sibling_dir,
            worker.index,
            self.settings.workers,
            self.service.get_stats,
            self.admin.own_callers,
            self._reload_from_sibling,
        )
        self.service.siblings = self.admin.siblings = siblings
        return siblings

    def _check_budget(self, old: Settings, new: Settings) -> None:
        """A larger pool must fit the connection budget read at start (as start() checks;
        the replica monitor's connection there is checked with the replicas'), and a smaller
        one must leave each running worker a connection."""
        if new.pool_size < old.workers:  # the running workers stay: old.workers
            raise ValueError(
                f"PGBROKER_POOL_SIZE={new.pool_size}: fewer connections than the"
                f" {old.workers} workers running (each needs one); restart to change the"
                " number of workers"
            )
        if new.pool_size <= old.pool_size or self.budget_probe.budget is None:
            return
        try:
            self.budget_probe.check(new.pool_size + monitor_connections(new), new.max_replicas)
        except BudgetExceeded as exc:
            raise ValueError(f"PGBROKER_POOL_SIZE={new.pool_size}: {exc}") from None

    def _apply_settings(self, old: Settings, new: Settings) -> None:
        """A reload's live settings, into the pool, the services and the authenticators."""
        self.settings = new
        self.pool.reconfigure(
            size=worker_pool_size(new, self.worker_index),
            max_waiting=new.max_waiting,
            queue_timeout=new.queue_timeout,
            max_lifetime=new.max_lifetime,
            weights=QueueWeights.parse(new.queue_weights),
        )
        service = self.service
        service.statement_timeout = new.statement_timeout
        service.limits = limits_for(new)
        service.inflight.limit = new.max_inflight_per_caller
        service.role_map = RoleMap.parse(new.role_map, new.default_role)
        service.session_audit = new.session_audit
        self.transact.idle_transaction_timeout = new.idle_transaction_timeout
        self.transact.transaction_timeout = new.transaction_timeout
        self.stream.idle_timeout = new.idle_transaction_timeout
        logging.getLogger("pgbroker").setLevel(new.log_level)
        # A token secret is re-read by the new authenticator on its first call.
        if new.tokens_secret_id or any(
            getattr(old, name) != getattr(new, name) for name in _AUTH_SETTINGS
        ):
            self.authenticator = authenticator_for_settings(new, self.auth_stats)
            if self.gate is not None:
                self.gate.authenticator = self.authenticator
        self.admin_auth = admin_authenticator_for_settings(new, self.authenticator, self.auth_stats)
        if self.admin_gate is not None:
            self.admin_gate.authenticator = self.admin_auth

    def _pool(self, settings: Settings) -> Pool:
        """The pool, connecting with *settings*' credentials through the first-connection
        probes."""
        # Credentials from the URL, a Secrets Manager secret or RDS IAM
        # (broker/postgres/credentials.py).
        self.credentials = credentials_for(settings)
        connect = connect_for(self.credentials, settings)
        # Read on the first connection: max_connections (start() checks the budget with it)
        # and pg_catalog's function names (calls of other functions get the session audited).
        # And the idempotency-key store (created if missing: broker/postgres/keys.py).
        self.store_probe = FirstConnectionProbe(connect, store_status)
        self.functions_probe = FirstConnectionProbe(self.store_probe, read_builtin_functions)
        self.budget_probe = BudgetProbe(self.functions_probe)
        return Pool(
            self.budget_probe,
            size=worker_pool_size(settings, self.worker_index),
            max_waiting=settings.max_waiting,
            queue_timeout=settings.queue_timeout,
            max_lifetime=settings.max_lifetime,
            weights=QueueWeights.parse(settings.queue_weights),
            pg_io=settings.pg_io,
        )

    def _build(self) -> None:
        # grpc.aio objects bind to the running event loop: build them inside it.
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(options=grpc_options(self.settings))
        # The Broker's handlers authenticate each call themselves (wrapped once here), so no
        # interceptor runs per call; health and reflection stay open.
        # One tarpit for both services: an address's refusals count together.
        tarpit = Tarpit(hold=self.settings.auth_refusal_hold)
        self.gate = gate = AuthGate(self.authenticator, self.auth_stats, tarpit=tarpit)
        methods = broker_method_handlers(self.service)
        methods["Transact"] = transact_handler(self.transact)  # broker/front/transact.py
        methods["Stream"] = stream_handler(self.stream)  # broker/front/stream.py
        gate.add_service(self.server, SERVICE_NAME, methods)
        # The operators' service, behind the admin identity only (broker/security/admin.py).
        self.admin_gate = AuthGate(self.admin_auth, self.auth_stats, tarpit=tarpit)
        admin = broker_method_handlers(self.admin, pb_grpc.add_AdminServicer_to_server)
        self.admin_gate.add_service(self.server, ADMIN_SERVICE_NAME, admin)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.server,
        )

    async def start(self) -> int:
        """Bind, open the pool and start serving; return the bound port.

        Raise `broker.pooling.pool.PoolUnavailable` if no database connection opens within
        ``connect_timeout`` seconds, RuntimeError if the address cannot be bound.
        """
        settings = self.settings
        self.phase = "building the server"
        # Before any socket opens: the soft open-file limit up to the hard one, and a warning
        # with the arithmetic if it cannot hold the callers (broker/front/fdlimit.py).
        descriptors = raise_nofile(
            settings.max_waiting, worker_pool_size(settings, self.worker_index)
        )
        self._build()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.phase = f"binding {settings.listen}"
        credentials = tls.server_credentials(settings)
        if credentials is not None:
            self.port = self.server.add_secure_port(settings.listen, credentials)
        else:
            self.port = self.server.add_insecure_port(settings.listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {settings.listen}")
        # One connection first: an over-budget pool is refused before it opens the rest.
        self.phase = "connecting to the database"
        # Said before the wait (up to connect_timeout), so a start that seems stuck says why.
        log.info("connecting to the database", extra={"timeout_s": settings.connect_timeout})
        await self.pool.open(wait="first", timeout=settings.connect_timeout, fill=False)
        # The total over all workers (pool_size), not this worker's share.
        self.budget_probe.check(
            settings.pool_size + monitor_connections(settings), settings.max_replicas
        )
        self.router.hook = load_hook(settings.routing_hook)
        self._learn_builtin_functions()
        self._check_key_store()
        self.pool.fill()
        if self.targets.replicas:
            self.phase = "connecting to the read replicas"
            await self.replicas.open()
        self.phase = "starting the gRPC server"
        await self.server.start()
        if descriptors is not None:
            self._descriptor_watch = DescriptorWatch(descriptors.soft)
            self._descriptor_watch.start()
        self.trimmer.start()
        if self.siblings is not None:
            await self.siblings.start()
        # With --workers N, worker 0 publishes the figures of all of them (the dashboard and
        # the autoscaling read one broker task as one publisher).
        if settings.metrics_interval > 0 and (self.worker is None or self.worker.index == 0):
            collect = self.siblings.parts if self.siblings is not None else None
            self.metrics = MetricsPublisher(
                self.service.get_stats,
                settings.metrics_interval,
                collect=collect,
                workers=settings.workers if collect is not None else 1,
            )
            self.metrics.start()
        self._serving_task = asyncio.create_task(self._serve_when_filled())
        if self.worker is not None:
            self._log_worker_started()
            self.worker.report_ready()  # the supervisor logs "listening on" for all workers
            return self.port
        log_listening(settings, self.port, self.flags, self.environ)
        return self.port

    def _learn_builtin_functions(self) -> None:
        probe = self.functions_probe
        if probe.value is None:
            log.warning(
                "cannot read pg_catalog's function names; every function call is audited",
                extra={"error": probe.error},
            )
        self.service.known_functions = probe.value

    def _check_key_store(self) -> None:
        probe = self.store_probe
        error = probe.error if probe.value is None else probe.value
        self.service.key_store_error = error or ""
        if error:
            log.warning(
                "idempotency keys unavailable: keyed requests are refused (FAILED_PRECONDITION,"
                " IDEMPOTENCY_UNAVAILABLE) and clients send them without a key",
                extra={"error": error},
            )
        else:
            self.key_sweeper.start()

    def _log_worker_started(self) -> None:
        assert self.worker is not None
        log.info(
            "worker %d of %d serving on %s:%d",
            self.worker.index,
            self.settings.workers,
            self.settings.listen_host,
            self.port,
            extra={
                "worker": self.worker.index,
                "pool_size": worker_pool_size(self.settings, self.worker_index),
            },
        )

    async def _serve_when_filled(self) -> None:
        await self.pool.wait_filled()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("pool filled, health SERVING", extra={"pool_size": self.pool.size})

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, stop accepting, let in-flight work finish within *grace*
        seconds (default ``shutdown_grace``), then close the pool."""
        if self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace if grace is None else grace
        log.info("shutting down", extra={"grace_s": grace, **self._inflight()})
        if self._serving_task is not None:
            self._serving_task.cancel()
        await self.health.enter_graceful_shutdown()
        if self._health_watchers():
            # Clients that watch health (lambda_client's round-robin) stop picking this replica
            # once they see NOT_SERVING; give them that moment before calls are refused, since
            # grpc cancels calls that race server.stop() (CANCELLED, grpc/grpc#41785).
            await asyncio.sleep(min(SHUTDOWN_DRAIN, grace))
        await self.server.stop(grace)
        if self.metrics is not None:
            await self.metrics.stop()
        if self.siblings is not None:
            if self.metrics is None and self.settings.metrics_interval > 0:
                await self.siblings.linger(0)  # worker 0 publishes this worker's figures too
            await self.siblings.stop()
        await self.key_sweeper.stop()
        if self._descriptor_watch is not None:
            await self._descriptor_watch.stop()
        await self.trimmer.stop()
        await self.replicas.close()
        await self.pool.close()
        self._stopped.set()
        log.info("stopped")

    def _health_watchers(self) -> int:
        """Open ``Health.Watch`` streams (grpc_health keeps no public count: assume one)."""
        counts = getattr(self.health, "_watcher_count_by_service", None)
        return sum(counts.values()) if isinstance(counts, dict) else 1

    def _inflight(self) -> dict[str, int]:
        stats = self.pool.get_stats()
        return {k: stats[k] for k in ("pool_active", "requests_waiting")}


async def serve(
    settings: Settings, worker: WorkerRole | None = None, flags: Mapping[str, Any] | None = None
) -> int:
    """Run a broker (or one *worker* of a ``--workers N`` broker) until SIGTERM/SIGINT;
    return the process exit code. SIGHUP reloads, SIGUSR1 pauses, SIGUSR2 resumes
    (broker/front/admin.py); *flags* are the command line's, for reloads."""
    # Python's GIL switch interval stays at its 5 ms default; it is 1 ms only while a heavy
    # request is analysed on a parser thread (broker/sql/stack.py: 1 ms all the time cost a
    # third of W2's throughput, docs/performance.md).
    tune_malloc()  # before the pool's threads allocate (broker/front/memory.py)
    server = BrokerServer(settings, worker, flags=flags)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for sig in SIGNALS:
        loop.add_signal_handler(sig, server.controls.on_signal, sig)
    # A signal during start-up (waiting for the database may take connect_timeout) stops
    # the start at once rather than after it.
    starting = asyncio.create_task(server.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(BaseException):
            await starting
        await _abandon_start(server)
        log.info(
            "stopped during start-up, while %s; nothing was serving",
            server.phase,
            extra={"phase": server.phase},
        )
        # A connection attempt blocked in a pool thread (a database that accepts and never
        # answers) would hold the interpreter's exit, which joins those threads, for up to
        # connect_timeout. Nothing was serving and nothing is left to save: leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    stopped.cancel()
    if (exc := starting.exception()) is not None:
        await _abandon_start(server)
        print(f"pgbroker: cannot start: {exc}", file=sys.stderr)
        return 1
    tune_gc()  # serving: what start-up allocated stays (broker/front/memory.py)
    await stop.wait()
    await server.stop()
    return 0


async def _abandon_start(server: BrokerServer) -> None:
    """Close what a start that did not finish opened."""
    with contextlib.suppress(Exception):
        await server.replicas.close()
    with contextlib.suppress(Exception):
        await server.pool.close()
    with contextlib.suppress(Exception):
        await server.server.stop(0)
    if server.siblings is not None:
        with contextlib.suppress(Exception):
            await server.siblings.stop()


def new_event_loop(settings: Settings) -> asyncio.AbstractEventLoop:
    """A new event loop of the kind ``settings.event_loop`` names. uvloop (libuv, written in
    Cython) runs grpc.aio's per-call callbacks and the pool's hand-offs with less CPU than the
    standard library's selector loop (docs/performance.md, "A/B: uvloop")."""
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(settings: Settings, main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)`` on the event loop ``settings.event_loop`` names."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(settings)) as runner:
        return runner.run(main)
