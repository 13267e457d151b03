"""The per-request billing context: one ContextVar pointing at a mutable ``RequestContext``.

The middleware sets the var when a request arrives and resets it when the request ends. Code
further down (a FastAPI dependency, a sync endpoint in a threadpool, a Flask ``before_request``)
sees the same object through the var, so what it records (``set_customer``, ``track``,
``@metered``) is visible to the middleware at the end even though context copies happened in
between: copies share the object, not a value.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from commet_middleware._errors import CustomerRequiredError
from commet_middleware._keys import derive_idempotency_key, new_request_id
from commet_middleware._models import (
    Operation,
    QuotaChange,
    UsageEvent,
    clean_properties,
    normalize_customer_id,
    utc_timestamp,
    validate_customer_id,
)

if TYPE_CHECKING:
    from commet_middleware._settings import CommetSettings
    from commet_middleware.quota import QuotaGate, Reservation
    from commet_middleware.quota._idempotency import IdempotencyClaim

    from ._refusals import Refusal

__all__ = [
    "CustomerRequiredError",
    "EventSink",
    "MeteringStats",
    "PendingCommit",
    "PendingQuota",
    "PendingUsage",
    "RequestContext",
    "commet_context",
    "current_customer",
    "default_sink",
    "get_current_context",
    "set_customer",
]

logger = logging.getLogger("commet_middleware")

# How long a WSGI request waits for its spool commit: well past SQLite's busy timeout (5 s),
# after which the writer gives up and keeps the operation in memory anyway.
COMMIT_WAIT_TIMEOUT = 30.0


class PendingCommit(Protocol):
    """What a sink may hand back: a write that becomes durable (or is given up) a little later.

    The delivery queue with a spool returns its spool group's commit; the middleware waits for
    it before the response completes, so a crash after the response loses nothing.
    """

    def wait(self, timeout: float | None = None, /) -> bool:
        """Block the calling thread until it is done; False if ``timeout`` ran out."""

    def __await__(self) -> Generator[Any, None, None]:
        """Wait for it on the running event loop."""


class EventSink(Protocol):
    """Where finished billable operations go: the delivery queue, or a list in tests."""

    def enqueue(self, operation: Operation, /) -> PendingCommit | None:
        """Accept one operation; must never raise and never block for long.

        May return a commit to wait for before the response completes (None: nothing to wait).
        """


@dataclass(frozen=True, slots=True)
class PendingQuota:
    """A quota change waiting for the response: a guard's reservation, or a release's removal.

    Settled with the request: a reservation is committed (quota add) when the response
    succeeds and released otherwise; a removal is recorded only when the response succeeds.
    """

    gate: QuotaGate | None
    idempotency_key: str
    reservation: Reservation | None = None
    # For a removal (quota_release): who, what and how many.
    customer_id: str = ""
    feature: str = ""
    count: int = 0


Measure = Callable[[], "tuple[int | float, dict[str, str] | None] | None"]
"""Computes a pending usage's value and properties when its request settles billable."""


class PendingUsage(NamedTuple):
    """A usage event recorded during a request, billed only if the request succeeds.

    A named tuple rather than a frozen dataclass: one is made per metered request, and a tuple
    is built in half the time.
    """

    feature: str
    value: int | float
    properties: dict[str, str] | None
    idempotency_key: str
    timestamp: str
    # An explicit customer from ``@metered(customer=...)``; None means the request's customer.
    customer_id: str | None = None
    # Computes (value, properties) when the request settles billable (``@metered`` functions of
    # the result), or None when that value cannot be billed (it logged and counted why);
    # ``value`` and ``properties`` above are then placeholders.
    measure: Measure | None = None


class MeteringStats:
    """Counters a middleware keeps about what it billed and what it could not bill."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events_enqueued = 0
        self.unattributed_requests = 0
        self.rejected_requests = 0
        self.invalid_values = 0
        self.incomplete_responses = 0
        self.quota_changes_enqueued = 0
        self.quota_refusals = 0

    def add(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to the counter ``name``; safe from any thread."""
        if amount:
            with self._lock:
                setattr(self, name, getattr(self, name) + amount)

    def as_dict(self) -> dict[str, int]:
        """Return a snapshot of every counter."""
        with self._lock:
            return {
                "events_enqueued": self.events_enqueued,
                "unattributed_requests": self.unattributed_requests,
                "rejected_requests": self.rejected_requests,
                "invalid_values": self.invalid_values,
                "incomplete_responses": self.incomplete_responses,
                "quota_changes_enqueued": self.quota_changes_enqueued,
                "quota_refusals": self.quota_refusals,
            }


