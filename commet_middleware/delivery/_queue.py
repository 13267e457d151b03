"""The delivery queue: admission and overflow, flush and close, over the parts it composes.

``DeliveryQueue.enqueue`` is a deque append under a lock plus, only when the worker is idle, a
wake-up; it never raises and never waits on the network. One worker per queue (``_workers``)
drains it with the pump (``_pump``); a spool (``_spool_bridge``), window aggregation
(``_sealing``) and the per-key order of quota changes (``_ordering``) are parts it composes, all
over one shared ``QueueState`` whose lock the queue and its parts take.

Overflow (``pending`` reached ``settings.queue_limit``): memory stays bounded and no event is lost
without a trace. ``"block"`` (the default) waits up to ``settings.overflow_block_timeout`` for
room, but only in a thread with no running event loop (a WSGI worker, a threadpool endpoint):
blocking an event loop would stall every request on it and, when the worker lives on that loop,
could never make room. If there is still no room the event is refused loudly: an ERROR log naming
customer, feature and idempotency key, the ``dropped`` counter, and ``settings.dead_letter``
called with an ``UndeliveredError`` (reason ``"queue_full"``) so the app can persist it. Growing
past the limit instead would trade a counted loss for an out-of-memory kill that loses every
queued event silently. With a spool, overflow spills to it. ``"spool"`` without ``spool_path``
behaves like ``"block"`` (a warning says so once). ``"drop"`` refuses at once, just as loudly.

Events still undelivered when ``close`` times out are reported the same way (``_leftovers``:
reason ``"shutdown"``, counted in ``dead_lettered``); ``close`` hands back the members of groups
it could not seal and send, one by one, and those of a quota aggregate it could not deliver.
Parked quota changes count as pending; ``close`` hands them back like the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from commet_middleware._models import Operation, UsageEvent
from commet_middleware._settings import CommetSettings
from commet_middleware._spool import Spool

from . import _process
from ._items import (
    AggregationStats,
    DeliveryListener,
    DeliveryStats,
    Encoder,
    Item,
    SenderFactory,
    Sleep,
    UndeliveredError,
    describe,
)
from ._leftovers import Leftovers
from ._ordering import QuotaTurns
from ._pacing import Pacer
from ._pump import BACKOFF_CAP, Pump, default_encoder, default_sender_factory
from ._reporting import DeliveryReport
from ._sealing import Sealer
from ._spool_bridge import SpoolBridge
from ._spool_writer import GroupCommit
from ._state import QueueState
from ._workers import Worker, WorkerSlot, running_loop

__all__ = ["DeliveryQueue"]

logger = logging.getLogger("commet_middleware.delivery")

# How often a waiting flush re-checks that a worker is still alive to make progress.
_FLUSH_RECHECK = 0.25
_AFLUSH_POLL = 0.005
_JOIN_TIMEOUT = 1.0
# The longest a close waits, after its flush, for sends in flight to be answered.
_ANSWER_GRACE = 1.0
# How often a flush re-counts the spool.
_SPOOL_FLUSH_POLL = 0.05


class DeliveryQueue:
    """A bounded in-memory queue of billable operations and the background sender draining it.

    ``sender_factory`` builds the client (default: ``AsyncCommetClient``), ``encoder`` the request
    body (default: ``_wire.encode_body``), and ``sleep`` waits out a retry delay (tests pass a
    fast one). ``spool`` replaces the one built from ``settings.spool_path`` (tests pass one
    with a short lease). ``clock`` (default ``time.monotonic``) times aggregation windows.
    """

    def __init__(
        self,
        settings: CommetSettings,
        *,
        sender_factory: SenderFactory | None = None,
        encoder: Encoder | None = None,
        sleep: Sleep | None = None,
        backoff_cap: float = BACKOFF_CAP,
        rng: random.Random | None = None,
        spool: Spool | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock or time.monotonic
        if spool is None and settings.spool_path:
            spool = Spool(settings.spool_path)
        self._spool = spool
        self._sender_factory = sender_factory or default_sender_factory
        self._encoder = encoder or default_encoder
        self._sleep: Sleep = sleep or asyncio.sleep
        self._backoff_cap = backoff_cap
        self._rng = rng or random.Random()
        self._limit = settings.queue_limit
        self._folding = settings.fold_when_behind and not settings.aggregate_window
        self._listeners: list[DeliveryListener] = []
        # Survives a fork's reset: a rate limit of log lines is per process anyway.
        self._report = DeliveryReport(logger)
        self._reset()
        if sender_factory is None:
            _process.import_http_stack()
        _process.live_queues.add(self)

    def _reset(self) -> None:
        """Build the state and the parts afresh: at creation, and in a forked child."""
        self._pid = os.getpid()
        self._generation = _process.fork_generation
        self._spool_warned = False
        settings, spool = self.settings, self._spool
        state = self._state = QueueState(self._limit)
        turns = self._turns = QuotaTurns()
        self._sealer = Sealer(
            state,
            window=settings.aggregate_window,
            fold=settings.fold_when_behind,
            clock=self._clock,
            spool=spool,
            encoder=self._encoder,
            dialect=settings.dialect,
        )
        default_client = self._sender_factory is default_sender_factory
        self._slot = WorkerSlot(
            state,
            max_concurrency=settings.max_concurrency,
            run=self._run_worker,
            prepare_thread=_process.import_http_stack if default_client else None,
            keep_polling=spool is not None,
            on_start=self._in_use,
        )
        self._bridge = (
            None
            if spool is None
            else SpoolBridge(
                state,
                spool,
                settings=settings,
                encoder=self._encoder,
                slot=self._slot,
                place=self._sealer.place,
                overflow=self._overflow,
            )
        )
        self._pump = Pump(
            state,
            turns=turns,
            sealer=self._sealer,
            bridge=self._bridge,
            settings=settings,
            sender_factory=self._sender_factory,
            encoder=self._encoder,
            sleep=self._sleep,
            backoff_cap=self._backoff_cap,
            rng=self._rng,
            listeners=self._listeners,
            report=self._report,
            pacer=(
                Pacer(state, full=min(settings.max_concurrency, settings.batch_size))
                if self._sealer.folds is not None
                else None
            ),
        )
        self._leftovers = Leftovers(
            state, turns=turns, sealer=self._sealer, bridge=self._bridge, pump=self._pump
        )

    def _run_worker(self, worker: Worker) -> Coroutine[Any, Any, None]:
        # Through the queue, not the pump's bound method: the slot is built before the pump.
        return self._pump.run(worker)

    def _in_use(self) -> None:
        """A sender is starting: the process's flush and exit hooks count this queue again
        (a close took it off their list)."""
        _process.live_queues.add(self)

    def _check_fork(self) -> None:
        if self._generation != _process.fork_generation:
            self._reset_after_fork()

    def add_listener(self, listener: DeliveryListener) -> None:
        """Call ``listener(operation, result)`` after each operation Commet accepted.

        The quota guard uses this to learn the balance Commet confirmed. A listener runs on the
        sender's loop, so it must be quick; its exceptions are logged and ignored.
        """
        if listener not in self._listeners:
            self._listeners.append(listener)

    def remove_listener(self, listener: DeliveryListener) -> None:
        """Stop calling ``listener``; unknown listeners are ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def __repr__(self) -> str:
        return f"<DeliveryQueue pending={self._state.pending} limit={self._limit}>"

    # -- the request path ------------------------------------------------------------------

    def enqueue(self, operation: Operation) -> GroupCommit | None:
        """Accept ``operation`` for delivery; never raises, waits only as the overflow says.

        With a spool, returns the commit to wait for before the response completes.
        """
        try:
            if self._generation != _process.fork_generation:
                self._reset_after_fork()
            if self._bridge is not None:
                return self._bridge.enqueue(Item(operation))
            state = self._state
            with state.lock:
                # A usage event is never refused when it can fold: it joins its group's waiting
                # fold, or opens one (bounded by the groups waiting, not by the request rate).
                if state.has_room() or (self._folding and isinstance(operation, UsageEvent)):
                    state.pending += 1
                    state.queued += 1
                    # No item yet: an aggregated usage event waits as a tuple (see Packed).
                    wake = self._sealer.place(operation, None)
                    if wake:
                        state.idle = False
                    worker = state.worker
                    full = False
                else:
                    full = True
            if full:
                self._overflow(Item(operation))
            else:
                self._slot.nudge(worker, wake)
        except Exception:
            logger.exception("commet: could not enqueue %s; the request is unaffected", operation)
        return None

    def _overflow(self, item: Item) -> None:
        policy = self.settings.overflow
        state = self._state
        if policy == "spool" and not self._spool_warned:
            self._spool_warned = True
            logger.warning(
                "commet: overflow='spool' without a spool_path: spilling to memory is not "
                "implemented yet (set spool_path); behaving like 'block'"
            )
        if policy != "drop" and running_loop() is None:
            self._slot.ensure()
            deadline = time.monotonic() + self.settings.overflow_block_timeout
            accepted = wake = False
            worker: Worker | None = None
            with state.cond:
                while not state.has_room():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    state.cond.wait(remaining)
                else:
                    state.pending += 1
                    state.queued += 1
                    wake = self._sealer.place(item.operation, item)
                    if wake:
                        state.idle = False
                    worker = state.worker
                    accepted = True
            if accepted:
                self._slot.nudge(worker, wake)
                return
        with state.lock:
            state.dropped += 1
            pending = state.pending
        self._report.dead_letter(
            "queue_full",
            item.operation.feature,
            describe(item.operation),
            f"delivery queue full ({pending} pending, limit {self._limit}, overflow={policy!r}): "
            "NOT delivering it",
        )
        self._pump.dead_letter(
            item.operation,
            UndeliveredError("queue_full", f"delivery queue full ({self._limit} pending)"),
        )

    def seal_now(self) -> None:
        """Seal every open aggregation group now and queue the aggregates (no-op when off)."""
        try:
            self._check_fork()
            if self._sealer.seal(everything=True):
                worker = self._state.worker
                if worker is None or not worker.alive():
                    self._slot.ensure()
                else:
                    self._slot.poke(worker)
        except Exception:
            logger.exception("commet: could not seal the aggregation groups")

    # -- the worker ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender now: on the running event loop if there is one, else in a thread."""
        try:
            self._check_fork()
            self._slot.ensure()
        except Exception:
            logger.exception("commet: could not start the delivery sender")

    def _on_worker_loop(self) -> bool:
        worker = self._state.worker
        return worker is not None and worker.on_this_thread() and running_loop() is not None

    # -- flush and close -------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is delivered or given up; False if ``timeout`` ran out.

        Call it from any thread but the sender's event loop (there, ``await aflush()``). The
        sender is not paced while a flush waits.
        """
        with self._unpaced():
            return self._flush(timeout)

    @contextmanager
    def _unpaced(self) -> Iterator[None]:
        """While a flush waits, the sender is not paced (see ``_pacing``); one waiting out a
        pace is woken to send what waits now."""
        state = self._state  # a fork during the flush replaces it: count out where counted in
        with state.lock:
            state.flushing += 1
            paced = state.worker if state.wake_at else None
        if paced is not None:
            try:
                self._slot.poke(paced)
            except Exception:  # its loop is gone: the flush replaces it
                logger.debug("commet: could not wake the paced sender", exc_info=True)
        try:
            yield
        finally:
            with state.lock:
                state.flushing -= 1

    def _flush(self, timeout: float | None) -> bool:
        try:
            self._check_fork()
            if timeout is None:
                timeout = self.settings.shutdown_timeout
            deadline = time.monotonic() + timeout
            state = self._state
            if self._on_worker_loop():
                logger.warning("commet: flush() on the sender's event loop; use await aflush()")
                return state.pending == 0
            while True:
                if self._sealer.open_members:
                    self.seal_now()
                with state.cond:
                    pending = state.pending
                    remaining = deadline - time.monotonic()
                if pending == 0 and self._spool_drained() and state.pending == 0:
                    return True
                if remaining <= 0:
                    return False
                if not self._slot.ensure():
                    # No thread can start (interpreter shutdown): drain on a loop of our own.
                    if running_loop() is not None:
                        return False
                    return asyncio.run(self.aflush(remaining))
                with state.cond:
                    if state.pending:
                        state.cond.wait(min(remaining, _FLUSH_RECHECK))
                        continue
                # Only spooled rows are left: nudge the worker to claim them.
                worker = state.worker
                if worker is not None:
                    self._slot.poke(worker)
                time.sleep(min(remaining, _SPOOL_FLUSH_POLL))
        except Exception:
            logger.exception("commet: flush failed")
            return False

    async def aflush(self, timeout: float | None = None) -> bool:
        """Like :meth:`flush`, without blocking the event loop."""
        with self._unpaced():
            return await self._aflush(timeout)

    async def _aflush(self, timeout: float | None) -> bool:
        try:
            if timeout is None:
                timeout = self.settings.shutdown_timeout
            deadline = time.monotonic() + timeout
            next_spool_check = 0.0
            state = self._state
            while True:
                if self._sealer.open_members:
                    if self._bridge is None:
                        self.seal_now()
                    else:
                        await asyncio.to_thread(self.seal_now)
                now = time.monotonic()
                if not state.pending and now >= next_spool_check:
                    # A spool read runs in a thread: this loop may be the app's.
                    drained = self._bridge is None or await asyncio.to_thread(self._spool_drained)
                    if drained and not state.pending:
                        return True
                    next_spool_check = now + _SPOOL_FLUSH_POLL
                    worker = state.worker
                    if worker is not None:
                        self._slot.poke(worker)
                if now >= deadline:
                    return False
                self._slot.ensure()
                await asyncio.sleep(_AFLUSH_POLL)
        except Exception:
            logger.exception("commet: flush failed")
            return False

    def _spool_drained(self) -> bool:
        """True if the spool has no row waiting to be claimed (always, without a spool)."""
        return self._bridge is None or self._bridge.drained()

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the sender; report what was left. True if everything was delivered.

        The timeout covers it all: the flush, then up to a fifth of it (at most
        ``_ANSWER_GRACE``) in which nothing new is sent and the sends in flight may still be
        answered (an answered one is delivered, not "undelivered"). What is left is reported
        exactly (see ``_leftovers``). The queue stays usable: a later enqueue starts a new sender.
        """
        if timeout is None:
            timeout = self.settings.shutdown_timeout
        grace = min(timeout / 5, _ANSWER_GRACE)
        delivered = self.flush(timeout - grace)
        try:
            if not delivered:
                self._await_answers(grace)
            worker, leftovers = self._leftovers.take()
            if worker is not None:
                self._slot.poke(worker, all_waits=True)
                worker.join(_JOIN_TIMEOUT)
            self._leftovers.report(leftovers)
            self._report.close()
            # Closed: what it held is delivered, reported or on disk. The process-wide flush
            # and the exit hook leave it alone until a later enqueue starts a sender again.
            _process.live_queues.discard(self)
        except Exception:
            logger.exception("commet: close failed")
            return False
        return self._closed_clean(delivered, leftovers)

    async def aclose(self, timeout: float | None = None) -> bool:
        """Like :meth:`close`, for an event loop (the ASGI lifespan shutdown)."""
        worker = self._state.worker
        if worker is None or worker.loop is not running_loop():
            return await asyncio.to_thread(self.close, timeout)
        if timeout is None:
            timeout = self.settings.shutdown_timeout
        grace = min(timeout / 5, _ANSWER_GRACE)
        delivered = await self.aflush(timeout - grace)
        try:
            if not delivered:
                await asyncio.to_thread(self._await_answers, grace)
            # Read the worker again: aflush may have replaced one that had died.
            worker, leftovers = self._leftovers.take()
            if worker is not None:
                self._slot.poke(worker, all_waits=True)
                await worker.wait_stopped(_JOIN_TIMEOUT)
            self._leftovers.report(leftovers)
            self._report.close()
            # Closed: what it held is delivered, reported or on disk. The process-wide flush
            # and the exit hook leave it alone until a later enqueue starts a sender again.
            _process.live_queues.discard(self)
        except Exception:
            logger.exception("commet: close failed")
            return False
        return self._closed_clean(delivered, leftovers)

    def _closed_clean(self, delivered: bool, leftovers: list[Item]) -> bool:
        """Delivered, or answered within the grace: nothing left behind, spooled or not."""
        if leftovers:
            return False
        return delivered or (self._leftovers.left_behind == 0 and self._spool_drained())

    def _stop_taking(self) -> None:
        with self._state.lock:
            self._state.closing = True

    def _in_flight(self) -> int:
        worker = self._state.worker
        return 0 if worker is None else worker.in_flight

    def _await_answers(self, grace: float) -> None:
        """Send nothing new, and give the sends in flight ``grace`` seconds to be answered."""
        self._stop_taking()
        state = self._state
        deadline = time.monotonic() + grace
        with state.cond:
            while self._in_flight() and (remaining := deadline - time.monotonic()) > 0:
                state.cond.wait(remaining)

    # -- counters --------------------------------------------------------------------------

    def stats(self) -> DeliveryStats:
        """Return a snapshot of the counters."""
        state = self._state
        with state.lock:
            worker = state.worker
            return DeliveryStats(
                queued=state.queued,
                sent=state.sent,
                retried=state.retried,
                duplicates=state.duplicates,
                dead_lettered=state.dead_lettered,
                dropped=state.dropped,
                in_flight=worker.in_flight if worker else 0,
                pending=state.pending,
                queue_depth=state.pending - state.folded,
            )

    def aggregation_stats(self) -> AggregationStats:
        """Return a snapshot of the aggregation counters."""
        state = self._state
        with state.lock:
            return AggregationStats(
                aggregated_members=state.aggregated_members,
                aggregates_sent=state.aggregates_sent,
                open_members=self._sealer.open_members,
                aggregates_split=state.aggregates_split,
            )

    # -- process hooks (called by _process) ------------------------------------------------

    def _reset_after_fork(self) -> None:
        # The parent's worker thread does not exist here and its client's sockets are shared
        # with the parent; what it had queued is the parent's to deliver.
        self._reset()

    def _hold_for_fork(self) -> None:
        """Before a fork: stop this queue's worker thread and start none until after it."""
        if self._pid != os.getpid():
            return  # inherited and not used since: nothing runs
        self._slot.hold_for_fork()

    def _release_after_fork(self) -> None:
        """After a fork, in the parent: restart a stopped worker thread if work is pending."""
        self._slot.release_after_fork()

    def _close_at_exit(self) -> None:
        state = self._state
        if state.pending or state.worker is not None or state.spilled:
            self.close(self.settings.shutdown_timeout)
