"""The allowance cache: warm hits, TTL, single-flight cold misses, errors never cached."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from commet_middleware._client import CommetClient
from commet_middleware._errors import CommetTransportError
from commet_middleware._results import QuotaAllowance
from commet_middleware.quota import AllowanceCache, QuotaDecision, QuotaGate
from commet_middleware.testing import FakeCommet

from .conftest import FakeClock, quota_reads

T = TypeVar("T")


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio."""
    return "asyncio"


def test_cache_hit_costs_no_request(gate: QuotaGate, fake: FakeCommet) -> None:
    """A second check within the TTL is answered from the cache."""
    gate.check("user_1", "tasks")
    gate.check("user_1", "tasks")
    assert quota_reads(fake) == 1
    stats = gate.stats.snapshot()
    assert (stats["checks"], stats["cache_hits"], stats["cache_misses"], stats["fetches"]) == (
        2,
        1,
        1,
        1,
    )


def test_ttl_expiry_refetches(
    gate: QuotaGate, fake: FakeCommet, clock: FakeClock, admin: CommetClient
) -> None:
    """After the TTL the allowance is read from Commet again, and its news is seen."""
    gate.check("user_1", "tasks", 0)
    admin.set_quota("user_1", "tasks", 3)
    clock.advance(4.9)
    assert gate.check("user_1", "tasks", 0).current == 0
    assert quota_reads(fake) == 1
    clock.advance(0.2)
    assert gate.check("user_1", "tasks", 0).current == 3
    assert quota_reads(fake) == 2


def test_keys_are_per_customer_and_feature(gate: QuotaGate, fake: FakeCommet) -> None:
    """Each (customer, feature) pair has its own entry."""
    gate.check("user_1", "tasks")
    gate.check("user_1", "seats")
    gate.check("user_2", "tasks")
    gate.check("user_1", "tasks")
    assert quota_reads(fake) == 3


@pytest.mark.anyio
async def test_single_flight_async(agate: QuotaGate, fake: FakeCommet) -> None:
    """20 concurrent cold async checks make exactly one request to Commet."""
    fake.faults.latency(0.05)
    decisions = await asyncio.gather(*(agate.acheck("user_2", "tasks", 0) for _ in range(20)))
    assert all(d.allowed for d in decisions)
    assert quota_reads(fake) == 1
    assert agate.stats.snapshot()["fetches"] == 1


def test_single_flight_threads(gate: QuotaGate, fake: FakeCommet) -> None:
    """20 threads checking a cold key at once make exactly one request to Commet."""
    fake.faults.latency(0.05)
    barrier = threading.Barrier(20)

    def check() -> QuotaDecision:
        barrier.wait()
        return gate.check("user_2", "tasks", 0)

    with ThreadPoolExecutor(20) as pool:
        decisions = list(pool.map(lambda _: check(), range(20)))
    assert all(d.allowed for d in decisions)
    assert quota_reads(fake) == 1
    assert gate.stats.snapshot()["fetches"] == 1


@pytest.mark.anyio
async def test_cancelled_caller_does_not_cancel_the_shared_fetch(clock: FakeClock) -> None:
    """A caller cancelled mid-fetch leaves the shared request running for the others."""
    cache = AllowanceCache(5.0, clock=clock)
    started = asyncio.Event()
    proceed = asyncio.Event()
    calls = 0

    async def fetch() -> QuotaAllowance:
        nonlocal calls
        calls += 1
        started.set()
        await proceed.wait()
        return QuotaAllowance("tasks", included=5, remaining=5)

    first = asyncio.create_task(cache.aget("c", "tasks", fetch))
    second = asyncio.create_task(cache.aget("c", "tasks", fetch))
    await started.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    proceed.set()
    lookup = await second
    assert lookup.source == "shared"
    assert lookup.allowance.remaining == 5
    assert calls == 1
    assert cache.fresh("c", "tasks") is not None


@pytest.mark.anyio
async def test_async_followers_share_the_error(clock: FakeClock) -> None:
    """Tasks waiting on a failed fetch all see its error; the next lookup fetches anew."""
    cache = AllowanceCache(5.0, clock=clock)
    started = asyncio.Event()
    proceed = asyncio.Event()
    calls = 0

    async def failing() -> QuotaAllowance:
        nonlocal calls
        calls += 1
        started.set()
        await proceed.wait()
        raise CommetTransportError("down")

    tasks = [asyncio.create_task(cache.aget("c", "tasks", failing)) for _ in range(5)]
    await started.wait()
    proceed.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, CommetTransportError) for r in results)
    assert calls == 1

    async def working() -> QuotaAllowance:
        return QuotaAllowance("tasks")

    assert (await cache.aget("c", "tasks", working)).source == "fetched"


