"""Aggregation of usage events: sums the events of one group and window into one UsageEvent.

Opt-in (``CommetSettings(aggregate_window=0.5)``), for apps whose request rate a request per event
cannot keep up with (see ``bench/RESULTS.md``). Usage events with the same customer, feature and
properties that are enqueued within one window are held, then *sealed* into one aggregate event
and sent as one request. Quota changes are never aggregated: their order and each one's answer
matter.

What an aggregate is, fixed at seal and never recomputed:

- ``value``: the exact sum of the members' values (an ``int`` when every member is an int, else
  ``math.fsum`` of them as floats);
- ``idempotency_key``: ``cm_agg_`` + sha256 over the members' keys, sorted (deterministic: the same
  members always make the same key);
- ``timestamp``: the timestamp of the group's first member (the window's start);
- ``properties``: the members' (shared) properties.

A group is sealed when its window has run out (``aggregate_window`` after its first member), when
it reaches ``MAX_AGGREGATE_MEMBERS``, or at once by a flush or ``seal_now``. Sealing happens on the
sender's side (or in a flush); ``enqueue`` only appends to a list (O(1)).

With a spool, every member is still written before ``enqueue`` returns; sealing replaces the
member rows by one aggregate row (its key and encoded body) in one transaction, so a crash leaves
either the members (never sent: replayed singly, each with its own key) or the aggregate (replayed
byte for byte, same key), never both. Only members this process wrote and holds are aggregated;
rows replayed from the spool (spilled, or left by another process) are sent as they are, so an
aggregate is never folded into another one.

The trade-off: fewer events and requests for the same totals, but coarser timestamps (every member
is billed at the window's first timestamp, so a window can straddle a billing period boundary by at
most the window length), and per-request idempotency is replaced by per-aggregate keys (a member
re-enqueued with the same key in another window is counted again; Commet deduplicates aggregates,
not members; within one window a repeated key counts once). A dead-letter hook receives the
aggregate, not its members. Processes sharing one spool file may differ in ``aggregate_window``:
a row is aggregated only by the process that wrote it and still holds its lease.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from ._models import UsageEvent

__all__ = [
    "AGGREGATE_KEY_PREFIX",
    "MAX_AGGREGATE_MEMBERS",
    "AggregateGroup",
    "Aggregator",
    "GroupKey",
    "aggregate_events",
    "aggregate_key",
    "sum_values",
]

AGGREGATE_KEY_PREFIX = "cm_agg_"
# A group this large is sealed at once: bounds the aggregate key's hashing and a seal transaction.
MAX_AGGREGATE_MEMBERS = 10_000

GroupKey = tuple[str, str, tuple[tuple[str, str], ...]]
_M = TypeVar("_M")


def aggregate_key(member_keys: Sequence[str]) -> str:
    """Return the aggregate's idempotency key: a digest of the sorted member keys."""
    digest = hashlib.sha256()
    for key in sorted(member_keys):
        digest.update(key.encode())
        digest.update(b"\n")  # keys cannot hold a newline (validated), so no two lists collide
    return AGGREGATE_KEY_PREFIX + digest.hexdigest()


def sum_values(values: Sequence[int | float]) -> int | float:
    """Return the exact sum: an int if every value is an int, else ``math.fsum`` of them."""
    if all(isinstance(value, int) for value in values):
        return sum(int(value) for value in values)
    return math.fsum(values)


def aggregate_events(members: Sequence[UsageEvent]) -> UsageEvent:
    """Return the one event that stands for ``members`` (same customer, feature, properties).

    A key enqueued twice in one window (an app's own retry) counts once, as Commet would count it.
    """
    unique = list({member.idempotency_key: member for member in reversed(members)}.values())
    unique.reverse()
    first = members[0]
    return UsageEvent(
        customer_id=first.customer_id,
        feature=first.feature,
        value=sum_values([member.value for member in unique]),
        idempotency_key=aggregate_key([member.idempotency_key for member in unique]),
        timestamp=first.timestamp,
        properties=first.properties,
    )


class AggregateGroup(Generic[_M]):
    """The members of one group in one window, oldest first, and when the window ends."""

    __slots__ = ("deadline", "members")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.members: list[_M] = []


class Aggregator(Generic[_M]):
    """Open groups by key; not thread-safe (the delivery queue's lock guards it).

    ``_M`` is whatever the queue keeps per member (its item); ``event_of`` reads its event.
    """

    def __init__(
        self,
        window: float,
        clock: Callable[[], float],
        *,
        max_members: int = MAX_AGGREGATE_MEMBERS,
    ) -> None:
        self.window = window
        self.clock = clock
        self.max_members = max_members
        self._open: dict[GroupKey, AggregateGroup[_M]] = {}
        # Groups that reached max_members: sealed at the sender's next look.
        self._full: list[AggregateGroup[_M]] = []
        self.members = 0

    def __len__(self) -> int:
        return self.members

    def add(self, event: UsageEvent, member: _M) -> bool:
        """Add ``member`` to its group; True if the sender must wake (an earlier deadline)."""
        key: GroupKey = (event.customer_id, event.feature, event.properties)
        group = self._open.get(key)
        wake = False
        if group is None:
            wake = not self._open and not self._full  # the first deadline there is
            group = self._open[key] = AggregateGroup(self.clock() + self.window)
        group.members.append(member)
        self.members += 1
        if len(group.members) >= self.max_members:
            del self._open[key]
            self._full.append(group)
            wake = True
        return wake

    def next_deadline(self) -> float | None:
        """Return when the next group is due (now if one is full), None if none is open."""
        if self._full:
            return self.clock()
        if not self._open:
            return None
        # Insertion order is opening order, and every window has the same length.
        return next(iter(self._open.values())).deadline

    def take_due(self, *, everything: bool = False) -> list[list[_M]]:
        """Remove and return the members of every due group (every group if ``everything``)."""
        due = [group.members for group in self._full]
        self._full.clear()
        now = self.clock()
        for key, group in list(self._open.items()):
            if not everything and group.deadline > now:
                break  # opened later than this one: not due either
            due.append(group.members)
            del self._open[key]
        self.members -= sum(len(members) for members in due)
        return due
