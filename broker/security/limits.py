"""Request and result limits, so one caller cannot exhaust the broker or its neighbours.

Every limit has a ``PGBROKER_*`` variable and a default a normal application never meets.
Crossing one raises `LimitExceeded`, which the service reports as RESOURCE_EXHAUSTED with
``google.rpc.ErrorInfo(reason="LIMIT_EXCEEDED", metadata={"limit": <variable>, ...})`` and a
message that names the limit and how to stay under it:

==================================  ===========  ==========================================
variable                            default      checked
==================================  ===========  ==========================================
``PGBROKER_MAX_STATEMENTS``         1000         per request, before it queues
``PGBROKER_MAX_REQUEST_BYTES``      8 MiB        per request (encoded size), before it queues
``PGBROKER_MAX_RESULT_ROWS``        1000000      rows of all results of one request
``PGBROKER_MAX_RESULT_BYTES``       32 MiB       encoded size of all results of one request
``PGBROKER_MAX_INFLIGHT_PER_CALLER`` (*)         running + queued requests of one identity
                                                 and Lambda function (`caller_key`)
==================================  ===========  ==========================================

(*) half of ``PGBROKER_POOL_SIZE + PGBROKER_MAX_WAITING`` (1010 with the defaults), so one
caller cannot fill the whole queue.

Nothing runs when a request limit or the in-flight limit is crossed; the in-flight refusal
carries ``RetryInfo`` (it clears as the caller's other requests finish), the others do not:
resending the same request cannot succeed, and clients do not retry them.

Result limits bound a *buffered* result (``Execute``, a ``Transact`` ``execute`` step), which
travels in one response; streamed rows (``Broker.Stream``, a ``Transact`` ``stream`` step) have
no limit. A batch's results are checked **before COMMIT**: when a statement of the batch
returns rows, the broker reads the results, checks them and only then sends ``COMMIT`` (one
more round trip for such batches; a batch whose statements return no rows still sends
``COMMIT`` with them), so a result over its limit is refused and the transaction rolled back:
nothing committed. A single statement runs without BEGIN … COMMIT and commits as it
completes, so its result is checked afterwards: ErrorInfo metadata ``completed=true`` says it
ran (for a single ``INSERT … RETURNING``, wrap it in a batch to make the check come first).
Page instead (``WHERE id > $1 ORDER BY id LIMIT 1000``) or stream.

A result is refused once it is over a limit whatever the rest of it holds, so the broker keeps
no more of it than that (`ResultBudget`): past the row limit, or past `WIRE_PER_ENCODED_BYTE`
times the byte limit in Postgres' own row messages, rows are read and counted but not kept.
However large the result, one in flight holds at most about the limits' worth of memory (a
3M-row result refused at the 1M-row limit: ~280 MB above idle instead of ~830 MB; a 100M-row
one no longer takes the worker down), and the refusal still reports the whole count.

The in-flight limit counts per identity (iam, token) and Lambda function name (the
``x-lambda-function-name`` metadata the client sends), so one function cannot take another's
share; with ``none`` and no function name every caller is the same ``anonymous`` and
``PGBROKER_MAX_WAITING`` already bounds the queue. The same key orders the pool's queue
(`QueueWeights`, broker/pooling/fairqueue.py).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from broker.configvalues import MIB
from broker.errors import RETRY_SOON, BrokerFailure, Code, Reason
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = [
    "WIRE_PER_ENCODED_BYTE",
    "InflightLimiter",
    "LimitExceeded",
    "Limits",
    "QueueWeights",
    "ResultBudget",
    "caller_key",
    "check_request",
    "check_results",
]

# Postgres' Bind message counts parameters in an Int16.
POSTGRES_MAX_PARAMS = 65_535


class LimitExceeded(BrokerFailure):
    """A limit was crossed: RESOURCE_EXHAUSTED, reason LIMIT_EXCEEDED. ``limit`` is the
    variable that sets it (or a Postgres limit), ``maximum`` its value, ``observed`` what the
    request had (all three in the ErrorInfo metadata); ``retry_after`` is set only when
    resending later can succeed; ``completed`` (metadata ``completed=true``) when the
    transaction had already run."""

    code = Code.RESOURCE_EXHAUSTED
    reason = Reason.LIMIT_EXCEEDED

    def __init__(
        self,
        limit: str,
        maximum: int,
        observed: int,
        message: str,
        *,
        retry_after: float | None = None,
        completed: bool = False,
    ) -> None:
        metadata = {"limit": limit, "maximum": str(maximum), "observed": str(observed)}
        if completed:
            metadata["completed"] = "true"
        super().__init__(message, retry_after=retry_after, metadata=metadata)
        self.limit = limit
        self.maximum = maximum
        self.observed = observed
        self.completed = completed


@dataclass(frozen=True)
class Limits:
    """The limits in force; 0 turns one off. Built from the settings
    (`broker.front.server.limits_for`), which declare each limit's default once."""

    max_statements: int
    max_request_bytes: int
    max_result_rows: int
    max_result_bytes: int
    max_inflight_per_caller: int

    def grpc_max_receive_bytes(self) -> int:
        """What the server may accept from the wire: above the request limit, so a request
        just over it gets this module's clear message rather than gRPC's."""
        return max(16 * MIB, self.max_request_bytes + MIB) if self.max_request_bytes else -1