def test_sync_followers_share_the_error(clock: FakeClock) -> None:
    """Threads waiting on a failed fetch all see its error, from one call of fetch."""
    cache = AllowanceCache(5.0, clock=clock)
    proceed = threading.Event()
    calls = 0

    def failing() -> QuotaAllowance:
        nonlocal calls
        calls += 1
        proceed.wait(5)
        raise CommetTransportError("down")

    def lookup() -> BaseException | None:
        try:
            cache.get("c", "tasks", failing)
        except CommetTransportError as exc:
            return exc
        return None

    with ThreadPoolExecutor(5) as pool:
        leader = pool.submit(lookup)
        flight = _wait_for(lambda: next(iter(cache._flights.values()), None))
        followers = [pool.submit(lookup) for _ in range(4)]
        # CPython detail, test-only: the Event's condition lists the threads blocked on it.
        _wait_for(lambda: len(flight.done._cond._waiters) == 4)  # type: ignore[attr-defined]
        proceed.set()
        results = [leader.result(), *(f.result() for f in followers)]
    assert all(isinstance(r, CommetTransportError) for r in results)
    assert calls == 1


def _wait_for(condition: Callable[[], T | None]) -> T:
    # Poll (no timing assertion: the deadline only stops a broken test from hanging).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.001)
    raise AssertionError("condition never became true")


def test_errors_are_not_cached(gate: QuotaGate, fake: FakeCommet) -> None:
    """A failed read is not remembered: the next check asks Commet again and gets through."""
    fake.faults.fail_next(1, status=503)
    assert gate.check("user_1", "tasks").degraded
    decision = gate.check("user_1", "tasks")
    assert not decision.degraded
    assert quota_reads(fake) == 2
    assert gate.cache.fresh("user_1", "tasks") is not None


@pytest.mark.anyio
async def test_errors_are_not_cached_async(agate: QuotaGate, fake: FakeCommet) -> None:
    """The async path does not remember a failed read either."""
    fake.faults.fail_next(1, status=503)
    assert (await agate.acheck("user_1", "tasks")).degraded
    assert not (await agate.acheck("user_1", "tasks")).degraded
    assert quota_reads(fake) == 2


def test_apply_new_balance_recomputes_from_included(clock: FakeClock) -> None:
    """Commet's new balance sets current, remaining and (high-water) billed quantity."""
    cache = AllowanceCache(5.0, clock=clock)
    allowance = QuotaAllowance("seats", current=3, included=5, remaining=2, overage_enabled=True)
    cache.put("c", "seats", allowance)
    cache.apply_new_balance("c", "seats", 8)
    after = cache.fresh("c", "seats")
    assert after is not None
    assert (after.current, after.remaining, after.billed_quantity) == (8, 0, 3)
    cache.apply_new_balance("c", "seats", 4)
    after = cache.fresh("c", "seats")
    assert after is not None
    assert (after.current, after.remaining, after.billed_quantity) == (4, 1, 3)


def test_apply_new_balance_without_entry_does_nothing(clock: FakeClock) -> None:
    """There is nothing to recompute from when the allowance was never read."""
    cache = AllowanceCache(5.0, clock=clock)
    cache.apply_new_balance("c", "tasks", 3)
    assert cache.last_known("c", "tasks") is None


def test_apply_delta_keeps_the_entry_age(clock: FakeClock) -> None:
    """Our own unconfirmed writes move the balance but do not extend the TTL."""
    cache = AllowanceCache(5.0, clock=clock)
    cache.put("c", "tasks", QuotaAllowance("tasks", current=1, included=5, remaining=4))
    clock.advance(4)
    cache.apply_delta("c", "tasks", 2)
    clock.advance(1.5)
    assert cache.fresh("c", "tasks") is None
    last = cache.last_known("c", "tasks")
    assert last is not None
    assert (last.current, last.remaining) == (3, 2)


def test_cache_is_bounded(clock: FakeClock) -> None:
    """Past max_entries the oldest-written entry goes first."""
    cache = AllowanceCache(5.0, clock=clock, max_entries=2)
    for customer in ("a", "b", "c"):
        cache.put(customer, "tasks", QuotaAllowance("tasks"))
    assert cache.last_known("a", "tasks") is None
    assert cache.last_known("c", "tasks") is not None
