"""RELOAD: re-read the settings that can change live, as PgBouncer does on SIGHUP.

Where new values come from: a running process's environment cannot change, so a reload
resolves every setting again exactly as the start did (flags > environment >
``PGBROKER_CONFIG_FILE`` > default, `broker.config.load_settings`), re-reading the file, and
puts the reload's *overrides* (``python -m broker reload pool_size=30``, live settings only)
on top; an override lasts until the next reload that succeeds (a ``--workers N`` worker
restarted meanwhile starts with it: `Reloader.restore`). Secrets are re-read too: a token secret
(``PGBROKER_TOKENS_SECRET_ID``, ``PGBROKER_ADMIN_TOKENS_SECRET_ID``) on the next call.

A reload is all or nothing: any bad value (or a larger pool, or a new read replica, that does
not fit the connection budget) refuses it, logged at ERROR and told to the caller
(`ReloadRefused`, naming each problem), and every setting keeps its value. The checks may wait
(a new replica's first connection, broker/front/replicas.py), so `Reloader.reload` is a
coroutine, and reloads run one at a time. Otherwise each live setting that changed is
applied by the appliers registered on the `Reloader` (the server registers the pool's, the
service's, the authenticators'; another part of the broker adds its own with `add_applier`)
and logged; a setting that needs a restart and differs is logged as such and keeps its value.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from broker.config import SETTINGS, ConfigError, Setting, Settings, load_settings, named
from broker.errors import BrokerFailure, Code, Reason

__all__ = ["Applier", "Check", "ReloadOutcome", "ReloadRefused", "Reloader", "live_settings"]

log = logging.getLogger("pgbroker.reload")

# Applies a reload: (old settings, new settings). It may raise ValueError to refuse the reload
# before anything changed only in its `check` half (see `Reloader.add_applier`).
Applier = Callable[[Settings, Settings], None]
# A check, which may be a coroutine (it may connect somewhere, e.g. to a new read replica).
Check = Callable[[Settings, Settings], Awaitable[None] | None]


class ReloadRefused(BrokerFailure):
    """A reload with a bad value: INVALID_ARGUMENT, reason BAD_REQUEST; nothing changed."""

    code = Code.INVALID_ARGUMENT
    reason = Reason.BAD_REQUEST


@dataclass
class ReloadOutcome:
    """What a reload did: ``changed`` ("pool_size: 2 -> 4"), and ``restart_needed`` (settings
    whose new value waits for a restart)."""

    changed: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        if not self.changed and not self.restart_needed:
            return "reloaded: nothing changed"
        parts = []
        if self.changed:
            parts.append("changed " + "; ".join(self.changed))
        if self.restart_needed:
            parts.append("needs a restart: " + ", ".join(self.restart_needed))
        return "reloaded: " + "; ".join(parts)


def live_settings() -> tuple[Setting, ...]:
    """The settings a reload changes live (`Setting.live`)."""
    return tuple(spec for spec in SETTINGS if spec.live)


class Reloader:
    """Re-resolves the settings of a broker started with *settings* and *flags* (its command
    line), and applies the live ones that changed. *environ* is read on each reload (the
    process environment by default; it does not change, the config file does). *adjust* turns
    freshly resolved settings into this process's (a worker's port)."""

    def __init__(
        self,
        settings: Settings,
        flags: Mapping[str, Any] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        adjust: Callable[[Settings], Settings] | None = None,
    ) -> None:
        self.settings = settings
        self.flags = {k: v for k, v in (flags or {}).items() if v is not None}
        self.environ = environ
        self.adjust = adjust or (lambda s: s)
        self._checks: list[tuple[Check, Applier | None]] = []
        self._appliers: list[Applier] = []
        self._one_at_a_time = asyncio.Lock()
        self.reloads = 0

    def add_applier(
        self, apply: Applier, check: Check | None = None, undo: Applier | None = None
    ) -> None:
        """Call *apply* (old, new) on every reload that is not refused; *check* (old, new),
        called before anything changes (awaited if it is a coroutine), refuses the reload by
        raising ValueError. When a later check refuses a reload that this *check* passed,
        *undo* (old, new) releases what the check prepared (connections it opened)."""
        self._appliers.append(apply)
        if check is not None:
            self._checks.append((check, undo))

    async def reload(
        self, overrides: Mapping[str, str] | None = None, *, why: str = ""
    ) -> ReloadOutcome:
        """Re-read the settings (see the module docstring) and apply the live ones that
        changed; raise `ReloadRefused` naming every problem, with nothing changed. Reloads
        run one at a time; the appliers run together, with no request in between."""
        async with self._one_at_a_time:
            log.info("reloading the configuration%s", f" ({why})" if why else "")
            old = self.settings
            try:
                new = self._resolve(overrides or {})
                await self._check(old, new)
            except (ConfigError, ValueError) as exc:
                problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
                log.error(
                    "reload refused; every setting keeps its value", extra={"problems": problems}
                )
                raise ReloadRefused(
                    "reload refused, nothing changed: " + "; ".join(problems)
                ) from None
            return self._apply(old, new)

    async def _check(self, old: Settings, new: Settings) -> None:
        """Every check; when one refuses (or fails), undo the ones that passed."""
        passed: list[Applier] = []
        try:
            for check, undo in self._checks:
                result = check(old, new)
                if inspect.isawaitable(result):
                    await result
                if undo is not None:
                    passed.append(undo)
        except BaseException:
            for undo in reversed(passed):
                undo(old, new)
            raise

    def _apply(self, old: Settings, new: Settings) -> ReloadOutcome:
        outcome = _compare(old, new)
        applied = _with_live(old, new)
        for apply in self._appliers:
            apply(old, applied)
        self.settings = applied
        self.reloads += 1
        for line in outcome.changed:
            log.info("reload: %s", line)
        for name in outcome.restart_needed:
            log.warning("reload: %s changed, but takes effect only after a restart", name)
        log.info(outcome.message, extra={"reloads": self.reloads})
        return outcome

    def restore(self, overrides: Mapping[str, str], *, why: str) -> Settings:
        """At start, before anything uses the settings: put the *overrides* a reload made
        in the running processes (a ``--workers N`` worker restarted after a crash) on top of
        the settings, as that reload did: resolved the same way, all or nothing, the changes
        logged (never a secret's value). Return the settings to start with; a refusal is
        logged at ERROR and starts without any of them."""
        if not overrides:
            return self.settings
        old = self.settings
        names = ", ".join(sorted(_setting_name(key) for key in overrides))
        try:
            new = self._resolve(overrides)
        except ConfigError as exc:
            log.error(
                "%s: the reload overrides in effect (%s) are refused here, so this process starts"
                " without them and differs from the others until the next reload",
                why,
                names,
                extra={"problems": exc.problems},
            )
            return old
        outcome = _compare(old, new)
        self.settings = _with_live(old, new)
        log.info(
            "%s: starting with the reload overrides in effect (%s): %s",
            why,
            names,
            "; ".join(outcome.changed) or "nothing changed",
            extra={"overrides": sorted(_setting_name(key) for key in overrides)},
        )
        return self.settings

    def _resolve(self, overrides: Mapping[str, str]) -> Settings:
        by_name = {_setting_name(key): str(value) for key, value in overrides.items()}
        problems = [_override_problem(name) for name in by_name]
        if any(problems):
            raise ConfigError([p for p in problems if p])
        environ = os.environ if self.environ is None else self.environ
        return self.adjust(load_settings(self.flags, environ, overrides=by_name))


def _with_live(old: Settings, new: Settings) -> Settings:
    """*old* with the live settings of *new* (the others wait for a restart)."""
    live = {spec.attribute: getattr(new, spec.attribute) for spec in live_settings()}
    return replace(old, **live)


def _setting_name(key: str) -> str:
    """``pool_size``, ``pool-size`` or ``PGBROKER_POOL_SIZE`` → ``pool_size``."""
    key = key.strip()
    for spec in SETTINGS:
        if key in spec.env:
            return spec.name
    return key.lower().replace("-", "_")


def _override_problem(name: str) -> str:
    try:
        spec = named(name)
    except KeyError:
        return f"{name}: no such setting"
    if spec.internal:
        return f"{name}: no such setting"
    if not spec.live:
        return f"{name}: needs a restart, so a reload cannot change it"
    return ""


def _compare(old: Settings, new: Settings) -> ReloadOutcome:
    outcome = ReloadOutcome()
    for spec in SETTINGS:
        before, after = getattr(old, spec.attribute), getattr(new, spec.attribute)
        if before == after or spec.internal:
            continue
        if not spec.live:
            outcome.restart_needed.append(spec.name)
        elif spec.secret:
            outcome.changed.append(f"{spec.name}: changed")  # never a secret's value
        else:
            outcome.changed.append(f"{spec.name}: {_shown(before)} -> {_shown(after)}")
    return outcome


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
