"""Django's own test suite against the stock postgresql backend and against
``lambda_client.django`` through a real broker, in one run, side by side (``make django-suite``).

    python -m devtools.djangosuite [--ci] [--only stock|broker] [--timeout S]
        [--django 6.1 [--suite-python 3.12]] [APP ...]

The Django 5.2 sdist (it carries ``tests/runtests.py`` and the test apps; the wheel does not)
is downloaded once with ``pip download`` into ``.cache/`` (ignored by git) and unpacked there.
``--django 6.1`` runs that series' suite instead (its newest release on the index), in a
virtualenv of its own made once in ``.cache/`` from pyenv's Python ``--suite-python`` (3.12:
Django 6 needs it) with that Django, psycopg and the client's dependencies; the backend is the
same source tree for every series.
A temporary Postgres is started (or ``PGBROKER_TEST_DSN`` used), then:

* **stock**: ``runtests.py`` with ``ENGINE django.db.backends.postgresql`` on psycopg, straight
  to Postgres; Django creates and drops its test databases itself.
* **broker**: two brokers (auth none, loopback, no lease bounds: a TestCase class is one
  ``atomic()`` for minutes), one per test database (``default`` and ``other``, created here
  beforehand); ``runtests.py --keepdb`` with ``ENGINE lambda_client.django`` and ``TEST:
  {"NAME": ...}`` naming the broker's database (a broker serves one database, so the backend
  never creates or drops one; see docs/django.md). The default broker's statement and parse
  cache figures are printed after the run.

Settings are the sdist's own ``tests/test_sqlite.py`` with the databases replaced.

Both runs use ``--parallel=1`` (cloned test databases need CREATE DATABASE, and the machine is
shared). The table gives tests run, failures, errors, skips and seconds for each, read from
unittest's summary lines; the exit status is 1 when the broker run has a failure or error the
stock run does not have (named at the end).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
# The Django series the main .venv has (pyproject's dev extras); --django picks another.
DJANGO_SERIES = "5.2"
# Another series' suite runs on this Python by default (Django 6 needs 3.12 or newer).
SUITE_PYTHON = "3.12"

# The app list of issue 13.
APPS = [
    "basic",
    "transactions",
    "transaction_hooks",
    "select_for_update",
    "queries",
    "expressions",
    "lookup",
    "aggregation",
    "model_fields",
    "db_functions",
    "bulk_create",
    "update",
    "delete",
    "get_or_create",
    "timezones",
    "introspection",
    "schema",
    "migrations",
    "constraints",
    "backends",
    "postgres_tests",
]

# A fixed subset CI runs (about a minute each on this machine); `make django-suite` runs all.
CI_APPS = [
    "basic",
    "transactions",
    "transaction_hooks",
    "select_for_update",
    "get_or_create",
    "bulk_create",
    "update",
    "delete",
]

# The sdist's own settings (its tests/test_sqlite.py: SECRET_KEY, the password hasher, USE_TZ,
# and on 5.2 DEFAULT_AUTO_FIELD = AutoField, which 6.x drops for its BigAutoField default),
# with the databases replaced.
SETTINGS = """\
from test_sqlite import *  # noqa: F403
DATABASES = {databases!r}
"""


def django_tests_dir(series: str = DJANGO_SERIES, python: str = sys.executable) -> Path:
    """The unpacked sdist's ``tests`` directory of Django *series* (its newest release on the
    index), downloading and unpacking it with *python*'s pip on first use."""
    found = sorted(CACHE.glob(f"django-{series}.*/tests/runtests.py"), key=_release)
    if found:
        return found[-1].parent
    CACHE.mkdir(exist_ok=True)
    pip = [python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*pip, f"django=={series}.*", "-d", str(CACHE)], check=True)
    sdist = max(CACHE.glob(f"django-{series}.*.tar.gz"), key=_release)
    with tarfile.open(sdist) as tar:
        tar.extractall(CACHE, filter="data")
    return django_tests_dir(series, python)


def _release(path: Path) -> list[int]:
    """5.2.20 of .cache/django-5.2.20[.tar.gz][/tests/runtests.py], as numbers."""
    name = next(p for p in (path, *path.parents) if p.name.startswith("django-")).name
    version = name.removeprefix("django-").removesuffix(".tar.gz")
    return [int(n) if n.isdigit() else 0 for n in version.split(".")]


