"""The settings table in broker/config.py is the one truth: the README shows it, the CLI's
flags and help come from it, and the help is plain text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import SETTINGS, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"
REGENERATE = "python -m broker settings"


def _readme_table() -> str:
    """The table in README.md's section "The broker" (the lines from its header row on)."""
    section = README.read_text().split("\n## The broker\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variable |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def _rows(table: str) -> dict[str, str]:
    """Row text by its first cell (the variable)."""
    return {row.split(" | ", 1)[0].strip("| "): row for row in table.splitlines()[2:]}


def test_readme_table_is_the_declared_table() -> None:
    readme, declared = _rows(_readme_table()), _rows(markdown_table())
    assert list(readme) == list(declared), f"names differ; regenerate with `{REGENERATE}`"
    for variable, row in declared.items():
        assert readme[variable] == row, f"{variable} differs; regenerate with `{REGENERATE}`"
    assert _readme_table() == markdown_table()


def test_declared_table_names_every_public_setting_once() -> None:
    public = [spec for spec in SETTINGS if not spec.internal]
    assert [spec.variable for spec in public] == [
        variable.split(" or ")[0].strip("`") for variable in _rows(markdown_table())
    ]
    assert len({spec.name for spec in SETTINGS}) == len(SETTINGS)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    # FORCE_COLOR asks colour-capable help formatters (Python 3.14's argparse) for colour.
    env = {**os.environ, "FORCE_COLOR": "1", "PYTHON_COLORS": "1", "COLUMNS": "100"}
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


@pytest.mark.parametrize("args", [(), ("run",), ("serve",), ("stats",), ("health",), ("settings",)])
def test_help_is_plain_text(args: tuple[str, ...]) -> None:
    shown = _cli(*args, "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("usage: python -m broker")
    assert "\x1b" not in shown.stdout  # no ANSI escape sequences
    assert "`" not in shown.stdout  # no Markdown or reStructuredText markup


def test_run_has_a_flag_for_every_setting_but_secrets_and_plumbing() -> None:
    shown = _cli("run", "--help").stdout
    flags = set(re.findall(r"(--[a-z-]+)", shown)) - {"--help"}
    assert flags == {spec.option for spec in SETTINGS if spec.option}
    assert "--tokens " not in shown and "--worker " not in shown


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    shown = _cli("--version")
    assert shown.returncode == 0
    assert shown.stdout == f"pgbroker {version('pgbroker')}\n"


def test_version_without_package_metadata_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from broker.__main__ import version

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert version() == "unknown (not installed)"


def test_settings_command_prints_the_table() -> None:
    shown = _cli("settings")
    assert (shown.returncode, shown.stdout) == (0, markdown_table())
