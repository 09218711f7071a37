"""Held refusals through a real broker (`PGBROKER_AUTH_REFUSAL_HOLD`, broker/security/tarpit.py):
any refusal counts, not only forged IAM proofs, and the held answer keeps its own status.
No times are asserted; the held calls are counted (``auth_held``)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from lambda_client._proto.pgbroker.v1 import broker_pb2 as pb
from lambda_client._proto.pgbroker.v1 import broker_pb2_grpc as pb_grpc
from tests.fixtures.brokers import InProcessBroker

TOKEN = "tarpit-test-token-0123456789"
BUDGET = 32  # broker.security.tarpit.BUDGET


async def guesses(target: str, count: int) -> list[grpc.aio.AioRpcError]:
    """*count* calls at once, each with a wrong bearer token."""

    async def one(k: int) -> grpc.aio.AioRpcError:
        try:
            await stub.Execute(
                pb.ExecuteRequest(statements=[pb.Statement(sql="SELECT 1")]),
                metadata=(("authorization", f"Bearer wrong-guess-{k:04d}-0123456789"),),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            return exc
        raise AssertionError("a wrong token was admitted")

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BrokerStub(channel)
        return list(await asyncio.gather(*(one(k) for k in range(count))))


@pytest.mark.parametrize(("hold", "held"), [("1", 8), ("0", 0)])
def test_token_guesses_past_the_budget_are_held_with_their_own_status(
    postgres: Any, hold: str, held: int
) -> None:
    with InProcessBroker(
        postgres.dsn, auth="token", tokens=f"app:{TOKEN}", auth_refusal_hold=hold
    ) as broker:
        errors = asyncio.run(guesses(broker.target, BUDGET + 8))
        stats = broker.stats()
        # The address's own valid token is still admitted (accepted calls are never held).
        answer = broker.execute(
            pb.ExecuteRequest(statements=[pb.Statement(sql="SELECT 1")]),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
        )
    assert {e.code() for e in errors} == {grpc.StatusCode.UNAUTHENTICATED}
    assert stats["auth_failures"] == BUDGET + 8
    assert stats["auth_held"] == held  # the 8 past the budget, unless the hold is 0
    assert len(answer.results) == 1
