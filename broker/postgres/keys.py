"""The idempotency-key store: exactly-once execution of keyed requests (docs/broker.md).

A keyed request's key is claimed INSIDE its own transaction, so the key commits if and only
if the work does:

* ``BEGIN …`` is followed, in the same flush, by `claim_calls`: a plain ``INSERT`` of
  (caller, key, request hash), behind a delete of the key if it expired. A key another
  attempt holds uncommitted makes the INSERT wait for that attempt (Postgres' unique-index
  wait): if it rolls back, this one proceeds; if it commits, the INSERT fails with 23505 on
  `CONSTRAINT` and the pipelined statements behind it do not run (25P02).
* a batch (broker/flow/batch.py) claims with the INSERT alone (``delete_expired=False``): an
  expired key is rare, and its delete cost a statement on every keyed transaction. The
  INSERT then fails on an expired key as on a live one; `replay` sees it expired (or swept
  meanwhile) and the batch runs once more with the delete, as every claim did before: one
  more round trip for a re-used expired key, the same outcome. An interactive transaction
  claims at COMMIT, behind its statements, which cannot run again: it deletes first.
* after the statements, `finish_call` stores the encoded response, pipelined with COMMIT:
  a keyed transaction costs one row written and one round trip more than an unkeyed one.
* both are statements with parameters that each connection prepares once (`pg.Call`):
  as SQL with literals (`claim_sql`, still what an interactive transaction's keyed COMMIT
  under a mapped role sends) Postgres parsed and planned them on every transaction,
  60–110 µs of backend CPU per keyed transaction (docs/performance.md, "A/B: the key's claim
  and store …").
* on that 23505, `replay` reads the stored row: the same request hash returns the stored
  response (nothing ran), another hash is `KeyReused`; an expired key (claimed without the
  delete) is claimed again.

The store is a table of the broker's own, created at start when the login role may
(`ensure_store`), swept of expired keys in small batches (`sweep`). The key is scoped by the
caller's identity, so two callers' keys never meet.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from broker.errors import RETRY_SOON, BrokerFailure, Code, Reason
from broker.postgres.pg import Call, PgConnection, PgError
from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb

__all__ = [
    "CLAIM_CALLS",
    "CONSTRAINT",
    "FINISH_CALLS",
    "MAX_KEY_CHARS",
    "STORE_SQL",
    "ClaimExpired",
    "KeyClaim",
    "KeyInProgress",
    "KeyReused",
    "StoreUnavailable",
    "check_key",
    "claim_calls",
    "claim_sql",
    "ensure_store",
    "finish_call",
    "is_claimed",
    "replay",
    "replay_transact",
    "request_hash",
    "store_status",
    "sweep",
]

log = logging.getLogger("pgbroker.keys")

MAX_KEY_CHARS = 255  # as Stripe's keys
TABLE = "pgbroker.idempotency_keys"
CONSTRAINT = "idempotency_keys_pkey"
# One simple query is one implicit transaction: the transaction-scoped advisory lock makes
# the workers and replicas that start together create the store one after the other (two
# concurrent CREATE … IF NOT EXISTS can fail on each other's catalog rows).
STORE_SQL = f"""SELECT pg_advisory_xact_lock(7264811963);
CREATE SCHEMA IF NOT EXISTS pgbroker;
CREATE TABLE IF NOT EXISTS {TABLE} (
  caller text NOT NULL,
  key text NOT NULL,
  request_hash bytea NOT NULL,
  response bytea,
  created_at timestamptz NOT NULL DEFAULT now(),
  expires_at timestamptz NOT NULL,
  CONSTRAINT {CONSTRAINT} PRIMARY KEY (caller, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_expires_at ON {TABLE} (expires_at)"""
_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
# Whether the login role can use the table (created by someone else, e.g. a DBA).
_USABLE_SQL = f"SELECT to_regclass('{TABLE}') IS NOT NULL" + "".join(
    f" AND has_table_privilege('{TABLE}', '{p}')" for p in _PRIVILEGES
)
# `claim_sql` and the response's store as statements prepared once per connection (`claim_calls`,
# `finish_call`). Folding the DELETE into the INSERT (ON CONFLICT … DO UPDATE … WHERE
# expired) loses the 23505 that stops the statements behind a committed key; with a second
# INSERT to raise it, it measured no cheaper than the two prepared statements.
_DELETE_EXPIRED_SQL = f"DELETE FROM {TABLE} WHERE caller = $1 AND key = $2 AND expires_at < now()"
_CLAIM_SQL = (
    f"INSERT INTO {TABLE} (caller, key, request_hash, expires_at)"
    " VALUES ($1, $2, $3, now() + make_interval(secs => $4))"
)
_FINISH_SQL = f"UPDATE {TABLE} SET response = $3 WHERE caller = $1 AND key = $2"
# What `finish_call` sends, to prepare ahead (`PgConnection.run_many`'s *calls*).
FINISH_CALLS = (_FINISH_SQL,)
# What `claim_calls` sends with the delete of an expired key (an interactive transaction's
# claim at COMMIT), to prepare ahead (`PgConnection.prepare`).
CLAIM_CALLS = (_DELETE_EXPIRED_SQL, _CLAIM_SQL)
_REPLAY_SQL = (
    f"SELECT request_hash, response, expires_at < now() FROM {TABLE} WHERE caller = $1 AND key = $2"
)
# Expired keys go in small batches, so a sweep never holds many row locks or runs long.
SWEEP_BATCH = 1000
_SWEEP_SQL = (
    f"DELETE FROM {TABLE} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {TABLE}"
    f" WHERE expires_at < now() LIMIT {SWEEP_BATCH} FOR UPDATE SKIP LOCKED))"
)


class KeyReused(BrokerFailure):
    """The key was used before with a different request: INVALID_ARGUMENT, reason
    IDEMPOTENCY_KEY_REUSED; nothing ran (Stripe refuses the same way)."""

    code = Code.INVALID_ARGUMENT
    reason = Reason.IDEMPOTENCY_KEY_REUSED


class KeyInProgress(BrokerFailure):
    """Another attempt with this key still runs and did not end within this request's
    statement timeout: ABORTED, reason IDEMPOTENCY_KEY_IN_PROGRESS, retry soon; nothing ran."""

    code = Code.ABORTED
    reason = Reason.IDEMPOTENCY_KEY_IN_PROGRESS
    retry_after = RETRY_SOON


class ClaimExpired(Exception):
    """The key a claim without the delete met had expired (or was swept since): nothing ran,
    the transaction is rolled back, and the caller claims the key again with the delete
    (`claim_calls`' ``delete_expired``). Never reaches a caller of the broker."""


class StoreUnavailable(BrokerFailure):
    """The broker has no key store (it could not create or use ``pgbroker.idempotency_keys``):
    FAILED_PRECONDITION, reason IDEMPOTENCY_UNAVAILABLE; nothing ran. The client resends
    the request without its key when it generated the key itself."""

    code = Code.FAILED_PRECONDITION
    reason = Reason.IDEMPOTENCY_UNAVAILABLE


@dataclass(frozen=True)
class KeyClaim:
    """A keyed request's claim: whose key, the key, the request's hash, how long it lives."""

    caller: str
    key: str
    digest: bytes
    ttl_seconds: float


def check_key(key: str) -> str | None:
    """Why *key* cannot be used (None when it can): 1..255 printable ASCII characters."""
    if len(key) > MAX_KEY_CHARS:
        return f"idempotency_key is {len(key)} characters; at most {MAX_KEY_CHARS} are allowed"
    # Printable ASCII: " " to "~" (str.isprintable counts the space, not tab or DEL).
    if not (key.isascii() and key.isprintable()):
        return "idempotency_key must be printable ASCII"
    return None


def request_hash(request: pb.ExecuteRequest | None) -> bytes:
    """SHA-256 of the request without its key (deterministic encoding); of an empty request
    for an interactive transaction's COMMIT, whose statements the hash cannot cover."""
    if request is None:
        return hashlib.sha256(b"pgbroker:transact").digest()
    # The key cleared on the request itself for the while, rather than on a copy (a copy of
    # W2's five statements costs more than its hash); the request is this call's alone.
    key = request.idempotency_key
    request.idempotency_key = ""
    try:
        data = request.SerializeToString(deterministic=True)
    finally:
        request.idempotency_key = key
    return hashlib.sha256(data).digest()


def _literal(text: str) -> str:
    """*text* as an escaped string constant (``E'…'``: backslashes and quotes doubled, read
    the same whatever standard_conforming_strings says). A constant, so the store's primary
    key finds the row: the hex-decoding expression this was before
    (``convert_from(decode(…))``) made Postgres scan the whole table on every keyed
    transaction's UPDATE, slower with every key stored."""
    if "\x00" in text:
        raise ValueError("a NUL character cannot be in a SQL string constant")
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def claim_sql(caller: str, key: str, digest: bytes, ttl_seconds: float) -> str:
    """Simple-protocol SQL that claims *key* for *caller* inside the open transaction (see
    the module docstring); fails with 23505 on `CONSTRAINT` when the key is committed."""
    who, what = _literal(caller), _literal(key)
    return (
        f"DELETE FROM {TABLE} WHERE caller = {who} AND key = {what} AND expires_at < now();"
        f" INSERT INTO {TABLE} (caller, key, request_hash, expires_at) VALUES ({who}, {what},"
        f" decode('{digest.hex()}', 'hex'), now() + interval '{max(1, int(ttl_seconds))} s')"
    )


def claim_calls(claim: KeyClaim, *, delete_expired: bool = True) -> list[Call]:
    """`claim_sql` as two prepared statements with parameters (`pg.Call`): one Sync group
    in the flush with BEGIN; fails with 23505 on `CONSTRAINT` when the key is committed.
    Without *delete_expired* the INSERT alone, which fails on an expired key too: `replay`
    with ``expired_claims`` tells the two apart (see the module docstring)."""
    who = (_text(claim.caller), _text(claim.key))
    insert = Call(_CLAIM_SQL, (*who, _bytea(claim.digest), str(max(1, int(claim.ttl_seconds)))))
    return [Call(_DELETE_EXPIRED_SQL, who), insert] if delete_expired else [insert]


def finish_call(claim: KeyClaim, response: bytes) -> Call:
    """The UPDATE storing *response* on the claimed key (sent with COMMIT), as a prepared
    statement with parameters (`pg.Call`)."""
    return Call(_FINISH_SQL, (_text(claim.caller), _text(claim.key), _bytea(response)))


def _text(text: str) -> str:
    """*text* as a parameter's text; a NUL cannot be in one, as in a constant (`_literal`)."""
    if "\x00" in text:
        raise ValueError("a NUL character cannot be in a SQL string")
    return text


def _bytea(data: bytes) -> str:
    """*data* in bytea's hex input format (a parameter's text)."""
    return "\\x" + data.hex()


def is_claimed(error: PgError) -> bool:
    """Whether *error* is the claim's INSERT meeting a committed key."""
    return error.sqlstate == "23505" and CONSTRAINT in error.message


def replay(
    conn: PgConnection, caller: str, key: str, digest: bytes, *, expired_claims: bool = False
) -> list[pb.StatementResult]:
    """The stored results of *key* (blocking; worker thread; after the claim failed and the
    transaction was rolled back). Raise `KeyReused` when it was claimed for another request,
    `KeyInProgress` when it has no response (it was swept or is being rewritten).
    With *expired_claims* (the claim did not delete an expired key first: `claim_calls`'
    ``delete_expired``) raise `ClaimExpired` when the key has expired, or is gone (only
    expired keys are deleted, so it was swept since): the caller claims it again, deleting
    it first."""
    row = conn.run(_REPLAY_SQL, [pb.Value(text=caller), pb.Value(text=key)])
    if not row.rows:
        if expired_claims:
            raise ClaimExpired(key)
        raise KeyInProgress("the idempotency key changed hands while this request waited")
    stored_hash, response, expired = row.rows[0].values
    if expired_claims and expired.bool:
        raise ClaimExpired(key)
    if stored_hash.bytea != digest:
        raise KeyReused(
            "this idempotency_key was used with a different request; use a new key for a"
            " new request (nothing ran)"
        )
    if response.WhichOneof("kind") != "bytea":
        raise KeyInProgress("the idempotency key has no stored response yet")
    return list(pb.ExecuteResponse.FromString(response.bytea).results)


def replay_transact(conn: PgConnection, caller: str, key: str, digest: bytes) -> None:
    """As `replay`, for an interactive transaction's COMMIT: return when *key* was claimed
    by an earlier COMMIT, raise `KeyReused` when by another kind of request."""
    row = conn.run(_REPLAY_SQL, [pb.Value(text=caller), pb.Value(text=key)])
    if row.rows and row.rows[0].values[0].bytea != digest:
        raise KeyReused("this idempotency_key was used with a different request; nothing committed")


def ensure_store(conn: PgConnection) -> str | None:
    """Create the store if missing (blocking); return None when usable, else why not (the
    broker then refuses keyed requests with `StoreUnavailable`)."""
    try:
        conn.execute_simple(STORE_SQL)
    except PgError as exc:
        # E.g. 42501 without CREATE on the database: a store made by a DBA still works.
        try:
            usable = conn.run(_USABLE_SQL).rows[0].values[0].bool
        except PgError:
            usable = False
        if not usable:
            return f"cannot create {TABLE}: {exc}"
    return None


def store_status(conn: PgConnection) -> str:
    """`ensure_store` for `broker.postgres.probe.FirstConnectionProbe`: "" when usable."""
    return ensure_store(conn) or ""


def sweep(conn: PgConnection) -> int:
    """Delete up to `SWEEP_BATCH` expired keys (blocking); return how many went."""
    result = conn.run(_SWEEP_SQL)
    return max(result.rows_affected, 0)
