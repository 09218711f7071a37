"""Bad configuration and command lines: one line on stderr, exit 2, never the password."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from broker.config import SETTINGS, ConfigError, Setting, load_settings

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


# A value each parser of the settings table refuses, by what --help shows for it.
_REFUSED_BY = {
    "N": "lots",
    "SECONDS": "soon",
    "BYTES": "2MB",
    "BOOL": "maybe",
    "HOST:PORT": "garbage",
    "URL": "mysql://db.internal/app",
    "TEXT": None,  # any text is accepted; checks across settings refuse combinations
}
_URL = "postgresql://app@127.0.0.1:1/app"


def _refused_value(spec: Setting) -> str | None:
    if spec.choices:
        return "bogus"
    if spec.internal:
        return "not-a-marker"
    return _REFUSED_BY[spec.metavar]


_REFUSABLE = [spec for spec in SETTINGS if _refused_value(spec) is not None]


@pytest.mark.parametrize("spec", _REFUSABLE, ids=lambda spec: spec.name)
def test_every_bad_value_is_one_problem_naming_its_source(spec: Setting) -> None:
    bad = _refused_value(spec)
    url = {} if spec.name == "database_url" else {"PGBROKER_DATABASE_URL": _URL}
    shown = "<redacted>" if spec.secret else repr(bad)
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={**url, spec.variable: bad})
    assert len(refused.value.problems) == 1
    assert refused.value.problems[0].startswith(f"{spec.variable}={shown}: ")
    if spec.option:
        with pytest.raises(ConfigError) as refused:
            load_settings({spec.name: bad}, environ={**url, spec.variable: "ignored: flag wins"})
        assert len(refused.value.problems) == 1
        assert refused.value.problems[0].startswith(f"{spec.option}={shown}: ")


def test_every_bad_flag_is_reported_in_one_line_with_exit_2() -> None:
    flags = [spec for spec in _REFUSABLE if spec.option and spec.name != "database_url"]
    argv = [arg for spec in flags for arg in (spec.option, str(_refused_value(spec)))]
    run = _cli("run", *argv, PGBROKER_DATABASE_URL=_URL)
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("pgbroker: bad configuration: ")
    for spec in flags:
        assert f"{spec.option}={_refused_value(spec)!r}: " in line


def test_byte_sizes_take_a_unit_and_durations_take_one_too() -> None:
    settings = load_settings(
        {"database_url": _URL, "max_request_bytes": "64KiB", "queue_timeout": "500ms"},
        environ={"PGBROKER_MAX_RESULT_BYTES": "2MiB", "PGBROKER_CONNECT_TIMEOUT": "1m"},
    )
    assert (settings.max_request_bytes, settings.max_result_bytes) == (64 * 1024, 2 * 1024**2)
    assert (settings.queue_timeout, settings.connect_timeout) == (0.5, 60.0)


def test_an_unknown_setting_name_is_a_callers_bug() -> None:
    with pytest.raises(TypeError, match="pool_sise"):
        load_settings({"database_url": _URL, "pool_sise": 4}, environ={})
