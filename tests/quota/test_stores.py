"""The quota stores (memory, SQLite, Redis) behind one protocol: the same rules in each."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from commet_middleware._results import QuotaAllowance
from commet_middleware.quota._redis import RedisQuotaStore
from commet_middleware.quota._sqlite import SQLiteQuotaStore
from commet_middleware.quota._store import MemoryQuotaStore, QuotaStore, QuotaStoreError

from .redis_server import RedisServer, redis_server_or_skip

Opener = Callable[[], QuotaStore]
TASKS = QuotaAllowance("tasks", 0, 5, 5, 0, False, False, None)


@contextmanager
def opener(kind: str, tmp_path: Path) -> Iterator[Opener]:
    """Open handles on one store; for SQLite and Redis each handle is what a process has."""
    opened: list[QuotaStore] = []
    if kind == "memory":
        memory = MemoryQuotaStore()
        yield lambda: memory
        return
    if kind == "sqlite":

        def sqlite() -> QuotaStore:
            store = SQLiteQuotaStore(str(tmp_path / "quota.db"))
            opened.append(store)
            return store

        yield sqlite
    else:
        with redis_server_or_skip() as server:

            def redis() -> QuotaStore:
                store = RedisQuotaStore(server.url, timeout=0.5)
                opened.append(store)
                return store

            yield redis
    for store in opened:
        store.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Handles on each kind of store."""
    with opener(request.param, tmp_path) as open_one:
        yield open_one


@pytest.fixture(params=["sqlite", "redis"])
def open_shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Handles on each store that several processes share."""
    with opener(request.param, tmp_path) as open_one:
        yield open_one


def reserve(store: QuotaStore, count: int = 1, mode: str = "fresh", lease: float = 60.0):  # type: ignore[no-untyped-def]
    return store.reserve(
        "user_1",
        "tasks",
        count,
        mode=mode,
        hard_limit=False,
        ttl=5.0,
        lease=lease,  # type: ignore[arg-type]
    )


def test_a_store_without_an_allowance_misses(open_store: Opener) -> None:
    """Nothing read yet: a check is a miss and holds nothing."""
    store = open_store()
    assert reserve(store).kind == "miss"
    assert store.in_flight("user_1", "tasks") == 0


def test_reservations_stop_at_the_allowance(open_store: Opener) -> None:
    """Five included: five single reservations pass, the sixth is refused with 0 remaining."""
    store = open_store()
    store.save_allowance("user_1", "tasks", TASKS)
    kinds = [reserve(store).kind for _ in range(6)]
    assert kinds == ["allowed"] * 5 + ["refused"]
    refused = reserve(store)
    assert (refused.left, refused.held, refused.enforced) == (5, 5, True)


def test_threads_racing_on_two_handles_get_exactly_the_allowance(open_store: Opener) -> None:
    """Forty threads on two handles (two processes) reserving at once: exactly 5 pass."""
    first, second = open_store(), open_store()
    first.save_allowance("user_1", "tasks", TASKS)
    results: list[str] = []
    lock = threading.Lock()

    def race(store: QuotaStore) -> None:
        outcome = reserve(store)
        with lock:
            results.append(outcome.kind)

    threads = [threading.Thread(target=race, args=((first, second)[i % 2],)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count("allowed") == 5
    assert results.count("refused") == 35


def test_a_commit_counts_until_commet_confirms_it(open_store: Opener) -> None:
    """A committed unit stays counted as used (unconfirmed), then Commet's balance takes over."""
    store = open_store()
    store.save_allowance("user_1", "tasks", TASKS)
    outcome = reserve(store, 2)
    assert outcome.reservation is not None
    assert store.commit(outcome.reservation, "k1", 600.0)
    assert store.in_flight("user_1", "tasks") == 0
    known = store.last_known("user_1", "tasks")
    assert known is not None
    assert known.current == 2
    assert store.confirm("user_1", "tasks", "k1", 2)
    known = store.last_known("user_1", "tasks")
    assert known is not None
    assert (known.current, known.remaining) == (2, 3)


