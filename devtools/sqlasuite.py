"""Run SQLAlchemy's and Alembic's dialect compliance suites against the ``postgresql+pgbroker``
dialect and the stock ``postgresql+pg8000`` dialect, on one Postgres, in one run, and print
their counts side by side: ``python -m devtools.sqlasuite [--ci] [-- PYTEST ARGS]``.

One temporary Postgres (`LocalPostgres`, or ``PGBROKER_TEST_DSN``) serves every run; the
pgbroker run goes through a real broker process in front of it. Each run is one pytest process
rooted at tests/sqlalchemy_suite (SQLAlchemy's plugin is its session plugin there), with its
own ``--dburi`` and requirements class:

* ``pg8000 (generic)``: stock pg8000 with SQLAlchemy's and Alembic's own ``SuiteRequirements``,
  the figure the issue measured; skipped with ``--ci``;
* ``pg8000``: stock pg8000 with our `Requirements` (what Postgres supports);
* ``pgbroker``: our dialect through the broker, with the same `Requirements`, whose only
  differences are the broker's overrides (tests/sqlalchemy_suite/requirements.py).

A pgbroker test that fails or errors and is not in tests/sqlalchemy_suite/expected_failures.toml
(with its reason) fails the run (exit 1); a listed test that now passes is reported so the
list can shrink. ``--ci`` runs the fixed subset named in that file's ``[ci]`` table, for CI's
time budget. Exit 2 when the servers could not be started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pg8000.native

from devtools.brokerproc import BrokerProcess
from devtools.localpg import LocalPostgres

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "tests" / "sqlalchemy_suite"
EXPECTED = SUITE / "expected_failures.toml"
SUITE_FILES = {"sqlalchemy": "test_suite_sqlalchemy.py", "alembic": "test_suite_alembic.py"}
GENERIC = "requirements:GenericRequirements"
OURS = "requirements:Requirements"
GATED = "pgbroker"
# The suite opens a few connections at once (independent_connections, isolation tests); each
# DB-API transaction holds one leased server connection.
BROKER_POOL_SIZE = 6
OUTCOMES = ("passed", "failed", "error", "skipped")


@dataclass(frozen=True)
class Run:
    """One pytest process: *label* in the table, *dialect* (pgbroker or pg8000), and the
    requirements class (``module:Class`` inside tests/sqlalchemy_suite)."""

    label: str
    dialect: str
    requirements: str


@dataclass
class Outcomes:
    """Each test's outcome in one run, by stable id (``file::Class::test[params]``, the class
    without SQLAlchemy's per-backend suffix)."""

    by_test: dict[str, str] = field(default_factory=dict)
    #: The failure or error message of each failed test.
    messages: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    exit_code: int = 0

    def counts(self, suite: str) -> Counter[str]:
        """passed/failed/error/skipped of the tests from *suite*'s file."""
        prefix = SUITE_FILES[suite] + "::"
        return Counter(o for t, o in self.by_test.items() if t.startswith(prefix))


def runs(ci: bool) -> list[Run]:
    """The runs in order: the generic baseline (not in CI), pg8000, pgbroker."""
    chosen = [
        Run("pg8000 (generic requirements)", "pg8000", GENERIC),
        Run("pg8000", "pg8000", OURS),
        Run("pgbroker", "pgbroker", OURS),
    ]
    return chosen[1:] if ci else chosen


# -- servers ------------------------------------------------------------------------------


