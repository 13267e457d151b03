"""The state a delivery queue's parts share, under one lock: the items waiting and the counters."""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from ._items import Item

if TYPE_CHECKING:
    from ._workers import Worker

__all__ = ["QueueState"]


class QueueState:
    """One queue's shared state; every attribute but ``lock`` and ``cond`` is guarded by ``lock``.

    The queue, its worker slot, spool bridge, sealer and pump all hold the same instance; a fork
    replaces it with a fresh one (the child starts with an empty queue of its own).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lock = threading.Lock()
        # Notified whenever ``pending`` drops or a worker goes away: flush and overflow wait on it.
        self.cond = threading.Condition(self.lock)
        self.queue: deque[Item] = deque()
        # The current worker (None: none started yet, or the last one was retired).
        self.worker: Worker | None = None
        # Set by a worker that found nothing to take: an enqueue from then on pokes it.
        self.idle = False
        # Set by a close whose flush ran out of time: the worker sends nothing new.
        self.closing = False
        # Flushes (and closes) waiting right now: while one waits the sender is not paced.
        self.flushing = 0
        # While the sender waits out a pace (see _pacing): a queue this deep wakes it (0: not
        # waiting so).
        self.wake_at = 0
        self.pending = 0
        # Members that joined a waiting fold (see _folding): counted in ``pending``, but taking
        # no place of their own, so ``pending - folded`` is what the queue holds.
        self.folded = 0
        self.queued = 0
        self.sent = 0
        self.retried = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.dropped = 0
        self.spilled = 0
        self.aggregated_members = 0
        self.aggregates_sent = 0
        self.aggregates_split = 0

    def wakes_worker(self) -> bool:
        """(Lock held.) After an append to the queue: True if the worker may be waiting for it
        (idle, or waiting out a pace that the queue, now a full batch deep, should end)."""
        return self.idle or 0 < self.wake_at <= len(self.queue)

    def has_room(self) -> bool:
        """(Lock held.) True while the places taken are fewer than ``limit``."""
        return self.pending - self.folded < self.limit

    def is_current(self, worker: Worker) -> bool:
        """(Lock held.) True while ``worker`` is the one meant to take and finish items."""
        return not (worker.retired or worker.stop_requested) and self.worker is worker

    def detach(self, worker: Worker, *, requeue: bool) -> list[Item]:
        """(Lock held.) Retire ``worker``; requeue its unfinished items, or return them."""
        owned = worker.retire()
        if self.worker is worker:
            self.worker = None
        if requeue:
            self.queue.extendleft(reversed(owned))
            return []
        return owned
