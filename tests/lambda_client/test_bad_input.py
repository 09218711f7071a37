"""Bad arguments fail at once with a `TypeError`/`ValueError` naming the argument, and nothing
reaches the broker: checked against a real broker's own count of calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from devtools.brokerproc import BrokerProcess
from devtools.lambda_context import FakeLambdaContext
from lambda_client import BrokerClient, DeadlineExceeded
from lambda_client.client import DEFAULT_TARGET, check_target


@pytest.fixture
def db(broker: BrokerProcess) -> Iterator[BrokerClient]:
    """A connected client; the test must send the broker no `Execute`."""
    client = BrokerClient(broker.target, timeout=10)
    client.query("SELECT 1")  # the channel is up: only the argument stands in the way
    before = client.stats()["rpcs_num"]  # counts Execute calls
    yield client
    assert client.stats()["rpcs_num"] == before


class NotANumberContext(FakeLambdaContext):
    def get_remaining_time_in_millis(self) -> Any:
        return "100"


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda db: db.transaction("SELECT 1"),
            TypeError,
            r"statements must be a list of SQL strings or \(sql, params\) pairs, not str",
        ),
        (
            lambda db: db.execute_many("SELECT $1", None),
            TypeError,
            "param_sets must be a list of parameter lists, one per execution, not NoneType",
        ),
        (lambda db: db.transaction(["SELECT 1", 2]), TypeError, "statement 1: each statement"),
        (lambda db: db.query("SELECT '\ud800'"), ValueError, "sql: text has a lone surrogate"),
        (
            lambda db: db.transaction(["SELECT 1"], isolation=3),
            TypeError,
            "isolation must be None, 'read committed', 'repeatable read' or 'serializable'",
        ),
        (lambda db: db.transaction(["SELECT 1"], isolation="snapshot"), ValueError, "isolation"),
        (
            lambda db: db.transaction(["SELECT 1"], read_only="no"),
            TypeError,
            "read_only must be True or False, not 'no'",
        ),
        (lambda db: db.transaction(["SELECT 1"], deferrable=1), TypeError, "deferrable must be"),
        (
            lambda db: db.query("SELECT 1", context=NotANumberContext()),
            TypeError,
            r"get_remaining_time_in_millis\(\) must return a number of milliseconds",
        ),
        (lambda db: db.query("SELECT 1", context={}), TypeError, "context must be the Lambda"),
        (lambda db: db.query("SELECT $1", [10**5, "\ud800"]), ValueError, r"\$2: text has"),
        (lambda db: db.query("SELECT $1", [{1: "a", "1": "b"}]), TypeError, r"\$1: JSON object"),
    ],
)
def test_bad_arguments_raise_naming_them_before_anything_is_sent(
    db: BrokerClient, call: Callable[[BrokerClient], object], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        call(db)


@pytest.mark.parametrize(
    ("timeout", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("5", TypeError),
        (True, TypeError),
    ],
)
def test_a_call_timeout_is_checked_like_the_clients(
    db: BrokerClient, timeout: Any, error: type
) -> None:
    with pytest.raises(error, match="timeout must be a"):
        db.query("SELECT 1", timeout=timeout)
    with pytest.raises(error, match="timeout must be a"):
        BrokerClient(db.target, timeout=timeout)


def test_an_int_beyond_the_str_conversion_limit_round_trips(broker: BrokerProcess) -> None:
    db = BrokerClient(broker.target)
    assert db.query("SELECT $1::numeric % 7", [10**5000]).scalar() == 10**5000 % 7


def test_a_deadline_too_short_to_send_says_nothing_was_sent(db: BrokerClient) -> None:
    with pytest.raises(DeadlineExceeded, match="before the call could be sent; nothing was sent"):
        db.query("SELECT 1", timeout=1e-6)


def test_no_time_left_names_the_lambda_margin_only_with_a_context(db: BrokerClient) -> None:
    with pytest.raises(DeadlineExceeded, match=r"within the deadline margin of 0\.5s") as info:
        db.query("SELECT 1", context=FakeLambdaContext(remaining=0.3))
    assert "nothing was sent" in str(info.value)


@pytest.mark.parametrize(
    "target",
    [
        "",
        "  ",
        "http://127.0.0.1:50071",
        "grpc://broker:50051",
        "127.0.0.1:99999",
        "127.0.0.1:0",
        "broker:",
        "[::1]:65536",
        "dns:///broker.internal:70000",
        "ipv4:10.0.1.5:50051,10.0.2.7:99999",
    ],
)
def test_a_malformed_target_is_refused_at_construction(target: str) -> None:
    with pytest.raises(ValueError, match="target"):
        BrokerClient(target)


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:50051",
        "broker.internal",
        "dns:///broker.internal:50051",
        "dns://10.0.0.2/broker.internal:50051",
        "ipv4:10.0.1.5:50051,10.0.2.7:50051",
        "ipv6:[::1]:50051",
        "[::1]:50051",
        "unix:///tmp/broker.sock",
    ],
)
def test_well_formed_targets_are_accepted(target: str) -> None:
    assert check_target(target) == target


def test_pgbroker_url_is_checked_and_named_and_empty_counts_as_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGBROKER_URL", "https://broker.internal:50051")
    with pytest.raises(ValueError, match=r"PGBROKER_URL 'https://broker\.internal:50051'"):
        BrokerClient()
    monkeypatch.setenv("PGBROKER_URL", "")
    assert BrokerClient().target == DEFAULT_TARGET
