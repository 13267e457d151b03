"""What a close could not deliver: taken off the queue when the worker is retired, then reported.

``Leftovers.take`` runs once a close's flush (and its grace for answers) is over: it retires the
worker, takes everything still undelivered (in flight, queued, parked quota changes, open
aggregation groups), gives what the spool can keep back to it, and counts the rest as
dead-lettered. ``Leftovers.report`` then says it once, loudly, and hands each operation to the
dead-letter hook with an ``UndeliveredError`` that tells "never sent" from "sent, no answer"
(Commet may have recorded the latter; its key makes a resend safe).
"""

from __future__ import annotations

import logging

from ._folding import UsageFold
from ._items import Item, UndeliveredError, describe
from ._ordering import QuotaTurns
from ._pump import Pump
from ._sealing import Sealer
from ._spool_bridge import SpoolBridge
from ._state import QueueState
from ._workers import Worker

__all__ = ["Leftovers"]

logger = logging.getLogger("commet_middleware.delivery")


class Leftovers:
    """Takes and reports what one queue's close left undelivered."""

    def __init__(
        self,
        state: QueueState,
        *,
        turns: QuotaTurns,
        sealer: Sealer,
        bridge: SpoolBridge | None,
        pump: Pump,
    ) -> None:
        self._state = state
        self._turns = turns
        self._sealer = sealer
        self._bridge = bridge
        self._pump = pump
        # Taken by the worker when the close came: in flight, or failed and waiting to retry.
        self._unanswered: set[Item] = set()
        # How many operations the last close found undelivered (in the spool or not).
        self.left_behind = 0

    def take(self) -> tuple[Worker | None, list[Item]]:
        """Retire the worker and take everything still undelivered, for close and aclose.

        What the spool can keep goes back to it (after the lock is released: no SQLite under
        it); the rest is returned (and counted as dead-lettered) for the caller to report once
        the worker has stopped.
        """
        state = self._state
        with state.lock:
            worker = state.worker
            leftovers = state.detach(worker, requeue=False) if worker else []
            # Taken by the worker: in flight, or failed and waiting to retry.
            self._unanswered = set(leftovers)
            leftovers.extend(state.queue)
            state.queue.clear()
            leftovers.extend(self._turns.unpark_all())
            leftovers.extend(self._sealer.unseal_all())
            if self._sealer.folds is not None:
                self._sealer.folds.clear()
            weight = sum(item.weight() for item in leftovers)
            self.left_behind = weight
            state.pending -= weight
            state.folded -= weight - len(leftovers)
            state.closing = False
            state.cond.notify_all()
        if self._bridge is not None:
            leftovers = self._bridge.keep(leftovers)
        reported: list[Item] = []
        for item in leftovers:
            if isinstance(item, UsageFold) and item.needs_seal:
                item.operation = item.aggregate()  # reported as the one event it stands for
            # An undelivered quota aggregate is reported member by member, as it was enqueued.
            reported.extend(item.parts or [item])
        with state.lock:
            state.dead_lettered += sum(len(i.parts) if i.parts else i.weight() for i in leftovers)
        return worker, reported

    def report(self, items: list[Item]) -> None:
        """Report what a close could not deliver: one ERROR with the counts, then the hook.

        Sent and unanswered (in flight at the deadline, or failed and waiting to retry):
        Commet may have recorded them, and their keys make a resend safe. Never sent: Commet
        has nothing of them.
        """
        if self._bridge is not None:  # the spool writer's release of the rows kept (no lock)
            self._bridge.wait_kept()
        if not items:
            return
        tried = [item for item in items if item.attempts or item in self._unanswered]
        untried = len(items) - len(tried)
        examples = ", ".join(describe(item.operation) for item in items[:3])
        logger.error(
            "commet: closing with %d operations undelivered: %d never sent, %d sent without an "
            "answer that Commet recorded them (it may have; a resend under the same key would "
            "be deduplicated). Raise shutdown_timeout, or set spool_path to keep them. First: %s",
            len(items),
            untried,
            len(tried),
            examples,
        )
        for item in items:
            maybe = item in tried
            self._pump.dead_letter(
                item.operation,
                UndeliveredError(
                    "shutdown",
                    "sent, no answer before the close timeout"
                    if maybe
                    else "not sent before the close timeout",
                    maybe_delivered=maybe,
                ),
            )
        self._unanswered.clear()