def suite_venv(series: str, python_version: str) -> str:
    """A virtualenv (``.cache/venv-django-<series>-py<python>``, made once) with pyenv's
    Python *python_version*, Django *series*, psycopg and the client's dependencies: what
    another series' runtests.py needs. The backend itself comes from the source tree
    (PYTHONPATH), as in the main run. Its python."""
    from devtools.clientpythons import find_python

    venv = CACHE / f"venv-django-{series}-py{python_version}"
    python = venv / "bin" / "python"
    if not python.exists():
        CACHE.mkdir(exist_ok=True)
        subprocess.run([str(find_python(python_version)), "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        packages = [f"django=={series}.*", "psycopg[binary,pool]>=3.1.8", str(ROOT / "client")]
        subprocess.run([*pip, *packages], check=True)
    return str(python)


@dataclass
class Outcome:
    """unittest's summary of one run."""

    run: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    expected_failures: int = 0
    seconds: float = 0.0
    status: int = 0
    log: Path = field(default_factory=Path)
    cache: str = ""  # the broker's statement and plan cache figures (`cache_figures`)

    @classmethod
    def parse(cls, text: str, seconds: float, status: int, log: Path) -> Outcome:
        out = cls(seconds=seconds, status=status, log=log)
        if m := re.search(r"^Ran (\d+) tests? in", text, re.M):
            out.run = int(m.group(1))
        if m := re.search(r"^(?:OK|FAILED) \((.*)\)\s*$", text, re.M):
            for part in m.group(1).split(","):
                key, _, value = part.strip().partition("=")
                attr = {"failures": "failures", "errors": "errors", "skipped": "skipped"}
                attr |= {"expected failures": "expected_failures"}
                if key in attr:
                    setattr(out, attr[key], int(value))
        return out


def run_suite(
    name: str,
    databases: dict[str, Any],
    apps: list[str],
    extra: list[str],
    timeout: float,
    python: str,
    tests: Path,
) -> Outcome:
    """``runtests.py`` of *tests* (an sdist's tests/) run by *python* with a settings module
    holding *databases*; output to a log file in .cache/ named after the run and release."""
    workdir = Path(tempfile.mkdtemp(prefix=f"djangosuite-{name}-"))
    module = f"pgbroker_settings_{name}"
    (workdir / f"{module}.py").write_text(SETTINGS.format(databases=databases))
    log = CACHE / f"django-suite-{name}-{tests.parent.name}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(workdir), str(ROOT / "client")])}
    argv = [python, "-X", "faulthandler", "runtests.py", f"--settings={module}"]
    argv += ["--parallel=1", "--noinput", *extra, *apps]
    started = time.monotonic()
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                argv,
                cwd=tests,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
            status = proc.returncode
        except subprocess.TimeoutExpired:
            status = -1
    seconds = time.monotonic() - started
    return Outcome.parse(log.read_text(errors="replace"), seconds, status, log)


def stock_databases(pg: Any) -> dict[str, Any]:
    common = {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": pg.host,
        "PORT": pg.port,
        "USER": pg.user,
        "PASSWORD": getattr(pg, "password", None) or "",
    }
    return {
        "default": {**common, "NAME": "django_stock"},
        "other": {**common, "NAME": "django_stock_other"},
    }


def broker_databases(targets: dict[str, tuple[str, str]]) -> dict[str, Any]:
    return {
        alias: {
            "ENGINE": "lambda_client.django",
            "NAME": db,
            "TEST": {"NAME": db},
            "OPTIONS": {"target": target, "timeout": 3600},  # a TestCase class: one atomic()
        }
        for alias, (db, target) in targets.items()
    }


def table(results: dict[str, Outcome]) -> str:
    rows = [("", *results)]
    for label, attr in (
        ("tests run", "run"),
        ("failures", "failures"),
        ("errors", "errors"),
        ("skipped", "skipped"),
        ("expected failures", "expected_failures"),
        ("seconds", "seconds"),
        ("exit status", "status"),
    ):
        rows.append((label, *(_fmt(getattr(o, attr)) for o in results.values())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


def _fmt(value: float) -> str:
    return f"{value:.0f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("apps", nargs="*", help="test apps or labels (default: issue 13's list)")
    parser.add_argument("--ci", action="store_true", help="the fixed CI subset")
    parser.add_argument("--only", choices=("stock", "broker"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--extra", default="", help="more runtests.py arguments")
    parser.add_argument(
        "--django",
        default=DJANGO_SERIES,
        metavar="SERIES",
        help=f"the Django series whose suite runs, e.g. 6.1 (default {DJANGO_SERIES}, the main "
        "venv's; another runs in a virtualenv of its own, see --suite-python)",
    )
    parser.add_argument(
        "--suite-python",
        default=SUITE_PYTHON,
        metavar="X.Y",
        help=f"pyenv's Python for another series' virtualenv (default {SUITE_PYTHON})",
    )
    args = parser.parse_args(argv)
    apps = args.apps or (CI_APPS if args.ci else APPS)
    extra = args.extra.split()
    python = sys.executable
    if args.django != DJANGO_SERIES:
        python = suite_venv(args.django, args.suite_python)
    tests = django_tests_dir(args.django, python)

    from devtools.brokerproc import BrokerProcess
    from devtools.localpg import LocalPostgres
    from tests.fixtures.postgres import ExternalPostgres

    dsn = os.environ.get("PGBROKER_TEST_DSN")
    pg: Any = ExternalPostgres.from_dsn(dsn) if dsn else LocalPostgres(max_connections=100).start()
    brokers: list[BrokerProcess] = []
    results: dict[str, Outcome] = {}
    try:
        if args.only in (None, "stock"):
            results["stock postgresql"] = run_suite(
                "stock", stock_databases(pg), apps, extra, args.timeout, python, tests
            )
        if args.only in (None, "broker"):
            targets = {}
            for alias, db in (("default", "django_broker"), ("other", "django_broker_other")):
                _recreate_database(pg, db)
                password = getattr(pg, "password", None)
                base = f"postgresql://{pg.user}" + (f":{password}" if password else "")
                broker = BrokerProcess(
                    f"{base}@{pg.host}:{pg.port}/{db}?sslmode=disable",
                    log_level="INFO",
                    pool_size=4,
                    auth="none",
                    # A TestCase class runs all its tests in one atomic(): one lease for
                    # minutes, idle while a test does no SQL; the broker's bounds (30 s, 10 s
                    # idle) are for Lambdas, not for this.
                    transaction_timeout=0,
                    idle_transaction_timeout=0,
                    statement_timeout=600,
                )
                brokers.append(broker.start())
                broker.wait_serving()
                targets[alias] = (db, broker.target)
            results["lambda_client.django"] = outcome = run_suite(
                "broker",
                broker_databases(targets),
                apps,
                ["--keepdb", *extra],
                args.timeout,
                python,
                tests,
            )
            outcome.cache = cache_figures(brokers[0].target)
    finally:
        for broker in brokers:
            broker.stop()
        if not dsn:
            pg.stop()
    print(f"Django {tests.parent.name.removeprefix('django-')} suite, apps: {' '.join(apps)}")
    print(table(results))
    for name, outcome in results.items():
        print(f"{name}: log {outcome.log}")
        if outcome.cache:
            print(f"{name}: {outcome.cache}")
    if len(results) == 2:
        stock, ours = results.values()
        new = sorted(failed_tests(ours.log) - failed_tests(stock.log))
        for test in new:
            print(f"NEW in lambda_client.django: {test}")
        return int(bool(new) or ours.status < 0 or ours.run == 0)  # a timeout or signal
    return int(any(o.failures or o.errors for o in results.values()))


def cache_figures(target: str) -> str:
    """The default database's broker's statement cache and plan cache figures (GetStats):
    how much of Django's SQL, literals written in, repeats."""
    import grpc

    from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
    from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target.removeprefix("dns:///")) as channel:
        stats = pb_grpc.BrokerStub(channel).GetStats(pb.GetStatsRequest(), timeout=10).stats
    if "statements_reused" not in stats:
        return ""  # a broker from before these figures
    runs = {k: stats[f"statements_{k}"] for k in ("reused", "unnamed", "prepared")}
    hits, misses = stats["plan_cache_hits"], stats["plan_cache_misses"]
    total = sum(runs.values()) or 1
    return (
        f"statements run {total}: {runs['reused']} prepared already "
        f"({100 * runs['reused'] / total:.0f}%), {runs['unnamed']} first runs unnamed, "
        f"{runs['prepared']} prepared; plan cache {hits} hits, {misses} misses "
        f"({100 * hits / ((hits + misses) or 1):.0f}% hits)"
    )


def failed_tests(log: Path) -> set[str]:
    """The ids of the tests unittest reports as FAIL or ERROR in *log*."""
    text = log.read_text(errors="replace")
    return set(re.findall(r"^(?:FAIL|ERROR): (\S+ \([^)]*\))", text, re.M))


def _recreate_database(pg: Any, name: str) -> None:
    """A fresh, empty database *name* with the extensions postgres_tests installs itself
    through migrations (they need a superuser, which the broker's login is here)."""
    import pg8000.native

    conn = pg8000.native.Connection(
        pg.user,
        host=pg.host,
        port=pg.port,
        database="postgres",
        password=getattr(pg, "password", None),
    )
    try:
        conn.run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.run(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main())
