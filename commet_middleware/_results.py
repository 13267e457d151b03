"""What Commet answers, as typed, immutable results built from its JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["QuotaAllowance", "QuotaChangeResult", "TrackResult"]


def _str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else str(value)


def _number(data: Mapping[str, Any], key: str, default: int | float | None = 0) -> Any:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return value


def _properties(raw: object) -> tuple[tuple[str, str], ...]:
    # v1 answers a list of {"property", "value"}; legacy an object. Both become sorted pairs.
    pairs: list[tuple[str, str]] = []
    if isinstance(raw, Mapping):
        pairs = [(str(k), str(v)) for k, v in raw.items()]
    elif isinstance(raw, list):
        for item in raw:
            if isinstance(item, Mapping) and "property" in item:
                pairs.append((str(item["property"]), str(item.get("value", ""))))
    return tuple(sorted(pairs))


@dataclass(frozen=True, slots=True)
class TrackResult:
    """A recorded usage event (Commet's UsageEvent), or the news that it already was.

    ``duplicate`` is set when Commet answered 409 ``duplicate`` (the event was recorded
    before) and ``replayed`` when it replayed a stored answer for the same Idempotency-Key.
    Both mean the event is billed exactly once.
    """

    id: str | None = None
    feature_code: str | None = None
    value: int | float | None = None
    customer_id: str | None = None
    event_id: str | None = None
    ts: str | None = None
    created_at: str | None = None
    properties: tuple[tuple[str, str], ...] = ()
    duplicate: bool = False
    replayed: bool = False
    request_id: str | None = None

    @classmethod
    def from_json(
        cls,
        data: Mapping[str, Any],
        *,
        duplicate: bool = False,
        replayed: bool = False,
        request_id: str | None = None,
    ) -> TrackResult:
        """Build the result from a UsageEvent object (v1 or legacy keys); missing keys are None."""
        return cls(
            id=_str(data, "id"),
            feature_code=_str(data, "featureCode") or _str(data, "feature"),
            value=_number(data, "value", None),
            customer_id=_str(data, "customerId"),
            event_id=_str(data, "eventId") or _str(data, "idempotencyKey"),
            ts=_str(data, "ts") or _str(data, "timestamp"),
            created_at=_str(data, "createdAt"),
            properties=_properties(data.get("properties")),
            duplicate=duplicate,
            replayed=replayed,
            request_id=request_id,
        )


@dataclass(frozen=True, slots=True)
class QuotaAllowance:
    """A customer's allowance for one quota feature (Commet's UsageQuota).

    ``remaining`` is None when the feature is unlimited.
    """

    feature_code: str
    current: int | float = 0
    included: int | float = 0
    remaining: int | float | None = None
    billed_quantity: int | float = 0
    unlimited: bool = False
    overage_enabled: bool = False
    as_of: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QuotaAllowance:
        """Build the allowance from a UsageQuota object; missing numbers are 0."""
        unlimited = data.get("unlimited") is True
        return cls(
            feature_code=_str(data, "featureCode") or "",
            current=_number(data, "current"),
            included=_number(data, "included"),
            remaining=None if unlimited else _number(data, "remaining", None),
            billed_quantity=_number(data, "billedQuantity"),
            unlimited=unlimited,
            overage_enabled=data.get("overageEnabled") is True,
            as_of=_str(data, "asOf"),
        )


@dataclass(frozen=True, slots=True)
class QuotaChangeResult:
    """The outcome of a quota add, remove or set (Commet's UsageQuotaEvent)."""

    id: str | None = None
    customer_id: str | None = None
    feature_code: str | None = None
    previous_balance: int | float | None = None
    new_balance: int | float | None = None
    ts: str | None = None
    created_at: str | None = None
    replayed: bool = False
    request_id: str | None = None

    @classmethod
    def from_json(
        cls,
        data: Mapping[str, Any],
        *,
        replayed: bool = False,
        request_id: str | None = None,
    ) -> QuotaChangeResult:
        """Build the result from a UsageQuotaEvent object; missing keys are None."""
        return cls(
            id=_str(data, "id"),
            customer_id=_str(data, "customerId"),
            feature_code=_str(data, "featureCode"),
            previous_balance=_number(data, "previousBalance", None),
            new_balance=_number(data, "newBalance", None),
            ts=_str(data, "ts"),
            created_at=_str(data, "createdAt"),
            replayed=replayed,
            request_id=request_id,
        )