def check_request(request: pb.ExecuteRequest, limits: Limits) -> None:
    """Raise `LimitExceeded` if *request* is too large to run; nothing has run yet."""
    count = len(request.statements)
    if limits.max_statements and count > limits.max_statements:
        raise LimitExceeded(
            "PGBROKER_MAX_STATEMENTS",
            limits.max_statements,
            count,
            f"{count} statements in one request; at most {limits.max_statements} are allowed"
            " (PGBROKER_MAX_STATEMENTS): split the work into several transactions, or insert"
            " many rows per statement (INSERT … SELECT * FROM unnest($1::int[], $2::text[]))",
        )
    size = request.ByteSize()
    if limits.max_request_bytes and size > limits.max_request_bytes:
        raise LimitExceeded(
            "PGBROKER_MAX_REQUEST_BYTES",
            limits.max_request_bytes,
            size,
            f"the request is {size} bytes; at most {limits.max_request_bytes} are allowed"
            " (PGBROKER_MAX_REQUEST_BYTES): send the rows in several requests, or keep large"
            " objects in S3 and store their keys",
        )
    if size <= 2 * POSTGRES_MAX_PARAMS:
        return  # every value takes 2 bytes or more (tag, length): no statement has too many
    for index, statement in enumerate(request.statements):
        if len(statement.params) > POSTGRES_MAX_PARAMS:
            raise LimitExceeded(
                "postgres_max_parameters",
                POSTGRES_MAX_PARAMS,
                len(statement.params),
                f"statement {index} has {len(statement.params)} parameters; Postgres accepts"
                f" at most {POSTGRES_MAX_PARAMS}: pass arrays ($1::int[]) instead",
            )


# At most how many bytes of Postgres' row messages (DataRow: a 4-byte length and the text of
# each cell) one byte of the encoded result comes from. Text is the longer form for most types:
# a timestamptz's 29 characters become an 8-byte integer, an interval's text a three-field
# message (about 3-4x); text, numeric and NULL cells take about as much either way.
WIRE_PER_ENCODED_BYTE = 4


