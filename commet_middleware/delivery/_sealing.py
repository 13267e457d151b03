"""Window aggregation in a queue: holds members in their groups and queues the sealed aggregates.

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
        """(Lock held.) Hold ``operation`` in its aggregation group or queue it; True: wake the
        worker. ``item`` is its spooled item, if it has one (else made here when needed).

        An aggregated member wakes the worker only when the earliest deadline moved.
        """
        state = self._state
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
