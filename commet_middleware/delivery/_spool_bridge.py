"""Everything a queue does with its spool: spilling into it, claiming from it, settling rows.

Durable spool (``settings.spool_path``): every operation is written to a SQLite file (see
``_spool``) before ``enqueue`` returns, and removed only once Commet accepted it (or answered
``duplicate``); a non-retryable refusal moves it to the spool's ``dead_letter`` table. The
in-memory queue is then only a window of at most ``queue_limit`` operations this process has
claimed: past it an operation is spooled unclaimed (whatever the overflow policy: it is already
durable), and the worker claims spooled rows as room frees, including rows an earlier or crashed
process left (replay). Rows this process holds carry a lease it renews; ``close`` gives back what
it could not deliver, which stays in the spool for the next process. If the spool cannot be
written, enqueue logs an ERROR and keeps the operation in memory as without a spool.

Order: spooled rows are claimed oldest first, and once a quota change has spilled to the spool,
later ones spill too until the worker has claimed the backlog, so none can pass it in memory;
claimed rows join the tail of the queue, so none passes a change that was placed in memory before
it spilled.

No SQLite call runs on an app's event loop (``spool_call``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from commet_middleware._models import Operation, QuotaChange
from commet_middleware._settings import CommetSettings
from commet_middleware._spool import Spool, SpoolRow

from ._items import Encoder, Item, describe, redact
from ._state import QueueState
from ._workers import Worker, WorkerSlot

__all__ = ["SpoolBridge", "spool_call"]

logger = logging.getLogger("commet_middleware.delivery")
_T = TypeVar("_T")


async def spool_call(worker: Worker, fn: Callable[..., _T], *args: Any) -> _T:
    """Run a (blocking, short) spool call for ``worker`` without stalling an app's event loop.

    A worker thread owns its loop, so it calls directly: that also works during interpreter
    shutdown (the atexit flush of a WSGI worker), when no executor takes new work.
    """
    if worker.owns_loop:
        return fn(*args)
    try:
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except RuntimeError:  # the interpreter is shutting down: no executor takes new work
        return fn(*args)
    return await future


class SpoolBridge:
    """One queue's dealings with its spool.

    ``place`` holds an operation whose place in memory is reserved in its aggregation group or
    queues it (lock held; True: wake the worker); ``overflow`` applies the overflow policy to an
    operation that found no room and could not be spooled either.
    """

    def __init__(
        self,
        state: QueueState,
        spool: Spool,
        *,
        settings: CommetSettings,
        encoder: Encoder,
        slot: WorkerSlot,
        place: Callable[[Operation, Item | None], bool],
        overflow: Callable[[Item], None],
    ) -> None:
        self.spool = spool
        self._state = state
        self._settings = settings
        self._encoder = encoder
        self._slot = slot
        self._place = place
        self._overflow = overflow
        self._spill_warned = False
        # While a quota change spilled to the spool is unclaimed, later ones spill too. A claim
        # that finds the spool drained clears it only if no spill began or was still being
        # written since just before it (``_spill_seq``, ``_spills_writing``).
        self._quota_spilling = False
        self._spill_seq = 0
        self._spills_writing = 0

    def enqueue(self, item: Item) -> None:
        """Write ``item`` to the spool, claimed if there is room in memory, else spilled."""
        state, spool, dialect = self._state, self.spool, self._settings.dialect
        quota = isinstance(item.operation, QuotaChange)
        with state.lock:
            room = state.has_room() and not (quota and self._quota_spilling)
            if room:  # reserve the place now; flush waits for it from here on
                state.pending += 1
                state.queued += 1
            elif quota:
                self._quota_spilling = True
                self._spill_seq += 1
                self._spills_writing += 1
        try:
            item.body = self._encoder(item.operation, dialect)
        except Exception:
            # Stored without bytes: the worker encodes it again and dead-letters it if it fails.
            logger.exception("commet: could not encode %s", describe(item.operation))
        try:
            item.row_id = spool.add(item.operation, dialect, item.body, claim=room)
        except Exception:
            logger.exception(
                "commet: could not write to the spool %s; keeping %s in memory only",
                spool.path,
                describe(item.operation),
            )
            if not room:
                if quota:
                    with state.lock:
                        self._spills_writing -= 1
                self._overflow(item)
                return
        if not room:
            with state.lock:
                if quota:
                    self._spills_writing -= 1
                state.queued += 1
                state.spilled += 1
                # Only a full queue warns; a quota change behind a spilled one is no news.
                warn = not self._spill_warned and not state.has_room()
                self._spill_warned |= warn
                worker = state.worker
                wake = state.idle
                state.idle = False
            if warn:
                logger.warning(
                    "commet: delivery queue full (limit %d); spilling operations to the spool %s",
                    state.limit,
                    spool.path,
                )
            self._slot.nudge(worker, wake)
            return
        with state.lock:
            # A usage event's row is held by this process until the seal replaces it (see
            # _sealing); quota changes are not aggregated with a spool.
            wake = self._place(item.operation, item)
            if wake:
                state.idle = False
            worker = state.worker
        self._slot.nudge(worker, wake)

    def claim(self, worker: Worker, room: int) -> bool | None:
        """Claim up to ``room`` spooled rows onto the tail of the queue; True if any, None: stale.

        The tail, not straight to the worker: a quota change placed in the queue while the claim
        ran (its place was reserved before these rows spilled) is older than they are, and the
        pump hands out (or parks) the changes of a key in the order it meets them. Blocking: the
        pump runs it through ``spool_call``.
        """
        state, spool = self._state, self.spool
        # The places are reserved in ``pending`` before the rows are claimed: a flush that saw
        # nothing pending and then no claimable row cannot miss rows claimed in between.
        with state.lock:
            state.pending += room
            spill_seq = self._spill_seq
            spills_settled = self._spills_writing == 0
        rows: list[SpoolRow] = []
        claimed = False
        try:
            rows = spool.claim(room)
            claimed = True
        except Exception:
            logger.exception("commet: could not read the spool %s", spool.path)
        items = [Item.from_row(row) for row in rows]
        with state.lock:
            stale = not state.is_current(worker)
            state.pending -= room if stale else room - len(items)
            if not stale:
                if claimed and len(rows) < room and spills_settled and self._spill_seq == spill_seq:
                    # Every quota change spilled so far is claimed now (rows come oldest first).
                    self._quota_spilling = False
                state.queue.extend(items)
                if items:
                    state.idle = False
            state.cond.notify_all()
        if stale:
            with contextlib.suppress(Exception):
                spool.release([item.row_id for item in items if item.row_id is not None])
            return None
        return bool(items)

    async def settle(self, worker: Worker, item: Item, failure: Exception | None) -> None:
        """Remove an accepted operation's spool row, or move a refused one to dead_letter."""
        spool, row_id = self.spool, item.row_id
        if row_id is None:
            return
        try:
            if failure is None:
                await spool_call(worker, spool.ack, row_id)
            else:
                reason = self._redact(f"{type(failure).__name__}: {failure}")
                await spool_call(worker, spool.bury, row_id, reason)
        except Exception:
            # Accepted but still spooled: a later replay gets 409 duplicate, which is delivered.
            logger.exception("commet: could not update the spool for %s", describe(item.operation))

    async def note_failure(self, worker: Worker, item: Item, error: Exception) -> None:
        """Record a failed attempt that will be retried on the item's row."""
        if item.row_id is None:
            return
        try:
            await spool_call(
                worker,
                self.spool.note_failure,
                item.row_id,
                self._redact(str(error) or repr(error)),
            )
        except Exception:
            logger.exception("commet: could not update the spool")

    async def renew_leases(self, worker: Worker) -> None:
        """Renew this process's leases for as long as ``worker`` is not retired."""
        spool = self.spool
        # A third of the lease: two renewals may fail (a busy file) before another process may
        # take a row this one is still sending.
        interval = max(spool.lease_seconds / 3, 0.01)
        while not worker.retired:
            try:
                await spool_call(worker, spool.renew)
                await spool_call(worker, spool.reclaim_dead_owners)
            except Exception:
                logger.exception("commet: could not renew the spool leases")
            await asyncio.sleep(interval)

    def keep(self, items: list[Item]) -> list[Item]:
        """Give back the spool rows among ``items``; return the memory-only rest."""
        spooled = [row for item in items for row in item.spool_rows()]
        if not spooled:
            return items
        try:
            self.spool.release(spooled)
        except Exception:
            logger.exception("commet: could not release spool rows; they wait out their lease")
        logger.warning(
            "commet: closing with %d operations undelivered; they stay in the spool %s",
            len(spooled),
            self.spool.path,
        )
        return [item for item in items if not item.spool_rows()]

    def drained(self) -> bool:
        """True if the spool has no row waiting to be claimed."""
        spool = self.spool
        try:
            # Rows a dead process of this host held are ours to deliver now, not after the lease.
            spool.reclaim_dead_owners()
            return spool.waiting() == 0
        except Exception:
            logger.exception("commet: could not read the spool %s", spool.path)
            return True  # nothing this process can do about it now; do not spin on it

    def _redact(self, text: str) -> str:
        return redact(text, self._settings.api_key)
