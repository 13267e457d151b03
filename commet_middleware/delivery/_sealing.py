"""Placing accepted operations: on the queue, into a waiting fold, or into a window's group.

Folding (the default, ``settings.fold_when_behind``, when no window is set): see ``_folding``.

Aggregation (``settings.aggregate_window``, off by default): usage events of one (customer,
feature, properties) enqueued within a window are held (counted in ``pending``, spooled as usual)
and summed into one event when the window is sealed, by the worker (a timer in its loop) or at once
by ``flush``, ``close`` or ``seal_now``; see ``_aggregation`` for what an aggregate is and the
trade-off. Without a spool, quota adds of one (customer, feature) are held and summed the same
way; a remove or set of the key seals the key's group before it joins the queue, and a quota
aggregate takes the key's turn like any change. Refused for good, it is split (see ``_pump``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import cast

from commet_middleware._models import Operation, QuotaChange, UsageEvent
from commet_middleware._settings import Dialect
from commet_middleware._spool import Spool, SpoolSealError

from ._aggregation import (
    MAX_AGGREGATE_MEMBERS,
    Aggregator,
    aggregate_quota_adds,
    build_aggregate,
    quota_group_key,
)
from ._folding import Folds, QuotaFold, UsageFold
from ._items import Encoder, Item, Member, Packed, unpack
from ._state import QueueState

__all__ = ["Sealer"]

logger = logging.getLogger("commet_middleware.delivery")


class Sealer:
    """Places each accepted operation: in its aggregation group, or on the queue.

    ``spool``: the queue's spool, whose member rows a usage aggregate's seal replaces.
    """

    def __init__(
        self,
        state: QueueState,
        *,
        window: float | None,
        fold: bool = True,
        clock: Callable[[], float],
        spool: Spool | None,
        encoder: Encoder,
        dialect: Dialect,
    ) -> None:
        self._state = state
        self._clock = clock
        self._spool = spool
        self._encoder = encoder
        self._dialect = dialect
        # Held members count in ``pending`` until their group is sealed, so a group must seal
        # well before it alone fills the queue: at a quarter of ``queue_limit`` (else a burst
        # of one customer's requests within one window is refused for want of room).
        group_limit = max(1, min(MAX_AGGREGATE_MEMBERS, state.limit // 4))
        self._aggregator: Aggregator[Member] | None = (
            Aggregator(window, clock, max_members=group_limit) if window else None
        )
        self.folds: Folds | None = (
            Folds(quota=spool is None, clock=clock) if fold and not window else None
        )

    @property
    def enabled(self) -> bool:
        """True if aggregation is on."""
        return self._aggregator is not None

    @property
    def open_members(self) -> int:
        """Members whose group is not sealed yet (read under the lock for an exact figure)."""
        aggregator = self._aggregator
        return aggregator.members if aggregator is not None else 0

    def place(self, operation: Operation, item: Item | None) -> bool:
        """(Lock held.) Queue ``operation``, fold it, or hold it in its window's group; True:
        wake the worker. ``item`` is its spooled item, if it has one (else made when needed).

        A folded member never wakes the worker (its fold is queued already); an aggregated one
        only when the earliest deadline moved.
        """
        state = self._state
        folds = self.folds
        if folds is not None:
            if isinstance(operation, UsageEvent):
                fold = folds.add_usage(
                    operation,
                    None if item is None else item.row_id,
                    None if item is None else item.body,
                )
                if fold is None:
                    state.folded += 1
                    state.aggregated_members += 1
                    return False
                state.queue.append(fold)
                return state.wakes_worker()
            queued = folds.add_quota(item or Item(operation))
            if queued is None:
                state.folded += 1
                state.aggregated_members += 1
                return False
            state.queue.append(queued)
            return state.wakes_worker()
        aggregator = self._aggregator
        if aggregator is not None:
            if isinstance(operation, UsageEvent):
                state.aggregated_members += 1
                group = (operation.customer_id, operation.feature, operation.properties)
                packed: Packed = (
                    operation.customer_id,
                    operation.feature,
                    operation.value,
                    operation.idempotency_key,
                    operation.timestamp,
                    operation.properties,
                    None if item is None else item.row_id,
                    None if item is None else item.body,
                )
                return aggregator.add_to(group, packed) and state.idle
            # Quota adds only without a spool (see _aggregation).
            if operation.action == "add" and self._spool is None:
                state.aggregated_members += 1
                return aggregator.add(operation, item or Item(operation)) and state.idle
            if operation.action != "add":
                # A remove or set must not overtake the adds held before it.
                self._seal_quota_key(operation.customer_id, operation.feature)
        state.queue.append(item or Item(operation))
        return state.idle

    def taken(self, item: Item) -> Item:
        """(Lock held.) The worker took ``item``: close it if it is a fold; return what to send.

        A quota fold is sealed here, in memory, so its key's turn sees the summed add; a usage
        fold is sealed by the pump (``seal_fold``), outside the lock.
        """
        folds = self.folds
        if folds is None:
            return item
        folds.take(item)
        if isinstance(item, QuotaFold):
            sealed, joined = item.seal()
            if joined:
                self._state.pending -= joined
                self._state.folded -= joined
                self._state.cond.notify_all()
            return sealed
        return item

    def seal_fold(self, fold: UsageFold) -> bool:
        """Seal a taken usage fold of several members into its aggregate; False: it could not be
        sealed, its member rows went back to the spool (to be sent one by one), it is finished.

        Blocking with a spool (one transaction): the pump runs it through ``spool_call``.
        """
        aggregate = fold.aggregate()
        body: bytes | None = None
        row_id: int | None = None
        spool = self._spool
        if spool is not None and fold.row_ids:
            try:
                body = self._encoder(aggregate, self._dialect)
                row_id = spool.seal_aggregate(fold.row_ids, aggregate, self._dialect, body)
            except SpoolSealError as exc:
                # A lease ran out: another process may hold a member. Each goes out with its
                # own key from the spool, so Commet deduplicates whatever both send.
                logger.warning("commet: not folding %d events: %s", fold.members, exc)
                spool.release(fold.row_ids)
                return False
        state = self._state
        with state.lock:
            fold.operation = aggregate
            fold.body = body
            fold.row_id = row_id
            fold.sealed = True
            joined = fold.members - 1
            state.pending -= joined
            state.folded -= joined
            state.cond.notify_all()
        return True

    def seal(self, *, everything: bool) -> bool:
        """Seal the due groups (all if ``everything``) and queue them; True if any was sealed.

        Blocking (a spool transaction per group): the pump runs it through ``spool_call``.
        """
        aggregator = self._aggregator
        if aggregator is None or not aggregator.members:
            return False
        state = self._state
        usage_groups: list[list[Packed]] = []
        with state.lock:
            groups = aggregator.take_due(everything=everything)
            for members in groups:
                if isinstance(members[0], Item):  # quota adds; usage events wait packed
                    # In memory, under the lock that took the group: a remove or set of its key
                    # cannot be queued in between and overtake it.
                    items = cast("list[Item]", members)
                    self._queue_sealed(items, self._seal_quota(items))
                else:
                    usage_groups.append(cast("list[Packed]", members))
            if groups:
                state.idle = False
        for packed in usage_groups:
            sealed = self._seal_one(packed)
            with state.lock:
                if sealed is None:
                    state.queue.extend(map(unpack, packed))
                else:
                    self._queue_sealed(packed, sealed)
                state.idle = False
        return bool(groups)

    def seal_due(self) -> None:
        """Seal the groups whose window has ended; never raises (the worker calls it)."""
        try:
            self.seal(everything=False)
        except Exception:
            logger.exception("commet: could not seal the aggregation groups")

    def due_in(self) -> float | None:
        """Seconds until the next aggregation window ends (None: no group is open)."""
        aggregator = self._aggregator
        if aggregator is None:
            return None
        with self._state.lock:
            deadline = aggregator.next_deadline()
        return None if deadline is None else max(deadline - self._clock(), 0.0)

    def unseal_all(self) -> list[Item]:
        """(Lock held.) Forget the open aggregation groups; return their members, oldest first."""
        aggregator = self._aggregator
        if aggregator is None or not aggregator.members:
            return []
        groups = aggregator.take_due(everything=True)
        return [unpack(member) for members in groups for member in members]

    def _queue_sealed(self, members: Sequence[Member], sealed: Item) -> None:
        """(Lock held.) Queue the item standing for ``members``: they now count as one."""
        state = self._state
        state.queue.append(sealed)
        if len(members) > 1:
            state.pending -= len(members) - 1
            state.cond.notify_all()

    def _seal_quota_key(self, customer_id: str, feature: str) -> None:
        """(Lock held.) Seal and queue the held adds of one key now, ahead of what follows."""
        aggregator = self._aggregator
        if aggregator is None or not aggregator.members:
            return
        for members in aggregator.take_group(quota_group_key(customer_id, feature)):
            items = cast("list[Item]", members)  # quota adds wait as items
            self._queue_sealed(items, self._seal_quota(items))

    @staticmethod
    def _seal_quota(members: list[Item]) -> Item:
        """Return the item standing for the quota adds ``members`` (no spool: in memory only)."""
        if len(members) == 1:
            return members[0]
        item = Item(aggregate_quota_adds([cast("QuotaChange", m.operation) for m in members]))
        item.members = len(members)
        item.parts = members
        return item

    def _seal_one(self, members: list[Packed]) -> Item | None:
        """Return the item standing for ``members``; None: send them one by one instead."""
        if len(members) == 1:
            return unpack(members[0])
        try:
            customer_id, feature, _, _, timestamp, properties, _, _ = members[0]
            aggregate = build_aggregate(
                customer_id, feature, properties, timestamp, ((m[3], m[2]) for m in members)
            )
            item = Item(aggregate)
            item.members = len(members)
            spool = self._spool
            row_ids = [member[6] for member in members if member[6] is not None]
            if spool is not None and row_ids:
                item.body = self._encoder(aggregate, self._dialect)
                item.row_id = spool.seal_aggregate(row_ids, aggregate, self._dialect, item.body)
        except SpoolSealError as exc:
            # A lease ran out and another process may hold a member: each goes out with its own
            # key, so Commet deduplicates whatever both send.
            logger.warning("commet: not aggregating %d events: %s", len(members), exc)
            return None
        except Exception:
            logger.exception(
                "commet: could not seal %d events; sending them one by one", len(members)
            )
            return None
        return item
