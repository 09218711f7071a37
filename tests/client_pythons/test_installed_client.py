"""The installed client distribution, on the Python running this test, against a real broker.

`make test-client-pythons` runs this under each supported Python (pyenv's 3.10 and 3.13) from a
virtualenv holding only ``pip install ./client pytest``; the broker runs from the main .venv
and its target comes in ``PGBROKER_URL``. Nothing here may import more than lambda_client.
"""

from __future__ import annotations

import asyncio
import os
import sys
import sysconfig
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

TARGET = os.environ.get("PGBROKER_URL", "")
pytestmark = pytest.mark.skipif(not TARGET, reason="run by `make test-client-pythons`")


def test_the_client_is_the_installed_distribution_not_the_source_tree() -> None:
    import lambda_client

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert Path(lambda_client.__file__).resolve().is_relative_to(site)


def test_query_round_trips_values() -> None:
    from lambda_client import BrokerClient

    values = [
        1,
        Decimal("12.50"),
        "héllo",
        b"\x00\xff",
        date(2024, 2, 29),
        datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc),
        timedelta(days=1, seconds=5),
        {"a": [1, None]},
        None,
    ]
    sql = "SELECT " + ", ".join(f"${n}" for n in range(1, len(values) + 1))
    with BrokerClient(TARGET, tls=False, timeout=10) as client:
        assert client.query(sql, values).one() == tuple(values)


def test_transaction_failure_rolls_back_and_raises_the_postgres_error() -> None:
    from lambda_client import BrokerClient, IntegrityError

    table = f"py{sys.version_info.major}{sys.version_info.minor}_accounts"
    with BrokerClient(TARGET, tls=False, timeout=10) as client:
        client.query(f"DROP TABLE IF EXISTS {table}")
        client.query(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        with pytest.raises(IntegrityError) as raised:
            client.transaction(
                [(f"INSERT INTO {table} VALUES ($1)", [1]), f"INSERT INTO {table} VALUES (1)"]
            )
        assert raised.value.sqlstate == "23505"
        assert client.query(f"SELECT count(*) FROM {table}").scalar() == 0
        client.query(f"DROP TABLE {table}")


def test_async_client_queries() -> None:
    from lambda_client.aio import AsyncBrokerClient

    async def run() -> object:
        async with AsyncBrokerClient(TARGET, tls=False, timeout=10) as client:
            return (await client.query("SELECT $1::int + 1", [41])).scalar()

    assert asyncio.run(run()) == 42


def test_only_the_client_and_its_dependencies_are_loaded() -> None:
    from lambda_client import BrokerClient

    BrokerClient(TARGET, tls=False, timeout=10).close()
    server_side = ("broker", "pg8000", "pglast", "devtools", "boto3", "aws_lambda_powertools")
    assert not [m for m in sys.modules if m.split(".")[0] in server_side]
