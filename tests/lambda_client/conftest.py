"""The client's tests run against real brokers in child processes (``broker_process`` and
``start_broker_process`` from `tests.fixtures.brokers`) or the scripted stand-in
(`tests.lambda_client.standin`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.brokerproc import BrokerProcess


@pytest.fixture(scope="module")
def broker(broker_process: BrokerProcess) -> Iterator[BrokerProcess]:
    """``broker_process`` under the name these tests use: every broker here is a child
    process."""
    yield broker_process
