"""The emulator's state: catalogue, usage events, quota balances and idempotency records."""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from commet_middleware._models import utc_timestamp

__all__ = [
    "IDEMPOTENCY_TTL_SECONDS",
    "RECENT_CHANGES",
    "ApiProblem",
    "Customer",
    "Dialect",
    "Feature",
    "Ledger",
    "LedgerChange",
    "LedgerSnapshot",
    "QuotaAllowance",
    "RecordedEvent",
    "RecordedQuotaEvent",
    "RecordedRequest",
    "StoredReply",
]

Dialect = Literal["v1", "legacy"]
QuotaAction = Literal["add", "remove", "set"]
IDEMPOTENCY_TTL_SECONDS = 24 * 60 * 60
# How many changes a snapshot carries, so a page opened late still shows recent traffic.
RECENT_CHANGES = 500
_log = logging.getLogger("commet_middleware.testing")


def new_id(prefix: str) -> str:
    """Return a random Commet-looking id such as ``evt_3f9a...``."""
    return f"{prefix}_{secrets.token_hex(12)}"


class ApiProblem(Exception):
    """An error answer: raised anywhere in request handling, rendered as Commet's error body."""

    def __init__(
        self,
        status: int,
        type: str,
        code: str,
        message: str,
        *,
        param: str | None = None,
        details: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        self.param = param
        self.details = details
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """Return the wire error body ``{"error": {...}}``."""
        return {
            "error": {
                "type": self.type,
                "code": self.code,
                "message": self.message,
                "param": self.param,
                "details": self.details,
                "doc_url": f"https://commet.co/docs/errors#{self.code}",
            }
        }


@dataclass(frozen=True)
class Feature:
    """A catalogue feature."""

    code: str
    quota: bool
    included: int
    unlimited: bool
    overage: bool


@dataclass(frozen=True)
class Customer:
    """A catalogue customer; ``plan`` None means subscribed to every feature."""

    customer_id: str
    commet_id: str
    plan: frozenset[str] | None
    subscribed: bool


@dataclass(frozen=True)
class RecordedEvent:
    """A usage event the emulator recorded (one per accepted ``POST .../usage/events``)."""

    id: str
    customer_id: str
    feature: str
    value: int | float
    idempotency_key: str | None
    timestamp: str
    properties: dict[str, str]
    dialect: Dialect
    created_at: str

    def to_wire(self) -> dict[str, Any]:
        """Return the UsageEvent body, with properties in this event's dialect shape."""
        properties: Any
        if self.dialect == "v1":
            properties = [{"property": k, "value": v} for k, v in self.properties.items()]
        else:
            properties = dict(self.properties)
        return {
            "id": self.id,
            "featureCode": self.feature,
            "value": self.value,
            "customerId": self.customer_id,
            "eventId": self.idempotency_key,
            "ts": self.timestamp,
            "createdAt": self.created_at,
            "properties": properties,
            "object": "usage_event",
            "livemode": False,
        }


@dataclass(frozen=True)
class RecordedQuotaEvent:
    """A committed quota change (add, remove or set)."""

    id: str
    customer_id: str
    feature: str
    action: QuotaAction
    count: int
    previous_balance: int
    new_balance: int
    dialect: Dialect
    timestamp: str

    def to_wire(self) -> dict[str, Any]:
        """Return the UsageQuotaEvent body."""
        return {
            "id": self.id,
            "customerId": self.customer_id,
            "featureCode": self.feature,
            "previousBalance": self.previous_balance,
            "newBalance": self.new_balance,
            "ts": self.timestamp,
            "createdAt": self.timestamp,
            "object": "usage_quota_event",
            "livemode": False,
        }


@dataclass(frozen=True)
class QuotaAllowance:
    """A customer's allowance for one quota feature: the UsageQuota fields in snake_case."""

    feature_code: str
    current: int
    included: int
    remaining: int | None
    billed_quantity: int
    unlimited: bool
    overage_enabled: bool
    as_of: str

    def to_wire(self) -> dict[str, Any]:
        """Return the UsageQuota body."""
        return {
            "featureCode": self.feature_code,
            "current": self.current,
            "included": self.included,
            "remaining": self.remaining,
            "billedQuantity": self.billed_quantity,
            "unlimited": self.unlimited,
            "overageEnabled": self.overage_enabled,
            "asOf": self.as_of,
            "object": "usage_quota",
            "livemode": False,
        }


@dataclass(frozen=True)
class RecordedRequest:
    """One request the emulator received; ``status`` is None when the connection was dropped."""

    method: str
    path: str
    status: int | None
    request_id: str
    dialect: Dialect | None
    replayed: bool = False
    fault: str | None = None


@dataclass(frozen=True)
class StoredReply:
    """An answer kept for an ``Idempotency-Key`` replay."""

    status: int
    body: bytes


@dataclass(frozen=True)
class LedgerChange:
    """One change to the ledger, numbered in commit order, as subscribers are told of it.

    ``kind`` is ``usage``, ``quota``, ``request`` or ``reset`` (``item`` None).
    """

    seq: int
    kind: Literal["usage", "quota", "request", "reset"]
    item: RecordedEvent | RecordedQuotaEvent | RecordedRequest | None
    at: str


@dataclass(frozen=True)
class LedgerSnapshot:
    """A consistent copy of the ledger's state for the dashboard, taken under one lock."""

    seq: int
    features: list[Feature]
    customers: list[Customer]
    totals: dict[tuple[str, str], int | float]
    allowances: dict[tuple[str, str], QuotaAllowance]
    changes: list[LedgerChange]


@dataclass
class _IdempotencyRecord:
    fingerprint: tuple[str, str, bytes]
    expires: float
    reply: StoredReply | None = None


@dataclass
class _Balance:
    current: int = 0
    high_water: int = 0


@dataclass
class _State:
    events: list[RecordedEvent] = field(default_factory=list)
    event_keys: set[tuple[str, str]] = field(default_factory=set)
    totals: dict[tuple[str, str], int | float] = field(default_factory=dict)
    balances: dict[tuple[str, str], _Balance] = field(default_factory=dict)
    quota_events: list[RecordedQuotaEvent] = field(default_factory=list)
    idempotency: dict[tuple[str, str], _IdempotencyRecord] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)