@contextlib.contextmanager
def servers(need_broker: bool) -> Iterator[tuple[str, str | None]]:
    """Yield (``postgresql://`` DSN, broker ``host:port`` or None): a temporary Postgres with
    the schemas the suites use, and a broker (auth none) in front of it; both stopped after."""
    external = os.environ.get("PGBROKER_TEST_DSN")
    local = None if external else LocalPostgres(max_connections=100).start()
    dsn = external or local.dsn  # type: ignore[union-attr]
    broker = None
    try:
        prepare_database(dsn)
        if need_broker:
            broker = BrokerProcess(
                dsn + "?sslmode=disable",
                log_level="INFO",
                pool_size=BROKER_POOL_SIZE,
                auth="none",
                shutdown_grace=2,
            ).start()
            if not broker.wait_serving(30):
                raise RuntimeError("the broker's pool did not fill:\n" + broker.log()[-3000:])
        yield dsn, broker.target if broker else None
    finally:
        if broker is not None:
            broker.close()
        if local is not None:
            local.stop()


def prepare_database(dsn: str) -> None:
    """Create the schemas SQLAlchemy's suite expects (README.unittests.rst: ``test_schema``,
    ``test_schema_2``), unless they exist."""
    from urllib.parse import urlsplit

    url = urlsplit(dsn)
    conn = pg8000.native.Connection(
        user=url.username or "postgres",
        password=url.password,
        host=url.hostname or "127.0.0.1",
        port=url.port or 5432,
        database=url.path.lstrip("/") or "postgres",
    )
    try:
        for schema in ("test_schema", "test_schema_2"):
            conn.run(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    finally:
        conn.close()


def dburi(dialect: str, dsn: str, broker_target: str | None) -> str:
    """The SQLAlchemy URL of *dialect* for the Postgres at *dsn* (directly, or through the
    broker at *broker_target*)."""
    rest = dsn.split("://", 1)[1]
    if dialect == "pg8000":
        return "postgresql+pg8000://" + rest
    assert broker_target is not None
    database = rest.rsplit("/", 1)[1].split("?")[0]
    return f"postgresql+pgbroker://{broker_target}/{database}"


# -- one pytest process ---------------------------------------------------------------------


def run_pytest(
    run: Run, uri: str, tests: Sequence[str], workdir: Path, extra: Sequence[str]
) -> Outcomes:
    """Run *tests* (paths or node ids under tests/sqlalchemy_suite) against *uri*; return
    their outcomes from pytest's junit XML. pytest's output goes to a log in *workdir*."""
    slug = run.label.split()[0] + ("-generic" if run.requirements == GENERIC else "")
    junit = workdir / f"{slug}.xml"
    log = workdir / f"{slug}.log"
    # Alembic's suite writes its scratch migration folders into the working directory.
    cwd = workdir / f"{slug}-cwd"
    cwd.mkdir(exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        str(SUITE / "setup.cfg"),
        "--rootdir",
        str(SUITE),
        "--dburi",
        uri,
        "--requirements-class",
        run.requirements,
        f"--junitxml={junit}",
        "-q",
        *(str(SUITE / t) for t in tests),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SUITE)])}
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    outcomes = read_junit(junit) if junit.exists() else Outcomes()
    outcomes.seconds = time.monotonic() - started
    outcomes.exit_code = proc.returncode
    if proc.returncode not in (0, 1):  # 1: some tests failed; anything else: pytest broke
        print(f"pytest for {run.label} exited {proc.returncode}; its output:", file=sys.stderr)
        print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
    return outcomes


def read_junit(path: Path) -> Outcomes:
    """Outcomes from a junit XML file; a test reported twice (a failing teardown) keeps its
    worst outcome."""
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    outcomes = Outcomes()
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "") + "\n" + (child.text or "")
        test = stable_id(case.get("classname", ""), case.get("name", ""))
        if rank[outcome] >= rank.get(outcomes.by_test.get(test, "passed"), 0):
            outcomes.by_test[test] = outcome
            if outcome in ("failed", "error"):
                outcomes.messages[test] = message
    return outcomes


def stable_id(classname: str, name: str) -> str:
    """``test_suite_x.py::Class::name`` from junit's ``test_suite_x.Class_<backend>``."""
    module, _, cls = classname.partition(".")
    cls = cls.split("_postgresql+", 1)[0]
    return f"{module}.py::{cls}::{name}" if cls else f"{module}.py::{name}"


