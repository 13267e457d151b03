"""Per-key turns: the quota changes of one (customer, feature) go out one at a time, in order.

A release that overtook its add, or an add that overtook the release before it, would meet a hard
ceiling (``included_limit_reached``, final) or an empty balance (``insufficient_balance``). So the
first change of a key taken holds the key's turn until it is finished (delivered or given up),
retries included; a later one taken meanwhile is parked behind it and put at the head of the queue
when the turn passes to it. Usage events have no turns: their totals add up in any order.
"""

from __future__ import annotations

from collections import deque
from typing import cast

from commet_middleware._models import QuotaChange

from ._items import Item

__all__ = ["QuotaKey", "QuotaTurns"]

QuotaKey = tuple[str, str]


class QuotaTurns:
    """The change holding each busy key's turn, and the later ones parked behind it.

    Not thread-safe: the caller holds the queue's lock for every call.
    """

    __slots__ = ("_parked", "_turns")

    def __init__(self) -> None:
        self._turns: dict[QuotaKey, Item] = {}
        self._parked: dict[QuotaKey, deque[Item]] = {}

    def take(self, item: Item) -> bool:
        """True if ``item`` may be sent now, else park it behind its key's turn."""
        operation = item.operation
        if not isinstance(operation, QuotaChange):
            return True
        key = (operation.customer_id, operation.feature)
        holder = self._turns.get(key)
        if holder is None:
            self._turns[key] = item
            return True
        if holder is item:  # back from a retry or a sender restart, or just given the turn
            return True
        parked = self._parked.get(key)
        if parked is None:
            parked = self._parked[key] = deque()
        parked.append(item)
        return False

    def pass_on(self, item: Item) -> Item | None:
        """``item`` is finished: return the next change of its key, now holding the turn.

        The caller queues it at the head: it was taken before anything now queued.
        """
        operation = item.operation
        if not isinstance(operation, QuotaChange):
            return None
        key = (operation.customer_id, operation.feature)
        if self._turns.get(key) is not item:
            return None
        parked = self._parked.get(key)
        if not parked:
            del self._turns[key]
            return None
        successor = parked.popleft()
        if not parked:
            del self._parked[key]
        self._turns[key] = successor
        return successor

    def split(self, aggregate: Item, parts: list[Item]) -> bool:
        """Give ``aggregate``'s turn to its first part and park the rest right behind it.

        False if ``aggregate`` held no turn. Either way the caller queues what goes first.
        """
        operation = cast("QuotaChange", aggregate.operation)  # only quota adds are split
        key = (operation.customer_id, operation.feature)
        if self._turns.get(key) is not aggregate:
            return False
        self._turns[key] = parts[0]
        if len(parts) > 1:
            parked = self._parked.setdefault(key, deque())
            parked.extendleft(reversed(parts[1:]))
        return True

    def unpark_all(self) -> list[Item]:
        """Forget every turn; return the parked changes, oldest first per key."""
        parked = [item for items in self._parked.values() for item in items]
        self._parked.clear()
        self._turns.clear()
        return parked