class RequestContext:
    """Everything billing needs to know about one request (or one job), shared by reference.

    ``direct`` contexts (jobs, :func:`commet_context`) enqueue each operation as soon as it is
    recorded; request contexts keep them pending until the middleware knows the response.
    A plain class rather than a dataclass: one is made per request, so what most requests
    never change lives on the class, and ``__init__`` sets only the rest.
    """

    # What the idempotency keys are derived from: "request" + the request id, or the client's
    # key (see _keys).
    key_seed: str
    status: int | None = None
    invalid_values: int = 0
    # Set by @metered in reject mode when it refused to run for want of a customer.
    customer_required: bool = False
    # Once settled, nothing more is billed for this request except what the settle allowed.
    settled: bool = False
    billable_after_settle: bool = False
    # What a guard refused with (sent instead of the app's response).
    refusal: Refusal | None = None
    # What the request recorded and holds until it settles, and the RateLimit headers a guard
    # adds to the response: tuples, empty on the class, replaced (not appended to) on the rare
    # request that records something, so a plain request allocates none of them.
    pending: tuple[PendingUsage, ...] = ()
    quota_pending: tuple[PendingQuota, ...] = ()
    response_headers: tuple[tuple[str, str], ...] = ()
    # Operations per feature so far (the ordinal in each key); made on first use.
    ordinals: dict[str, int] | None = None
    # The client's Idempotency-Key held by this request: kept as used when the request settles
    # billable, freed for a retry otherwise.
    idempotency: IdempotencyClaim | None = None
    # The sink's commits of what this request enqueued (a spool's group commits), waited for
    # before its response completes: empty on the class, replaced on the request that has any.
    commits: tuple[PendingCommit, ...] = ()

    def __init__(
        self,
        sink: EventSink,
        settings: CommetSettings | None = None,
        request_id: str = "",
        key_seed: str = "",
        customer_id: str | None = None,
        direct: bool = False,
        reject_missing_customer: bool = False,
        stats: MeteringStats | None = None,
        late_resolver: Callable[[], str | None] | None = None,
        gate: QuotaGate | None = None,
    ) -> None:
        self.sink = sink
        self.settings = settings
        # A fresh id unless given (one per request: made here, not by the caller).
        self.request_id = request_id = request_id or new_request_id()
        self.key_seed = key_seed or "request\x1f" + request_id
        self.customer_id = customer_id
        self.direct = direct
        self.reject_missing_customer = reject_missing_customer
        self.stats = stats
        # Re-runs the middleware's customer resolver (sync only) for values that appear only
        # once the app has routed the request or authenticated the user (path params,
        # scope["user"]).
        self.late_resolver = late_resolver
        # The middleware's quota gate, for @quota_guard and @quota_release.
        self.gate = gate
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"<RequestContext {self.request_id} customer={self.customer_id!r} "
            f"direct={self.direct} settled={self.settled} pending={len(self.pending)}>"
        )

    def add_response_headers(self, headers: Iterable[tuple[str, str]]) -> None:
        """Add headers to the response the middleware sends (a guard's RateLimit headers)."""
        with self._lock:
            self.response_headers = (*self.response_headers, *headers)

    def customer(self) -> str | None:
        """Return the customer id, asking the resolver again if none is known yet."""
        if self.customer_id is None and self.late_resolver is not None:
            self.customer_id = self.late_resolver()
        return self.customer_id

    def next_key(self, feature: str) -> str:
        """Return the idempotency key for the next operation on ``feature`` in this context."""
        with self._lock:
            ordinal = self._next_ordinal(feature)
        return derive_idempotency_key(self.key_seed, feature, ordinal)

    def _next_ordinal(self, feature: str) -> int:
        # Lock held.
        ordinals = self.ordinals
        if ordinals is None:
            ordinals = self.ordinals = {}
        ordinal = ordinals[feature] = ordinals.get(feature, 0) + 1
        return ordinal

    def count_invalid(self) -> None:
        """Count one usage value that could not be billed because it was invalid."""
        with self._lock:
            self.invalid_values += 1
        if self.stats is not None:
            self.stats.add("invalid_values")

    def record(
        self,
        feature: str,
        value: int | float,
        properties: dict[str, str] | None,
        customer_id: str | None = None,
        *,
        measure: Measure | None = None,
    ) -> None:
        """Record one usage: pending in a request, enqueued at once in a direct context.

        The caller has validated feature, value and properties; or ``measure`` computes them
        when the request settles billable (never for a response that is not billed). Its key
        and timestamp are taken now either way. Raises ``CustomerRequiredError`` only in a
        direct context that has no customer.
        """
        pending = PendingUsage(
            feature=feature,
            value=value,
            properties=properties,
            idempotency_key=self.next_key(feature),
            timestamp=utc_timestamp(),
            customer_id=customer_id,
            measure=measure,
        )
        if self.direct:
            customer = customer_id or self.customer()
            if customer is None:
                raise CustomerRequiredError(
                    f"no customer for {feature!r}: pass customer= to commet_context() or "
                    "@metered(), or call set_customer() first"
                )
            self._enqueue(pending, customer)
            return
        with self._lock:
            if not self.settled:
                self.pending = (*self.pending, pending)
                return
        # Recorded after the response was settled (e.g. in a background task that runs after
        # the body was sent): bill it now if the response was billed, else say why not.
        customer = customer_id or self.customer_id
        if self.billable_after_settle and customer is not None:
            self._enqueue(pending, customer)
        else:
            logger.warning(
                "commet: usage of %r recorded after request %s had settled, and that request "
                "was not billable or had no customer; not billed",
                feature,
                self.request_id,
            )

    def settle(self, *, billable: bool) -> int:
        """Enqueue the pending operations if ``billable``; return how many were enqueued.

        Runs once per request; later calls return 0. A billable request with no customer is
        never billed to anyone: it is logged and counted as unattributed.
        """
        with self._lock:
            if self.settled:
                return 0
            self.settled = True
            self.billable_after_settle = billable
            pending, self.pending = self.pending, ()
            quota, self.quota_pending = self.quota_pending, ()
        claim = self.idempotency
        if claim is not None:
            claim.finish(billable)
        for change in quota:
            self._settle_quota(change, billable=billable)
        if not billable or not pending:
            return 0
        sent = 0
        unattributed = 0
        for item in pending:
            customer = item.customer_id or self.customer_id or self.customer()
            if customer is None:
                unattributed += 1
                continue
            if self._enqueue(item, customer):
                sent += 1
        if unattributed:
            logger.warning(
                "commet: request %s succeeded with %d billable event(s) but no customer; "
                "not billed to anyone (features: %s)",
                self.request_id,
                unattributed,
                ", ".join(sorted({p.feature for p in pending if p.customer_id is None})),
            )
            if self.stats is not None:
                self.stats.add("unattributed_requests")
        return sent

    def settle_with_usage(self, feature: str) -> None:
        """Settle a billable request that also uses one unit of ``feature`` (zero-code metering).

        What ``record(feature, 1, None)`` then ``settle(billable=True)`` do, in one step when
        nothing else is pending (the common zero-code request): one lock, no pending list.
        """
        customer = self.customer_id
        if (
            customer is not None
            and self.idempotency is None
            and not (self.pending or self.quota_pending or self.settled)
        ):
            with self._lock:
                simple = not (self.pending or self.quota_pending or self.settled)
                if simple:
                    self.settled = True
                    self.billable_after_settle = True
                    ordinal = self._next_ordinal(feature)
            if simple:
                # The customer came from a resolver or set_customer, both of which clean or
                # validate it, and the feature from the middleware's checked rules: the event
                # is built as it is, without the checks _enqueue makes of recorded usage.
                key = derive_idempotency_key(self.key_seed, feature, ordinal)
                self._hand_over(UsageEvent(customer, feature, 1, key, utc_timestamp()))
                return
        self.record(feature, 1, None)
        self.settle(billable=True)

    def add_quota(self, change: PendingQuota) -> None:
        """Hold a quota change until the response is known; a direct context settles it now.

        Added after the request settled (a guard in a background task), it is settled at once
        with the request's outcome.
        """
        if self.direct:
            self._settle_quota(change, billable=True)
            return
        with self._lock:
            if not self.settled:
                self.quota_pending = (*self.quota_pending, change)
                return
        self._settle_quota(change, billable=self.billable_after_settle)

    def _settle_quota(self, change: PendingQuota, *, billable: bool) -> None:
        gate = change.gate
        try:
            reservation = change.reservation
            if reservation is not None:
                if gate is None:
                    return
                if not billable:
                    gate.release(reservation)
                    return
                operation: QuotaChange = gate.commit(
                    reservation, idempotency_key=change.idempotency_key
                )
            elif not billable:
                return
            elif gate is not None:
                operation = gate.record_removal(
                    change.customer_id,
                    change.feature,
                    change.count,
                    idempotency_key=change.idempotency_key,
                )
            else:
                operation = QuotaChange.create(
                    change.customer_id,
                    change.feature,
                    "remove",
                    change.count,
                    idempotency_key=change.idempotency_key,
                )
        except Exception:
            logger.exception(
                "commet: could not settle a quota change of request %s", self.request_id
            )
            return
        try:
            commit = self.sink.enqueue(operation)
        except Exception:
            logger.exception("commet: sink refused quota change %s", change.idempotency_key)
            return
        if commit is not None:
            self._note_commit(commit)
        if self.stats is not None:
            self.stats.add("quota_changes_enqueued")

    def _enqueue(self, item: PendingUsage, customer: str) -> bool:
        if item.measure is not None:
            measured = item.measure()
            if measured is None:
                return False  # logged and counted by the measure
            item = item._replace(value=measured[0], properties=measured[1], measure=None)
        try:
            # Feature and value were validated when recorded; the customer is new. Properties
            # only describe the usage: a bad one is cleaned (one WARNING), the event still billed.
            properties = item.properties
            event = UsageEvent(
                customer_id=validate_customer_id(customer.strip()),
                feature=item.feature,
                value=item.value,
                idempotency_key=item.idempotency_key,
                timestamp=item.timestamp,
                properties=() if properties is None else clean_properties(properties, item.feature),
            )
        except ValueError:
            logger.exception("commet: could not build usage event for %r; not billed", item.feature)
            self.count_invalid()
            return False
        return self._hand_over(event)

    def _hand_over(self, event: UsageEvent) -> bool:
        try:
            commit = self.sink.enqueue(event)
        except Exception:
            # The contract says enqueue never raises; if a sink does, the request still succeeds.
            logger.exception("commet: sink refused usage event %s", event.idempotency_key)
            return False
        if commit is not None:
            self._note_commit(commit)
        if self.stats is not None:
            self.stats.add("events_enqueued")
        return True

    def _note_commit(self, commit: PendingCommit) -> None:
        with self._lock:
            if commit not in self.commits:  # operations of one request often share a group
                self.commits = (*self.commits, commit)

    async def committed(self) -> None:
        """Wait on the running loop until what this request enqueued is durable (see
        ``PendingCommit``); at once when nothing is pending."""
        for commit in self.commits:
            await commit

    def wait_committed(self, timeout: float = COMMIT_WAIT_TIMEOUT) -> bool:
        """Like :meth:`committed`, blocking the calling thread at most ``timeout`` seconds per
        commit; False (and a WARNING) if one did not finish in time."""
        for commit in self.commits:
            if not commit.wait(timeout):
                logger.warning(
                    "commet: request %s: the spool write did not finish within %.0fs; "
                    "answering anyway",
                    self.request_id,
                    timeout,
                )
                return False
        return True