# -- the expected-failures list ---------------------------------------------------------------


@dataclass
class Expected:
    """pgbroker's known failures (expected_failures.toml): by test id, and by a text in the
    error (a broker behaviour that fails whichever test lands on it), each with its reason;
    and the CI subset's test paths."""

    by_test: dict[str, str]
    by_message: dict[str, str]
    ci_tests: list[str]
    ci_args: list[str]

    def explains(self, test: str, message: str) -> bool:
        return test in self.by_test or any(text in message for text in self.by_message)


def load_expected(path: Path = EXPECTED) -> Expected:
    data = tomllib.loads(path.read_text())
    return Expected(
        by_test={str(k): str(v) for k, v in data.get("expected_failures", {}).items()},
        by_message={str(k): str(v) for k, v in data.get("expected_messages", {}).items()},
        ci_tests=[str(t) for t in data.get("ci", {}).get("tests", [])],
        ci_args=[str(a) for a in data.get("ci", {}).get("pytest_args", [])],
    )


def judge(outcomes: Outcomes, expected: Expected) -> tuple[list[str], list[str]]:
    """(new failures: failed or errored and not explained by *expected*; fixed: listed by
    id but passed)."""
    new = sorted(
        t
        for t, o in outcomes.by_test.items()
        if o in ("failed", "error") and not expected.explains(t, outcomes.messages.get(t, ""))
    )
    fixed = sorted(t for t in expected.by_test if outcomes.by_test.get(t) == "passed")
    return new, fixed


# -- report --------------------------------------------------------------------------------


def table(results: list[tuple[Run, Outcomes]]) -> str:
    """The counts per suite and run, one row each, in one text table."""
    head = f"{'suite':<11} {'dialect':<30} {'passed':>7} {'failed':>7} {'errors':>7}"
    head += f" {'skipped':>8} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for suite in SUITE_FILES:
        for run, outcomes in results:
            c = outcomes.counts(suite)
            lines.append(
                f"{suite:<11} {run.label:<30} {c['passed']:>7} {c['failed']:>7} "
                f"{c['error']:>7} {c['skipped']:>8} {outcomes.seconds:>8.0f}"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="the fixed CI subset, no generic run")
    parser.add_argument(
        "--only", choices=["pg8000", "pgbroker"], help="run one dialect (with our requirements)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the junit files and logs")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed to every pytest")
    args = parser.parse_args(argv)

    expected = load_expected()
    tests = expected.ci_tests if args.ci else list(SUITE_FILES.values())
    pytest_args = [*(expected.ci_args if args.ci else []), *args.pytest_args]
    chosen = runs(args.ci)
    if args.only:
        chosen = [r for r in chosen if r.dialect == args.only and r.requirements == OURS]
    workdir = Path(tempfile.mkdtemp(prefix="pgbroker-sqlasuite-"))
    results: list[tuple[Run, Outcomes]] = []
    try:
        with servers(any(r.dialect == "pgbroker" for r in chosen)) as (dsn, target):
            for run in chosen:
                outcomes = run_pytest(
                    run, dburi(run.dialect, dsn, target), tests, workdir, pytest_args
                )
                results.append((run, outcomes))
    except RuntimeError as exc:
        print(f"sqlasuite: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)
    print(table(results))
    status = 0
    for run, outcomes in results:
        if outcomes.exit_code not in (0, 1) or not outcomes.by_test:
            print(f"{run.label}: pytest exited {outcomes.exit_code}; no usable result")
            status = 1
    for run, outcomes in results:
        if run.dialect != GATED:
            continue
        new, fixed = judge(outcomes, expected)
        for test in new:
            print(f"NEW FAILURE ({run.label}): {test} -> {outcomes.by_test[test]}")
        for test in fixed:
            print(f"now passes ({run.label}), remove from {EXPECTED.name}: {test}")
        status = status or (1 if new else 0)
    if args.keep:
        print(f"junit files and logs: {workdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
