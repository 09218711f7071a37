"""The call policy, once for the blocking and the asyncio client: deadlines, which failures
are resent and after how long, what a failed call raises. No I/O happens here.

A call is planned as a generator (`lambda_client._base.ClientBase._plan`) that yields steps:
zero-argument callables that do one piece of I/O (a wait for the channel, an attempt, a
pause) and receives each step's outcome back: its value via ``send``, or its `grpc.RpcError` via
``throw``. `run_plan` drives a plan with blocking calls; `lambda_client.aio` awaits each
step instead. The policy:

* the deadline is *timeout* (else the client's), cut to a Lambda context's remaining time
  minus the margin (`CallPolicy.deadline`); a call never outlives it (`time_left`);
* resent only where nothing ran: a reason in `lambda_client._status.NOTHING_RAN` or a
  ``RetryInfo`` (`CallPolicy.retry_delay`), and a rolled-back transaction only when asked;
* jittered exponential backoff that honours ``RetryInfo``, never past the deadline: work that
  did not run is resent until the deadline (bounded only by `SAFETY_ATTEMPTS`, far above
  what a 30 s deadline needs), a rolled-back transaction at most *max_attempts* times; the
  error that ends the call says how many attempts were made, over how long;
* logged through the standard `logging` module under ``lambda_client`` (`logger`), with
  structured fields (``extra=``) that Powertools' ``Logger`` and CloudWatch Logs Insights can
  filter: each retry at INFO (``reason``, ``attempt``, ``delay_s``), a call whose outcome is
  unknown at WARNING. No handler is configured here: the application's logging decides.
* a call on a channel that has not reached the broker first waits for the channel to be
  ready (`Link`, no RPC), so a deadline that passes while connecting is `errors.Unavailable`
  with "nothing was sent".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from lambda_client import errors
from lambda_client._grpc import grpc
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from lambda_client._requests import remaining_seconds, seconds, target_ports
from lambda_client._status import NOTHING_RAN, Reason

if TYPE_CHECKING:
    from lambda_client._requests import LambdaContext

__all__ = [
    "BROKER_UNREACHABLE",
    "SAFETY_ATTEMPTS",
    "Call",
    "CallPolicy",
    "Link",
    "Plan",
    "Step",
    "broker_unreachable",
    "logger",
    "resume",
    "run_plan",
    "time_left",
]

HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
# The reason of the `Unavailable` the client raises when no connection was ready in time.
BROKER_UNREACHABLE = Reason.BROKER_UNREACHABLE.value

# Attempts of work that did not run when *max_attempts* is not given: a bound against a
# broken loop, not a policy (a 30 s deadline with the default backoff needs about 40).
SAFETY_ATTEMPTS = 1000
logger = logging.getLogger("lambda_client")
# At most this much of a call's time asks an unready channel why (`Link.reach`).
_DIAGNOSIS_SECONDS = 0.3

T = TypeVar("T")
Metadata = Sequence[tuple[str, str]]
# One attempt of a call: (stub, seconds left, metadata) -> response (an awaitable for aio).
Invoke = Callable[[pb_grpc.BrokerStub, float, Metadata], Any]
# One piece of I/O: a call that returns its result (blocking) or an awaitable of it (aio).
Step = Callable[[], Any]
Plan = Generator[Step, Any, T]


class Call(Generic[T]):
    """What a public method asks for: *invoke* (None: nothing to send) and *finish*, which
    turns the response (None when nothing was sent) into the method's result.

    A plain class, not a dataclass, as `lambda_client._base.ExecuteCall`: each
    ``@dataclass`` costs about 1 ms of a cold start to define (docs/performance.md), and a
    call only reads these attributes."""

    __slots__ = ("finish", "invoke", "retry_aborted")

    def __init__(
        self, invoke: Invoke | None, finish: Callable[[Any], T], retry_aborted: bool = False
    ) -> None:
        self.invoke = invoke
        self.finish = finish
        self.retry_aborted = retry_aborted


@dataclass(frozen=True)
class CallPolicy:
    """Deadline and retry settings, with the arithmetic on them; arguments as on
    `lambda_client.BrokerClient`. Raise `TypeError`/`ValueError` naming a bad one.

    *max_attempts* bounds the resending of a rolled-back transaction; *nothing_ran_attempts*
    the resending of work that did not run (a full queue, an unreachable broker), which
    otherwise goes on until the deadline."""

    timeout: float = 30.0
    deadline_margin: float = 0.5
    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    nothing_ran_attempts: int = SAFETY_ATTEMPTS

    def __post_init__(self) -> None:
        seconds("timeout", self.timeout)
        seconds("deadline_margin", self.deadline_margin, allow_zero=True)
        if self.max_attempts < 1 or self.nothing_ran_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def deadline(self, context: LambdaContext | None, timeout: float | None) -> float:
        """The call's monotonic deadline; raise `TypeError`/`ValueError` for a bad *timeout*
        or *context*, `DeadlineExceeded` if the context leaves no time (nothing is sent)."""
        budget = float(self.timeout) if timeout is None else seconds("timeout", timeout)
        if context is not None:
            # A 15-minute function should not wait 15 minutes on one call (a broker that is
            # down makes a call wait for the channel until its deadline): the timeout caps it.
            remaining = remaining_seconds(context)
            if remaining <= self.deadline_margin:
                raise errors.DeadlineExceeded(
                    f"no time left for the call: the Lambda invocation has {remaining:.3f}s "
                    f"left, within the deadline margin of {self.deadline_margin}s; "
                    "nothing was sent",
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                )
            budget = min(budget, remaining - self.deadline_margin)
        return time.monotonic() + budget

    def retry_delay(self, error: errors.Error, attempt: int, retry_aborted: bool) -> float | None:
        """Seconds to wait before resending after *error*, or None if it must not be resent."""
        if isinstance(error, errors.Overloaded | errors.Unavailable):
            if attempt >= self.nothing_ran_attempts:
                return None
            # Only what the broker says never ran: a crossed limit (PGBROKER_MAX_*, or gRPC's
            # message size cap, which has no reason) fails the same way again, and a
            # transport failure mid-call (no rich status) may hide a committed transaction.
            # RetryInfo is the broker's word that waiting helps (the in-flight limit, a
            # database that was unreachable before BEGIN).
            if error.reason not in NOTHING_RAN and error.retry_after is None:
                return None
        elif attempt >= self.max_attempts or not (
            retry_aborted and isinstance(error, errors.TransactionRollback)
        ):
            return None  # a rolled-back transaction is resent only if asked, max_attempts times
        backoff = min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1))
        if error.retry_after is not None:
            return error.retry_after + _uniform(0, backoff)
        return _uniform(backoff / 2, backoff)

    def backoff_or_raise(
        self,
        exc: grpc.RpcError,
        attempt: int,
        deadline: float,
        retry_aborted: bool,
        started: float | None = None,
        took: float = 0.0,
    ) -> float:
        """Seconds to wait before resending after *exc* (logged at INFO); raise its
        `errors.Error` (caused by *exc*) if it must not be resent or the wait plus another
        attempt as long as the last (*took* seconds) would pass *deadline*: a resend the
        deadline cuts short would turn a clean refusal into an unknown outcome. An error that
        was being retried then says how many attempts were made since *started* (monotonic);
        one whose outcome is unknown is logged at WARNING."""
        error = errors.from_rpc_error(exc)
        delay = self.retry_delay(error, attempt, retry_aborted)
        if delay is not None and time.monotonic() + delay + took < deadline:
            logger.info(
                "pgbroker call failed with %s, retrying in %.3fs (attempt %d)",
                error.reason or _code_name(error),
                delay,
                attempt,
                extra=_fields(error, attempt, delay_s=round(delay, 3)),
            )
            return delay
        if started is not None and self.retry_delay(error, 1, retry_aborted) is not None:
            gave_up(error, attempt, time.monotonic() - started, delay is None)
        if outcome_unknown(error):
            logger.warning(
                "pgbroker call failed with %s; it may have run: %s",
                _code_name(error),
                error.details,
                extra=_fields(error, attempt, outcome="unknown"),
            )
        raise error from exc


def _uniform(low: float, high: float) -> float:
    """`random.uniform`, with `random` (and the hashing it loads) imported on the first retry
    rather than on a cold start."""
    import random

    return random.uniform(low, high)


def gave_up(error: errors.Error, attempts: int, elapsed: float, capped: bool) -> None:
    """Add to *error*'s message how many attempts were made over *elapsed* seconds, and why
    no more were (the attempt bound, else the deadline)."""
    why = "max_attempts reached" if capped else "the next retry would pass the deadline"
    plural = "s" if attempts != 1 else ""
    error.details = (
        f"{error.details} (gave up after {attempts} attempt{plural} over {elapsed:.3g}s: {why})"
    )
    error.args = (error.details,)


def outcome_unknown(error: errors.Error) -> bool:
    """Whether the request may have run although the call failed: the broker lost the
    connection during it, or the deadline or the transport ended the call with no word from
    the broker (no reason, no SQLSTATE)."""
    if isinstance(error, errors.OutcomeUnknown):
        return True
    silent = error.reason is None and error.sqlstate is None and error.retry_after is None
    return silent and isinstance(error, errors.DeadlineExceeded | errors.Unavailable)


def _code_name(error: errors.Error) -> str:
    return error.code.name if error.code is not None else type(error).__name__


def _fields(error: errors.Error, attempt: int, **more: Any) -> dict[str, Any]:
    """Structured log fields (``extra=``): flat names that do not collide with `logging`'s."""
    fields = {
        "pgbroker_code": _code_name(error),
        "reason": error.reason,
        "sqlstate": error.sqlstate,
        "attempt": attempt,
    }
    return {**fields, **more}