_current: ContextVar[RequestContext | None] = ContextVar("commet_request_context", default=None)


def get_current_context() -> RequestContext | None:
    """Return the billing context of the running request or job, or None outside one."""
    return _current.get()


def set_customer(customer_id: str) -> None:
    """Set the customer the current request (or job context) is billed to.

    Call it from auth code anywhere inside the request: a FastAPI dependency, a Flask
    ``before_request``, a sync endpoint in a threadpool. The id is stripped of surrounding
    whitespace, as the customer resolvers read it. Raises ``RuntimeError`` outside a request or
    :func:`commet_context`, and ``ValueError`` for an empty or whitespace-only id, or one that
    cannot name a customer (over 255 characters, control or invisible characters).
    """
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError(
            "set_customer() called outside a Commet request context: install CommetMiddleware "
            "(or CommetWSGIMiddleware), or wrap the job in commet_context()"
        )
    try:
        ctx.customer_id = normalize_customer_id(customer_id)
    except ValueError as error:
        raise ValueError(f"set_customer(): {error}") from None


def current_customer() -> str | None:
    """Return the customer of the current request or job context, or None if unknown."""
    ctx = _current.get()
    return None if ctx is None else ctx.customer()


@contextmanager
def commet_context(
    customer: str | None = None,
    *,
    sink: EventSink | None = None,
    settings: CommetSettings | None = None,
    idempotency_seed: str | None = None,
) -> Iterator[RequestContext]:
    """Run a block of non-web code (a worker job) as one billing context.

    Operations recorded inside (``@metered``, ``track``) are enqueued as soon as the decorated
    function returns, on ``customer`` or whatever ``set_customer`` set. Pass a stable
    ``idempotency_seed`` (e.g. the job id) to make a retried job produce the same keys.
    Without ``sink`` the default delivery queue for ``settings`` (or the environment) is used.
    """
    ctx = RequestContext(
        sink=sink if sink is not None else default_sink(settings),
        settings=settings,
        key_seed=("job\x1f" + idempotency_seed) if idempotency_seed else "",
        customer_id=normalize_customer_id(customer) if customer is not None else None,
        direct=True,
    )
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def default_sink(settings: CommetSettings | None = None) -> EventSink:
    """Return the process-wide started delivery queue for ``settings`` (default: from env)."""
    from commet_middleware._live import redirected  # the testing tools' seam
    from commet_middleware._settings import CommetSettings
    from commet_middleware.delivery import (
        default_queue,  # the delivery pipeline is only needed when used
    )

    queue = default_queue(redirected(settings or CommetSettings.from_env()))
    queue.start()
    return queue
