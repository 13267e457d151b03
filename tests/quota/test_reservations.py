"""Reservations: units held in flight are counted, released on failure, committed on success."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from commet_middleware._client import CommetClient
from commet_middleware.quota import InMemoryReservationStore, QuotaDecision, QuotaGate
from commet_middleware.testing import FakeCommet

from .conftest import quota_reads


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio."""
    return "asyncio"


@pytest.mark.anyio
async def test_concurrent_async_checks_allow_exactly_remaining(agate: QuotaGate) -> None:
    """With 5 remaining, 50 concurrent async checks allow exactly 5."""
    decisions = await asyncio.gather(*(agate.acheck("user_1", "tasks") for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 5
    assert {d.code for d in decisions if not d.allowed} == {"quota_exceeded"}
    assert agate.store.in_flight("user_1", "tasks") == 5


def test_concurrent_threaded_checks_allow_exactly_remaining(gate: QuotaGate) -> None:
    """With 5 remaining, 50 threads checking at once through the sync path allow exactly 5."""
    barrier = threading.Barrier(50)

    def check() -> QuotaDecision:
        barrier.wait()
        return gate.check("user_1", "tasks")

    with ThreadPoolExecutor(50) as pool:
        decisions = list(pool.map(lambda _: check(), range(50)))
    assert sum(d.allowed for d in decisions) == 5
    assert gate.store.in_flight("user_1", "tasks") == 5


def test_threads_committing_while_others_check_never_overshoot(gate: QuotaGate) -> None:
    """Threads that check, commit and check again never hold more than the ceiling in total."""
    barrier = threading.Barrier(20)
    allowed = []
    lock = threading.Lock()

    def work(i: int) -> None:
        barrier.wait()
        for j in range(5):
            decision = gate.check("user_1", "tasks")
            if decision.reservation is not None:
                gate.commit(decision.reservation, idempotency_key=f"k{i}-{j}")
                with lock:
                    allowed.append(decision)

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(work, range(20)))
    assert len(allowed) == 5
    assert gate.store.in_flight("user_1", "tasks") == 0


def test_release_frees_a_slot(gate: QuotaGate, admin: CommetClient) -> None:
    """A released reservation gives its units back to the next check."""
    admin.set_quota("user_1", "tasks", 4)
    first = gate.check("user_1", "tasks")
    assert first.reservation is not None
    assert not gate.check("user_1", "tasks").allowed
    gate.release(first.reservation)
    gate.release(first.reservation)  # twice is harmless: release sits in finally blocks
    assert gate.check("user_1", "tasks").allowed
    assert gate.stats.snapshot()["released"] == 1


def test_commit_updates_the_warm_cache(gate: QuotaGate, fake: FakeCommet) -> None:
    """A commit moves the cached balance, so the next check is exact with no new request."""
    decision = gate.check("user_1", "tasks", 2)
    assert decision.reservation is not None
    reads = quota_reads(fake)
    change = gate.commit(decision.reservation, idempotency_key="req-1")
    assert (change.customer_id, change.feature, change.action, change.count) == (
        "user_1",
        "tasks",
        "add",
        2,
    )
    assert change.idempotency_key == "req-1"
    after = gate.check("user_1", "tasks", 1)
    assert (after.current, after.remaining) == (2, 2)
    assert quota_reads(fake) == reads
    cached = gate.cache.fresh("user_1", "tasks")
    assert cached is not None
    assert (cached.current, cached.remaining) == (2, 3)


def test_commit_twice_raises(gate: QuotaGate) -> None:
    """A reservation is committed at most once: a second commit is a programming error."""
    decision = gate.check("user_1", "tasks")
    assert decision.reservation is not None
    gate.commit(decision.reservation, idempotency_key="k")
    with pytest.raises(ValueError, match="already"):
        gate.commit(decision.reservation, idempotency_key="k")


def test_removal_frees_units_in_the_cache(gate: QuotaGate, admin: CommetClient) -> None:
    """record_removal returns the quota remove to enqueue and frees units at once."""
    admin.set_quota("user_1", "tasks", 5)
    assert not gate.check("user_1", "tasks").allowed
    change = gate.record_removal("user_1", "tasks", 2, idempotency_key="del-1")
    assert (change.action, change.count) == ("remove", 2)
    assert gate.check("user_1", "tasks", 2).allowed


def test_in_memory_store_checks_and_takes_atomically() -> None:
    """The store holds units up to the limit, counts them, and settles each once."""
    store = InMemoryReservationStore()
    first = store.reserve("c", "f", 3, 4)
    assert first is not None
    assert store.reserve("c", "f", 2, 4) is None
    second = store.reserve("c", "f", 1, 4)
    assert second is not None
    assert store.in_flight("c", "f") == 4
    assert store.reserve("c", "f", 100, None) is not None  # no limit: tracked, never refused
    assert store.commit(first)
    assert not store.commit(first)
    assert not store.release(first)
    assert store.release(second)
    assert store.in_flight("c", "f") == 100