class ResultBudget:
    """What one request's results may keep in memory (`PgConnection.run_many`'s *budget*,
    one per request, reset by each run): every row is counted, and once the rows kept are
    over ``max_result_rows``, or their row messages over `WIRE_PER_ENCODED_BYTE` times
    ``max_result_bytes``, the results are certainly over a limit and later rows are only
    counted (`dropped_rows`, `dropped_bytes`). `check_results` adds them in, and refuses."""

    __slots__ = (
        "dropped_bytes",
        "dropped_rows",
        "full",
        "limits",
        "max_rows",
        "max_wire_bytes",
        "rows",
        "wire_bytes",
    )

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # Read for every row (`keep`), so taken from *limits* once.
        self.max_rows = limits.max_result_rows  # 0: no limit
        self.max_wire_bytes = limits.max_result_bytes * WIRE_PER_ENCODED_BYTE
        self.reset()

    def reset(self) -> None:
        """Count from nothing: a run of the request's statements starts (again)."""
        self.rows = self.wire_bytes = self.dropped_rows = self.dropped_bytes = 0
        self.full = False

    def keep(self, size: int) -> bool:
        """Count a row of *size* bytes of row message; whether to keep it."""
        if self.full:
            self.dropped_rows += 1
            self.dropped_bytes += size
            return False
        self.rows += 1
        self.wire_bytes += size
        if (self.max_rows and self.rows > self.max_rows) or (
            self.max_wire_bytes and self.wire_bytes > self.max_wire_bytes
        ):
            self.full = True
        return True


