"""Test the installed client on other Pythons: ``python -m devtools.clientpythons 3.10 3.13``.

For each version, pyenv's newest interpreter of that series gets a virtualenv
(``.venv-client-<version>``) holding only ``pip install ./client pytest``; that interpreter runs
``tests/client_pythons`` against one real broker, which runs from this interpreter (the main
.venv) over a temporary Postgres. A version pyenv does not have fails the run, by name: CI must
not pass by testing fewer Pythons than it claims.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from devtools.brokerproc import BrokerProcess
from devtools.localpg import LocalPostgres

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests" / "client_pythons"


class MissingPython(RuntimeError):
    """pyenv has no interpreter of the asked version."""


def pyenv_root() -> Path:
    """PYENV_ROOT, else ``pyenv root``, else ~/.pyenv."""
    if root := os.environ.get("PYENV_ROOT"):
        return Path(root)
    try:
        out = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return Path.home() / ".pyenv"


def find_python(version: str) -> Path:
    """pyenv's newest ``<version>.x`` interpreter; MissingPython names what to install."""
    versions = pyenv_root() / "versions"
    found = [
        path / "bin" / f"python{version}"
        for path in versions.glob(f"{version}.*")
        if (path / "bin" / f"python{version}").is_file()
    ]
    if not found:
        raise MissingPython(
            f"no Python {version} under {versions}: run `pyenv install {version}` first"
        )
    return max(found, key=lambda p: [int(n) for n in p.parent.parent.name.split(".")])


def prepare_venv(version: str) -> Path:
    """A virtualenv with the client distribution and pytest only; its python."""
    venv = ROOT / f".venv-client-{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([str(find_python(version)), "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # Not editable: the test must see the files the wheel ships, not the source tree.
    subprocess.run([*pip, "--force-reinstall", "--no-deps", str(ROOT / "client")], check=True)
    subprocess.run([*pip, str(ROOT / "client"), "pytest"], check=True)
    return python


def run_tests(python: Path, target: str) -> int:
    """tests/client_pythons under *python*, with its own ini (no repo conftest, no repo path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PGBROKER_URL")}
    env["PGBROKER_URL"] = target
    argv = [str(python.parent / "pytest"), "-c", str(TESTS / "pytest.ini"), str(TESTS)]
    return subprocess.run(argv, cwd=TESTS, env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.clientpythons")
    parser.add_argument("versions", nargs="+", help="Python series, e.g. 3.10 3.13")
    args = parser.parse_args(argv)
    try:
        pythons = {version: prepare_venv(version) for version in args.versions}
    except MissingPython as exc:
        print(f"test-client-pythons: {exc}", file=sys.stderr)
        return 2
    failed = []
    with (
        LocalPostgres(max_connections=20) as postgres,
        BrokerProcess(postgres.dsn, pool_size=2, log_level="INFO") as broker,
    ):
        broker.wait_serving()
        for version, python in pythons.items():
            print(f"== client on Python {version} ({python})", flush=True)
            if run_tests(python, broker.target) != 0:
                failed.append(version)
    if failed:
        print(f"test-client-pythons: failed on Python {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
