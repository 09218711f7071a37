"""``--workers N``: N broker processes sharing one listen port (``SO_REUSEPORT``).

One broker process runs all gRPC work on one event loop, about one core at ~1,000 RPC/s
(docs/performance.md). With ``PGBROKER_WORKERS=N`` (N > 1) the process started by
``python -m broker run`` becomes a supervisor:

* it has validated the settings already (bad ones: exit 2 before any child starts);
* it reserves the listen address with a socket bound with ``SO_REUSEPORT`` (port 0: the kernel
  picks a free port, which every worker then binds; the reservation is never listened on, so the
  kernel hands it no connection, and a process without ``SO_REUSEPORT`` cannot take the port);
* it starts N children with its own command line and environment plus the ``_PGBROKER_WORKER``
  marker (index, concrete port, a pipe to report readiness), so they serve instead of forking.
  Each child binds the address with ``grpc.so_reuseport=1`` and holds ``pool_size // N``
  server connections (the first ``pool_size % N`` one more); the kernel spreads new client
  connections over them;
* once every worker has started it logs ``listening on HOST:PORT`` once, with the real port;
* it forwards SIGTERM/SIGINT to the workers, waits for them to drain and exits 0 when all of
  them exited 0;
* it forwards SIGHUP (reload), SIGUSR1 (pause) and SIGUSR2 (resume) to every worker, logging
  each; a worker that gets an Admin RPC sends the signal to the supervisor, so a control
  reaches all of them (broker/front/admin.py);
* a worker started later (a restart) starts in the broker's current state, so the workers
  never differ silently: paused if the broker is paused (the supervisor keeps a ``paused``
  marker in its directory while it is), and with the ``reload key=value`` overrides in effect
  (each worker that reloads records its overrides there, `WorkerRole.record_overrides`; a
  plain reload that succeeds clears them, as it does in the running workers; a worker applies
  them at start as the reload did, all or nothing, logged: `Reloader.restore`). A control that
  comes while a worker starts is sent to it once it reports ready (a signal before the worker
  handles it would kill it);
* a worker that exits unexpectedly once serving (a crash, the OOM killer) is logged (``worker
  N was killed by SIGKILL; restarting it``, level ERROR) and started again on the same port;
  the other workers keep serving meanwhile, and only calls in flight on the dead worker fail.
  The (``RESTART_LIMIT`` + 1)th unexpected exit within ``RESTART_WINDOW`` seconds, or a
  worker that fails its first start, makes it stop the others and exit 1 (the orchestrator
  then replaces the task).

The default is one worker per CPU the task may use (`broker.config.task_cpus`: the cgroup
CPU quota rounded up, which is what a Fargate task's vCPUs become, else the affinity mask), at
most ``pool_size``; the ``listening on`` line says how many and why.

Figures are the broker's, not one worker's: each worker serves its own on a unix socket in a
directory the supervisor creates (mode 0700) and removes, and the worker that gets
``GetStats`` or ``ShowCallers`` adds its siblings' figures to its own
(broker/front/siblings.py); worker 0 alone publishes the EMF metrics, of all workers. The
figures of a Pause, Resume or Reload reply are the broker's too (broker/front/admin.py).
Health stays per worker, on purpose: it says whether the worker at the other end of a
connection serves, and a client's connection, so every call on it, stays on that one worker.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any

from broker.config import MIN_POOL_PER_WORKER, Settings, named, origins, task_cpus

__all__ = [
    "RESTART_LIMIT",
    "RESTART_WINDOW",
    "WORKER_ENV",
    "WorkerRole",
    "supervise",
    "worker_pool_size",
    "worker_role",
]

log = logging.getLogger("pgbroker.workers")

# Set by the supervisor in each child's environment: "index,port,ready_fd"; the child reads it
# with its other settings (`Settings.worker`).
WORKER_ENV = named("worker").variable
# Seconds a worker gets beyond shutdown_grace to exit before the supervisor kills it.
_EXIT_SLACK = 30.0
_POLL = 0.2
# A worker that exits unexpectedly is restarted, unless this is the (RESTART_LIMIT + 1)th
# unexpected exit within RESTART_WINDOW seconds: a worker that cannot stay up (a crash on
# every request, a broken database) then stops the broker, so the orchestrator sees it.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
# PgBouncer's control signals, forwarded to every worker: reload, pause, resume.
_CONTROLS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True)
class WorkerRole:
    """What the supervisor told a child: its index, the concrete port, its readiness pipe."""

    index: int
    port: int
    ready_fd: int
    # The supervisor's private directory (mode 0700) of the workers' figure sockets
    # (broker/front/siblings.py); "" when none was given.
    sibling_dir: str = ""

    def apply(self, settings: Settings) -> Settings:
        """*settings* with the port the supervisor reserved (the configured one may be 0)."""
        return replace(settings, listen_address=(settings.listen_host, self.port))

    def starts_paused(self) -> bool:
        """Whether the broker is paused now (the supervisor's marker): a worker started while
        it is starts paused."""
        return bool(self.sibling_dir) and os.path.exists(_paused_marker(self.sibling_dir))

    def overrides_in_effect(self) -> dict[str, str]:
        """The ``reload key=value`` overrides the running workers accepted last ({} when the
        last reload that succeeded had none); a worker starting later applies them."""
        if not self.sibling_dir:
            return {}
        try:
            with open(_overrides_file(self.sibling_dir), encoding="utf-8") as f:
                recorded = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # written whole (rename): should not happen
            log.error("cannot read the reload overrides in effect: %s", exc)
            return {}
        return {str(key): str(value) for key, value in dict(recorded).items()}

    def record_overrides(self, overrides: Mapping[str, str]) -> None:
        """After a reload this worker accepted: its *overrides* are the ones in effect (none:
        a plain reload ends the earlier ones). Every worker that reloads writes the same, so
        whole files (write, then rename) are enough; mode 0600, in the 0700 directory, since
        an override may be a token."""
        if not self.sibling_dir:
            return
        path = _overrides_file(self.sibling_dir)
        if not overrides:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        partial = f"{path}.{os.getpid()}"
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(descriptor, "w", encoding="utf-8") as f:
            json.dump(dict(overrides), f)
        os.replace(partial, path)

    def report_ready(self) -> None:
        """Tell the supervisor this worker serves (it waits for every worker before it logs
        ``listening on``). A closed pipe without this byte means the worker failed to start."""
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, b"1")
            os.close(self.ready_fd)


def _paused_marker(directory: str) -> str:
    return os.path.join(directory, "paused")


def _overrides_file(directory: str) -> str:
    return os.path.join(directory, "overrides.json")


def worker_role(settings: Settings) -> WorkerRole | None:
    """The role of this process if a supervisor started it (`Settings.worker`), else None."""
    if settings.worker is None:
        return None
    index, port, ready_fd, sibling_dir = settings.worker
    return WorkerRole(index, port, ready_fd, sibling_dir)


def worker_pool_size(settings: Settings, index: int = 0) -> int:
    """Server connections worker *index* holds: ``pool_size // workers``, plus one for the
    first ``pool_size % workers`` workers, so that together they hold ``pool_size`` (config
    ensures each holds at least one)."""
    share, left = divmod(settings.pool_size, settings.workers)
    return share + (1 if index < left else 0)


def supervise(
    settings: Settings, argv: Sequence[str], flags: Mapping[str, Any] | None = None
) -> int:
    """Run ``settings.workers`` child brokers (``python -m broker`` *argv*) until they exit;
    return the exit code (0 when every worker exited 0 after SIGTERM/SIGINT, else 1). *flags*
    are the command line's (the log says whether ``--workers`` was one)."""
    try:
        reservation = _reserve(settings.listen_host, settings.listen_port)
    except OSError as exc:
        print(f"pgbroker: cannot listen on {settings.listen}: {exc}", file=sys.stderr)
        return 1
    with reservation, tempfile.TemporaryDirectory(prefix="pgbroker-workers-") as sibling_dir:
        # mkdtemp makes it 0700: only this user's processes reach the workers' figure sockets.
        port = int(reservation.getsockname()[1])
        return _Supervisor(settings, argv, port, sibling_dir, flags).run()


def _reserve(host: str, port: int) -> socket.socket:
    """A socket bound to *host*:*port* with SO_REUSEPORT, never listened on.

    It keeps the port (port 0: the one the kernel picked) from processes that do not set
    SO_REUSEPORT until the workers have bound it. Another process of the same user that does
    set it (a second multi-worker broker on the same fixed port) could still join the group.
    """
    try:
        return _bind(host, port, reuse_addr=False)
    except OSError:
        if port == 0:
            raise
    # Without SO_REUSEADDR, connections of a previous run in TIME_WAIT block the port; with it,
    # a socket that is bound but not listening (SO_REUSEADDR alone) would not keep another
    # program out, so it is only the fallback. A listening program still makes this fail.
    return _bind(host, port, reuse_addr=True)


def _bind(host: str, port: int, *, reuse_addr: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Supervisor:
    def __init__(
        self,
        settings: Settings,
        argv: Sequence[str],
        port: int,
        sibling_dir: str,
        flags: Mapping[str, Any] | None,
    ) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.port = port
        self.sibling_dir = sibling_dir
        self.flags = flags
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        self.failed = False
        # Readiness pipes of starting workers (first start and restarts).
        self.selector = selectors.DefaultSelector()
        # When workers exited unexpectedly, within the last RESTART_WINDOW seconds.
        self.deaths: collections.deque[float] = collections.deque()
        # The broker's state for a worker that starts later: paused (SIGUSR1 .. SIGUSR2).
        self.paused = False
        # Workers that reported ready: they handle the control signals. A starting one is
        # sent what it missed once ready: SIGHUP, and the pause state if it may have read
        # another one than the current.
        self.ready: set[int] = set()
        self.missed_reload: set[int] = set()
        self.saw_paused: set[int] = set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for sig in _CONTROLS:
            signal.signal(sig, self._on_control)
        started = False
        try:
            started = self._start_all()
            if started:
                self._log_listening()
            self._wait_all()
        finally:
            for child in self.children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
            for key in list(self.selector.get_map().values()):
                os.close(key.fd)
            self.selector.close()
        codes = [child.returncode for child in self.children]
        clean = [0]
        if self.stopping and not started:
            # A worker that got the forwarded SIGTERM before Python ran its code dies of it:
            # that is the stop asked for, not a failure.
            clean.append(-signal.SIGTERM)
            log.info(
                "stopped during start-up, while starting workers; nothing was serving",
                extra={"phase": "starting workers", "workers_started": len(self.children)},
            )
        log.info("workers stopped", extra={"exit_codes": codes})
        return 0 if not self.failed and all(code in clean for code in codes) else 1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        self._forward(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    def _on_control(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            return
        if signum in (signal.SIGUSR1, signal.SIGUSR2):
            self._set_paused(signum == signal.SIGUSR1)
        starting = [i for i, child in enumerate(self.children) if i not in self.ready]
        log.info(
            "%s: forwarding it to %d workers",
            signal.Signals(signum).name,
            len(self.children) - len(starting),
            extra={
                "signal": signal.Signals(signum).name,
                **({"workers_starting": starting} if starting else {}),
            },
        )
        if signum == signal.SIGHUP:
            self.missed_reload.update(starting)
        for index in self.ready:
            self._send(index, signum)

    def _set_paused(self, paused: bool) -> None:
        """Keep the broker's pause state, and its marker for the workers that start later
        (`WorkerRole.starts_paused`)."""
        self.paused = paused
        marker = _paused_marker(self.sibling_dir)
        try:
            if paused:
                self.saw_paused.update(set(range(len(self.children))) - self.ready)
                with open(marker, "w"):
                    pass
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(marker)
        except OSError as exc:  # the running workers still get the signal
            log.error("cannot mark the broker %s: %s", "paused" if paused else "resumed", exc)

    def _send(self, index: int, sig: int) -> None:
        child = self.children[index]
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(sig)

    def _on_ready(self, index: int) -> None:
        """Worker *index* handles the control signals now: send it those it missed while it
        started (both pause signals are idempotent: a second PAUSE changes nothing)."""
        self.ready.add(index)
        if self.paused:
            self._send(index, signal.SIGUSR1)
        elif index in self.saw_paused:  # it may have read the marker before a RESUME
            self._send(index, signal.SIGUSR2)
        if index in self.missed_reload:
            self._send(index, signal.SIGHUP)
        self.saw_paused.discard(index)
        self.missed_reload.discard(index)

    def _forward(self, sig: int) -> None:
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(sig)

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        """Start worker *index* (a first start or a restart); its readiness pipe is watched by
        ``self.selector``."""
        self.ready.discard(index)
        self.missed_reload.discard(index)
        self.saw_paused.discard(index)
        if self.paused:
            self.saw_paused.add(index)
        read_fd, write_fd = os.pipe()
        env = {**os.environ, WORKER_ENV: f"{index},{self.port},{write_fd},{self.sibling_dir}"}
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "broker", *self.argv],
                env=env,
                pass_fds=(write_fd,),
                preexec_fn=_die_with_parent,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.selector.register(read_fd, selectors.EVENT_READ, index)
        return child

    def _start_all(self) -> bool:
        """Start worker 0 and wait until it reports ready, then the others, and wait until
        each reports ready; False if one failed first (the others are then being stopped) or
        a signal came.

        Worker 0 first: what fails for one fails for all (an unreachable database, a pool over
        the connection budget), and then one worker says so, once, having opened one
        connection; and the first connection's one-time work (the key store) is done by one."""
        return self._start(range(1)) and self._start(range(1, self.settings.workers))

    def _start(self, indexes: range) -> bool:
        for index in indexes:
            if self.stopping:  # a signal came while starting: start no more
                break
            self.children.append(self._spawn(index))
        pending = set(indexes)
        while pending and not self.stopping:
            for index, ready in self._readiness(_POLL):
                pending.discard(index)
                if ready:
                    self._on_ready(index)
                if not ready and self.stopping:  # it obeyed the forwarded signal
                    return False
                if not ready:  # closed without reporting: the worker could not start
                    self._fail(index, "could not start")
                    return False
            if self._check_children(restart=False):
                return False
        return not pending

    def _readiness(self, timeout: float) -> list[tuple[int, bool]]:
        """(worker index, whether it reported ready) for each readiness pipe that spoke
        within *timeout* seconds; those pipes are closed."""
        reported = []
        for key, _ in self.selector.select(timeout):
            data = os.read(key.fd, 16)
            self.selector.unregister(key.fd)
            os.close(key.fd)
            reported.append((int(key.data), bool(data)))
        return reported

    def _log_listening(self) -> None:
        log_listening(
            self.settings,
            self.port,
            flags=self.flags,
            worker_pids=[child.pid for child in self.children],
        )

    def _wait_all(self) -> None:
        """Until every worker exited: restart a worker that exits unexpectedly (stop them all
        when one dies too often); kill the ones still running ``shutdown_grace`` + 30 s after
        the stop began."""
        deadline: float | None = None
        while any(child.poll() is None for child in self.children):
            self._check_children(restart=True)
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.settings.shutdown_grace + _EXIT_SLACK
            if deadline is not None and time.monotonic() > deadline:
                log.error("workers did not stop in time; killing them")
                self.failed = True
                for child in self.children:
                    if child.poll() is None:
                        child.kill()
            for index, ready in self._readiness(_POLL):
                if ready:
                    self._on_ready(index)
                    log.info(
                        "worker %d restarted",
                        index,
                        extra={
                            "worker": index,
                            "pid": self.children[index].pid,
                            "paused": self.paused,
                        },
                    )

    def _check_children(self, *, restart: bool) -> bool:
        """True (after starting to stop the others) if a worker exited while not stopping and
        is not restarted: *restart* is false (still starting), or it died too often."""
        if self.stopping:
            return False
        for index, child in enumerate(self.children):
            if child.poll() is None:
                continue
            what = _exit_description(child.returncode)
            if not restart:
                self._fail(index, what)
                return True
            now = time.monotonic()
            self.deaths.append(now)
            while self.deaths and self.deaths[0] < now - RESTART_WINDOW:
                self.deaths.popleft()
            if len(self.deaths) > RESTART_LIMIT:
                self._fail(
                    index,
                    f"{what}, the {len(self.deaths)}th worker exit within"
                    f" {RESTART_WINDOW:.0f} s (at most {RESTART_LIMIT} are restarted)",
                )
                return True
            log.error(
                "worker %d %s; restarting it",
                index,
                what,
                extra={"worker": index, "pid": child.pid, "exit_code": child.returncode},
            )
            self.children[index] = self._spawn(index)
        return False

    def _fail(self, index: int, what: str) -> None:
        log.error(
            "worker %d %s; stopping the others",
            index,
            what,
            extra={"worker": index, "pid": self.children[index].pid},
        )
        self.failed = True
        self.stopping = True
        self._forward(signal.SIGTERM)


def _exit_description(returncode: int) -> str:
    """ "exited with code 3" or "was killed by SIGSEGV" (Popen: -N for signal N)."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the supervisor dies (Linux), so a killed
    supervisor leaves no worker behind."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def workers_why(
    settings: Settings,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Why the broker runs ``settings.workers`` processes: the CPUs it found (the default), or
    where the setting came from."""
    origin = origins(flags, environ).get("workers", "default")
    if origin != "default":
        return f"PGBROKER_WORKERS / --workers ({origin})"
    cpus, why = task_cpus()
    if settings.workers < cpus:
        return f"{why}, at most one per {MIN_POOL_PER_WORKER} of pool_size {settings.pool_size}"
    return why


def log_listening(
    settings: Settings,
    port: int,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    **extra: object,
) -> None:
    """The one ``listening on HOST:PORT`` line of a broker (single process or supervisor),
    with how many worker processes serve and why (*flags* and *environ*: what the settings
    were read from).

    Always written, whatever the log level: tools read the bound port from its JSON ``port``.
    """
    log.log(
        max(logging.INFO, log.getEffectiveLevel()),
        "listening on %s:%d with %d worker process%s (%s)",
        settings.listen_host,
        port,
        settings.workers,
        "" if settings.workers == 1 else "es",
        workers_why(settings, flags, environ),
        extra={
            "workers": settings.workers,
            "host": settings.listen_host,
            "port": port,
            "database": settings.database.redacted,
            "pool_size": settings.pool_size,
            "auth": settings.auth,
            "tls": "mtls" if settings.tls_client_ca else bool(settings.tls_cert),
            **extra,
        },
    )