def _not_found(code: str, message: str, param: str) -> ApiProblem:
    return ApiProblem(404, "not_found_error", code, message, param=param)


def _billing(code: str, message: str, param: str) -> ApiProblem:
    return ApiProblem(400, "billing_error", code, message, param=param)


def _wrong_kind(message: str, param: str) -> ApiProblem:
    return ApiProblem(
        400,
        "validation_error",
        "validation_error",
        message,
        param=param,
        details=[{"field": param, "message": message}],
    )


class Ledger:
    """Every piece of emulator state behind one lock, so no concurrent write is ever lost."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._features: dict[str, Feature] = {}
        self._customers: dict[str, Customer] = {}
        self._aliases: dict[str, str] = {}
        self._state = _State()
        # Idempotency records expire on this clock; tests may swap it to skip 24 hours.
        self.clock: Callable[[], float] = time.monotonic
        self._seq = 0
        self._subscribers: list[Callable[[LedgerChange], None]] = []
        self._recent: deque[LedgerChange] = deque(maxlen=RECENT_CHANGES)

    # change notification (the dashboard's live feed)

    def subscribe(self, callback: Callable[[LedgerChange], None]) -> Callable[[], None]:
        """Call ``callback`` with every later change; return the function that unsubscribes.

        Callbacks run in the writing thread, under the ledger lock, in ``seq`` order: they must
        only hand the change on (to a queue or another thread's loop), never block or write.
        """
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def _publish(
        self,
        kind: Literal["usage", "quota", "request", "reset"],
        item: RecordedEvent | RecordedQuotaEvent | RecordedRequest | None,
    ) -> None:
        # Called with the lock held, so sequence numbers follow commit order.
        self._seq += 1
        change = LedgerChange(self._seq, kind, item, utc_timestamp())
        if kind == "reset":
            self._recent.clear()
        self._recent.append(change)
        for callback in list(self._subscribers):
            try:
                callback(change)
            except Exception:
                # A broken subscriber (say, a closed event loop) must never fail an API write.
                _log.exception("ledger subscriber failed; unsubscribing it")
                with contextlib.suppress(ValueError):
                    self._subscribers.remove(callback)

    def snapshot(self) -> LedgerSnapshot:
        """Return the catalogue, totals, balances and the most recent changes."""
        with self._lock:
            allowances = {
                (customer.customer_id, feature.code): self._allowance(customer, feature)
                for customer in self._customers.values()
                for feature in self._features.values()
                if feature.quota and (customer.plan is None or feature.code in customer.plan)
            }
            return LedgerSnapshot(
                seq=self._seq,
                features=list(self._features.values()),
                customers=list(self._customers.values()),
                totals=dict(self._state.totals),
                allowances=allowances,
                changes=list(self._recent),
            )

    # catalogue

    def add_feature(self, feature: Feature) -> None:
        """Add or replace a feature."""
        with self._lock:
            self._features[feature.code] = feature

    def add_customer(self, customer: Customer) -> None:
        """Add or replace a customer; it can be named by its own id or its ``cus_`` id."""
        with self._lock:
            self._customers[customer.customer_id] = customer
            self._aliases[customer.commet_id] = customer.customer_id

    def customer(self, ref: str) -> Customer | None:
        """Return the customer named ``ref`` (own id or ``cus_`` id), if any."""
        with self._lock:
            key = ref if ref in self._customers else self._aliases.get(ref, ref)
            return self._customers.get(key)

    def reset(self) -> None:
        """Forget events, balances, idempotency records and the request log; keep the catalogue."""
        with self._lock:
            self._state = _State()
            self._publish("reset", None)

    # lookups shared by usage and quota

    def _subscription(self, ref: str, code: str, *, quota: bool, param: str) -> Customer:
        customer = self.customer(ref)
        if customer is None:
            raise _not_found("customer_not_found", f"No customer {ref!r}.", "customerId")
        feature = self._features.get(code)
        if feature is None:
            raise _not_found("feature_not_found", f"No feature {code!r}.", param)
        if not customer.subscribed:
            raise _not_found(
                "no_active_subscription",
                f"Customer {ref!r} has no active subscription.",
                "customerId",
            )
        if customer.plan is not None and code not in customer.plan:
            raise _billing(
                "feature_not_in_plan", f"Feature {code!r} is not in the customer's plan.", param
            )
        if quota and not feature.quota:
            raise _wrong_kind(
                f"Feature {code!r} is metered: send usage events, not quota changes.", param
            )
        if not quota and feature.quota:
            raise _wrong_kind(
                f"Feature {code!r} is a quota feature: use the quota endpoints.", param
            )
        return customer

    # usage

    def record_usage(
        self,
        ref: str,
        code: str,
        value: int | float,
        *,
        event_id: str | None,
        timestamp: str | None,
        properties: dict[str, str],
        dialect: Dialect,
        param: str,
    ) -> RecordedEvent:
        """Record one usage event, or raise the ApiProblem Commet would answer."""
        with self._lock:
            customer = self._subscription(ref, code, quota=False, param=param)
            cid = customer.customer_id
            if event_id is not None:
                if (cid, event_id) in self._state.event_keys:
                    key_name = "eventId" if dialect == "v1" else "idempotencyKey"
                    raise ApiProblem(
                        409,
                        "conflict_error",
                        "duplicate",
                        f"An event with {key_name} {event_id!r} was already recorded "
                        "for this customer.",
                        param=key_name,
                    )
                self._state.event_keys.add((cid, event_id))
            now = utc_timestamp()
            event = RecordedEvent(
                id=new_id("evt"),
                customer_id=cid,
                feature=code,
                value=value,
                idempotency_key=event_id,
                timestamp=timestamp or now,
                properties=properties,
                dialect=dialect,
                created_at=now,
            )
            self._state.events.append(event)
            key = (cid, code)
            self._state.totals[key] = self._state.totals.get(key, 0) + value
            self._publish("usage", event)
            return event

    def events(self, customer_id: str | None, feature: str | None) -> list[RecordedEvent]:
        """Return recorded events in arrival order, optionally filtered."""
        with self._lock:
            return [
                e
                for e in self._state.events
                if (customer_id is None or e.customer_id == customer_id)
                and (feature is None or e.feature == feature)
            ]

    def usage_total(self, customer_id: str, feature: str) -> int | float:
        """Return the sum of recorded values for one customer and feature."""
        with self._lock:
            return self._state.totals.get((customer_id, feature), 0)

    # quota

    def _allowance(self, customer: Customer, feature: Feature) -> QuotaAllowance:
        balance = self._state.balances.get((customer.customer_id, feature.code), _Balance())
        if feature.unlimited:
            remaining: int | None = None
            billed = 0
        else:
            remaining = max(feature.included - balance.current, 0)
            billed = max(balance.high_water - feature.included, 0)
        return QuotaAllowance(
            feature_code=feature.code,
            current=balance.current,
            included=feature.included,
            remaining=remaining,
            billed_quantity=billed,
            unlimited=feature.unlimited,
            overage_enabled=feature.overage,
            as_of=utc_timestamp(),
        )

    def allowance(self, ref: str, code: str) -> QuotaAllowance:
        """Return one allowance, or raise the ApiProblem Commet would answer."""
        with self._lock:
            customer = self._subscription(ref, code, quota=True, param="featureCode")
            return self._allowance(customer, self._features[code])

    def allowances(self, ref: str) -> list[QuotaAllowance]:
        """Return an allowance for every quota feature of the customer's plan."""
        with self._lock:
            customer = self.customer(ref)
            if customer is None:
                raise _not_found("customer_not_found", f"No customer {ref!r}.", "customerId")
            if not customer.subscribed:
                raise _not_found(
                    "no_active_subscription",
                    f"Customer {ref!r} has no active subscription.",
                    "customerId",
                )
            return [
                self._allowance(customer, feature)
                for feature in self._features.values()
                if feature.quota and (customer.plan is None or feature.code in customer.plan)
            ]

    def change_quota(
        self, ref: str, code: str, action: QuotaAction, count: int, *, dialect: Dialect
    ) -> RecordedQuotaEvent:
        """Apply add, remove or set to a balance, or raise the ApiProblem Commet would answer."""
        with self._lock:
            customer = self._subscription(ref, code, quota=True, param="featureCode")
            feature = self._features[code]
            key = (customer.customer_id, code)
            balance = self._state.balances.setdefault(key, _Balance())
            previous = balance.current
            if action == "add":
                new = previous + count
            elif action == "remove":
                new = previous - count
            else:
                new = count
            if new < 0:
                raise _billing(
                    "insufficient_balance",
                    f"Cannot remove {count} from a balance of {previous}.",
                    "count",
                )
            limited = not feature.unlimited and not feature.overage
            if limited and new > feature.included and new > previous:
                raise _billing(
                    "included_limit_reached",
                    f"{code!r} allows {feature.included} without overage; "
                    f"the balance would be {new}.",
                    "count",
                )
            balance.current = new
            balance.high_water = max(balance.high_water, new)
            event = RecordedQuotaEvent(
                id=new_id("uqe"),
                customer_id=customer.customer_id,
                feature=code,
                action=action,
                count=count,
                previous_balance=previous,
                new_balance=new,
                dialect=dialect,
                timestamp=utc_timestamp(),
            )
            self._state.quota_events.append(event)
            self._publish("quota", event)
            return event

    def quota(self, customer_id: str, feature: str) -> QuotaAllowance:
        """Return an allowance without the API's plan checks (for test assertions)."""
        with self._lock:
            customer = self.customer(customer_id)
            spec = self._features.get(feature)
            if customer is None or spec is None or not spec.quota:
                raise KeyError((customer_id, feature))
            return self._allowance(customer, spec)

    def quota_events(
        self, customer_id: str | None, feature: str | None
    ) -> list[RecordedQuotaEvent]:
        """Return committed quota changes in order, optionally filtered."""
        with self._lock:
            return [
                e
                for e in self._state.quota_events
                if (customer_id is None or e.customer_id == customer_id)
                and (feature is None or e.feature == feature)
            ]

    def start_new_period(self) -> None:
        """Begin a billing period: each high-water mark drops to the current balance."""
        with self._lock:
            for balance in self._state.balances.values():
                balance.high_water = balance.current

    # idempotency (Idempotency-Key header)

    def begin_idempotent(
        self, key: tuple[str, str], fingerprint: tuple[str, str, bytes]
    ) -> StoredReply | None:
        """Reserve ``key`` (None), return the stored answer to replay, or raise a conflict."""
        with self._lock:
            now = self.clock()
            record = self._state.idempotency.get(key)
            if record is not None and record.expires <= now:
                record = None
            if record is None:
                self._state.idempotency[key] = _IdempotencyRecord(
                    fingerprint, now + IDEMPOTENCY_TTL_SECONDS
                )
                return None
            if record.fingerprint != fingerprint:
                raise ApiProblem(
                    409,
                    "conflict_error",
                    "idempotency_key_mismatch",
                    "This Idempotency-Key was used with another request body.",
                    param="Idempotency-Key",
                )
            if record.reply is None:
                raise ApiProblem(
                    409,
                    "conflict_error",
                    "idempotency_in_progress",
                    "A request with this Idempotency-Key is still being processed.",
                    param="Idempotency-Key",
                )
            return record.reply

    def finish_idempotent(self, key: tuple[str, str], reply: StoredReply | None) -> None:
        """Store the answer for ``key``, or (None) release the reservation."""
        with self._lock:
            if reply is None:
                self._state.idempotency.pop(key, None)
            elif key in self._state.idempotency:
                self._state.idempotency[key].reply = reply

    # request log

    def log_request(self, request: RecordedRequest) -> None:
        """Append one request to the log."""
        with self._lock:
            self._state.requests.append(request)
            self._publish("request", request)

    def requests(self) -> list[RecordedRequest]:
        """Return a snapshot of the request log."""
        with self._lock:
            return list(self._state.requests)
