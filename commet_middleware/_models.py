"""The billable operations this toolkit sends to Commet, fixed when they are created."""

from __future__ import annotations

import logging
import math
import numbers
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Literal, TypeAlias

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
    "UsageValue",
    "clean_properties",
    "customer_id_problem",
    "normalize_customer_id",
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
UsageValue: TypeAlias = "int | float | Decimal | Fraction"
"""A usage value as given: any real number (``numbers.Real`` at run time), never a bool."""


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


def normalize_customer_id(customer_id: object) -> str:
    """Return ``customer_id`` without surrounding whitespace, as the resolvers read ids.

    Raise ``ValueError`` when it is not a string, is empty or only whitespace, or what is left
    cannot name a customer (see :func:`customer_id_problem`).
    """
    if not isinstance(customer_id, str):
        raise ValueError(
            f"customer id must be a str, got {type(customer_id).__name__} {customer_id!r}"
        )
    stripped = customer_id.strip()
    if not stripped:
        raise ValueError(f"customer id is empty or only whitespace: {_shown(customer_id)}")
    return validate_customer_id(stripped)


def validate_usage_value(value: object) -> int | float:
    """Return ``value`` as the int or float sent to Commet, or raise ``ValueError``.

    A usage value is a finite real number >= 0, never a bool. An int or a float is sent as it
    is. Any other real number (``decimal.Decimal``, ``fractions.Fraction``, a numpy scalar:
    a Decimal or any ``numbers.Real``) is converted, because Commet reads JSON numbers as
    doubles and the spool and the folding sums hold ints and floats: a whole Decimal or
    Fraction becomes an int (``Decimal("2.00")`` is sent as ``2``); any other Decimal or
    Fraction becomes the float whose shortest text, what goes on the wire, is exactly its
    value (``Decimal("1.5")`` and ``Fraction(1, 10)`` are sent as ``1.5`` and ``0.1``), and is
    refused when no such float exists (``Fraction(1, 3)``, a Decimal with more digits than a
    double keeps): it is never rounded behind the caller's back. Other real numbers are sent
    as ``float(value)``, like a float.
    """
    kind = type(value)
    if kind is int or kind is float:  # the common case, first
        number: int | float = value  # type: ignore[assignment]
    # Decimal is only a numbers.Number (it refuses to mix with floats), so it is named here.
    elif isinstance(value, bool) or not isinstance(value, (numbers.Real, Decimal)):
        raise ValueError(f"usage value must be a number, got {kind.__name__} {value!r}")
    else:
        number = _plain_number(value)
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"usage value must be finite, got {value!r}")
    if number < 0:
        raise ValueError(f"usage value must be >= 0, got {value!r}")
    return number


def _plain_number(value: numbers.Real | Decimal) -> int | float:
    """``value`` as an int or float of exactly its value (see ``validate_usage_value``)."""
    if isinstance(value, (int, float)):  # subclasses: sent as the plain type
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, Decimal) and not value.is_finite():
        raise ValueError(f"usage value must be finite, got {value!r}")
    try:
        # First, before any int(): float() of a huge Decimal is cheap, int() of it is not.
        approx = float(value)
    except (OverflowError, ValueError):
        approx = math.inf
    if not math.isfinite(approx):
        raise ValueError(f"usage value must be finite and within a double's range, got {value!r}")
    exact: Decimal | Fraction
    if isinstance(value, Decimal):
        exact = value
        if value == value.to_integral_value():
            return int(value)
        sent: Decimal | Fraction = Decimal(repr(approx))
    elif isinstance(value, numbers.Rational):
        exact = Fraction(int(value.numerator), int(value.denominator))
        if exact.denominator == 1:
            return int(exact)
        sent = Fraction(repr(approx))
    else:
        return approx
    if sent != exact:
        raise ValueError(
            f"usage value {value!r} cannot be sent exactly: the nearest number Commet can "
            f"read is {approx!r}; round it first (e.g. to 6 decimal places)"
        )
    return approx


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
        value: UsageValue = 1,
        *,
        idempotency_key: str,
        timestamp: str | None = None,
        properties: dict[str, str] | None = None,
    ) -> UsageEvent:
        """Validate the input and return the event; raise ``ValueError`` on bad input.

        A ``Decimal`` or other real ``value`` is stored as the int or float sent for it (see
        :func:`validate_usage_value`).
        """
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
