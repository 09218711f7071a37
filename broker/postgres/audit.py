"""The second line behind `broker.sql.sessionstate`: find session state the parser could not see.

A ``DO`` block running dynamic SQL, a procedure, a function or trigger with side effects can
change the session without any refused statement in the request. After such a transaction
the broker checks the connection and replaces it (never hands it to the next caller) if
anything outlived the transaction:

* always, for free: the ``ParameterStatus`` values Postgres pushes when a reported setting
  changes (TimeZone, DateStyle, IntervalStyle, client_encoding, session_authorization,
  default_transaction_read_only, standard_conforming_strings, …) are compared with the values
  at connect time (`PgConnection.reported_changes`);
* for requests the parser cannot see through (``DO``, ``CALL``, SQL it cannot parse — see
  `RequestPlan.needs_audit` in broker/sql/plan.py — and calls of functions outside
  ``pg_catalog``, see `RequestPlan.calls_unknown_function` and `read_builtin_functions`), or
  for every request with ``PGBROKER_SESSION_AUDIT=always``,
  one more query after the transaction (`AUDIT_SQL`, one round trip): settings changed at
  session level, ``LISTEN`` channels, SQL prepared statements, open cursors, advisory locks,
  temporary relations, and a role other than the login role.
"""

from __future__ import annotations

import logging

from broker.postgres.pg import ConnectionLost, PgConnection, PgError, TransactionStatus

__all__ = [
    "AUDIT_MODES",
    "AUDIT_SQL",
    "CLEANUP",
    "PROBE_SQL",
    "RESET_SQL",
    "audit_session",
    "mark_leaks",
    "probe_leaks",
    "read_builtin_functions",
]

log = logging.getLogger("pgbroker.sessionaudit")

AUDIT_MODES = ("opaque", "always", "off")

# One row, one text[] column: the kinds of session state found (empty when clean).
AUDIT_SQL = """SELECT array_remove(ARRAY[
  CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_settings WHERE source = 'session')
       THEN 'settings' END,
  CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_listening_channels())
       THEN 'listen' END,
  CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_statements WHERE from_sql)
       THEN 'prepared statements' END,
  CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_cursors WHERE is_holdable)
       THEN 'cursors' END,
  CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_locks
                    WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid())
       THEN 'advisory locks' END,
  CASE WHEN pg_catalog.pg_my_temp_schema() <> 0 AND EXISTS (
         SELECT 1 FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema())
       THEN 'temporary relations' END,
  CASE WHEN current_user <> session_user THEN 'role' END
], NULL)::text[]"""


# Run behind every transaction's COMMIT (or a single statement), in the same flush, so it
# costs no round trip (`CLEANUP`; the stream sends `RESET_SQL` as simple SQL):
# RESET ALL puts every setting back to its connect-time value, custom ones
# (``app.tenant_id`` set with set_config(…, false) in a function, a trigger, a DO block)
# and search_path included: pg_settings does not list custom settings, so no check can see
# them, and resetting is as cheap as looking. pg_advisory_unlock_all() drops session advisory
# locks the same way. The one row then names what cannot be reset in place: a role, LISTEN,
# SQL prepared statements, WITH HOLD cursors, temporary relations; the connection is then
# replaced. (The broker's own statements are protocol-level, not from SQL: they stay.)
PROBE_SQL = """SELECT concat_ws(',',
  CASE WHEN current_user <> session_user THEN 'role' END,
  CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_listening_channels()) THEN 'listen' END,
  CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_statements WHERE from_sql)
       THEN 'prepared statements' END,
  CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_cursors WHERE is_holdable) THEN 'cursors' END,
  CASE WHEN pg_catalog.pg_my_temp_schema() <> 0 AND EXISTS (
         SELECT 1 FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema())
       THEN 'temporary relations' END,
  CASE WHEN pg_catalog.pg_advisory_unlock_all() IS NULL THEN NULL END)"""
RESET_SQL = "RESET ALL; " + PROBE_SQL
# The same as statements the connection prepares once (`PgConnection.run_many`'s *cleanup*):
# Postgres then plans the probe once per connection instead of on every transaction (the
# plan took more than half of the probe's ~185 µs of backend CPU).
CLEANUP = ("RESET ALL", PROBE_SQL)


def probe_leaks(rows: list[list[object]]) -> list[str] | None:
    """What `RESET_SQL`'s row says was left behind ([] when clean), or None without its row
    (not sent, or skipped after a failed COMMIT): the caller then audits the session."""
    if not rows or not rows[-1]:
        return None
    cell = rows[-1][0]
    return str(cell).split(",") if cell else []


def mark_leaks(conn: PgConnection, rows: list[list[object]] | None, audit: bool) -> None:
    """Mark *conn* dirty (``session_dirty``: replaced on release, never handed on) if the
    transaction left session state behind: by the probe's row in *rows* (None: no probe was
    sent), else, when the probe did not run and *audit* asks for it, by `audit_session`."""
    leaked = probe_leaks(rows) if rows is not None else None
    if leaked is None and audit:
        leaked = audit_session(conn)
    if leaked:
        conn.session_dirty = ", ".join(leaked)


# Names a user function also has (an overload such as public.lower(int, int)) are left out:
# an unqualified call of that name may resolve to the user's function.
BUILTIN_FUNCTIONS_SQL = (
    "SELECT array_agg(DISTINCT proname::text) FROM pg_catalog.pg_proc AS p"
    " WHERE pronamespace = 'pg_catalog'::regnamespace AND NOT EXISTS ("
    "SELECT 1 FROM pg_catalog.pg_proc AS u WHERE u.proname = p.proname"
    " AND u.pronamespace <> 'pg_catalog'::regnamespace)"
)


def read_builtin_functions(conn: PgConnection) -> frozenset[str]:
    """The names of the server's built-in (``pg_catalog``) functions that no user function
    shares, read at start; a call of any other function gets the session audited after it."""
    result = conn.run(BUILTIN_FUNCTIONS_SQL)
    cell = result.rows[0].values[0]
    return frozenset(value.text for value in cell.array.values)


def audit_session(conn: PgConnection) -> list[str]:
    """The kinds of session state left on *conn* (blocking; worker thread), [] when clean.

    Only for an idle connection; a failure to audit counts as dirty (``["unaudited"]``) so the
    connection is replaced rather than trusted. `ConnectionLost` propagates.
    """
    if conn.closed or conn.transaction_status is not TransactionStatus.IDLE:
        return []
    try:
        result = conn.run(AUDIT_SQL)
    except PgError as exc:
        log.warning("session audit failed: %s", exc.sqlstate)
        return ["unaudited"]
    except ConnectionLost:
        return []  # the pool replaces a lost connection anyway
    if not result.rows:
        return ["unaudited"]
    cell = result.rows[0].values[0]
    return [value.text for value in cell.array.values]
