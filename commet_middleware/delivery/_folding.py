"""Folding: operations that wait while the sender is behind become one exact operation per group.

This is what keeps default settings from refusing a usage event for want of room. A usage event
enqueued while an earlier event of the same (customer, feature, properties) still waits in the
queue (not yet taken by the sender) joins that earlier one's *fold* instead of taking a place of
its own. When the sender takes a fold, the fold is sealed: a fold of one member is sent as that
very event (its own key, timestamp and bytes: at low load nothing changes), a fold of several as
one aggregate event. The queue therefore holds at most one waiting fold per group, whatever the
request rate: memory is bounded by the number of distinct groups waiting, not by the requests.

A sealed usage fold follows the rules of a window aggregate (see ``_aggregation``): ``value`` is
the exact sum (an ``int`` when every member is one, else the correctly rounded sum of the floats,
kept as exact partial sums while members arrive, so no member list is kept); ``idempotency_key``
is ``cm_agg_`` + sha256 over the members' keys, sorted; ``timestamp`` is the first member's; a
key enqueued twice into one fold counts once, as Commet would count it. A fold closes to new
members at ``MAX_FOLD_MEMBERS`` or after ``MAX_FOLD_AGE`` seconds open (a long outage): the next
event of its group opens a new fold, so one aggregate never spans more than that, and the keys
one fold keeps stay bounded.

Quota adds of one (customer, feature) fold the same way, only without a spool (as for window
aggregation), into one add keyed ``cm_qagg_`` + the digest of the members' keys. A remove or set
of the key closes the key's open fold before it is queued, so it can never be overtaken. The
members are kept (``parts``, at most ``MAX_QUOTA_FOLD_MEMBERS``): if Commet refuses the folded
add for good, it applied nothing, and the pump sends them one by one (``Pump._split``).

With a spool every member is still committed before its response completes; sealing a fold of
several replaces their rows by the aggregate's row in one transaction (``Spool.seal_aggregate``),
run by the sender off any event loop and outside the queue lock. If that swap is refused (a lease
ran out), the member rows are given back to the spool and replayed one by one, with their keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import cast

from commet_middleware._models import QuotaChange, UsageEvent

from ._aggregation import aggregate_key, aggregate_quota_adds
from ._items import Item

__all__ = [
    "MAX_FOLD_AGE",
    "MAX_FOLD_MEMBERS",
    "MAX_QUOTA_FOLD_MEMBERS",
    "Folds",
    "QuotaFold",
    "UsageFold",
]

# A fold this large, or this old, takes no more members: it bounds the keys one fold keeps, the
# hashing at its seal, and how far an aggregate's one timestamp can be from its members'.
MAX_FOLD_MEMBERS = 10_000
MAX_FOLD_AGE = 60.0
# Quota folds keep their members (to split a refused add), so they close sooner.
MAX_QUOTA_FOLD_MEMBERS = 1_000

UsageGroup = tuple[str, str, tuple[tuple[str, str], ...]]


def _add_exact(partials: list[float], value: float) -> None:
    """Add ``value`` to ``partials``: non-overlapping floats whose sum is exactly the total.

    Shewchuk's algorithm, which ``math.fsum`` runs over a whole list: the partials stay few, and
    ``math.fsum(partials)`` is the correctly rounded sum of every value ever added.
    """
    i = 0
    for partial in partials:
        if abs(value) < abs(partial):
            value, partial = partial, value
        high = value + partial
        low = partial - (high - value)
        if low:
            partials[i] = low
            i += 1
        value = high
    partials[i:] = [value]


class UsageFold(Item):
    """Usage events of one group that wait in the queue together, summed as they arrive.

    Until sealed it is queued as its first member (``operation``, ``body``, ``row_id``); the
    pump seals it (``aggregate``) when more joined, once it is taken and takes no more.
    """

    __slots__ = ("floats", "group", "int_total", "keys", "opened", "row_ids", "sealed")

    def __init__(
        self, event: UsageEvent, row_id: int | None, body: bytes | None, opened: float
    ) -> None:
        super().__init__(event)
        self.group: UsageGroup = (event.customer_id, event.feature, event.properties)
        self.body = body
        self.row_id = row_id
        self.opened = opened
        # Every member counts in ``pending`` until the fold is finished, a repeated key too.
        self.members = 1
        self.keys: dict[str, None] = {event.idempotency_key: None}
        value = event.value
        self.int_total = value if isinstance(value, int) else 0
        self.floats: list[float] | None = None if isinstance(value, int) else [float(value)]
        self.row_ids: list[int] = [] if row_id is None else [row_id]
        self.sealed = False

    def join(self, event: UsageEvent, row_id: int | None) -> None:
        """Count ``event`` in; a key already in the fold adds no value (Commet would ignore it)."""
        self.members += 1
        if row_id is not None:
            self.row_ids.append(row_id)
        key = event.idempotency_key
        if key in self.keys:
            return
        self.keys[key] = None
        value = event.value
        if isinstance(value, int):
            self.int_total += value
            return
        if self.floats is None:
            self.floats = []
        _add_exact(self.floats, float(value))

    def total(self) -> int | float:
        """The exact sum of the distinct members' values (an int if every one was an int)."""
        if self.floats is None:
            return self.int_total
        return math.fsum([*self.floats, self.int_total])

    def spool_rows(self) -> list[int]:
        """Every member's row until sealed, then the aggregate's own."""
        if self.sealed or self.members == 1:
            return super().spool_rows()
        return list(self.row_ids)

    def weight(self) -> int:
        """Every member counts until sealed."""
        return 1 if self.sealed else self.members

    @property
    def needs_seal(self) -> bool:
        """True if it stands for several events and still carries its first one."""
        return self.members > 1 and not self.sealed

    def aggregate(self) -> UsageEvent:
        """Return the one event that stands for every member (fixed once sealed)."""
        customer_id, feature, properties = self.group
        return UsageEvent(
            customer_id=customer_id,
            feature=feature,
            value=self.total(),
            idempotency_key=aggregate_key(list(self.keys)),
            timestamp=self.operation.timestamp,  # type: ignore[union-attr]
            properties=properties,
        )


