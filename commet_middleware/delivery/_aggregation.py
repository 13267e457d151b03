"""Aggregation: sums the usage events, or the quota adds, of one group and window into one.

Opt-in (``CommetSettings(aggregate_window=0.5)``), for apps whose request rate a request per event
cannot keep up with (see ``bench/RESULTS.md``). Usage events with the same customer, feature and
properties that are enqueued within one window are held, then *sealed* into one aggregate event
and sent as one request. Quota adds of one (customer, feature) are held and sealed the same way,
in groups of their own, into one add (see "Quota adds" below); removes and sets never are.

What an aggregate is, fixed at seal and never recomputed:

- ``value``: the exact sum of the members' values (an ``int`` when every member is an int, else
  ``math.fsum`` of them as floats);
- ``idempotency_key``: ``cm_agg_`` + sha256 over the members' keys, sorted (deterministic: the same
  members always make the same key);
- ``timestamp``: the timestamp of the group's first member (the window's start);
- ``properties``: the members' (shared) properties.

A group is sealed when its window has run out (``aggregate_window`` after its first member), when
it reaches ``MAX_AGGREGATE_MEMBERS``, or at once by a flush or ``seal_now``. Sealing happens on the
sender's side (or in a flush); ``enqueue`` only appends to a list (O(1)), except that a quota
remove or set seals its key's open add group (in memory) before it is queued.

With a spool, every member is still committed before its response completes; sealing replaces the
member rows by one aggregate row (its key and encoded body) in one transaction, so a crash leaves
either the members (never sent: replayed singly, each with its own key) or the aggregate (replayed
byte for byte, same key), never both. Only members this process wrote and holds are aggregated;
rows replayed from the spool (spilled, or left by another process) are sent as they are, so an
aggregate is never folded into another one.

The trade-off: fewer events and requests for the same totals, but coarser timestamps (every member
is billed at the window's first timestamp, so a window can straddle a billing period boundary by at
most the window length), and per-request idempotency is replaced by per-aggregate keys (a member
re-enqueued with the same key in another window is counted again; Commet deduplicates aggregates,
not members; within one window a repeated key counts once). A dead-letter hook receives a usage
aggregate, not its members. Processes sharing one spool file may differ in ``aggregate_window``:
a row is aggregated only by the process that wrote it and still holds its lease.

Quota adds (only without a spool: see below) are grouped per (customer, feature) and sealed by
the same rules into one ``QuotaChange(action="add", count=<sum>)`` keyed ``cm_qagg_`` + the same
digest, so it never shares a key with a usage aggregate. Their order is sacred: a remove or set
of the key seals the key's open group inside ``enqueue``, so the aggregate is queued ahead of it.
If Commet refuses the aggregate for good (a hard ceiling: ``included_limit_reached``), it applied
nothing: its members are sent again one by one, each with its own key, at the head of the key's
turn, so exactly the members Commet accepts alone count and each refused one reaches the
dead-letter hook on its own (a failure that may have applied it, such as an unexpected exception,
dead-letters each member instead, without a resend). A delivered aggregate is reported to the
delivery listeners once per member, with the aggregate's answer. With a spool, quota adds are not
aggregated, each is sent alone: splitting a sealed row back into member rows would need a second
atomic seal, more machinery than the saving is worth.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, TypeVar

from commet_middleware._models import Operation, QuotaChange, UsageEvent

__all__ = [
    "AGGREGATE_KEY_PREFIX",
    "MAX_AGGREGATE_MEMBERS",
    "QUOTA_AGGREGATE_KEY_PREFIX",
    "AggregateGroup",
    "Aggregator",
    "GroupKey",
    "aggregate_events",
    "aggregate_key",
    "aggregate_quota_adds",
    "build_aggregate",
    "group_key",
    "quota_group_key",
    "sum_values",
]

AGGREGATE_KEY_PREFIX = "cm_agg_"
QUOTA_AGGREGATE_KEY_PREFIX = "cm_qagg_"
# A group this large is sealed at once: bounds the aggregate key's hashing and a seal transaction.
MAX_AGGREGATE_MEMBERS = 10_000

# Usage groups are (customer, feature, properties), quota-add groups (customer, feature): the two
# shapes never compare equal, so the kinds never share a group.
GroupKey = tuple[str, str, tuple[tuple[str, str], ...]] | tuple[str, str]
_M = TypeVar("_M")
_Op = TypeVar("_Op", UsageEvent, QuotaChange)


def aggregate_key(member_keys: Sequence[str], *, prefix: str = AGGREGATE_KEY_PREFIX) -> str:
    """Return the aggregate's idempotency key: ``prefix`` + a digest of the sorted member keys.

    ``QUOTA_AGGREGATE_KEY_PREFIX`` keys quota aggregates, so no quota aggregate can carry the key
    of a usage aggregate of the same members.
    """
    digest = hashlib.sha256()
    for key in sorted(member_keys):
        digest.update(key.encode())
        digest.update(b"\n")  # keys cannot hold a newline (validated), so no two lists collide
    return prefix + digest.hexdigest()


def quota_group_key(customer_id: str, feature: str) -> GroupKey:
    """Return the group of the quota adds of one customer and feature."""
    return (customer_id, feature)


def group_key(operation: Operation) -> GroupKey:
    """Return the group ``operation`` is aggregated in (its kind's own shape of key)."""
    if isinstance(operation, UsageEvent):
        return (operation.customer_id, operation.feature, operation.properties)
    return quota_group_key(operation.customer_id, operation.feature)


def sum_values(values: Sequence[int | float]) -> int | float:
    """Return the exact sum: an int if every value is an int, else ``math.fsum`` of them."""
    if all(isinstance(value, int) for value in values):
        return sum(int(value) for value in values)
    return math.fsum(values)


def _first_of_each_key(members: Sequence[_Op]) -> list[_Op]:
    # A key enqueued twice in one window (an app's own retry) counts once, as Commet would.
    unique: dict[str, _Op] = {}
    for member in members:
        unique.setdefault(member.idempotency_key, member)
    return list(unique.values())


def build_aggregate(
    customer_id: str,
    feature: str,
    properties: tuple[tuple[str, str], ...],
    timestamp: str,
    keyed_values: Iterable[tuple[str, int | float]],
) -> UsageEvent:
    """Return the one event of a group from its members' (key, value) pairs, oldest first.

    A key enqueued twice in one window (an app's own retry) counts once, as Commet would count it.
    """
    unique: dict[str, int | float] = {}
    for key, value in keyed_values:
        unique.setdefault(key, value)
    return UsageEvent(
        customer_id=customer_id,
        feature=feature,
        value=sum_values(list(unique.values())),
        idempotency_key=aggregate_key(list(unique)),
        timestamp=timestamp,
        properties=properties,
    )


def aggregate_events(members: Sequence[UsageEvent]) -> UsageEvent:
    """Return the one event that stands for ``members`` (same customer, feature, properties).

    It carries the first member's timestamp; a key enqueued twice in one window counts once.
    """
    first = members[0]
    return build_aggregate(
        first.customer_id,
        first.feature,
        first.properties,
        first.timestamp,
        ((member.idempotency_key, member.value) for member in members),
    )


def aggregate_quota_adds(members: Sequence[QuotaChange]) -> QuotaChange:
    """Return the one add that stands for ``members`` (adds of one customer and feature).

    A key enqueued twice in one window counts once, as for usage events.
    """
    unique = _first_of_each_key(members)
    first = members[0]
    return QuotaChange(
        customer_id=first.customer_id,
        feature=first.feature,
        action="add",
        count=sum(member.count for member in unique),
        idempotency_key=aggregate_key(
            [member.idempotency_key for member in unique], prefix=QUOTA_AGGREGATE_KEY_PREFIX
        ),
    )


class AggregateGroup(Generic[_M]):
    """The members of one group in one window, oldest first, and when the window ends."""

    __slots__ = ("deadline", "key", "members")

    def __init__(self, key: GroupKey, deadline: float) -> None:
        self.key = key
        self.deadline = deadline
        self.members: list[_M] = []


class Aggregator(Generic[_M]):
    """Open groups by key; not thread-safe (the delivery queue's lock guards it).

    ``_M`` is whatever the queue keeps per member (its item). Usage events and quota adds share
    it, each kind in groups of its own key shape (see ``group_key``).
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

    def add(self, operation: Operation, member: _M) -> bool:
        """Add ``member`` to its group; True if the sender must wake (an earlier deadline)."""
        return self.add_to(group_key(operation), member)

    def add_to(self, key: GroupKey, member: _M) -> bool:
        """Add ``member`` to the group ``key`` (see ``group_key``); True: the sender must wake."""
        group = self._open.get(key)
        wake = False
        if group is None:
            wake = not self._open and not self._full  # the first deadline there is
            group = self._open[key] = AggregateGroup(key, self.clock() + self.window)
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

    def take_group(self, key: GroupKey) -> list[list[_M]]:
        """Remove and return the members of ``key``'s groups, due or not, oldest group first."""
        taken = [group.members for group in self._full if group.key == key]
        if taken:
            self._full = [group for group in self._full if group.key != key]
        group = self._open.pop(key, None)
        if group is not None:
            taken.append(group.members)
        self.members -= sum(len(members) for members in taken)
        return taken
