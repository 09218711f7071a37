"""How held refusals are released and how many are held (broker/security/tarpit.py): each held
call waits its own drawn time, so calls held together are not answered together; and one
source past its own cap may use the broker-wide room while another source still finds its
own. The times asserted are lower bounds (a sleep never ends early) and a spread that calls
answered together (the fixed hold's burst) cannot have."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from broker.security.stsgate import VerifyGate, peer_host
from broker.security.tarpit import SPREAD, Tarpit
from tests.broker.security.test_sts_bounds import (
    FLOOD_SOURCE,
    VALID_SOURCE,
    CountingPost,
    call,
    forged,
    iam_auth,
    over_budget,
    release_held,
    two_sources,
    until,
)
from tests.broker.security.test_tarpit import BUDGET, TOKEN, guesses
from tests.fixtures.aws import MotoAws
from tests.fixtures.brokers import InProcessBroker

HOLD = 2.0  # seconds: drawn holds span 1-3 s, a spread far above the calls' arrival skew
HELD = 40


async def answer_times(target: str, count: int) -> tuple[list[float], set[grpc.StatusCode]]:
    """Seconds from sending *count* wrong tokens at once (`guesses`, one each) to each one's
    answer, and the codes."""
    started = time.monotonic()

    async def one() -> tuple[float, grpc.StatusCode]:
        (error,) = await guesses(target, 1)
        return time.monotonic() - started, error.code()

    answers = await asyncio.gather(*(one() for _ in range(count)))
    return [t for t, _ in answers], {code for _, code in answers}


def test_calls_held_together_are_answered_spread_over_the_hold(postgres: Any) -> None:
    with InProcessBroker(
        postgres.dsn, auth="token", tokens=f"app:{TOKEN}", auth_refusal_hold=str(HOLD)
    ) as broker:
        asyncio.run(guesses(broker.target, BUDGET))  # the budget, answered at once
        times, codes = asyncio.run(answer_times(broker.target, HELD))
        stats = broker.stats()
    assert codes == {grpc.StatusCode.UNAUTHENTICATED}
    assert stats["auth_held"] == HELD
    # Each held at least its drawn minimum, and not all answered in one burst: 40 holds drawn
    # over 2 s span less than 1 s with a probability below 1e-10.
    assert min(times) >= HOLD * (1 - SPREAD), times
    assert max(times) - min(times) >= HOLD / 2, sorted(times)


def test_a_source_past_its_cap_uses_the_broker_wide_room_left_by_others(
    moto_aws: MotoAws,
) -> None:
    # A long hold: the held calls are still held when the test looks, then cancelled.
    tarpit = Tarpit(budget=1, hold=60.0, per_source=2, total=6)
    valid_source = peer_host(f"ipv4:{VALID_SOURCE}:1")

    async def scenario() -> tuple[list[grpc.StatusCode], dict[str, int]]:
        async with over_budget(moto_aws, tarpit) as (a, b):
            tasks = [asyncio.create_task(call(a, forged(moto_aws))) for _ in range(5)]
            await until(
                lambda: sum(t.done() for t in tasks) == 1 and tarpit.holding() == 4,
                "A's 2 plus 2 borrowed held, its fifth answered at once",
            )
            tasks += [asyncio.create_task(call(b, forged(moto_aws))) for _ in range(3)]
            await until(
                lambda: sum(t.done() for t in tasks) == 2 and tarpit.holding() == 6,
                "B's own 2 held, its third answered at once (broker-wide cap)",
            )
            return await release_held(tarpit, tasks, valid_source)

    answered, holding = asyncio.run(scenario())
    # A borrowed until only its cap's worth (2) was left of the total (6), which B then used.
    assert holding == {FLOOD_SOURCE: 4, valid_source: 2}
    assert answered == [grpc.StatusCode.UNAUTHENTICATED] * 2
    assert tarpit.held == 6


def test_more_calls_held_than_the_releases_per_hold_are_held_longer(moto_aws: MotoAws) -> None:
    post = CountingPost()
    hold, releases, count = 0.5, 1, 6
    # The last of 6 held at once is held at least 6 / 1 x 0.5 x (1 - SPREAD) = 1.5 s; with the
    # plain hold none would wait over 0.5 x (1 + SPREAD) = 0.75 s.
    tarpit = Tarpit(budget=1, hold=hold, releases=releases)

    async def timed(stub: Any) -> float:
        started = time.monotonic()
        assert await call(stub, forged(moto_aws)) is grpc.StatusCode.UNAVAILABLE
        return time.monotonic() - started

    async def scenario() -> list[float]:
        # One STS refusal for the address: the STS bounds refuse its next proofs without an
        # STS call, so the held ones arrive together (well within the first one's hold).
        auth = iam_auth(moto_aws, post, VerifyGate(refusals=1))
        async with two_sources(auth, tarpit) as (a, _):
            assert await call(a, forged(moto_aws)) is grpc.StatusCode.UNAUTHENTICATED
            return list(await asyncio.gather(*(timed(a) for _ in range(count))))

    times = asyncio.run(scenario())
    assert tarpit.held == count and len(post.keys) == 1
    assert min(times) >= hold * (1 - SPREAD), times
    assert max(times) >= count / releases * hold * (1 - SPREAD), sorted(times)