class Link:
    """The stub on one channel (blocking or ``grpc.aio``), and whether a call on it has
    reached the broker since the channel opened or last failed in a way that may mean a lost
    connection.

    Until then, each attempt first waits for the channel to be READY (connected and, with
    health checking, reported SERVING), with no RPC: if the deadline passes during that wait,
    the request itself was never sent, which a call that waited inside gRPC could not tell
    (`broker_unreachable`). A channel that has reached the broker skips the wait, so a warm
    call is still one round trip, and a new channel's first call is one too.
    """

    def __init__(self, channel: Any, aio: bool = False) -> None:
        self.stub = pb_grpc.BrokerStub(channel)
        self.channel = channel
        self.aio = aio
        # Only to ask why a channel is not ready (`_last_error`): raw bytes both ways, an
        # empty HealthCheckRequest asks about the server as a whole.
        self.health_check = channel.unary_unary(HEALTH_CHECK_METHOD)
        self.reached = False

    def reach(
        self,
        timeout: float,
        target: str,
        started: float,
        explain: Callable[[str, float], str] | None = None,
    ) -> Plan[None]:
        """Wait for the channel to be ready (one step); raise `broker_unreachable` if the
        deadline passes first.

        With *explain* (gRPC's last connection error and the seconds it may spend probing ->
        cause and fix), the end of *timeout* is kept back to ask the channel why it is not
        ready (`lambda_client._diagnose`), so the error says "TLS handshake failed: …"
        rather than only the deadline; the call still ends within *timeout*."""
        ends = time.monotonic() + timeout
        reserve = min(_DIAGNOSIS_SECONDS, timeout / 10) if explain is not None else 0.0
        wait = _ready_aio if self.aio else _ready_blocking
        ready = yield lambda: wait(self.channel, timeout - reserve)
        if ready:
            self.reached = True
            return
        why = ""
        if explain is not None:
            last_error = yield from self._last_error(reserve / 2)
            why = explain(last_error, ends - time.monotonic())
        raise broker_unreachable(target, time.monotonic() - started, why)

    def _last_error(self, timeout: float) -> Plan[str]:
        """The channel's last connection error: a check that does not wait for the channel
        fails at once with it (empty if the check succeeds or says nothing)."""
        try:
            yield lambda: self.health_check(b"", timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as exc:
            return str(exc.details() or "")
        return ""

    def call_failed(self, exc: grpc.RpcError) -> None:
        if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            self.reached = False


def _ready_blocking(channel: grpc.Channel, timeout: float) -> bool:
    """Whether *channel* became READY within *timeout* seconds (it is asked to connect)."""
    future = grpc.channel_ready_future(channel)
    try:
        future.result(timeout=max(timeout, 0.0))
    except grpc.FutureTimeoutError:
        future.cancel()  # stops watching the channel's state
        return False
    return True


async def _ready_aio(channel: Any, timeout: float) -> bool:
    """`_ready_blocking` for a ``grpc.aio`` channel."""
    import asyncio  # loaded with grpc.aio already; the blocking client never needs it here

    try:
        await asyncio.wait_for(channel.channel_ready(), max(timeout, 0.0))
    except asyncio.TimeoutError:
        return False
    return True


def time_left(deadline: float, attempt: int) -> float:
    """Seconds until *deadline*; raise `DeadlineExceeded` if none are left to send *attempt*."""
    left = deadline - time.monotonic()
    if left > 0:
        return left
    # Only a refusal that guarantees nothing ran, or a rollback, is retried.
    if attempt > 1:
        message = "deadline passed while waiting to retry; no earlier attempt took effect"
    else:
        message = "deadline passed before the call could be sent; nothing was sent"
    raise errors.DeadlineExceeded(message, code=grpc.StatusCode.DEADLINE_EXCEEDED)


def broker_unreachable(target: str, waited: float, why: str = "") -> errors.Unavailable:
    """The error for a call whose deadline passed before its channel reached the broker: the
    request never left the client. *why* is the likely cause and fix, when known."""
    no_port = " (the target has no port, so gRPC uses 443)" if None in target_ports(target) else ""
    return errors.Unavailable(
        f"broker at {target!r} not reachable within {waited:.3g}s: "
        f"{why or 'no connection was ready, or the broker reported NOT_SERVING'}{no_port}; "
        "nothing was sent, so retrying is safe",
        code=grpc.StatusCode.UNAVAILABLE,
        reason=BROKER_UNREACHABLE,
    )


def resume(plan: Plan[T], outcome: Any, failed: bool) -> tuple[bool, Any]:
    """Hand a step's *outcome* to *plan* (with *failed*, the `grpc.RpcError` the step raised,
    thrown in): (False, its next step), or (True, its result) once it has returned. What the
    plan raises propagates. No object per step is kept while the next one is in flight."""
    try:
        return False, plan.throw(outcome) if failed else plan.send(outcome)
    except StopIteration as done:
        return True, done.value


def run_plan(plan: Plan[T]) -> T:
    """Drive *plan* with blocking calls; return its result or raise what it raises."""
    finished, step = resume(plan, None, False)
    while not finished:
        finished, step = resume(plan, *_outcome(step))
    return step  # type: ignore[no-any-return]


def _outcome(step: Step) -> tuple[Any, bool]:
    """Run a blocking *step*: (its value, False), or (the `grpc.RpcError`, True)."""
    try:
        return step(), False
    except grpc.RpcError as exc:
        return exc, True