def test_a_read_while_changes_are_unconfirmed_keeps_our_balance(open_store: Opener) -> None:
    """Commet's older balance read during delivery does not undo our committed unit."""
    store = open_store()
    store.save_allowance("user_1", "tasks", TASKS)
    outcome = reserve(store, 3)
    assert outcome.reservation is not None
    store.commit(outcome.reservation, "k1", 600.0)
    store.save_allowance("user_1", "tasks", TASKS)  # Commet has not applied k1 yet: 0
    assert [reserve(store).kind for _ in range(3)] == ["allowed", "allowed", "refused"]


def test_a_reservation_commits_or_releases_once(open_store: Opener) -> None:
    """Settling a reservation twice says so; the units are given back once."""
    store = open_store()
    store.save_allowance("user_1", "tasks", TASKS)
    outcome = reserve(store, 2)
    assert outcome.reservation is not None
    assert store.release(outcome.reservation)
    assert not store.release(outcome.reservation)
    assert not store.commit(outcome.reservation, "k1", 600.0)
    assert store.in_flight("user_1", "tasks") == 0


def test_a_dead_workers_reservation_expires(open_shared: Opener) -> None:
    """Units held under a lease that ran out (the worker died) stop counting."""
    store = open_shared()
    store.save_allowance("user_1", "tasks", TASKS)
    assert reserve(store, 5, lease=0.2).kind == "allowed"
    assert reserve(store).kind == "refused"
    time.sleep(0.3)
    assert store.in_flight("user_1", "tasks") == 0
    assert reserve(store, 5).kind == "allowed"


def test_one_handle_reads_commet_while_the_others_wait(open_shared: Opener) -> None:
    """The read claim is exclusive across handles, and refused while the allowance is fresh."""
    first, second = open_shared(), open_shared()
    assert first.claim_read("user_1", "tasks", 5.0, 5.0)
    assert not second.claim_read("user_1", "tasks", 5.0, 5.0)
    assert second.reading("user_1", "tasks")
    first.save_allowance("user_1", "tasks", TASKS)
    assert not second.reading("user_1", "tasks")
    assert second.fresh("user_1", "tasks", 5.0)
    assert not second.claim_read("user_1", "tasks", 5.0, 5.0)  # fresh: nobody reads again


def test_overlapping_confirmations_keep_our_accounting(open_store: Opener) -> None:
    """Two changes in flight: answers arriving out of order do not set an older balance."""
    store = open_store()
    store.save_allowance("user_1", "tasks", TASKS)
    first, second = reserve(store), reserve(store)
    assert first.reservation is not None
    assert second.reservation is not None
    store.commit(first.reservation, "k1", 600.0)
    store.commit(second.reservation, "k2", 600.0)
    store.confirm("user_1", "tasks", "k2", 2)
    store.confirm("user_1", "tasks", "k1", 1)  # k1's answer is older: Commet says 1
    known = store.last_known("user_1", "tasks")
    assert known is not None
    assert known.current == 2


def test_idempotency_records(open_store: Opener) -> None:
    """A key is new once, running until finished, then done (with its answer) or reused."""
    store = open_store()
    assert store.begin_idempotent("r1", "fp", 60.0).state == "new"
    assert store.begin_idempotent("r1", "fp", 60.0).state == "running"
    assert store.begin_idempotent("r1", "other", 60.0).state == "reused"
    store.finish_idempotent("r1", "fp", b"stored answer", 60.0)
    assert tuple(store.begin_idempotent("r1", "fp", 60.0)) == ("done", b"stored answer")
    assert store.begin_idempotent("r2", "fp", 60.0).state == "new"
    store.abandon_idempotent("r2", "fp")
    assert store.begin_idempotent("r2", "fp", 60.0).state == "new"


def test_a_stopped_redis_fails_fast_as_a_store_error(redis_server: RedisServer) -> None:
    """Redis gone: every call raises QuotaStoreError (never hangs, never another error)."""
    store = RedisQuotaStore(redis_server.url, timeout=0.05)
    store.save_allowance("user_1", "tasks", TASKS)
    redis_server.stop()
    with pytest.raises(QuotaStoreError):
        reserve(store)
    with pytest.raises(QuotaStoreError):
        store.begin_idempotent("r1", "fp", 60.0)
    store.close()
