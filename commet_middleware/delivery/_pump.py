"""What a worker runs: it takes batches, delivers each item, plans retries, and finishes them.

Delivery is at least once on the wire and exactly once in effect: each operation's body is encoded
once and the same bytes, carrying the same idempotency key, are re-sent on every retry, so Commet
deduplicates. Only what Commet recorded counts as delivered: its documented answer, or a 409
``duplicate`` (``_wire``). Usage events go out concurrently (their totals add up in any order);
the quota changes of one key one at a time (``_ordering``).

Every failure is classified once, by ``_retry.classify`` (the same rules as the direct client):

- transient (transport errors, 408, 429, 5xx, ``idempotency_in_progress``, a 2xx that is not
  Commet's answer): queued again after ``retry_delay`` (``settings.backoff_base`` doubling up to
  ``BACKOFF_CAP``, equal jitter, never less than ``Retry-After``); never given up while the
  process lives, except by ``close`` when its timeout runs out;
- configuration (401, 403, a 404 without one of Commet's codes: a wrong key or URL): the event is
  kept and retried on the slow schedule (``CONFIG_RETRY_CAP``, minutes), never dead-lettered;
  the fix is logged once, loudly (``_reporting``);
- permanent (validation, unknown customer or feature, billing refusals, and an operation the
  client refuses as invalid): dead-lettered to ``settings.dead_letter``, logged one line per
  (code, feature) per minute;
- unexpected (a bug): retried ``MAX_UNEXPECTED_ATTEMPTS`` times, then dead-lettered, so a bug
  cannot spin forever.

A quota aggregate Commet refused for good is split: its members take its place at the head of the
key's turn, each sent alone. Listeners hear of each member of a delivered quota aggregate.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import random
from typing import Any, cast

from commet_middleware._errors import CommetAPIError
from commet_middleware._models import Operation
from commet_middleware._retry import (
    BACKOFF_CAP,
    CONFIG_RETRY_CAP,
    FailureClass,
    classify,
    configuration_hint,
    retry_delay,
)
from commet_middleware._settings import CommetSettings, Dialect

from ._folding import UsageFold
from ._items import (
    DeliveryListener,
    Encoder,
    Item,
    OperationSender,
    SenderFactory,
    Sleep,
    describe,
    redact,
)
from ._ordering import QuotaTurns
from ._pacing import Pacer
from ._reporting import DeliveryReport
from ._sealing import Sealer
from ._spool_bridge import SpoolBridge, spool_call
from ._state import QueueState
from ._workers import Worker

__all__ = [
    "BACKOFF_CAP",
    "MAX_CLIENT_ATTEMPTS",
    "MAX_UNEXPECTED_ATTEMPTS",
    "Pump",
    "default_encoder",
    "default_sender_factory",
    "refused_outright",
    "retry_delay",
]

logger = logging.getLogger("commet_middleware.delivery")

MAX_UNEXPECTED_ATTEMPTS = 5
# Attempts to build the client before a worker gives up (loudly) and leaves its work queued for
# the next worker an enqueue or flush starts.
MAX_CLIENT_ATTEMPTS = 5
# How often an idle worker looks for spooled rows it has not been told about (spilled by another
# thread, left by a crashed process).
_SPOOL_POLL = 0.5


def refused_outright(error: Exception) -> bool:
    """True if ``error`` shows the operation was not applied: Commet refused it, or it never left.

    A key mismatch says something *was* applied under the key, and an unexpected exception leaves
    the outcome unknown: for neither may a quota aggregate's members be sent again on their own.
    """
    if isinstance(error, (ValueError, TypeError)):
        return True
    return (
        isinstance(error, CommetAPIError)
        and error.status >= 400
        and error.code != "idempotency_key_mismatch"
    )


def default_sender_factory(settings: CommetSettings) -> OperationSender:
    """Build the default client, an ``AsyncCommetClient``."""
    # Imported here: the client pulls in httpx, and tests replace it with a fake anyway.
    module = importlib.import_module("commet_middleware._client")
    return cast("OperationSender", module.AsyncCommetClient(settings))


def default_encoder(operation: Operation, dialect: Dialect) -> bytes | None:
    """Encode a request body with ``_wire.encode_body``."""
    try:
        module = importlib.import_module("commet_middleware._wire")
    except ImportError:  # pragma: no cover - only before the wire module exists
        return None  # the client encodes it itself
    return cast("bytes", module.encode_body(operation, dialect))


class Pump:
    """Runs a queue's workers: each ``run(worker)`` drains the queue until the worker retires.

    It holds the queue's lock only for bookkeeping (taking, finishing, requeueing), never across
    an await or a send. ``bridge`` is None without a spool.
    """

    def __init__(
        self,
        state: QueueState,
        *,
        turns: QuotaTurns,
        sealer: Sealer,
        bridge: SpoolBridge | None,
        settings: CommetSettings,
        sender_factory: SenderFactory,
        encoder: Encoder,
        sleep: Sleep,
        backoff_cap: float,
        rng: random.Random,
        listeners: list[DeliveryListener],
        report: DeliveryReport,
        pacer: Pacer | None = None,
    ) -> None:
        self.report = report
        # Paces partial takes while folding (None: window aggregation, or folding off).
        self._pacer = pacer
        self._state = state
        self._turns = turns
        self._sealer = sealer
        self._bridge = bridge
        self._settings = settings
        self._sender_factory = sender_factory
        self._encoder = encoder
        self._sleep = sleep
        self._backoff_cap = backoff_cap
        self._rng = rng
        self._listeners = listeners

    async def run(self, worker: Worker) -> None:
        """Take, send and finish items on ``worker``'s loop until it retires or stops."""
        state, bridge, sealer = self._state, self._bridge, self._sealer
        tasks: set[asyncio.Task[None]] = set()
        client: OperationSender | None = None
        loop = asyncio.get_running_loop()
        renewer: asyncio.Task[None] | None = None
        abandoned = False
        try:
            client = await self._make_client(worker)
            if client is None:
                return
            if bridge is not None:
                renewer = loop.create_task(bridge.renew_leases(worker))
            while True:
                if worker.free_slots <= 0:
                    worker.slot_free.clear()
                    if worker.free_slots <= 0:
                        await worker.slot_free.wait()
                    continue
                worker.wakeup.clear()
                if sealer.enabled:
                    due_in = sealer.due_in()
                    if due_in is not None and due_in <= 0:
                        if bridge is None:
                            sealer.seal_due()
                        else:  # a spool transaction per group: off the (app's) event loop
                            await spool_call(worker, sealer.seal_due)
                pacer = self._pacer
                if pacer is not None:
                    pause = pacer.delay()
                    if pause > 0:
                        # Behind: let the waiting events fold a while longer (see _pacing); a
                        # full batch waiting, a flush or a stop ends the wait.
                        with state.lock:
                            state.wake_at = pacer.full
                        try:
                            await self._wait_for_wakeup(worker, pause)
                        finally:
                            with state.lock:
                                state.wake_at = 0
                        continue
                limit = min(worker.free_slots, self._settings.batch_size)
                batch = self.take(worker, limit)
                if batch is None:
                    return
                if not batch and bridge is not None:
                    room = min(limit, state.limit - (state.pending - state.folded))
                    if room > 0:
                        # SQLite calls run off the event loop: it may be the app's.
                        claimed = await spool_call(worker, bridge.claim, worker, room)
                        if claimed is None:
                            return
                        if claimed:
                            continue  # queued: take them behind what the queue held
                if not batch:
                    # Rows can appear in the spool without a wake-up (another process), and a
                    # window ends without one.
                    timeout = None if bridge is None else _SPOOL_POLL
                    due_in = sealer.due_in()
                    if due_in is not None:
                        timeout = due_in if timeout is None else min(timeout, due_in)
                    await self._wait_for_wakeup(worker, timeout)
                    continue
                for item in batch:
                    worker.free_slots -= 1
                    task = loop.create_task(self._deliver(worker, client, item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except Exception:
            logger.exception("commet: the delivery sender failed; the next enqueue restarts it")
        except GeneratorExit:
            # Its loop was closed without cancelling it (the coroutine is being collected): no
            # await may run now. What it held stays owned; the next enqueue, flush or exit
            # finds the worker dead and queues it again.
            abandoned = True
            raise
        finally:
            if renewer is not None:
                renewer.cancel()
                tasks.add(renewer)
            for task in tasks:
                task.cancel()
            if tasks and not abandoned:
                await asyncio.gather(*tasks, return_exceptions=True)
            if worker.stop_requested:
                # Only now that no send of this generation can still finish: an operation it
                # delivered is finished, one it did not is queued again, never both.
                with state.lock:
                    if not worker.retired:
                        state.detach(worker, requeue=True)
                        state.idle = False
                    state.cond.notify_all()
            if client is not None and not abandoned:
                await self._close_client(client)

    def take(self, worker: Worker, limit: int) -> list[Item] | None:
        """Take up to ``limit`` items for ``worker``; [] if none, None if it may take no more."""
        state = self._state
        with state.lock:
            if not state.is_current(worker):
                return None
            if state.closing:  # a close gives what is in flight its last chance: nothing new
                state.idle = True
                return []
            queue = state.queue
            batch: list[Item] = []
            taken = self._sealer.taken
            while queue and len(batch) < limit:
                item = taken(queue.popleft())
                if self._turns.take(item):
                    batch.append(item)
            if not batch:
                # Idle before any spool claim, too: an enqueue from now on pokes the worker.
                state.idle = True
                return []
            worker.owned.update(batch)
            worker.in_flight += len(batch)
            if self._pacer is not None:
                self._pacer.took(len(batch))
            return batch

    async def _make_client(self, worker: Worker) -> OperationSender | None:
        attempt = 0
        while not (worker.retired or worker.stop_requested):
            try:
                return self._sender_factory(self._settings)
            except Exception:
                attempt += 1
                if attempt >= MAX_CLIENT_ATTEMPTS:
                    logger.exception(
                        "commet: could not build the Commet client (%d attempts); NOT sending: "
                        "%d operations stay queued for the next sender (the next enqueue or "
                        "flush starts one)",
                        attempt,
                        self._state.pending,
                    )
                    with self._state.lock:
                        self._state.detach(worker, requeue=True)  # owns nothing yet
                        self._state.cond.notify_all()
                    return None
                logger.exception(
                    "commet: could not build the Commet client (attempt %d of %d); retrying",
                    attempt,
                    MAX_CLIENT_ATTEMPTS,
                )
                delay = retry_delay(attempt, base=self._settings.backoff_base, rng=self._rng)
                await self._sleep_unless_woken(worker, delay)
        return None

    @staticmethod
    async def _wait_for_wakeup(worker: Worker, timeout: float | None) -> None:
        """Wait until ``worker`` is poked, or ``timeout`` seconds (None: no limit).

        Not ``asyncio.wait_for``: on Python 3.11 it loses a cancellation that arrives in the
        turn its awaitable completes, and the worker would then wait again, for ever, under a
        loop that is shutting down (asyncio.run never returned).
        """
        if timeout is None:
            await worker.wakeup.wait()
            return
        waiter = asyncio.get_running_loop().create_task(worker.wakeup.wait())
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:
            waiter.cancel()

    async def _sleep_unless_woken(self, worker: Worker, delay: float) -> None:
        """Wait ``delay``, or less if ``worker`` is poked (asked to stop before a fork)."""
        worker.wakeup.clear()
        if worker.stop_requested:  # asked before the clear: its wake-up may be gone
            return
        loop = asyncio.get_running_loop()
        waits = {loop.create_task(self._sleep_for(delay)), loop.create_task(worker.wakeup.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def _sleep_for(self, delay: float) -> None:
        await self._sleep(delay)

    @staticmethod
    async def _close_client(client: OperationSender) -> None:
        aclose: Any = getattr(client, "aclose", None)
        if aclose is None:
            return
        try:
            await aclose()
        except Exception:
            logger.exception("commet: closing the Commet client failed")

    async def _deliver(self, worker: Worker, client: OperationSender, item: Item) -> None:
        state = self._state
        try:
            if isinstance(item, UsageFold) and item.needs_seal:
                if self._bridge is None:
                    sealed = self._sealer.seal_fold(item)
                else:
                    sealed = await spool_call(worker, self._sealer.seal_fold, item)
                if not sealed:
                    self._give_back(worker, item)
                    return
            try:
                if item.body is None:
                    item.body = self._encoder(item.operation, self._settings.dialect)
            except Exception as exc:
                logger.exception("commet: could not encode %s", describe(item.operation))
                if item.parts:
                    self._split(worker, item, exc)
                    return
                await self._settle(worker, item, exc)
                self._finish(worker, item, failure=exc)
                return
            try:
                result = await client.send_once(item.operation, request_body=item.body)
            except Exception as exc:
                delay = self._plan_retry(item, exc)
                if delay is None:
                    if item.parts and refused_outright(exc):
                        self._split(worker, item, exc)
                        return
                    await self._settle(worker, item, exc)
                    self._finish(worker, item, failure=exc)
                    return
                if self._bridge is not None:
                    await self._bridge.note_failure(worker, item, exc)
                with state.lock:
                    if item not in worker.owned:
                        return
                    worker.in_flight -= 1
                    worker.retrying += 1
                    state.retried += 1
            else:
                await self._settle(worker, item, None)
                self._finish(worker, item, result=result)
                return
        finally:
            worker.free_slots += 1
            worker.slot_free.set()
        try:
            await self._sleep(delay)
        finally:
            with state.lock:
                worker.retrying -= 1
                requeue = item in worker.owned and not worker.retired
                if requeue:
                    worker.owned.discard(item)
                    state.queue.appendleft(item)
                    state.idle = False
        if requeue:
            worker.wakeup.set()

    async def _settle(self, worker: Worker, item: Item, failure: Exception | None) -> None:
        if self._bridge is not None:
            await self._bridge.settle(worker, item, failure)

    def _plan_retry(self, item: Item, error: Exception) -> float | None:
        """Return how long to wait before sending ``item`` again, or None to give it up."""
        item.attempts += 1
        kind: FailureClass = classify(error)
        cap = self._backoff_cap
        if kind == "permanent":
            return None
        text = self._redact(str(error) or repr(error))
        waiting = self._state.pending
        if kind == "transient":
            self.report.retrying(describe(item.operation), text, waiting)
        elif kind == "configuration":
            # Nothing gets through until someone fixes the setup: keep every event, try now
            # and then (minutes apart), and say what to fix once.
            cap = max(cap, CONFIG_RETRY_CAP)
            hint = configuration_hint(error, base_url=self._settings.base_url)
            self.report.configuration(hint or text, text, waiting)
        else:
            item.unexpected += 1
            logger.error(
                "commet: unexpected error sending %s (%d of %d): %s",
                describe(item.operation),
                item.unexpected,
                MAX_UNEXPECTED_ATTEMPTS,
                self._redact(repr(error)),
            )
            if item.unexpected >= MAX_UNEXPECTED_ATTEMPTS:
                return None
        return retry_delay(
            item.attempts,
            base=self._settings.backoff_base,
            cap=cap,
            retry_after=getattr(error, "retry_after", None),
            retry_after_cap=self._settings.retry_after_cap,
            rng=self._rng,
        )

    def _finish(
        self,
        worker: Worker,
        item: Item,
        *,
        result: object = None,
        failure: Exception | None = None,
    ) -> None:
        state = self._state
        with state.lock:
            if not self._release(worker, item):
                return
            # A quota aggregate is reported member by member, so that a listener or hook
            # counting our changes (the quota gate) sees each one it was handed settle.
            operations = [part.operation for part in item.parts or [item]]
            if failure is None:
                state.sent += 1
                if item.members:
                    state.aggregates_sent += 1
                if getattr(result, "duplicate", False):
                    state.duplicates += 1
            else:
                state.dead_lettered += len(operations)
            successor = self._turns.pass_on(item)
            if successor is not None:
                # At the head: it was taken before anything now queued.
                state.queue.appendleft(successor)
                state.idle = False
                worker.wakeup.set()  # we run on the worker's loop
        if failure is not None:
            code = getattr(failure, "code", None) or type(failure).__name__
            text = self._redact(str(failure) or repr(failure))
            for operation in operations:
                self.report.dead_letter(str(code), operation.feature, describe(operation), text)
                self.dead_letter(operation, failure)
        else:
            self.report.delivered()
            for operation in operations:
                self._notify_listeners(operation, result)
        # Only now, so a flush that returns has seen the hook called too.
        with state.lock:
            state.pending -= 1
            state.cond.notify_all()

    def _give_back(self, worker: Worker, fold: UsageFold) -> None:
        """A fold whose rows went back to the spool unsealed: finished here, sent from there."""
        state = self._state
        with state.lock:
            if not self._release(worker, fold):
                return
            state.pending -= fold.members
            state.folded -= fold.members - 1
            state.cond.notify_all()

    def _split(self, worker: Worker, item: Item, failure: Exception) -> None:
        """A quota aggregate Commet refused (nothing applied): send its members one by one.

        They take its turn, oldest first, at the head of the queue, so nothing queued behind the
        aggregate (a remove, a set, a later add) overtakes them.
        """
        parts = item.parts
        if not parts:  # pragma: no cover - only quota aggregates are split
            return
        state = self._state
        with state.lock:
            if not self._release(worker, item):
                return
            state.aggregates_split += 1
            state.pending += len(parts) - 1
            if self._turns.split(item, parts):
                state.queue.appendleft(parts[0])
            else:  # pragma: no cover - an aggregate is sent only while it holds its key's turn
                state.queue.extendleft(reversed(parts))
            state.idle = False
        logger.info(
            "commet: %s refused (%s); sending its %d members one by one",
            describe(item.operation),
            self._redact(str(failure) or repr(failure)),
            len(parts),
        )
        worker.wakeup.set()  # we run on the worker's loop

    @staticmethod
    def _release(worker: Worker, item: Item) -> bool:
        """(Lock held.) Take ``item``, no longer in flight, from ``worker``; False if a restart
        or a close took it back first: then someone else reports it."""
        if item not in worker.owned:
            return False
        worker.owned.discard(item)
        worker.in_flight -= 1
        return True

    def _notify_listeners(self, operation: Operation, result: object) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(operation, result)
            except Exception:
                logger.exception("commet: a delivery listener raised; ignored")

    def dead_letter(self, operation: Operation, error: Exception) -> None:
        """Hand ``operation`` to ``settings.dead_letter``; a hook that raises is logged."""
        hook = self._settings.dead_letter
        if hook is None:
            return
        try:
            hook(operation, error)
        except Exception:
            logger.exception("commet: the dead_letter hook raised; ignored")

    def _redact(self, text: str) -> str:
        return redact(text, self._settings.api_key)
