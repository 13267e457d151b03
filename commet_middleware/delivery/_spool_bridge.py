"""Everything a queue does with its spool: spilling into it, claiming from it, settling rows.

Durable spool (``settings.spool_path``): every operation is written to a SQLite file (see
``_spool``) and removed only once Commet accepted it (or answered ``duplicate``); a
non-retryable refusal moves it to the spool's ``dead_letter`` table. ``enqueue`` does not write
it: it hands it to the queue's spool writer (``_spool_writer``), which commits operations in
groups and then places them, and returns the group's commit, which the request waits for before
its response completes. The in-memory queue is then only a window of at most ``queue_limit``
operations this process has claimed: past it an operation is spooled unclaimed (whatever the
overflow policy: it is already durable), and the worker claims spooled rows as room frees,
including rows an earlier or crashed process left (replay). Rows this process holds carry a
lease it renews; ``close`` gives back what it could not deliver, which stays in the spool for
the next process. If the spool cannot be written, the writer logs an ERROR and keeps the group
in memory as without a spool.

Order: spooled rows are claimed oldest first, and once a quota change has spilled to the spool,
later ones spill too until the worker has claimed the backlog, so none can pass it in memory;
claimed rows join the tail of the queue, so none passes a change that was placed in memory before
it spilled.

No SQLite call runs on an app's event loop (``spool_call``, the writer's thread) nor under the
queue's lock (``keep`` has the writer release the rows).
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
from ._spool_writer import GroupCommit, SpoolWriter
from ._state import QueueState
from ._workers import Worker, WorkerSlot, running_loop

__all__ = ["SpoolBridge", "spool_call"]

logger = logging.getLogger("commet_middleware.delivery")
_T = TypeVar("_T")
# How long a close waits for the writer to give back the rows it could not deliver.
_KEEP_WAIT = 5.0


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
        self.writer = SpoolWriter(spool, settings.dialect, self._publish)
        # The rows ``keep`` gave back at a close, for the writer to release (``wait_kept``).
        self._kept: list[int] = []

    def enqueue(self, item: Item) -> GroupCommit | None:
        """Hand ``item`` to the spool writer, claimed if there is room in memory, else spilled.

        Returns the group commit the request waits for before its response completes (None:
        nothing to wait for, it was written here). No SQLite call on an event loop or under the
        queue's lock: the writer commits, then places the item (``_publish``); only a thread
        without a loop may commit its own group when the writer is idle.
        """
        state = self._state
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
            item.body = self._encoder(item.operation, self._settings.dialect)
        except Exception:
            # Stored without bytes: the worker encodes it again and dead-letters it if it fails.
            logger.exception("commet: could not encode %s", describe(item.operation))
        # A thread without an event loop may commit a group of its own (see SpoolWriter.submit).
        return self.writer.submit(item, room=room, may_lead=running_loop() is None)

    def _publish(
        self,
        entries: list[tuple[Item, bool]],
        row_ids: list[int] | None,
        error: BaseException | None,
    ) -> Callable[[], None] | None:
        """(Writer thread, after the group's commit.) Place the group's items: those with room
        in the queue, the spilled ones counted; return what to do once its waiters are released.

        If the commit failed, the items are kept in memory as without a spool, and those that
        found no room go to the overflow policy (after the waiters are released: it may block).
        """
        state, spool = self._state, self.spool
        if row_ids is None:
            logger.error(
                "commet: could not write to the spool %s; keeping %d operation(s) in memory "
                "only (first: %s)",
                spool.path,
                len(entries),
                describe(entries[0][0].operation),
                exc_info=error,
            )
        else:
            for (item, _), row_id in zip(entries, row_ids, strict=True):
                item.row_id = row_id
        durable = row_ids is not None
        overflow: list[Item] = []
        wake = warn = False
        with state.lock:
            for item, room in entries:
                if room:
                    # A usage event's row is held by this process until the seal replaces it
                    # (see _sealing); quota changes are not aggregated with a spool.
                    wake |= self._place(item.operation, item)
                    continue
                if isinstance(item.operation, QuotaChange):
                    self._spills_writing -= 1
                if not durable:
                    overflow.append(item)
                    continue
                state.queued += 1
                state.spilled += 1
                wake |= state.idle
                # Only a full queue warns; a quota change behind a spilled one is no news.
                if not self._spill_warned and not state.has_room():
                    self._spill_warned = warn = True
            if wake:
                state.idle = False
            worker = state.worker
        if warn:
            logger.warning(
                "commet: delivery queue full (limit %d); spilling operations to the spool %s",
                state.limit,
                spool.path,
            )
        self._slot.nudge(worker, wake)
        if not overflow:
            return None

        def overflow_all() -> None:
            for item in overflow:
                self._overflow(item)

        return overflow_all

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
        # Not while the writer commits and places a group: a row it committed unclaimed must not
        # reach the queue ahead of an older operation of that group waiting to be placed.
        with self.writer.publishing:
            try:
                rows = spool.claim(room)
                claimed = True
            except Exception:
                logger.exception("commet: could not read the spool %s", spool.path)
            items = [Item.from_row(row) for row in rows]
            stale = self._queue_claimed(worker, room, items, claimed, spill_seq, spills_settled)
        if stale:
            with contextlib.suppress(Exception):
                spool.release([item.row_id for item in items if item.row_id is not None])
            return None
        return bool(items)

    def _queue_claimed(
        self,
        worker: Worker,
        room: int,
        items: list[Item],
        claimed: bool,
        spill_seq: int,
        spills_settled: bool,
    ) -> bool:
        """Queue the claimed ``items`` behind what the queue holds; True if ``worker`` is stale."""
        state = self._state
        with state.lock:
            stale = not state.is_current(worker)
            state.pending -= room if stale else room - len(items)
            if not stale:
                if (
                    claimed
                    and len(items) < room
                    and spills_settled
                    and self._spill_seq == spill_seq
                ):
                    # Every quota change spilled so far is claimed now (rows come oldest first).
                    self._quota_spilling = False
                state.queue.extend(items)
                if items:
                    state.idle = False
            state.cond.notify_all()
        return stale

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
        """Give back the spool rows among ``items``; return the memory-only rest.

        The rows are released by the writer once the worker has stopped (no SQLite call under
        the queue's lock, and no claim of ours can take them back): see :meth:`wait_kept`.
        """
        spooled = [row for item in items for row in item.spool_rows()]
        if not spooled:
            return items
        self._kept.extend(spooled)
        logger.warning(
            "commet: closing with %d operations undelivered; they stay in the spool %s",
            len(spooled),
            self.spool.path,
        )
        return [item for item in items if not item.spool_rows()]

    def wait_kept(self) -> None:
        """After a close (queue lock not held, worker stopped): have the writer release the rows
        ``keep`` gave back and wait for it, so the next process can claim them at once.

        On an event loop too (``aclose``, at lifespan shutdown): a server's worker process may
        end with ``os._exit`` right after it (uvicorn's and gunicorn's do), with no exit hook
        to wait for the writer, and the loop has no request left to serve.
        """
        kept, self._kept = self._kept, []
        if kept:
            release = self.writer.release(kept)
            if release is not None:
                release.wait(_KEEP_WAIT)

    def drained(self) -> bool:
        """True if the spool has no row waiting to be claimed."""
        spool = self.spool
        if not self.writer.idle:
            return False  # its rows are not all in the file yet
        try:
            # Rows a dead process of this host held are ours to deliver now, not after the lease.
            spool.reclaim_dead_owners()
            return spool.waiting() == 0
        except Exception:
            logger.exception("commet: could not read the spool %s", spool.path)
            return True  # nothing this process can do about it now; do not spin on it

    def _redact(self, text: str) -> str:
        return redact(text, self._settings.api_key)
