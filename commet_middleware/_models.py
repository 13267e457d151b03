"""The billable operations this toolkit sends to Commet, fixed when they are created."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

__all__ = [
    "FEATURE_CODE_PATTERN",
    "MAX_CUSTOMER_ID_LENGTH",
    "MAX_FEATURE_CODE_LENGTH",
    "MAX_PROPERTIES",
    "MAX_PROPERTY_KEY_LENGTH",
    "MAX_PROPERTY_VALUE_LENGTH",
    "MAX_USAGE_VALUE",
    "Operation",
    "QuotaAction",
    "QuotaChange",
    "UsageEvent",
    "clean_properties",
    "customer_id_problem",
    "utc_timestamp",
    "validate_customer_id",
    "validate_feature_code",
    "validate_properties",
    "validate_quota_count",
    "validate_recorded_value",
    "validate_usage_value",
]

_logger = logging.getLogger("commet_middleware")

FEATURE_CODE_PATTERN = re.compile(r"[a-z0-9_]+")
# Bounds at the edge (SECURITY.md). Commet publishes none for these; ours make oversize or
# hostile input a clear error where it enters, instead of bytes sent to Commet and logs.
# A customer id is an id: 255 printable characters hold a cus_ id, an email or a UUID.
MAX_CUSTOMER_ID_LENGTH = 255
MAX_FEATURE_CODE_LENGTH = 64
# One event's value: whole numbers up to 2**53 are exact as JSON numbers read into doubles (as a
# JavaScript server reads them); 10**15 stays well inside, and is more than any real meter.
MAX_USAGE_VALUE = 10**15
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


def _shown(text: str) -> str:
    # Errors and logs quote at most this much of an input, escaped: a hostile value can neither
    # flood a log nor forge a line of it.
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


def validate_feature_code(feature: object) -> str:
    """Return ``feature`` if it is a valid Commet feature code, else raise ``ValueError``."""
    if not isinstance(feature, str) or not FEATURE_CODE_PATTERN.fullmatch(feature):
        shown = _shown(feature) if isinstance(feature, str) else repr(feature)
        raise ValueError(
            f"invalid feature code {shown}: use only lowercase letters, digits and "
            "underscores (a-z, 0-9, _), e.g. 'api_calls'"
        )
    if len(feature) > MAX_FEATURE_CODE_LENGTH:
        raise ValueError(
            f"invalid feature code {_shown(feature)}: at most {MAX_FEATURE_CODE_LENGTH} "
            f"characters, got {len(feature)}"
        )
    return feature


def customer_id_problem(customer_id: str) -> str | None:
    """Return why ``customer_id`` cannot name a customer, or None if it can.

    A customer id is 1 to ``MAX_CUSTOMER_ID_LENGTH`` printable characters: no control
    characters (a newline would forge log lines), no invisible or direction-changing ones (they
    make two ids look alike), no blank id.
    """
    if not customer_id.strip():
        return "customer id must be a non-empty string"
    if len(customer_id) > MAX_CUSTOMER_ID_LENGTH:
        return (
            f"customer id must be at most {MAX_CUSTOMER_ID_LENGTH} characters, got "
            f"{len(customer_id)}: {_shown(customer_id)}"
        )
    if not customer_id.isprintable():
        bad = next(c for c in customer_id if not c.isprintable())
        return (
            f"customer id must not contain control or invisible characters, found "
            f"U+{ord(bad):04X} in {_shown(customer_id)}"
        )
    return None


def validate_customer_id(customer_id: object) -> str:
    """Return ``customer_id`` if it can name a customer, else raise ``ValueError``.

    See :func:`customer_id_problem` for the rule.
    """
    if not isinstance(customer_id, str):
        raise ValueError(f"customer id must be a non-empty string, got {customer_id!r}")
    problem = customer_id_problem(customer_id)
    if problem is not None:
        raise ValueError(problem)
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


def validate_recorded_value(value: object) -> int | float:
    """Return ``value`` if it may be recorded as one event's usage, else raise ``ValueError``.

    What :func:`validate_usage_value` checks, and at most ``MAX_USAGE_VALUE``. Only values
    entering the toolkit are bounded: an aggregate of many events may sum past it and is sent.
    """
    checked = validate_usage_value(value)
    if checked > MAX_USAGE_VALUE:
        raise ValueError(f"usage value must be at most {MAX_USAGE_VALUE:.0e}, got {value!r}")
    return checked


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
    """Return ``properties`` as sorted (key, value) string pairs, or raise ``ValueError``.

    For callers that can correct their input (an event built directly, a constant given to a
    decorator). On the request path :func:`clean_properties` keeps the event instead.
    """
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
            raise ValueError(
                f"property {key!r}: keys and values must be strings, got {type(value).__name__}"
            )
        if not key or len(key) > MAX_PROPERTY_KEY_LENGTH:
            raise ValueError(f"property key {key!r}: 1 to {MAX_PROPERTY_KEY_LENGTH} characters")
        if len(value) > MAX_PROPERTY_VALUE_LENGTH:
            raise ValueError(
                f"property {key!r}: value longer than {MAX_PROPERTY_VALUE_LENGTH} characters"
            )
        pairs.append((key, value))
    return tuple(sorted(pairs))


def clean_properties(properties: object, feature: str) -> tuple[tuple[str, str], ...]:
    """Return the valid ``properties`` as sorted pairs, dropping or cutting the rest.

    Used where usage is recorded and nobody can correct the input any more: properties only
    describe an event, so a bad one must never cost the event. A key or value that is not a
    string, an empty or over-long key, and properties past the first ``MAX_PROPERTIES`` (in key
    order) are dropped; an over-long value is cut to ``MAX_PROPERTY_VALUE_LENGTH``. Anything
    changed is told in one WARNING for the event.
    """
    if properties is None:
        return ()
    if not isinstance(properties, Mapping):
        _logger.warning(
            "commet: properties of %r must be a mapping of str to str, got %s; the usage is "
            "billed without them",
            feature,
            type(properties).__name__,
        )
        return ()
    kept: list[tuple[str, str]] = []
    problems: list[str] = []
    for key, value in properties.items():
        if not isinstance(key, str) or not isinstance(value, str):
            problems.append(f"{_shown(str(key))} dropped (not a str to str)")
        elif not key or len(key) > MAX_PROPERTY_KEY_LENGTH:
            problems.append(
                f"{_shown(key)} dropped (keys are 1 to {MAX_PROPERTY_KEY_LENGTH} characters)"
            )
        elif len(value) > MAX_PROPERTY_VALUE_LENGTH:
            problems.append(f"{_shown(key)} cut to {MAX_PROPERTY_VALUE_LENGTH} characters")
            kept.append((key, value[:MAX_PROPERTY_VALUE_LENGTH]))
        else:
            kept.append((key, value))
    kept.sort()
    if len(kept) > MAX_PROPERTIES:
        problems.append(f"{len(kept) - MAX_PROPERTIES} past the first {MAX_PROPERTIES} dropped")
        del kept[MAX_PROPERTIES:]
    if problems:
        _logger.warning(
            "commet: properties of %r: %s; the usage is billed all the same",
            feature,
            "; ".join(problems),
        )
    return tuple(kept)


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
            value=validate_recorded_value(value),
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
