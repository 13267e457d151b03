"""Background delivery: takes billable operations off the request path and gets them to Commet.

``DeliveryQueue.enqueue`` is a deque append under a lock plus, only when the sender is idle, a
wake-up; it never raises and never waits on the network. One sender per queue drains it with at
most ``settings.max_concurrency`` sends in flight over one pooled client: an asyncio task when
started inside a running event loop, else a daemon thread running its own loop. A sender whose
loop or thread has gone away (a test client's loop closed, a fork) is replaced on the next
enqueue or flush, and what it had taken is queued again, never lost.

Durable spool (``settings.spool_path``): every operation is written to a SQLite file (see
``_spool``) before ``enqueue`` returns, and removed only once Commet accepted it (or answered
``duplicate``); a non-retryable refusal moves it to the spool's ``dead_letter`` table. The
in-memory queue is then only a window of at most ``queue_limit`` operations this process has
claimed: past it an operation is spooled unclaimed (whatever the overflow policy: it is already
durable), and the sender claims spooled rows as room frees, including rows an earlier or crashed
process left (replay). Rows this process holds carry a lease it renews; ``close`` gives back what
it could not deliver, which stays in the spool for the next process. If the spool cannot be
written, enqueue logs an ERROR and keeps the operation in memory as without a spool.

Delivery is at least once on the wire and exactly once in effect: each operation's body is encoded
once and the same bytes, carrying the same idempotency key, are re-sent on every retry, so Commet
deduplicates. A 409 ``duplicate`` counts as delivered.

Order: usage events go out concurrently (their totals add up in any order), but the quota
changes of one (customer, feature) go out one at a time, in enqueue order: a release that
overtook its add, or an add that overtook the release before it, would meet a hard ceiling
(``included_limit_reached``, final) or an empty balance (``insufficient_balance``). The first
change of a key taken holds the key's turn until it is finished (delivered or given up),
retries included; a later one taken meanwhile is parked in a per-key deque and put at the head
of the queue when the turn passes to it. Parked changes count as pending; ``close`` hands them
back like the rest. Spooled rows are claimed oldest first, and once a quota change has spilled
to the spool, later ones spill too until the sender has claimed the backlog, so none can pass
it in memory; claimed rows join the tail of the queue, so none passes a change that was placed
in memory before it spilled.

Retries: a retryable failure (transport errors, 408, 429, 5xx, ``idempotency_in_progress``) is
queued again after ``retry_delay``: ``settings.backoff_base`` doubling per attempt up to
``BACKOFF_CAP``, with equal jitter (a random point in the upper half of that step), and never
less than the server's ``Retry-After`` (capped at ``settings.retry_after_cap``). It is never given
up while retryable, except by ``close`` when its timeout runs out. A non-retryable answer goes to
``settings.dead_letter``, as does an operation the client refuses as invalid (``ValueError``,
``TypeError``). Any other unexpected exception from the sender is retried
``MAX_UNEXPECTED_ATTEMPTS`` times and then dead-lettered, so a bug cannot spin forever.

Overflow (``pending`` reached ``settings.queue_limit``): memory stays bounded and no event is lost
without a trace. ``"block"`` (the default) waits up to ``settings.overflow_block_timeout`` for
room, but only in a thread with no running event loop (a WSGI worker, a threadpool endpoint):
blocking an event loop would stall every request on it and, when the sender lives on that loop,
could never make room. If there is still no room the event is refused loudly: an ERROR log naming
customer, feature and idempotency key, the ``dropped`` counter, and ``settings.dead_letter``
called with an ``UndeliveredError`` (reason ``"queue_full"``) so the app can persist it. Growing
past the limit instead would trade a counted loss for an out-of-memory kill that loses every
queued event silently. With a spool, overflow spills to it (above). ``"spool"`` without
``spool_path`` behaves like ``"block"`` (a warning says so once). ``"drop"`` refuses at once,
just as loudly.

Events still undelivered when ``close`` times out are reported the same way (reason
``"shutdown"``, counted in ``dead_lettered``).

Aggregation (``settings.aggregate_window``, off by default): usage events of one (customer,
feature, properties) enqueued within a window are held (counted in ``pending``, spooled as usual)
and summed into one event when the window is sealed, by the sender (a timer in its loop) or at once
by ``flush``, ``close`` or ``seal_now``; see ``_aggregate`` for what an aggregate is and the
trade-off. Without a spool, quota adds of one (customer, feature) are held and summed the same
way; a remove or set of the key seals the key's group before it joins the queue, and a quota
aggregate takes the key's turn like any change. Refused for good, it is split: its members take
its place at the head of the turn, each sent alone. Listeners hear of each member of a delivered
quota aggregate. ``close`` hands back the members of groups it could not seal and send, one by
one, and those of a quota aggregate it could not deliver.

Fork: a thread that holds a lock when the process forks holds it forever in the child (an import
lock, OpenSSL's locks while it builds an SSL context). So the HTTP stack is imported up front by
the thread that creates the queue or starts its sender, never by a sender thread, and before any
fork (``os.register_at_fork``) every sender *thread* of this process is stopped at an await and
joined: what it had taken goes back to the queue (spool claims stay this process's), and it is
restarted after the fork if work is pending. A sender task on an app's event loop needs nothing:
no other thread runs it. The child starts afresh with an empty queue of its own.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, cast

from ._errors import CommetAPIError, CommetError
from ._models import Operation, QuotaChange, UsageEvent
from ._settings import CommetSettings, Dialect
from ._spool import Spool, SpoolRow, SpoolSealError
from .delivery._aggregation import (
    MAX_AGGREGATE_MEMBERS,
    Aggregator,
    aggregate_quota_adds,
    build_aggregate,
    quota_group_key,
)
from .delivery._items import (
    AggregationStats,
    DeliveryListener,
    DeliveryStats,
    Encoder,
    OperationSender,
    SenderFactory,
    Sleep,
    UndeliveredError,
)
from .delivery._items import Item as _Item
from .delivery._items import Member as _Member
from .delivery._items import Packed as _Packed
from .delivery._items import describe as _describe
from .delivery._items import unpack as _unpack

__all__ = [
    "BACKOFF_CAP",
    "MAX_CLIENT_ATTEMPTS",
    "MAX_UNEXPECTED_ATTEMPTS",
    "AggregationStats",
    "DeliveryListener",
    "DeliveryQueue",
    "DeliveryStats",
    "Encoder",
    "OperationSender",
    "SenderFactory",
    "UndeliveredError",
    "close_default_queues",
    "default_queue",
    "retry_delay",
]

logger = logging.getLogger("commet_middleware.delivery")
_T = TypeVar("_T")

BACKOFF_CAP = 30.0
MAX_UNEXPECTED_ATTEMPTS = 5
# Attempts to build the client before a sender gives up (loudly) and leaves its work queued for
# the next sender an enqueue or flush starts.
MAX_CLIENT_ATTEMPTS = 5
# Statuses worth retrying even if an error object forgot to say so: for a background pipeline
# a 429 is never final, Retry-After or not.
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_RETRYABLE_CODES = frozenset({"idempotency_in_progress", "rate_limited", "internal_error"})
# How often a waiting flush re-checks that a sender is still alive to make progress.
_FLUSH_RECHECK = 0.25
_AFLUSH_POLL = 0.005
_JOIN_TIMEOUT = 1.0
# How long a fork waits for a sender thread to stop; it forks anyway afterwards (and says so).
_FORK_JOIN_TIMEOUT = 5.0
# How often an idle sender looks for spooled rows it has not been told about (spilled by another
# thread, left by a crashed process), and how often a flush re-counts the spool.
_SPOOL_POLL = 0.5
_SPOOL_FLUSH_POLL = 0.05


def retry_delay(
    attempt: int,
    *,
    base: float,
    cap: float = BACKOFF_CAP,
    retry_after: float | None = None,
    retry_after_cap: float = 30.0,
    rng: random.Random | None = None,
) -> float:
    """Return the wait before retry ``attempt`` (1-based): jittered, capped, >= Retry-After."""
    step = min(cap, base * 2.0 ** min(attempt - 1, 32))
    jitter: float = (rng or random).random()
    delay = step / 2 + jitter * step / 2
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, retry_after_cap))
    return delay


def _is_retryable(error: CommetError) -> bool:
    if error.retryable:
        return True
    if isinstance(error, CommetAPIError):
        return error.status in _RETRYABLE_STATUSES or error.code in _RETRYABLE_CODES
    return False


def _refused_outright(error: Exception) -> bool:
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


def _default_sender_factory(settings: CommetSettings) -> OperationSender:
    # Imported here: the client pulls in httpx, and tests replace it with a fake anyway.
    module = importlib.import_module("commet_middleware._client")
    return cast("OperationSender", module.AsyncCommetClient(settings))


# What the default client imports on first use rather than at import time (httpx imports httpcore
# lazily; httpcore, anyio and the socket layer import their backends on the first request).
_HTTP_STACK_MODULES = (
    "commet_middleware._client",
    "commet_middleware._wire",
    "certifi",
    "encodings.idna",
    "sniffio",
    "httpcore",
    "httpcore._backends.anyio",
    "httpcore._backends.auto",
    "anyio._backends._asyncio",
    "anyio.abc",
    "anyio.lowlevel",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "anyio.streams.tls",
    "anyio.to_thread",
)
_http_stack_imported = False


def _import_http_stack() -> None:
    """Import what the default client needs, in the calling thread, once per process.

    A sender thread that imports holds the import lock of a half-built module; a fork then
    leaves the child that lock and the half-built module (``partially initialized module``).
    """
    global _http_stack_imported
    if _http_stack_imported:
        return
    for name in _HTTP_STACK_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # another version lays itself out differently: imported on use
            logger.debug("commet: could not import %s ahead of use", name)
    _http_stack_imported = True


def _default_encoder(operation: Operation, dialect: Dialect) -> bytes | None:
    try:
        module = importlib.import_module("commet_middleware._wire")
    except ImportError:  # pragma: no cover - only before the wire module exists
        return None  # the client encodes it itself
    return cast("bytes", module.encode_body(operation, dialect))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _spool_call(sender: _Sender, fn: Callable[..., _T], *args: Any) -> _T:
    """Run a (blocking, short) spool call for ``sender`` without stalling an app's event loop.

    A sender thread owns its loop, so it calls directly: that also works during interpreter
    shutdown (the atexit flush of a WSGI worker), when no executor takes new work.
    """
    if sender.mode == "thread":
        return fn(*args)
    try:
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    except RuntimeError:  # the interpreter is shutting down: no executor takes new work
        return fn(*args)
    return await future


class _Sender:
    """One generation of the background sender; replaced, never revived, when it dies."""

    def __init__(self, mode: Literal["asyncio", "thread"], max_concurrency: int) -> None:
        self.mode = mode
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread_id: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.thread: threading.Thread | None = None
        # asyncio.Event binds to a loop on first wait, so creating it here is fine.
        self.wakeup = asyncio.Event()
        self.slot_free = asyncio.Event()
        self.free_slots = max_concurrency
        # Items this generation took from the queue and has not finished: on its death they go
        # back to the queue.
        self.owned: set[_Item] = set()
        self.in_flight = 0
        self.retrying = 0
        self.retired = False
        # Set before a fork: stop at the next await and put back what it holds (see _run).
        self.stop_requested = False

    def alive(self) -> bool:
        if self.retired or self.stop_requested:
            return False
        if self.mode == "thread":
            return self.thread is not None and self.thread.is_alive()
        loop, task = self.loop, self.task
        return loop is not None and task is not None and loop.is_running() and not task.done()


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
        self._sender_factory = sender_factory or _default_sender_factory
        self._encoder = encoder or _default_encoder
        self._sleep: Sleep = sleep or asyncio.sleep
        self._backoff_cap = backoff_cap
        self._rng = rng or random.Random()
        self._limit = settings.queue_limit
        self._listeners: list[DeliveryListener] = []
        self._init_state()
        if sender_factory is None:
            _import_http_stack()
        _live_queues.add(self)

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

    def _init_state(self) -> None:
        self._pid = os.getpid()
        self._generation = _fork_generation
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._start_lock = threading.Lock()
        self._queue: deque[_Item] = deque()
        self._sender: _Sender | None = None
        self._idle = False
        self._spool_warned = False
        self._pending = 0
        self._queued = 0
        self._sent = 0
        self._retried = 0
        self._duplicates = 0
        self._dead_lettered = 0
        self._dropped = 0
        self._spilled = 0
        window = self.settings.aggregate_window
        # Held members count in ``pending`` until their group is sealed, so a group must seal
        # well before it alone fills the queue: at a quarter of ``queue_limit`` (else a burst
        # of one customer's requests within one window is refused for want of room).
        group_limit = max(1, min(MAX_AGGREGATE_MEMBERS, self._limit // 4))
        self._aggregator: Aggregator[_Member] | None = (
            Aggregator(window, self._clock, max_members=group_limit) if window else None
        )
        self._aggregated_members = 0
        self._aggregates_sent = 0
        self._aggregates_split = 0
        self._spill_warned = False
        # Per-key order of quota changes (see the module docstring): the change holding each
        # busy key's turn, and the later ones parked behind it.
        self._quota_turns: dict[tuple[str, str], _Item] = {}
        self._quota_parked: dict[tuple[str, str], deque[_Item]] = {}
        # While a quota change spilled to the spool is unclaimed, later ones spill too. A claim
        # that finds the spool drained clears it only if no spill began or was still being
        # written since just before it (``_spill_seq``, ``_spills_writing``).
        self._quota_spilling = False
        self._spill_seq = 0
        self._spills_writing = 0
        # Set from before a fork until after it, in the parent: _start_lock is held meanwhile.
        self._held_for_fork = False
        self._stopped_for_fork = False

    def __repr__(self) -> str:
        return f"<DeliveryQueue pending={self._pending} limit={self._limit}>"

    # -- the request path ------------------------------------------------------------------

    def enqueue(self, operation: Operation) -> None:
        """Accept ``operation`` for delivery; never raises, waits only as the overflow says."""
        try:
            if self._generation != _fork_generation:
                self._reset_after_fork()
            if self._spool is not None:
                self._enqueue_spooled(_Item(operation), self._spool)
                return
            with self._lock:
                if self._pending < self._limit:
                    self._pending += 1
                    self._queued += 1
                    # No item yet: an aggregated usage event waits as a tuple (see _Packed).
                    wake = self._place(operation, None)
                    if wake:
                        self._idle = False
                    sender = self._sender
                    full = False
                else:
                    full = True
            if full:
                self._overflow(_Item(operation))
            elif sender is None or not sender.alive():
                self._ensure_sender()
            elif wake:
                self._poke(sender)
        except Exception:
            logger.exception("commet: could not enqueue %s; the request is unaffected", operation)

    def _enqueue_spooled(self, item: _Item, spool: Spool) -> None:
        quota = isinstance(item.operation, QuotaChange)
        with self._lock:
            room = self._pending < self._limit and not (quota and self._quota_spilling)
            if room:  # reserve the place now; flush waits for it from here on
                self._pending += 1
                self._queued += 1
            elif quota:
                self._quota_spilling = True
                self._spill_seq += 1
                self._spills_writing += 1
        try:
            item.body = self._encoder(item.operation, self.settings.dialect)
        except Exception:
            # Stored without bytes: the sender encodes it again and dead-letters it if it fails.
            logger.exception("commet: could not encode %s", _describe(item.operation))
        try:
            item.row_id = spool.add(item.operation, self.settings.dialect, item.body, claim=room)
        except Exception:
            logger.exception(
                "commet: could not write to the spool %s; keeping %s in memory only",
                spool.path,
                _describe(item.operation),
            )
            if not room:
                if quota:
                    with self._lock:
                        self._spills_writing -= 1
                self._overflow(item)
                return
        if not room:
            with self._lock:
                if quota:
                    self._spills_writing -= 1
                self._queued += 1
                self._spilled += 1
                # Only a full queue warns; a quota change behind a spilled one is no news.
                warn = not self._spill_warned and self._pending >= self._limit
                self._spill_warned |= warn
                sender = self._sender
                wake = self._idle
                self._idle = False
            if warn:
                logger.warning(
                    "commet: delivery queue full (limit %d); spilling operations to the spool %s",
                    self._limit,
                    spool.path,
                )
            if sender is None or not sender.alive():
                self._ensure_sender()
            elif wake:
                self._poke(sender)
            return
        with self._lock:
            # A usage event's row is held by this process until the seal replaces it (see
            # _seal_one); quota changes are not aggregated with a spool.
            wake = self._place(item.operation, item)
            if wake:
                self._idle = False
            sender = self._sender
        if sender is None or not sender.alive():
            self._ensure_sender()
        elif wake:
            self._poke(sender)

    def _place(self, operation: Operation, item: _Item | None) -> bool:
        """(Lock held.) Hold ``operation`` in its aggregation group or queue it; True: wake the
        sender. ``item`` is its spooled item, if it has one (else made here when needed).

        An aggregated member wakes the sender only when the earliest deadline moved.
        """
        aggregator = self._aggregator
        if aggregator is not None:
            if isinstance(operation, UsageEvent):
                self._aggregated_members += 1
                group = (operation.customer_id, operation.feature, operation.properties)
                packed: _Packed = (
                    operation.customer_id,
                    operation.feature,
                    operation.value,
                    operation.idempotency_key,
                    operation.timestamp,
                    operation.properties,
                    None if item is None else item.row_id,
                    None if item is None else item.body,
                )
                return aggregator.add_to(group, packed) and self._idle
            # Quota adds only without a spool (see _aggregate).
            if operation.action == "add" and self._spool is None:
                self._aggregated_members += 1
                return aggregator.add(operation, item or _Item(operation)) and self._idle
            if operation.action != "add":
                # A remove or set must not overtake the adds held before it.
                self._seal_quota_key(operation.customer_id, operation.feature)
        self._queue.append(item or _Item(operation))
        return self._idle

    # -- aggregation -----------------------------------------------------------------------

    def seal_now(self) -> None:
        """Seal every open aggregation group now and queue the aggregates (no-op when off)."""
        try:
            if self._generation != _fork_generation:
                self._reset_after_fork()
            if self._seal(everything=True):
                sender = self._sender
                if sender is None or not sender.alive():
                    self._ensure_sender()
                else:
                    self._poke(sender)
        except Exception:
            logger.exception("commet: could not seal the aggregation groups")

    def _seal(self, *, everything: bool) -> bool:
        """Seal the due groups (all if ``everything``) and queue them; True if any was sealed.

        Blocking (a spool transaction per group): the sender runs it through ``_spool_call``.
        """
        aggregator = self._aggregator
        if aggregator is None or not aggregator.members:
            return False
        usage_groups: list[list[_Packed]] = []
        with self._lock:
            groups = aggregator.take_due(everything=everything)
            for members in groups:
                if isinstance(members[0], _Item):  # quota adds; usage events wait packed
                    # In memory, under the lock that took the group: a remove or set of its key
                    # cannot be queued in between and overtake it.
                    items = cast("list[_Item]", members)
                    self._queue_sealed(items, self._seal_quota(items))
                else:
                    usage_groups.append(cast("list[_Packed]", members))
            if groups:
                self._idle = False
        for packed in usage_groups:
            sealed = self._seal_one(packed)
            with self._lock:
                if sealed is None:
                    self._queue.extend(map(_unpack, packed))
                else:
                    self._queue_sealed(packed, sealed)
                self._idle = False
        return bool(groups)

    def _queue_sealed(self, members: Sequence[_Member], sealed: _Item) -> None:
        """(Lock held.) Queue the item standing for ``members``: they now count as one."""
        self._queue.append(sealed)
        if len(members) > 1:
            self._pending -= len(members) - 1
            self._cond.notify_all()

    def _seal_quota_key(self, customer_id: str, feature: str) -> None:
        """(Lock held.) Seal and queue the held adds of one key now, ahead of what follows."""
        aggregator = self._aggregator
        if aggregator is None or not aggregator.members:
            return
        for members in aggregator.take_group(quota_group_key(customer_id, feature)):
            items = cast("list[_Item]", members)  # quota adds wait as items
            self._queue_sealed(items, self._seal_quota(items))

    @staticmethod
    def _seal_quota(members: list[_Item]) -> _Item:
        """Return the item standing for the quota adds ``members`` (no spool: in memory only)."""
        if len(members) == 1:
            return members[0]
        item = _Item(aggregate_quota_adds([cast("QuotaChange", m.operation) for m in members]))
        item.members = len(members)
        item.parts = members
        return item

    def _seal_one(self, members: list[_Packed]) -> _Item | None:
        """Return the item standing for ``members``; None: send them one by one instead."""
        if len(members) == 1:
            return _unpack(members[0])
        try:
            customer_id, feature, _, _, timestamp, properties, _, _ = members[0]
            aggregate = build_aggregate(
                customer_id, feature, properties, timestamp, ((m[3], m[2]) for m in members)
            )
            item = _Item(aggregate)
            item.members = len(members)
            spool = self._spool
            row_ids = [member[6] for member in members if member[6] is not None]
            if spool is not None and row_ids:
                item.body = self._encoder(aggregate, self.settings.dialect)
                item.row_id = spool.seal_aggregate(
                    row_ids, aggregate, self.settings.dialect, item.body
                )
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

    def _aggregate_due_in(self) -> float | None:
        """Seconds until the next aggregation window ends (None: no group is open)."""
        aggregator = self._aggregator
        if aggregator is None:
            return None
        with self._lock:
            deadline = aggregator.next_deadline()
        return None if deadline is None else max(deadline - self._clock(), 0.0)

    def _overflow(self, item: _Item) -> None:
        policy = self.settings.overflow
        if policy == "spool" and not self._spool_warned:
            self._spool_warned = True
            logger.warning(
                "commet: overflow='spool' without a spool_path: spilling to memory is not "
                "implemented yet (set spool_path); behaving like 'block'"
            )
        if policy != "drop" and _running_loop() is None:
            self._ensure_sender()
            deadline = time.monotonic() + self.settings.overflow_block_timeout
            accepted = wake = False
            sender: _Sender | None = None
            with self._cond:
                while self._pending >= self._limit:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                else:
                    self._pending += 1
                    self._queued += 1
                    wake = self._place(item.operation, item)
                    if wake:
                        self._idle = False
                    sender = self._sender
                    accepted = True
            if accepted:
                if sender is None or not sender.alive():
                    self._ensure_sender()
                elif wake:
                    self._poke(sender)
                return
        with self._lock:
            self._dropped += 1
            pending = self._pending
        logger.error(
            "commet: delivery queue full (%d pending, limit %d, overflow=%r): NOT delivering %s",
            pending,
            self._limit,
            policy,
            _describe(item.operation),
        )
        self._call_dead_letter(
            item.operation,
            UndeliveredError("queue_full", f"delivery queue full ({self._limit} pending)"),
        )

    # -- sender lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the sender now: on the running event loop if there is one, else in a thread."""
        try:
            if self._generation != _fork_generation:
                self._reset_after_fork()
            self._ensure_sender()
        except Exception:
            logger.exception("commet: could not start the delivery sender")

    def _ensure_sender(self, *, thread_only: bool = False) -> bool:
        """Make sure a live sender exists; return False if none could be started.

        ``thread_only``: start a thread even on a running loop (restarting a thread sender).
        """
        with self._start_lock:
            current = self._sender
            if current is not None and current.alive():
                return True
            loop = None if thread_only else _running_loop()
            if loop is None and self._sender_factory is _default_sender_factory:
                _import_http_stack()  # here, never in the sender thread
            sender = _Sender("asyncio" if loop else "thread", self.settings.max_concurrency)
            with self._lock:
                if current is not None:
                    self._retire(current, requeue=True)
                self._sender = sender
                self._idle = False
            if loop is not None:
                sender.loop = loop
                sender.thread_id = threading.get_ident()
                sender.task = loop.create_task(self._run(sender))
                return True
            thread = threading.Thread(
                target=self._thread_main, args=(sender,), name="commet-delivery", daemon=True
            )
            sender.thread = thread
            try:
                thread.start()
            except RuntimeError:  # interpreter shutting down: no new threads
                sender.retired = True
                with self._lock:
                    if self._sender is sender:
                        self._sender = None
                return False
            return True

    def _retire(self, sender: _Sender, *, requeue: bool) -> list[_Item]:
        """Detach ``sender`` (lock held); requeue its unfinished items, or return them."""
        sender.retired = True
        if self._sender is sender:
            self._sender = None
        owned = list(sender.owned)
        sender.owned.clear()
        if requeue:
            self._queue.extendleft(reversed(owned))
            return []
        return owned

    def _poke(self, sender: _Sender, *, all_waits: bool = False) -> None:
        def wake() -> None:
            sender.wakeup.set()
            if all_waits:
                sender.slot_free.set()

        if sender.thread_id == threading.get_ident():
            wake()
            return
        loop = sender.loop
        if loop is None:
            return  # still starting: it looks at the queue before it ever waits
        try:
            loop.call_soon_threadsafe(wake)
        except RuntimeError:  # its loop is closed: replace it
            if not all_waits:
                self._ensure_sender()

    def _thread_main(self, sender: _Sender) -> None:
        loop = asyncio.new_event_loop()
        try:
            sender.loop = loop
            sender.thread_id = threading.get_ident()
            loop.run_until_complete(self._run(sender))
        except Exception:
            logger.exception("commet: the delivery thread failed")
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
        if sender.stop_requested and not self._held_for_fork and self._pending:
            # Stopped for a fork that did not wait for it: the fork is over, carry on.
            with contextlib.suppress(Exception):
                self._ensure_sender(thread_only=True)

    async def _run(self, sender: _Sender) -> None:
        tasks: set[asyncio.Task[None]] = set()
        client: OperationSender | None = None
        loop = asyncio.get_running_loop()
        renewer: asyncio.Task[None] | None = None
        try:
            client = await self._make_client(sender)
            if client is None:
                return
            if self._spool is not None:
                renewer = loop.create_task(self._renew_leases(sender, self._spool))
            while True:
                if sender.free_slots <= 0:
                    sender.slot_free.clear()
                    if sender.free_slots <= 0:
                        await sender.slot_free.wait()
                    continue
                sender.wakeup.clear()
                if self._aggregator is not None:
                    due_in = self._aggregate_due_in()
                    if due_in is not None and due_in <= 0:
                        if self._spool is None:
                            self._seal_due()
                        else:  # a spool transaction per group: off the (app's) event loop
                            await _spool_call(sender, self._seal_due)
                limit = min(sender.free_slots, self.settings.batch_size)
                batch = self._take(sender, limit)
                if batch is None:
                    return
                if not batch and self._spool is not None:
                    room = min(limit, self._limit - self._pending)
                    if room > 0:
                        # SQLite calls run off the event loop: it may be the app's.
                        claimed = await _spool_call(
                            sender, self._claim_spooled, sender, self._spool, room
                        )
                        if claimed is None:
                            return
                        if claimed:
                            continue  # queued: take them behind what the queue held
                if not batch:
                    # Rows can appear in the spool without a wake-up (another process), and a
                    # window ends without one.
                    timeout = None if self._spool is None else _SPOOL_POLL
                    due_in = self._aggregate_due_in()
                    if due_in is not None:
                        timeout = due_in if timeout is None else min(timeout, due_in)
                    await self._wait_for_wakeup(sender, timeout)
                    continue
                for item in batch:
                    sender.free_slots -= 1
                    task = loop.create_task(self._deliver(sender, client, item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        except Exception:
            logger.exception("commet: the delivery sender failed; the next enqueue restarts it")
        finally:
            if renewer is not None:
                renewer.cancel()
                tasks.add(renewer)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if sender.stop_requested:
                # Only now that no send of this generation can still finish: an operation it
                # delivered is finished, one it did not is queued again, never both.
                with self._lock:
                    if not sender.retired:
                        self._retire(sender, requeue=True)
                        self._idle = False
                    self._cond.notify_all()
            if client is not None:
                await self._close_client(client)

    def _seal_due(self) -> None:
        try:
            self._seal(everything=False)
        except Exception:
            logger.exception("commet: could not seal the aggregation groups")

    async def _renew_leases(self, sender: _Sender, spool: Spool) -> None:
        # A third of the lease: two renewals may fail (a busy file) before another process may
        # take a row this one is still sending.
        interval = max(spool.lease_seconds / 3, 0.01)
        while not sender.retired:
            try:
                await _spool_call(sender, spool.renew)
                await _spool_call(sender, spool.reclaim_dead_owners)
            except Exception:
                logger.exception("commet: could not renew the spool leases")
            await asyncio.sleep(interval)

    async def _make_client(self, sender: _Sender) -> OperationSender | None:
        attempt = 0
        while not (sender.retired or sender.stop_requested):
            try:
                return self._sender_factory(self.settings)
            except Exception:
                attempt += 1
                if attempt >= MAX_CLIENT_ATTEMPTS:
                    logger.exception(
                        "commet: could not build the Commet client (%d attempts); NOT sending: "
                        "%d operations stay queued for the next sender (the next enqueue or "
                        "flush starts one)",
                        attempt,
                        self._pending,
                    )
                    with self._lock:
                        self._retire(sender, requeue=True)  # owns nothing yet
                        self._cond.notify_all()
                    return None
                logger.exception(
                    "commet: could not build the Commet client (attempt %d of %d); retrying",
                    attempt,
                    MAX_CLIENT_ATTEMPTS,
                )
                delay = retry_delay(attempt, base=self.settings.backoff_base, rng=self._rng)
                await self._sleep_unless_woken(sender, delay)
        return None

    @staticmethod
    async def _wait_for_wakeup(sender: _Sender, timeout: float | None) -> None:
        """Wait until ``sender`` is poked, or ``timeout`` seconds (None: no limit).

        Not ``asyncio.wait_for``: on Python 3.11 it loses a cancellation that arrives in the
        turn its awaitable completes, and the sender would then wait again, for ever, under a
        loop that is shutting down (asyncio.run never returned).
        """
        if timeout is None:
            await sender.wakeup.wait()
            return
        waiter = asyncio.get_running_loop().create_task(sender.wakeup.wait())
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:
            waiter.cancel()

    async def _sleep_unless_woken(self, sender: _Sender, delay: float) -> None:
        """Wait ``delay``, or less if ``sender`` is poked (asked to stop before a fork)."""
        sender.wakeup.clear()
        if sender.stop_requested:  # asked before the clear: its wake-up may be gone
            return
        loop = asyncio.get_running_loop()
        waits = {loop.create_task(self._sleep_for(delay)), loop.create_task(sender.wakeup.wait())}
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

    def _take(self, sender: _Sender, limit: int) -> list[_Item] | None:
        with self._lock:
            if sender.retired or sender.stop_requested or self._sender is not sender:
                return None
            queue = self._queue
            batch: list[_Item] = []
            while queue and len(batch) < limit:
                item = queue.popleft()
                if self._take_turn(item):
                    batch.append(item)
            if not batch:
                # Idle before any spool claim, too: an enqueue from now on pokes the sender.
                self._idle = True
                return []
            sender.owned.update(batch)
            sender.in_flight += len(batch)
            return batch

    def _claim_spooled(self, sender: _Sender, spool: Spool, room: int) -> bool | None:
        """Claim up to ``room`` spooled rows onto the tail of the queue; True if any, None: stale.

        The tail, not straight to the sender: a quota change placed in the queue while the claim
        ran (its place was reserved before these rows spilled) is older than they are, and
        ``_take`` hands out (or parks) the changes of a key in the order it meets them.
        """
        # The places are reserved in ``_pending`` before the rows are claimed: a flush that saw
        # nothing pending and then no claimable row cannot miss rows claimed in between.
        with self._lock:
            self._pending += room
            spill_seq = self._spill_seq
            spills_settled = self._spills_writing == 0
        rows: list[SpoolRow] = []
        claimed = False
        try:
            rows = spool.claim(room)
            claimed = True
        except Exception:
            logger.exception("commet: could not read the spool %s", spool.path)
        items = [_Item.from_row(row) for row in rows]
        with self._lock:
            stale = sender.retired or sender.stop_requested or self._sender is not sender
            self._pending -= room if stale else room - len(items)
            if not stale:
                if claimed and len(rows) < room and spills_settled and self._spill_seq == spill_seq:
                    # Every quota change spilled so far is claimed now (rows come oldest first).
                    self._quota_spilling = False
                self._queue.extend(items)
                if items:
                    self._idle = False
            self._cond.notify_all()
        if stale:
            with contextlib.suppress(Exception):
                spool.release([item.row_id for item in items if item.row_id is not None])
            return None
        return bool(items)

    def _take_turn(self, item: _Item) -> bool:
        """(Lock held.) True if ``item`` may be sent now, else park it behind its key's turn."""
        operation = item.operation
        if not isinstance(operation, QuotaChange):
            return True
        key = (operation.customer_id, operation.feature)
        holder = self._quota_turns.get(key)
        if holder is None:
            self._quota_turns[key] = item
            return True
        if holder is item:  # back from a retry or a sender restart, or just given the turn
            return True
        parked = self._quota_parked.get(key)
        if parked is None:
            parked = self._quota_parked[key] = deque()
        parked.append(item)
        return False

    def _pass_turn(self, item: _Item) -> bool:
        """(Lock held.) ``item`` is finished: queue the next change of its key; True if any."""
        operation = item.operation
        if not isinstance(operation, QuotaChange):
            return False
        key = (operation.customer_id, operation.feature)
        if self._quota_turns.get(key) is not item:
            return False
        parked = self._quota_parked.get(key)
        if not parked:
            del self._quota_turns[key]
            return False
        successor = parked.popleft()
        if not parked:
            del self._quota_parked[key]
        self._quota_turns[key] = successor
        # At the head: it was taken before anything now queued.
        self._queue.appendleft(successor)
        self._idle = False
        return True

    def _unpark_all(self) -> list[_Item]:
        """(Lock held.) Forget every turn; return the parked changes, oldest first per key."""
        parked = [item for items in self._quota_parked.values() for item in items]
        self._quota_parked.clear()
        self._quota_turns.clear()
        return parked

    async def _deliver(self, sender: _Sender, client: OperationSender, item: _Item) -> None:
        try:
            try:
                if item.body is None:
                    item.body = self._encoder(item.operation, self.settings.dialect)
            except Exception as exc:
                logger.exception("commet: could not encode %s", _describe(item.operation))
                if item.parts:
                    self._split(sender, item, exc)
                    return
                await self._settle_row(sender, item, exc)
                self._finish(sender, item, failure=exc)
                return
            try:
                result = await client.send_once(item.operation, request_body=item.body)
            except Exception as exc:
                delay = self._plan_retry(item, exc)
                if delay is None:
                    if item.parts and _refused_outright(exc):
                        self._split(sender, item, exc)
                        return
                    await self._settle_row(sender, item, exc)
                    self._finish(sender, item, failure=exc)
                    return
                if item.row_id is not None and self._spool is not None:
                    try:
                        await _spool_call(
                            sender,
                            self._spool.note_failure,
                            item.row_id,
                            self._redact(str(exc) or repr(exc)),
                        )
                    except Exception:
                        logger.exception("commet: could not update the spool")
                with self._lock:
                    if item not in sender.owned:
                        return
                    sender.in_flight -= 1
                    sender.retrying += 1
                    self._retried += 1
            else:
                await self._settle_row(sender, item, None)
                self._finish(sender, item, result=result)
                return
        finally:
            sender.free_slots += 1
            sender.slot_free.set()
        try:
            await self._sleep(delay)
        finally:
            with self._lock:
                sender.retrying -= 1
                requeue = item in sender.owned and not sender.retired
                if requeue:
                    sender.owned.discard(item)
                    self._queue.appendleft(item)
                    self._idle = False
        if requeue:
            sender.wakeup.set()

    async def _settle_row(self, sender: _Sender, item: _Item, failure: Exception | None) -> None:
        """Remove an accepted operation's spool row, or move a refused one to dead_letter."""
        spool, row_id = self._spool, item.row_id
        if spool is None or row_id is None:
            return
        try:
            if failure is None:
                await _spool_call(sender, spool.ack, row_id)
            else:
                reason = self._redact(f"{type(failure).__name__}: {failure}")
                await _spool_call(sender, spool.bury, row_id, reason)
        except Exception:
            # Accepted but still spooled: a later replay gets 409 duplicate, which is delivered.
            logger.exception("commet: could not update the spool for %s", _describe(item.operation))

    def _plan_retry(self, item: _Item, error: Exception) -> float | None:
        item.attempts += 1
        retry_after: float | None = None
        if isinstance(error, CommetError):
            if not _is_retryable(error):
                return None
            retry_after = getattr(error, "retry_after", None)
            logger.info(
                "commet: attempt %d of %s failed, will retry: %s",
                item.attempts,
                _describe(item.operation),
                self._redact(str(error)),
            )
        elif isinstance(error, (ValueError, TypeError)):
            return None  # the client refused an invalid operation: no retry can fix it
        else:
            item.unexpected += 1
            logger.error(
                "commet: unexpected error sending %s (%d of %d): %s",
                _describe(item.operation),
                item.unexpected,
                MAX_UNEXPECTED_ATTEMPTS,
                self._redact(repr(error)),
            )
            if item.unexpected >= MAX_UNEXPECTED_ATTEMPTS:
                return None
        return retry_delay(
            item.attempts,
            base=self.settings.backoff_base,
            cap=self._backoff_cap,
            retry_after=retry_after,
            retry_after_cap=self.settings.retry_after_cap,
            rng=self._rng,
        )

    def _finish(
        self,
        sender: _Sender,
        item: _Item,
        *,
        result: object = None,
        failure: Exception | None = None,
    ) -> None:
        with self._lock:
            if item not in sender.owned:
                return  # taken back by a restart or a close: someone else reports it
            sender.owned.discard(item)
            sender.in_flight -= 1
            # A quota aggregate is reported member by member, so that a listener or hook
            # counting our changes (the quota gate) sees each one it was handed settle.
            operations = [part.operation for part in item.parts or [item]]
            if failure is None:
                self._sent += 1
                if item.members:
                    self._aggregates_sent += 1
                if getattr(result, "duplicate", False):
                    self._duplicates += 1
            else:
                self._dead_lettered += len(operations)
            if self._pass_turn(item):
                sender.wakeup.set()  # we run on the sender's loop
        if failure is not None:
            for operation in operations:
                logger.error(
                    "commet: giving up on %s: %s",
                    _describe(operation),
                    self._redact(str(failure) or repr(failure)),
                )
                self._call_dead_letter(operation, failure)
        else:
            for operation in operations:
                self._notify_listeners(operation, result)
        # Only now, so a flush that returns has seen the hook called too.
        with self._lock:
            self._pending -= 1
            self._cond.notify_all()

    def _split(self, sender: _Sender, item: _Item, failure: Exception) -> None:
        """A quota aggregate Commet refused (nothing applied): send its members one by one.

        They take its turn, oldest first, at the head of the queue, so nothing queued behind the
        aggregate (a remove, a set, a later add) overtakes them.
        """
        parts = item.parts
        assert parts is not None
        operation = cast("QuotaChange", item.operation)
        key = (operation.customer_id, operation.feature)
        with self._lock:
            if item not in sender.owned:
                return  # taken back by a restart or a close: someone else reports it
            sender.owned.discard(item)
            sender.in_flight -= 1
            self._aggregates_split += 1
            self._pending += len(parts) - 1
            if self._quota_turns.get(key) is item:
                self._quota_turns[key] = parts[0]
                if len(parts) > 1:
                    parked = self._quota_parked.setdefault(key, deque())
                    parked.extendleft(reversed(parts[1:]))
                self._queue.appendleft(parts[0])
            else:  # pragma: no cover - an aggregate is sent only while it holds its key's turn
                self._queue.extendleft(reversed(parts))
            self._idle = False
        logger.info(
            "commet: %s refused (%s); sending its %d members one by one",
            _describe(operation),
            self._redact(str(failure) or repr(failure)),
            len(parts),
        )
        sender.wakeup.set()  # we run on the sender's loop

    def _notify_listeners(self, operation: Operation, result: object) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(operation, result)
            except Exception:
                logger.exception("commet: a delivery listener raised; ignored")

    def _call_dead_letter(self, operation: Operation, error: Exception) -> None:
        hook = self.settings.dead_letter
        if hook is None:
            return
        try:
            hook(operation, error)
        except Exception:
            logger.exception("commet: the dead_letter hook raised; ignored")

    def _redact(self, text: str) -> str:
        key = self.settings.api_key
        return text.replace(key, "***") if key else text

    # -- flush and close -------------------------------------------------------------------

    def _on_sender_loop(self) -> bool:
        sender = self._sender
        return (
            sender is not None
            and sender.thread_id == threading.get_ident()
            and _running_loop() is not None
        )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is delivered or given up; False if ``timeout`` ran out.

        Call it from any thread but the sender's event loop (there, ``await aflush()``).
        """
        try:
            if self._generation != _fork_generation:
                self._reset_after_fork()
            if timeout is None:
                timeout = self.settings.shutdown_timeout
            deadline = time.monotonic() + timeout
            if self._on_sender_loop():
                logger.warning("commet: flush() on the sender's event loop; use await aflush()")
                return self._pending == 0
            while True:
                if self._aggregator is not None and self._aggregator.members:
                    self.seal_now()
                with self._cond:
                    pending = self._pending
                    remaining = deadline - time.monotonic()
                if pending == 0 and self._spool_drained() and self._pending == 0:
                    return True
                if remaining <= 0:
                    return False
                if not self._ensure_sender():
                    # No thread can start (interpreter shutdown): drain on a loop of our own.
                    if _running_loop() is not None:
                        return False
                    return asyncio.run(self.aflush(remaining))
                with self._cond:
                    if self._pending:
                        self._cond.wait(min(remaining, _FLUSH_RECHECK))
                        continue
                # Only spooled rows are left: nudge the sender to claim them.
                sender = self._sender
                if sender is not None:
                    self._poke(sender)
                time.sleep(min(remaining, _SPOOL_FLUSH_POLL))
        except Exception:
            logger.exception("commet: flush failed")
            return False

    async def aflush(self, timeout: float | None = None) -> bool:
        """Like :meth:`flush`, without blocking the event loop."""
        try:
            if timeout is None:
                timeout = self.settings.shutdown_timeout
            deadline = time.monotonic() + timeout
            next_spool_check = 0.0
            while True:
                if self._aggregator is not None and self._aggregator.members:
                    if self._spool is None:
                        self.seal_now()
                    else:
                        await asyncio.to_thread(self.seal_now)
                now = time.monotonic()
                if not self._pending and now >= next_spool_check:
                    if self._spool_drained() and not self._pending:
                        return True
                    next_spool_check = now + _SPOOL_FLUSH_POLL
                    sender = self._sender
                    if sender is not None:
                        self._poke(sender)
                if now >= deadline:
                    return False
                self._ensure_sender()
                await asyncio.sleep(_AFLUSH_POLL)
        except Exception:
            logger.exception("commet: flush failed")
            return False

    def _spool_drained(self) -> bool:
        """True if the spool has no row waiting to be claimed (always, without a spool)."""
        spool = self._spool
        if spool is None:
            return True
        try:
            # Rows a dead process of this host held are ours to deliver now, not after the lease.
            spool.reclaim_dead_owners()
            return spool.waiting() == 0
        except Exception:
            logger.exception("commet: could not read the spool %s", spool.path)
            return True  # nothing this process can do about it now; do not spin on it

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the sender; report what was left. True if everything was delivered.

        The queue stays usable: a later enqueue starts a new sender.
        """
        delivered = self.flush(timeout)
        try:
            sender, leftovers = self._take_leftovers()
            if sender is not None:
                self._poke(sender, all_waits=True)
                thread = sender.thread
                if thread is not None and thread is not threading.current_thread():
                    thread.join(_JOIN_TIMEOUT)
            self._abandon(leftovers)
        except Exception:
            logger.exception("commet: close failed")
            return False
        return delivered and not leftovers

    async def aclose(self, timeout: float | None = None) -> bool:
        """Like :meth:`close`, for an event loop (the ASGI lifespan shutdown)."""
        sender = self._sender
        if sender is None or sender.loop is not _running_loop():
            return await asyncio.to_thread(self.close, timeout)
        delivered = await self.aflush(timeout)
        try:
            # Read the sender again: aflush may have replaced one that had died.
            sender, leftovers = self._take_leftovers()
            if sender is not None:
                self._poke(sender, all_waits=True)
                if sender.task is not None and sender.loop is asyncio.get_running_loop():
                    await asyncio.wait({sender.task}, timeout=_JOIN_TIMEOUT)
                elif sender.thread is not None:
                    await asyncio.to_thread(sender.thread.join, _JOIN_TIMEOUT)
            self._abandon(leftovers)
        except Exception:
            logger.exception("commet: close failed")
            return False
        return delivered and not leftovers

    def _take_leftovers(self) -> tuple[_Sender | None, list[_Item]]:
        """Retire the sender and take everything still undelivered, for close and aclose.

        What the spool can keep goes back to it; the rest is returned (and counted as
        dead-lettered) for the caller to report once the sender has stopped.
        """
        with self._lock:
            sender = self._sender
            leftovers = self._retire(sender, requeue=False) if sender else []
            leftovers.extend(self._queue)
            self._queue.clear()
            leftovers.extend(self._unpark_all())
            leftovers.extend(self._unseal_all())
            self._pending -= len(leftovers)
            leftovers = self._keep_spooled(leftovers)
            # An undelivered quota aggregate is reported member by member, as it was enqueued.
            leftovers = [part for item in leftovers for part in item.parts or [item]]
            self._dead_lettered += len(leftovers)
            self._cond.notify_all()
        return sender, leftovers

    def _unseal_all(self) -> list[_Item]:
        """(Lock held.) Forget the open aggregation groups; return their members, oldest first."""
        aggregator = self._aggregator
        if aggregator is None or not aggregator.members:
            return []
        groups = aggregator.take_due(everything=True)
        return [_unpack(member) for members in groups for member in members]

    def _keep_spooled(self, items: list[_Item]) -> list[_Item]:
        """Give back the spool rows among ``items`` (lock held); return the memory-only rest."""
        spooled = [item.row_id for item in items if item.row_id is not None]
        if not spooled or self._spool is None:
            return items
        try:
            self._spool.release(spooled)
        except Exception:
            logger.exception("commet: could not release spool rows; they wait out their lease")
        logger.warning(
            "commet: closing with %d operations undelivered; they stay in the spool %s",
            len(spooled),
            self._spool.path,
        )
        return [item for item in items if item.row_id is None]

    def _abandon(self, items: list[_Item]) -> None:
        if not items:
            return
        logger.error("commet: closing with %d operations undelivered", len(items))
        for item in items:
            logger.error("commet: undelivered at shutdown: %s", _describe(item.operation))
            self._call_dead_letter(
                item.operation,
                UndeliveredError("shutdown", "not delivered before the close timeout"),
            )

    def stats(self) -> DeliveryStats:
        """Return a snapshot of the counters."""
        with self._lock:
            sender = self._sender
            return DeliveryStats(
                queued=self._queued,
                sent=self._sent,
                retried=self._retried,
                duplicates=self._duplicates,
                dead_lettered=self._dead_lettered,
                dropped=self._dropped,
                in_flight=sender.in_flight if sender else 0,
                pending=self._pending,
            )

    def aggregation_stats(self) -> AggregationStats:
        """Return a snapshot of the aggregation counters."""
        with self._lock:
            aggregator = self._aggregator
            return AggregationStats(
                aggregated_members=self._aggregated_members,
                aggregates_sent=self._aggregates_sent,
                open_members=aggregator.members if aggregator is not None else 0,
                aggregates_split=self._aggregates_split,
            )

    # -- fork --------------------------------------------------------------------------------

    def _reset_after_fork(self) -> None:
        # The parent's sender thread does not exist here and its client's sockets are shared
        # with the parent; what it had queued is the parent's to deliver.
        self._init_state()

    def _hold_for_fork(self) -> None:
        """Before a fork: stop this queue's sender thread and start none until after it."""
        if self._pid != os.getpid():
            return  # inherited and not used since: nothing runs
        # Held across the fork, so no thread starts a sender in between (released after it).
        self._held_for_fork = self._start_lock.acquire(timeout=_FORK_JOIN_TIMEOUT)
        if not self._held_for_fork:
            logger.error("commet: forking while another thread starts a delivery sender")
        sender = self._sender
        if sender is None or sender.mode != "thread" or sender.retired:
            return
        thread = sender.thread
        if thread is None or thread is threading.current_thread():
            return  # forked from a listener on the sender's own loop: it is at a safe point
        sender.stop_requested = True
        self._stopped_for_fork = True
        self._poke(sender, all_waits=True)
        thread.join(_FORK_JOIN_TIMEOUT)
        if thread.is_alive():
            logger.error(
                "commet: the delivery thread did not stop within %.0fs before a fork; the "
                "child may inherit a lock it holds",
                _FORK_JOIN_TIMEOUT,
            )

    def _release_after_fork(self) -> None:
        """After a fork, in the parent: restart a stopped sender thread if work is pending."""
        if self._held_for_fork:
            self._held_for_fork = False
            self._start_lock.release()
        stopped, self._stopped_for_fork = self._stopped_for_fork, False
        # Eagerly: no later enqueue may come to restart it, and a spool sender also polls.
        if stopped and (self._pending or self._spool is not None):
            self._ensure_sender(thread_only=True)


_live_queues: weakref.WeakSet[DeliveryQueue] = weakref.WeakSet()
# Bumped in a forked child, so a queue sees it was inherited without a getpid() system call
# per enqueue (system calls are what a busy request path can least afford; see bench/).
_fork_generation = 0
_registry_lock = threading.Lock()
_defaults_by_id: dict[int, DeliveryQueue] = {}
_defaults: list[DeliveryQueue] = []


def default_queue(settings: CommetSettings) -> DeliveryQueue:
    """Return the process-wide queue for ``settings`` (equal settings, same transport and hook)."""
    queue = _defaults_by_id.get(id(settings))
    if queue is not None and queue.settings is settings:
        return queue
    with _registry_lock:
        for queue in _defaults:
            known = queue.settings
            if (
                known == settings
                and known.transport is settings.transport
                and known.dead_letter is settings.dead_letter
            ):
                break
        else:
            queue = DeliveryQueue(settings)
            _defaults.append(queue)
        # The queue holds its settings, so this id cannot be reused while the entry exists.
        _defaults_by_id[id(settings)] = queue
        return queue


def close_default_queues(timeout: float | None = None) -> bool:
    """Close and forget every default queue; True if all delivered everything."""
    with _registry_lock:
        queues = list(_defaults)
        _defaults.clear()
        _defaults_by_id.clear()
    results = [queue.close(timeout) for queue in queues]  # close every one, no short cut
    return all(results)


def _close_all_at_exit() -> None:
    for queue in list(_live_queues):
        if queue._pending or queue._sender is not None or queue._spilled:
            queue.close(queue.settings.shutdown_timeout)


_held_queues: list[DeliveryQueue] = []


def _before_fork() -> None:
    for queue in list(_live_queues):
        try:
            queue._hold_for_fork()
        except Exception:
            logger.exception("commet: could not stop the delivery sender before a fork")
        _held_queues.append(queue)


def _after_fork_in_parent() -> None:
    queues = list(_held_queues)
    _held_queues.clear()
    for queue in queues:
        try:
            queue._release_after_fork()
        except Exception:
            logger.exception("commet: could not restart the delivery sender after a fork")


def _after_fork_in_child() -> None:
    global _registry_lock, _fork_generation
    _fork_generation += 1
    _registry_lock = threading.Lock()
    _held_queues.clear()
    for queue in list(_live_queues):
        queue._reset_after_fork()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