def check_results(
    results: Sequence[pb.StatementResult],
    limits: Limits,
    *,
    completed: bool = True,
    budget: ResultBudget | None = None,
) -> None:
    """Raise `LimitExceeded` if *results* are too large to send (buffered in one response).

    *completed* says whether the work already committed (a single statement, which runs
    without BEGIN … COMMIT: metadata ``completed=true``) or is checked before COMMIT (a batch
    or a Transact step: the message says it was rolled back). *budget*: what the run kept
    of them; rows it only counted are in the figures, and a result missing rows is never
    sent."""
    single = len(results) == 1  # the usual case: no generator
    rows = len(results[0].rows) if single else sum(len(result.rows) for result in results)
    dropped = budget if budget is not None and budget.full else None
    if dropped is not None:
        rows += dropped.dropped_rows
    if limits.max_result_rows and rows > limits.max_result_rows:
        outcome, advice = _refusal_words(completed)
        raise LimitExceeded(
            "PGBROKER_MAX_RESULT_ROWS",
            limits.max_result_rows,
            rows,
            f"{outcome} have {rows} rows; at most {limits.max_result_rows} are sent"
            " (PGBROKER_MAX_RESULT_ROWS): page with WHERE key > $1 ORDER BY key LIMIT n"
            f"{advice}",
            completed=completed,
        )
    size = results[0].ByteSize() if single else sum(result.ByteSize() for result in results)
    if dropped is not None:  # at least what was kept and the rest's share of its row messages
        size += -(-dropped.dropped_bytes // WIRE_PER_ENCODED_BYTE)
        size = max(size, limits.max_result_bytes + 1)  # a result missing rows is never sent
    if limits.max_result_bytes and size > limits.max_result_bytes:
        outcome, advice = _refusal_words(completed)
        raise LimitExceeded(
            "PGBROKER_MAX_RESULT_BYTES",
            limits.max_result_bytes,
            size,
            f"{outcome} are {'at least ' if dropped else ''}{size} bytes;"
            f" at most {limits.max_result_bytes} are sent"
            " (PGBROKER_MAX_RESULT_BYTES): select fewer columns, page with WHERE key > $1"
            f" ORDER BY key LIMIT n{advice}",
            completed=completed,
        )


def _refusal_words(completed: bool) -> tuple[str, str]:
    """What `check_results`' refusal says happened, and its advice (and what happened after)."""
    advice = " or stream them (db.stream, tx.stream: no limit)"
    if completed:
        return "the transaction completed, but its results", advice
    return "the results", f"{advice}; the transaction was rolled back, nothing committed"


class InflightLimiter:
    """Counts running + queued requests per caller identity; event-loop confined.

    `hold(key)` raises `LimitExceeded` (with ``retry_after``) when *key* already has
    *limit* requests in flight; ``key=None`` or ``limit=0`` is never limited (but counted,
    for `busiest`).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def enter(self, key: str | None) -> str:
        """Count one more request of *key*, or raise `LimitExceeded` (nothing counted); return
        what to give `leave` when it is done. `hold` as two calls, for the request path."""
        key = "" if key is None else key
        current = self._counts.get(key, 0)
        if key and self.limit > 0 and current >= self.limit:
            raise LimitExceeded(
                "PGBROKER_MAX_INFLIGHT_PER_CALLER",
                self.limit,
                current + 1,
                f"{key} already has {current} requests running or queued; at most"
                f" {self.limit} per caller (PGBROKER_MAX_INFLIGHT_PER_CALLER): lower the"
                " function's concurrency or retry later",
                retry_after=RETRY_SOON,
            )
        self._counts[key] = current + 1
        return key

    def leave(self, held: str) -> None:
        """The request `enter` counted (*held*, what it returned) is done."""
        remaining = self._counts[held] - 1
        if remaining:
            self._counts[held] = remaining
        else:
            del self._counts[held]

    @contextmanager
    def hold(self, key: str | None) -> Iterator[None]:
        held = self.enter(key)
        try:
            yield
        finally:
            self.leave(held)

    def in_flight(self, key: str) -> int:
        return self._counts.get(key, 0)

    def busiest(self, limit: int) -> list[tuple[str, int]]:
        """The *limit* caller keys with the most requests in flight (``""``: unknown callers),
        most first."""
        return sorted(self._counts.items(), key=lambda item: -item[1])[:limit]


# -- fair queuing: who a request is queued as, and with what weight ------------------------------


def caller_key(caller: str | None, function: str | None) -> str | None:
    """The identity a request queues and is counted as: the authenticated caller (its ARN, or
    ``kind:name``) and the Lambda function (``x-lambda-function-name``), as
    ``caller|function`` (``|function`` without authentication), or just the caller when no
    function name was sent; None when neither is known (``PGBROKER_AUTH=none`` and no function
    name), which is not limited and shares one queue."""
    if function is None:
        return caller
    return f"{caller or ''}|{function}"


MAX_QUEUE_WEIGHT = 1000


@dataclass(frozen=True)
class QueueWeights:
    """``PGBROKER_QUEUE_WEIGHTS``: ordered (pattern, weight) entries; a caller key no pattern
    matches weighs 1. A pattern (``*`` and ``?`` wildcards, case-sensitive) is matched against
    the key's function name, then its caller (ARN or ``kind:name``), then the whole key
    (`caller_key`); the first matching entry wins."""

    entries: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, text: str) -> QueueWeights:
        """The weights from JSON (``{"fn-a": 2, "report-*": 0.5}``) or ``pattern=weight,…``.

        Raise ValueError (one line) for malformed text or a weight that is not a number in
        (0, 1000]."""
        text = text.strip()
        items: list[tuple[str, object]] = []
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"PGBROKER_QUEUE_WEIGHTS is not valid JSON ({exc.msg})") from None
            items = [(str(k).strip(), v) for k, v in data.items()]
        elif text:
            for item in text.split(","):
                pattern, sep, weight = item.partition("=")
                if not sep or not pattern.strip() or not weight.strip():
                    raise ValueError(
                        f"PGBROKER_QUEUE_WEIGHTS entry {item.strip()!r} is not pattern=weight"
                    )
                items.append((pattern.strip(), weight.strip()))
        return cls(tuple((pattern, _weight(pattern, value)) for pattern, value in items))

    def weight_for(self, key: str | None) -> float:
        """The weight of caller key *key* (1 when no entry matches, or for None)."""
        if key is None or not self.entries:
            return 1.0
        caller, _, function = key.rpartition("|") if "|" in key else (key, "", "")
        for pattern, weight in self.entries:
            if any(fnmatch.fnmatchcase(part, pattern) for part in (function, caller, key)):
                return weight
        return 1.0


def _weight(pattern: str, value: object) -> float:
    try:
        weight = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        weight = float("nan")
    if not 0 < weight <= MAX_QUEUE_WEIGHT:  # also false for NaN
        raise ValueError(
            f"PGBROKER_QUEUE_WEIGHTS: the weight of {pattern!r} must be a number in"
            f" (0, {MAX_QUEUE_WEIGHT}], not {value!r}"
        )
    return weight
