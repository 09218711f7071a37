"""Bad configuration and command lines: one line on stderr, exit 2, never the password."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from broker.config import ConfigError, load_settings

_PASSWORD = "S3cret@PW/x"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{_PASSWORD}@127.0.0.1:5432/postgres",  # '/' ends the host early
        "postgresql://app:S3c@ret@127.0.0.1:5432/postgres",  # two '@'
        "postgresql://app:1234?x@127.0.0.1:5432/postgres",  # '?' ends the host early
        "postgresql://app:1234#x@127.0.0.1:5432/postgres",  # '#' ends the host early
    ],
    ids=["slash", "two-at-signs", "question-mark", "hash"],
)
def test_url_with_unescaped_password_characters_is_refused(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({"database_url": url}, environ={})
    assert refused.value.problems == [
        "--database-url=<redacted>: cannot parse; percent-encode special characters in the "
        "user name and password (@ → %40, / → %2F, : → %3A, ? → %3F, # → %23)"
    ]


def test_percent_encoded_password_is_decoded() -> None:
    url = "postgresql://app:S3cret%40PW%2Fx@127.0.0.1:5432/postgres"
    target = load_settings({"database_url": url}, environ={}).database
    assert (target.password, target.host, target.database) == (_PASSWORD, "127.0.0.1", "postgres")


@pytest.mark.parametrize("special", list("@/:?#[]%& "))
def test_a_password_is_either_read_whole_or_refused_without_echo(special: str) -> None:
    password = f"S3c{special}ret"
    for rest in ("127.0.0.1:5432/db", "db.example.com/db?sslmode=disable", "[::1]:5432/db"):
        try:
            target = load_settings({"database_url": f"postgresql://app:{password}@{rest}"}, {})
        except ConfigError as exc:
            assert "S3c" not in str(exc) and "ret" not in str(exc)
        else:
            assert target.database.password == password
            assert "S3c" not in target.database.host + target.database.database


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PGBROKER_")}
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=30,
    )


def test_run_refuses_url_with_unescaped_password_without_echoing_it() -> None:
    url = f"postgresql://app:{_PASSWORD}@127.0.0.1:1/postgres"
    run = _cli("run", PGBROKER_DATABASE_URL=url)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "pgbroker: bad configuration: PGBROKER_DATABASE_URL=<redacted>: cannot parse; "
        "percent-encode special characters in the user name and password "
        "(@ → %40, / → %2F, : → %3A, ? → %3F, # → %23)"
    ]
    for fragment in ("S3cret", "PW", "pw:"):
        assert fragment not in run.stderr + run.stdout


@pytest.mark.parametrize("command", ["stats", "health"])
def test_bad_target_is_one_line_and_exit_2(command: str) -> None:
    run = _cli(command, "--target", "garbage")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "pgbroker: --target='garbage': must be host:port, e.g. 127.0.0.1:50051 or [::]:50051"
    ]
    run = _cli(command, PGBROKER_LISTEN="garbage")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "pgbroker: PGBROKER_LISTEN='garbage': must be host:port, e.g. 127.0.0.1:50051 or [::]:50051"
    ]
