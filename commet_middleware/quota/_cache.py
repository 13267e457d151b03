"""Allowances read from Commet, kept per process for a short TTL with single-flight reads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from commet_middleware._errors import CommetTransportError
from commet_middleware._results import QuotaAllowance

from ._decide import Number, with_balance

__all__ = ["AllowanceCache", "AllowanceLookup", "Clock"]

Clock = Callable[[], float]
_Key = tuple[str, str]


class AllowanceLookup(NamedTuple):
    """One cache lookup: the allowance and how it was obtained.

    ``source`` is ``"cache"`` (fresh entry, no network), ``"fetched"`` (this caller made the
    request) or ``"shared"`` (this caller waited for another caller's request).
    """

    allowance: QuotaAllowance
    source: Literal["cache", "fetched", "shared"]


@dataclass
class _Entry:
    allowance: QuotaAllowance
    fetched_at: float


class _Flight:
    """One sync fetch in progress: the leader fills it in, followers wait on ``done``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.allowance: QuotaAllowance | None = None
        self.error: BaseException | None = None


class AllowanceCache:
    """Per (customer, feature) allowances with a short TTL, single-flight fetches, and the
    last known value kept past expiry for fail-open.

    Thread-safe, and safe across asyncio tasks. Errors are never cached: a failed fetch leaves
    the entry as it was, and the next lookup tries again.
    """

    def __init__(
        self,
        ttl: float = 5.0,
        *,
        clock: Clock = time.monotonic,
        max_entries: int = 10_000,
        wait_timeout: float = 10.0,
    ) -> None:
        if ttl < 0:
            raise ValueError("ttl must be >= 0")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.ttl = ttl
        self._clock = clock
        self._max_entries = max_entries
        # How long a sync follower waits for the leader's fetch before giving up (a timeout
        # surfaces as CommetTransportError, i.e. "Commet unavailable").
        self._wait_timeout = wait_timeout
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()
        self._flights: dict[_Key, _Flight] = {}
        self._tasks: dict[_Key, asyncio.Task[QuotaAllowance]] = {}

    # reads and writes

    def fresh(self, customer_id: str, feature: str) -> QuotaAllowance | None:
        """Return the cached allowance if it is younger than the TTL, else None."""
        with self._lock:
            entry = self._entries.get((customer_id, feature))
            if entry is None or self._clock() - entry.fetched_at >= self.ttl:
                return None
            return entry.allowance

    def last_known(self, customer_id: str, feature: str) -> QuotaAllowance | None:
        """Return the last allowance seen, however old (None if never seen)."""
        with self._lock:
            entry = self._entries.get((customer_id, feature))
            return None if entry is None else entry.allowance

    def put(self, customer_id: str, feature: str, allowance: QuotaAllowance) -> None:
        """Store an allowance Commet just answered; it is fresh for ``ttl`` seconds."""
        with self._lock:
            self._store((customer_id, feature), _Entry(allowance, self._clock()))

    def apply_new_balance(self, customer_id: str, feature: str, new_balance: Number) -> None:
        """Set the cached balance to ``new_balance`` (Commet's answer to one of our writes) and
        recompute remaining and billed from ``included``; the entry is fresh again.

        Does nothing when the entry is not cached: there is no ``included`` to compute from.
        """
        with self._lock:
            key = (customer_id, feature)
            entry = self._entries.get(key)
            if entry is not None:
                allowance = with_balance(entry.allowance, new_balance)
                self._store(key, _Entry(allowance, self._clock()))

    def apply_delta(self, customer_id: str, feature: str, delta: Number) -> None:
        """Move the cached balance by ``delta`` (a write of ours not yet confirmed by Commet).

        The entry keeps its age, so the TTL still bounds how long Commet goes unasked.
        """
        with self._lock:
            entry = self._entries.get((customer_id, feature))
            if entry is not None:
                new = max(entry.allowance.current + delta, 0)
                entry.allowance = with_balance(entry.allowance, new)

    def invalidate(self, customer_id: str, feature: str) -> None:
        """Forget the entry, stale copy included."""
        with self._lock:
            self._entries.pop((customer_id, feature), None)

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()

    def _store(self, key: _Key, entry: _Entry) -> None:
        # Caller holds the lock. Oldest-written first out: a bound, not a policy.
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    # single-flight lookups

    def get(
        self, customer_id: str, feature: str, fetch: Callable[[], QuotaAllowance]
    ) -> AllowanceLookup:
        """Return the fresh allowance, or fetch it once however many threads ask at once.

        Followers get the leader's allowance, or its exception, re-raised in their thread.
        """
        key = (customer_id, feature)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._clock() - entry.fetched_at < self.ttl:
                return AllowanceLookup(entry.allowance, "cache")
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            if not flight.done.wait(self._wait_timeout):
                raise CommetTransportError(
                    f"timed out after {self._wait_timeout}s waiting for a quota read"
                )
            if flight.error is not None:
                raise flight.error
            if flight.allowance is None:  # the leader died of something it did not raise
                raise CommetTransportError("a concurrent quota read ended without an answer")
            return AllowanceLookup(flight.allowance, "shared")
        try:
            allowance = fetch()
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.allowance = allowance
            self.put(customer_id, feature, allowance)
            return AllowanceLookup(allowance, "fetched")
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()

    async def aget(
        self,
        customer_id: str,
        feature: str,
        fetch: Callable[[], Awaitable[QuotaAllowance]],
    ) -> AllowanceLookup:
        """Return the fresh allowance, or fetch it once however many tasks ask at once.

        The fetch runs in its own task that every caller awaits through ``asyncio.shield``: a
        cancelled caller does not cancel the request the others are waiting for.
        """
        key = (customer_id, feature)
        loop = asyncio.get_running_loop()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._clock() - entry.fetched_at < self.ttl:
                return AllowanceLookup(entry.allowance, "cache")
            shared = self._tasks.get(key)
            # A task of another event loop cannot be awaited here: start a flight of our own.
            leader = shared is None or shared.get_loop() is not loop
            if shared is None or leader:
                task = loop.create_task(self._fetch_and_store(key, fetch))
                self._tasks[key] = task
                task.add_done_callback(lambda done: self._forget_task(key, done))
            else:
                task = shared
        allowance = await asyncio.shield(task)
        return AllowanceLookup(allowance, "fetched" if leader else "shared")

    async def _fetch_and_store(
        self, key: _Key, fetch: Callable[[], Awaitable[QuotaAllowance]]
    ) -> QuotaAllowance:
        allowance = await fetch()
        self.put(key[0], key[1], allowance)
        return allowance

    def _forget_task(self, key: _Key, task: asyncio.Task[QuotaAllowance]) -> None:
        with self._lock:
            if self._tasks.get(key) is task:
                del self._tasks[key]
        # Mark the exception retrieved: when every waiter was cancelled nobody else will.
        if not task.cancelled():
            task.exception()
