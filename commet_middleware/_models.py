"""The billable operations this toolkit sends to Commet, fixed when they are created."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

__all__ = [
    "FEATURE_CODE_PATTERN",
    "Operation",
    "QuotaAction",
    "QuotaChange",
    "UsageEvent",
    "utc_timestamp",
    "validate_customer_id",
    "validate_feature_code",
    "validate_properties",
    "validate_quota_count",
    "validate_usage_value",
]

FEATURE_CODE_PATTERN = re.compile(r"[a-z0-9_]+")
# Commet does not publish a size limit for properties; these keep one event small enough that a
# batch of them never becomes the slow part of delivery, and make an oversize value a clear error.
MAX_PROPERTIES = 50
MAX_PROPERTY_KEY_LENGTH = 40
MAX_PROPERTY_VALUE_LENGTH = 500

QuotaAction = Literal["add", "remove", "set"]


# The formatted date and time of the last second a timestamp was made in: every event made
# within one second shares it (the request path makes one timestamp per usage event).
_stamp_second: tuple[int, str] = (-1, "")
# ".000Z" to ".999Z", looked up rather than formatted on every event.
_MILLISECONDS = tuple(f".{ms:03d}Z" for ms in range(1000))


def utc_timestamp(moment: datetime | None = None) -> str:
    """Return an ISO 8601 UTC timestamp with milliseconds, as Commet writes them.

    ``2026-11-22T10:15:30.123Z``; without ``moment``, the current time.
    """
    global _stamp_second
    if moment is not None:
        text = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
        return text.replace("+00:00", "Z")
    now = time.time()
    second = int(now)
    cached, prefix = _stamp_second
    if cached != second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp_second = (second, prefix)
    # min(): a fraction just under 1 can round up to 1000.0 once multiplied.
    return prefix + _MILLISECONDS[min(int((now - second) * 1000), 999)]


def validate_feature_code(feature: object) -> str:
    """Return ``feature`` if it is a valid Commet feature code, else raise ``ValueError``."""
    if not isinstance(feature, str) or not FEATURE_CODE_PATTERN.fullmatch(feature):
        raise ValueError(
            f"invalid feature code {feature!r}: use only lowercase letters, digits and "
            "underscores (a-z, 0-9, _), e.g. 'api_calls'"
        )
    return feature


def validate_customer_id(customer_id: object) -> str:
    """Return ``customer_id`` if it is a non-empty string, else raise ``ValueError``."""
    if not isinstance(customer_id, str) or not customer_id.strip():
        raise ValueError(f"customer id must be a non-empty string, got {customer_id!r}")
    return customer_id


def validate_usage_value(value: object) -> int | float:
    """Return ``value`` if it is a finite number >= 0 (not a bool), else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"usage value must be a number, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"usage value must be finite, got {value!r}")
    if value < 0:
        raise ValueError(f"usage value must be >= 0, got {value!r}")
    return value


def validate_quota_count(count: object) -> int:
    """Return ``count`` if it is a whole number >= 0 (not a bool), else raise ``ValueError``."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(
            f"quota count must be a whole number, got {type(count).__name__} {count!r}"
        )
    if count < 0:
        raise ValueError(f"quota count must be >= 0, got {count!r}")
    return count


def validate_properties(properties: object) -> tuple[tuple[str, str], ...]:
    """Return ``properties`` as sorted (key, value) string pairs, or raise ``ValueError``."""
    if properties is None:
        return ()
    if not isinstance(properties, dict):
        raise ValueError(
            f"properties must be a dict of str to str, got {type(properties).__name__}"
        )
    if len(properties) > MAX_PROPERTIES:
        raise ValueError(f"at most {MAX_PROPERTIES} properties, got {len(properties)}")
    pairs = []
    for key, value in properties.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"property {key!r}: keys and values must be strings, got {value!r}")
        if not key or len(key) > MAX_PROPERTY_KEY_LENGTH:
            raise ValueError(f"property key {key!r}: 1 to {MAX_PROPERTY_KEY_LENGTH} characters")
        if len(value) > MAX_PROPERTY_VALUE_LENGTH:
            raise ValueError(
                f"property {key!r}: value longer than {MAX_PROPERTY_VALUE_LENGTH} characters"
            )
        pairs.append((key, value))
    return tuple(sorted(pairs))


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One usage event. Every field is fixed at creation, so every retry sends the same bytes.

    Build it with :meth:`create`, which validates; the plain constructor trusts its input.
    """

    customer_id: str
    feature: str
    value: int | float
    idempotency_key: str
    timestamp: str
    properties: tuple[tuple[str, str], ...] = ()
    kind: Literal["usage"] = field(default="usage", init=False)

    @classmethod
    def create(
        cls,
        customer_id: str,
        feature: str,
        value: int | float = 1,
        *,
        idempotency_key: str,
        timestamp: str | None = None,
        properties: dict[str, str] | None = None,
    ) -> UsageEvent:
        """Validate the input and return the event; raise ``ValueError`` on bad input."""
        if not idempotency_key:
            raise ValueError("an idempotency key is required: it is what makes a retry safe")
        return cls(
            customer_id=validate_customer_id(customer_id),
            feature=validate_feature_code(feature),
            value=validate_usage_value(value),
            idempotency_key=idempotency_key,
            timestamp=timestamp or utc_timestamp(),
            properties=validate_properties(properties),
        )


@dataclass(frozen=True, slots=True)
class QuotaChange:
    """One change to a customer's quota balance (add, remove or set), fixed at creation."""

    customer_id: str
    feature: str
    action: QuotaAction
    count: int
    idempotency_key: str
    kind: Literal["quota"] = field(default="quota", init=False)

    @classmethod
    def create(
        cls,
        customer_id: str,
        feature: str,
        action: QuotaAction,
        count: int = 1,
        *,
        idempotency_key: str,
    ) -> QuotaChange:
        """Validate the input and return the change; raise ``ValueError`` on bad input."""
        if action not in ("add", "remove", "set"):
            raise ValueError(f"quota action must be add, remove or set, got {action!r}")
        if not idempotency_key:
            raise ValueError("an idempotency key is required: it is what makes a retry safe")
        return cls(
            customer_id=validate_customer_id(customer_id),
            feature=validate_feature_code(feature),
            action=action,
            count=validate_quota_count(count),
            idempotency_key=idempotency_key,
        )


Operation = UsageEvent | QuotaChange