class QuotaFold(Item):
    """Quota adds of one (customer, feature) that wait in the queue together (no spool)."""

    __slots__ = ("key", "opened", "sealed")

    def __init__(self, first: Item, key: tuple[str, str], opened: float) -> None:
        super().__init__(first.operation)
        self.key = key
        self.parts = [first]
        self.opened = opened
        self.sealed = False

    def weight(self) -> int:
        """Every member counts until sealed."""
        return 1 if self.sealed else len(self.parts or ())

    def join(self, item: Item) -> None:
        """Add the add ``item``: sent within the fold, or alone if the fold is refused."""
        assert self.parts is not None
        self.parts.append(item)

    def seal(self) -> tuple[Item, int]:
        """Return what to send (the only member itself, or this fold as one summed add) and how
        many members stop counting on their own (0 if sealed before: a retry, a turn passed)."""
        parts = self.parts
        assert parts
        if len(parts) == 1:
            return parts[0], 0
        if self.sealed:
            return self, 0
        self.sealed = True
        changes = [cast("QuotaChange", part.operation) for part in parts]
        self.operation = aggregate_quota_adds(changes)
        self.members = len(parts)
        return self, len(parts) - 1


class Folds:
    """The folds still open to new members, one per group at most; not thread-safe.

    The delivery queue calls every method with its lock held; the folds themselves sit in the
    queue's deque like any item, in the order their first member arrived.
    """

    def __init__(
        self,
        *,
        quota: bool,
        max_members: int = MAX_FOLD_MEMBERS,
        max_age: float = MAX_FOLD_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quota = quota
        self.max_members = max_members
        self.max_age = max_age
        self.clock = clock
        self._usage: dict[UsageGroup, UsageFold] = {}
        self._quota: dict[tuple[str, str], QuotaFold] = {}

    def add_usage(self, event: UsageEvent, row_id: int | None, body: bytes | None) -> Item | None:
        """Fold ``event`` into its group's waiting fold: None; or return a new fold to queue."""
        group = (event.customer_id, event.feature, event.properties)
        fold = self._usage.get(group)
        if fold is not None:
            if fold.members < self.max_members and self.clock() - fold.opened < self.max_age:
                fold.join(event, row_id)
                return None
            del self._usage[group]  # full or old: it waits as it is, a new fold follows it
        fold = self._usage[group] = UsageFold(event, row_id, body, self.clock())
        return fold

    def add_quota(self, item: Item) -> Item | None:
        """Fold the quota add ``item`` into its key's waiting fold: None; or return what to queue.

        A remove or set closes the key's fold and is returned as it is, to queue behind it.
        """
        change = item.operation
        assert isinstance(change, QuotaChange)
        key = (change.customer_id, change.feature)
        if not self.quota:
            return item
        fold = self._quota.get(key)
        if change.action != "add":
            if fold is not None:
                del self._quota[key]  # nothing may join it past a remove or set
            return item
        if fold is not None:
            parts = fold.parts
            assert parts is not None
            if len(parts) < MAX_QUOTA_FOLD_MEMBERS and self.clock() - fold.opened < self.max_age:
                fold.join(item)
                return None
            del self._quota[key]
        fold = self._quota[key] = QuotaFold(item, key, self.clock())
        return fold

    def take(self, item: Item) -> None:
        """The sender took ``item``: if it is an open fold, it takes no more members."""
        if isinstance(item, UsageFold):
            if self._usage.get(item.group) is item:
                del self._usage[item.group]
        elif isinstance(item, QuotaFold) and self._quota.get(item.key) is item:
            del self._quota[item.key]

    def clear(self) -> None:
        """Close every open fold (they stay queued as they are)."""
        self._usage.clear()
        self._quota.clear()
