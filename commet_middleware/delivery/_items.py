"""The item on its way to Commet, what a queue reports, and the seams a queue is built with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from commet_middleware._errors import CommetError
from commet_middleware._models import Operation, UsageEvent
from commet_middleware._settings import CommetSettings, Dialect
from commet_middleware._spool import SpoolRow

__all__ = [
    "AggregationStats",
    "DeliveryListener",
    "DeliveryStats",
    "Encoder",
    "Item",
    "Member",
    "OperationSender",
    "Packed",
    "SenderFactory",
    "Sleep",
    "UndeliveredError",
    "describe",
    "redact",
    "unpack",
]


class OperationSender(Protocol):
    """What the pipeline needs from a client: one HTTP attempt per call."""

    async def send_once(self, operation: Operation, *, request_body: bytes | None = None) -> object:
        """Send ``operation`` once; return on success, raise ``CommetError`` on failure."""
        ...


SenderFactory = Callable[[CommetSettings], OperationSender]
Encoder = Callable[[Operation, Dialect], "bytes | None"]
Sleep = Callable[[float], Awaitable[None]]
# Told of each operation Commet accepted, with what Commet answered.
DeliveryListener = Callable[[Operation, object], None]


class UndeliveredError(CommetError):
    """Given to the dead-letter hook for an event the pipeline did not deliver.

    ``maybe_delivered``: it was sent and no answer came before the close (a shutdown timeout):
    Commet may have recorded it, and a resend under its key would be deduplicated.
    """

    def __init__(
        self,
        reason: Literal["queue_full", "shutdown"],
        message: str,
        *,
        maybe_delivered: bool = False,
    ) -> None:
        self.reason = reason
        self.maybe_delivered = maybe_delivered
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class DeliveryStats:
    """A snapshot of a queue's counters. Totals since creation (or since a fork), then gauges.

    ``sent`` counts every operation Commet accepted, duplicates included; ``duplicates`` is the
    part of it Commet had already recorded. ``pending`` is everything accepted and not yet
    finished: waiting (members of an unsealed aggregate or fold each count), in flight, or
    waiting to retry. ``queue_depth`` is the places those take: a fold of many events is one
    (what ``queue_limit`` bounds).
    """

    queued: int
    sent: int
    retried: int
    duplicates: int
    dead_lettered: int
    dropped: int
    in_flight: int
    pending: int
    queue_depth: int = 0


@dataclass(frozen=True, slots=True)
class AggregationStats:
    """Aggregation counters since creation (or a fork); zeros when aggregation is off.

    ``aggregated_members``: usage events and quota adds taken into a group; ``aggregates_sent``:
    aggregates of two or more members Commet accepted; ``open_members``: members whose group is
    not sealed yet; ``aggregates_split``: quota aggregates Commet refused for good, whose members
    were then sent one by one.
    """

    aggregated_members: int
    aggregates_sent: int
    open_members: int
    aggregates_split: int = 0


def describe(operation: Operation) -> str:
    """Return how log lines name ``operation``: its kind, customer, feature, amount and key."""
    if isinstance(operation, UsageEvent):
        return (
            f"usage event customer={operation.customer_id!r} feature={operation.feature!r} "
            f"value={operation.value!r} key={operation.idempotency_key!r}"
        )
    return (
        f"quota {operation.action} customer={operation.customer_id!r} "
        f"feature={operation.feature!r} count={operation.count!r} key={operation.idempotency_key!r}"
    )


def redact(text: str, api_key: str | None) -> str:
    """Return ``text`` with the API key masked, for a log line or a spool column."""
    return text.replace(api_key, "***") if api_key else text


class Item:
    """One operation on its way, with the bytes every attempt re-sends."""

    __slots__ = ("attempts", "body", "members", "operation", "parts", "row_id", "unexpected")

    def __init__(self, operation: Operation) -> None:
        self.operation = operation
        self.body: bytes | None = None
        self.attempts = 0
        self.unexpected = 0
        # The spool row this process holds for it (None: in memory only).
        self.row_id: int | None = None
        # How many operations this aggregate stands for (0: not an aggregate).
        self.members = 0
        # A quota aggregate's member items, oldest first: reported one by one to the listeners,
        # sent one by one if Commet refuses the aggregate (None: not a quota aggregate).
        self.parts: list[Item] | None = None

    def spool_rows(self) -> list[int]:
        """The spool rows this process holds for it (none: in memory only)."""
        return [] if self.row_id is None else [self.row_id]

    def weight(self) -> int:
        """How many accepted operations it stands for in ``pending`` (more: an unsealed fold)."""
        return 1

    @classmethod
    def from_row(cls, row: SpoolRow) -> Item:
        """Return the item for a spool row this process has claimed."""
        item = cls(row.operation)
        item.body = row.body
        item.attempts = row.attempts
        item.row_id = row.row_id
        return item


# A usage event waiting in an aggregation group: customer, feature, value, key, timestamp,
# properties, spool row, encoded body. A plain tuple of strings and numbers, not an Item:
# thousands wait per window, and such tuples drop out of the garbage collector's lists at its
# first pass, where items would be traversed (and promoted, and traversed again) by every
# collection while they wait. The p99 latency of a busy ASGI app showed it (bench/RESULTS.md).
Packed = tuple[
    str, str, "int | float", str, str, "tuple[tuple[str, str], ...]", "int | None", "bytes | None"
]
Member = Item | Packed


def unpack(member: Member) -> Item:
    """Return the item for an aggregation member (a packed usage event becomes one)."""
    if isinstance(member, Item):
        return member
    customer_id, feature, value, key, timestamp, properties, row_id, body = member
    item = Item(UsageEvent(customer_id, feature, value, key, timestamp, properties))
    item.row_id = row_id
    item.body = body
    return item
