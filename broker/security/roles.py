"""Least privilege per caller: ``PGBROKER_ROLE_MAP`` maps identities to Postgres roles.

One pool logs in as one database user (a member of every mapped role); each transaction then
runs ``SET LOCAL ROLE <role>`` for its caller, so callers with different rights share the
pool and a role never outlives its transaction. The map is JSON (``{"app-role":
"app_rw", "reporting-*": "app_ro"}``) or ``pattern=role,…``; patterns are matched in order
against the caller's role name (iam), token label (token) or ``anonymous`` (none), or against
ARNs when they start with ``arn:`` (``*`` and ``?`` wildcards, see `Identity.matches`).
A caller no pattern matches gets ``PGBROKER_DEFAULT_ROLE``, or PERMISSION_DENIED without one.

With a map in force the session-state check also refuses every role change by the caller
(``SET LOCAL ROLE``, ``RESET ROLE``, ``set_config('role', …)``, ``DO`` blocks) — otherwise a
caller could switch back to the login user, which is a member of every role.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from broker.errors import BrokerFailure, Code, Reason
from broker.security.identity import Identity

__all__ = ["RoleMap", "RoleRefused", "quote_role"]

# Role names as Postgres folds unquoted identifiers, plus '-' (quoted). Anything else is
# refused at start, so no map entry can smuggle SQL into SET LOCAL ROLE.
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}")


class RoleRefused(BrokerFailure):
    """The caller maps to no Postgres role and there is no default role: PERMISSION_DENIED,
    with ErrorInfo metadata ``cause=role_map``."""

    code = Code.PERMISSION_DENIED
    reason = Reason.PERMISSION_DENIED

    def __init__(self, identity: Identity) -> None:
        super().__init__(
            f"{identity} has no database role: it matches no PGBROKER_ROLE_MAP entry and"
            " PGBROKER_DEFAULT_ROLE is not set",
            metadata={"cause": "role_map"},
        )
        self.identity = identity


def quote_role(role: str) -> str:
    """The role as a quoted identifier (names were validated by `RoleMap.parse`)."""
    return '"' + role.replace('"', '""') + '"'


@dataclass(frozen=True)
class RoleMap:
    """Ordered (pattern, role) entries and an optional default role."""

    entries: tuple[tuple[str, str], ...]
    default_role: str | None = None

    @classmethod
    def parse(cls, text: str, default_role: str = "") -> RoleMap | None:
        """The map from ``PGBROKER_ROLE_MAP`` text, or None when both are empty.

        Raise ValueError (one line) for malformed text or a role name that is not a plain
        identifier.
        """
        text, default = text.strip(), default_role.strip()
        if not text and not default:
            return None
        entries: list[tuple[str, str]] = []
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"PGBROKER_ROLE_MAP is not valid JSON ({exc.msg})") from None
            entries = [(str(k).strip(), str(v).strip()) for k, v in data.items()]
        elif text:
            for item in text.split(","):
                pattern, sep, role = item.partition("=")
                if not sep or not pattern.strip() or not role.strip():
                    raise ValueError(
                        f"PGBROKER_ROLE_MAP entry {item.strip()!r} is not pattern=role"
                    )
                entries.append((pattern.strip(), role.strip()))
        for role in [r for _, r in entries] + ([default] if default else []):
            if not _ROLE_NAME.fullmatch(role):
                raise ValueError(
                    f"PGBROKER_ROLE_MAP/PGBROKER_DEFAULT_ROLE: {role!r} is not a plain role name"
                )
        return cls(tuple(entries), default or None)

    def role_for(self, identity: Identity | None) -> str:
        """The Postgres role for *identity*: the first matching entry, else the default.

        Raise `RoleRefused` when nothing applies.
        """
        caller = identity or Identity("none", "anonymous")
        for pattern, role in self.entries:
            if caller.matches(pattern):
                return role
        if self.default_role is not None:
            return self.default_role
        raise RoleRefused(caller)
