"""Commet's wire format, both dialects, without I/O: operations to requests, responses to results.

Nothing here opens a socket, so the sync client, the async client and the delivery pipeline
share one exact idea of what goes on the wire. Bodies are compact JSON with keys in a fixed
order: one operation always encodes to the same bytes, which is what lets an
``Idempotency-Key`` replay (and the pipeline's byte-for-byte re-sends) be recognised.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from ._errors import CommetAPIError
from ._models import Operation, UsageEvent
from ._results import QuotaAllowance, QuotaChangeResult, TrackResult
from ._retry import classify_answer, is_retryable
from ._settings import CommetSettings, Dialect

__all__ = [
    "WireRequest",
    "base_headers",
    "build_get_all_quotas",
    "build_get_quota",
    "build_request",
    "encode_body",
    "is_deprecated",
    "parse_all_quotas",
    "parse_error",
    "parse_operation",
    "parse_quota",
    "parse_quota_change",
    "parse_track",
    "request_idempotency_key",
    "route",
]

_V1_PATHS = {
    "track": "/api/v1/usage/events",
    "add": "/api/v1/usage/quota",
    "remove": "/api/v1/usage/quota/remove",
    "set": "/api/v1/usage/quota",
    "quota": "/api/v1/usage/quota",
    "all": "/api/v1/usage/quota/all",
}
_LEGACY_PATHS = {
    "track": "/api/usage/events",
    "add": "/api/usage/quota",
    "remove": "/api/usage/quota",
    "set": "/api/usage/quota",
    "quota": "/api/usage/quota",
    "all": "/api/usage/quota/all",
}
_V1_METHODS = {"add": "POST", "remove": "POST", "set": "PUT"}
_LEGACY_METHODS = {"add": "POST", "remove": "DELETE", "set": "PUT"}


@dataclass(frozen=True, slots=True)
class WireRequest:
    """One HTTP request to Commet, relative to the base URL. ``repr`` hides the headers."""

    method: str
    path: str
    params: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None

    def __repr__(self) -> str:
        # The headers hold the API key; a repr must never show it.
        return f"WireRequest(method={self.method!r}, path={self.path!r}, params={self.params!r})"


def _dumps(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _paths(dialect: Dialect) -> dict[str, str]:
    return _V1_PATHS if dialect == "v1" else _LEGACY_PATHS


def encode_body(operation: Operation, dialect: Dialect = "v1") -> bytes:
    """Return the request body of ``operation`` in ``dialect``: the same bytes every time."""
    payload: dict[str, Any]
    if isinstance(operation, UsageEvent):
        if dialect == "v1":
            payload = {
                "featureCode": operation.feature,
                "customerId": operation.customer_id,
                "value": operation.value,
                "eventId": operation.idempotency_key,
                "timestamp": operation.timestamp,
            }
            if operation.properties:
                payload["properties"] = [
                    {"property": key, "value": value} for key, value in operation.properties
                ]
        else:
            payload = {
                "feature": operation.feature,
                "customerId": operation.customer_id,
                "value": operation.value,
                "idempotencyKey": operation.idempotency_key,
                "timestamp": operation.timestamp,
            }
            if operation.properties:
                payload["properties"] = dict(operation.properties)
    elif dialect == "v1":
        payload = {
            "featureCode": operation.feature,
            "count": operation.count,
            "customerId": operation.customer_id,
        }
    else:
        payload = {
            "customerId": operation.customer_id,
            "featureCode": operation.feature,
            "count": operation.count,
        }
    return _dumps(payload)


def base_headers(settings: CommetSettings, *, has_body: bool) -> tuple[tuple[str, str], ...]:
    """Return the headers every request of ``settings`` carries, without the per-request
    ``Idempotency-Key`` (the async client builds them into its request heads once)."""
    return _headers(settings, has_body=has_body)


def _headers(
    settings: CommetSettings, *, idempotency_key: str | None = None, has_body: bool = False
) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = [("Accept", "application/json")]
    if settings.dialect == "v1":
        headers.append(("Commet-Version", settings.api_version))
    headers.append(("x-api-key", settings.api_key))
    if has_body:
        headers.append(("Content-Type", "application/json"))
    if idempotency_key:
        # Legacy paths are not documented to honour it; sending it costs nothing and lets a
        # server that does make a retried quota change safe.
        headers.append(("Idempotency-Key", idempotency_key))
    return tuple(headers)


def request_idempotency_key(operation: Operation) -> str:
    """Return the ``Idempotency-Key`` header value for ``operation``: its key, scoped by customer.

    Commet dedupes an event's ``eventId`` per customer, but keeps ``Idempotency-Key`` headers
    per API key, for every customer of the account. Sent raw, one key used for two customers
    (which the reference allows) would make the second customer's request a 409
    ``idempotency_key_mismatch`` and leave it unbilled. Hashing the customer in keeps the two
    scopes the same: a header can only ever collide with the same customer's same key.
    """
    material = "\x1f".join(
        ("commet-middleware/request", operation.customer_id, operation.idempotency_key)
    )
    return "cm_" + hashlib.sha256(material.encode("utf-8")).hexdigest()[:32]


def route(operation: Operation, dialect: Dialect) -> tuple[str, str]:
    """Return the method and path that perform ``operation`` in ``dialect``."""
    paths = _paths(dialect)
    if isinstance(operation, UsageEvent):
        return "POST", paths["track"]
    methods = _V1_METHODS if dialect == "v1" else _LEGACY_METHODS
    return methods[operation.action], paths[operation.action]


def build_request(
    operation: Operation, settings: CommetSettings, *, body: bytes | None = None
) -> WireRequest:
    """Return the request that performs ``operation``.

    ``body`` is the operation's already encoded body (see :func:`encode_body`); pass it to
    re-send exactly the bytes of an earlier attempt.
    """
    if body is None:
        body = encode_body(operation, settings.dialect)
    method, path = route(operation, settings.dialect)
    return WireRequest(
        method=method,
        path=path,
        headers=_headers(
            settings, idempotency_key=request_idempotency_key(operation), has_body=True
        ),
        body=body,
    )


def build_get_quota(customer_id: str, feature: str, settings: CommetSettings) -> WireRequest:
    """Return the request that reads one quota allowance."""
    return WireRequest(
        method="GET",
        path=_paths(settings.dialect)["quota"],
        params=(("customerId", customer_id), ("featureCode", feature)),
        headers=_headers(settings),
    )


def build_get_all_quotas(customer_id: str, settings: CommetSettings) -> WireRequest:
    """Return the request that reads every quota allowance of a customer."""
    return WireRequest(
        method="GET",
        path=_paths(settings.dialect)["all"],
        params=(("customerId", customer_id),),
        headers=_headers(settings),
    )


# --- responses -----------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def _flag(headers: Mapping[str, str], name: str) -> bool:
    value = _header(headers, name)
    return value is not None and value.strip().lower() == "true"


def is_deprecated(headers: Mapping[str, str]) -> bool:
    """Return True when the response says its path is deprecated (``Deprecation: true``)."""
    return _flag(headers, "Deprecation")


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = _header(headers, "Retry-After")
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, (moment - datetime.now(timezone.utc)).total_seconds())


def _json(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _unwrap(data: Any) -> Any:
    # Some Commet answers come in a {"success": true, "data": ...} envelope; take the inside.
    if isinstance(data, dict) and isinstance(data.get("success"), bool) and "data" in data:
        return data["data"]
    return data


def _redact(text: str | None, secret: str | None) -> str | None:
    if text and secret:
        return text.replace(secret, "[redacted]")
    return text


def _redact_all(value: Any, secret: str | None) -> Any:
    """``value`` (JSON: strings, lists, objects) with ``secret`` scrubbed from every string."""
    if not secret:
        return value
    if isinstance(value, str):
        return _redact(value, secret)
    if isinstance(value, list):
        return [_redact_all(item, secret) for item in value]
    if isinstance(value, dict):
        return {_redact_all(k, secret): _redact_all(v, secret) for k, v in value.items()}
    return value


def parse_error(
    status: int, headers: Mapping[str, str], body: bytes, *, secret: str | None = None
) -> CommetAPIError:
    """Return the error that a non-2xx answer describes, with ``retryable`` worked out.

    Reads ``{"error": {...}}`` or the same keys at the top level. ``secret`` (the API key)
    is scrubbed from anything Commet echoed back. ``retryable`` and which ``Retry-After`` is kept
    follow ``_retry`` (the one rule set): a transient answer keeps its wait, whatever its status.
    """
    data = _json(body)
    fields: Mapping[str, Any] = {}
    message: str | None = None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            fields = inner
        elif isinstance(inner, str):
            fields = data
            message = inner
        else:
            fields = data
    elif body:
        message = body[:200].decode("utf-8", "replace").strip() or None

    def text(key: str) -> str | None:
        value = fields.get(key)
        return value if isinstance(value, str) else None

    code = text("code")
    if message is None:
        message = text("message")
    retry_after = _retry_after(headers)
    transient = classify_answer(status, code) == "transient"
    return CommetAPIError(
        status,
        type=_redact(text("type"), secret),
        code=_redact(code, secret),
        message=_redact(message, secret),
        param=_redact(text("param"), secret),
        details=_redact_all(fields.get("details"), secret),
        request_id=_redact(_header(headers, "x-request-id"), secret),
        retryable=is_retryable(status, code, retry_after),
        # Honoured on any transient answer: a 503 during maintenance often names its wait too.
        retry_after=retry_after if transient else None,
    )


def _sniff(headers: Mapping[str, str], body: bytes, secret: str | None) -> str:
    """A short description of an answer that was not Commet's, for the error message."""
    if not body:
        return "an empty body"
    kind = _header(headers, "Content-Type") or "no content type"
    start = body[:60].decode("utf-8", "replace").replace("\n", " ").strip()
    return f"{len(body)} bytes of {kind}: {_redact(start, secret)!r}"


def _invalid(
    status: int, headers: Mapping[str, str], body: bytes, what: str, secret: str | None = None
) -> CommetAPIError:
    # A 2xx that is not Commet's answer came from something else (a proxy's or captive
    # portal's page, a wrong base URL, a body cut short): nothing says Commet recorded the
    # operation, so it is a transient failure, retried with the same key and bytes.
    code = "invalid_response"
    return CommetAPIError(
        status,
        type="api_error",
        code=code,
        message=f"expected {what} in the {status} answer, got {_sniff(headers, body, secret)}",
        request_id=_header(headers, "x-request-id"),
        retryable=is_retryable(status, code, None),
    )


def _is_usage_event(data: Any) -> bool:
    # The reference's UsageEvent has object "usage_event"; without that field, the fields that
    # name the event are required instead.
    if not isinstance(data, dict):
        return False
    kind = data.get("object")
    if kind is not None:
        return bool(kind == "usage_event")
    feature = data.get("featureCode", data.get("feature"))
    return all(isinstance(v, str) and v for v in (data.get("id"), data.get("customerId"), feature))


def _is_quota_event(data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    kind = data.get("object")
    if kind is not None:
        return bool(kind == "usage_quota_event")
    balance = data.get("newBalance")
    return (
        all(isinstance(data.get(k), str) and data.get(k) for k in ("id", "featureCode"))
        and isinstance(balance, (int, float))
        and not isinstance(balance, bool)
    )


def parse_track(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    event: UsageEvent | None = None,
    secret: str | None = None,
) -> TrackResult:
    """Return what a track answer says, or raise :class:`CommetAPIError`.

    A 409 ``duplicate`` is a success (the event is already recorded), flagged ``duplicate``.
    So is a 409 ``idempotency_key_mismatch``: the request key is scoped by customer and event
    key (:func:`request_idempotency_key`), so a mismatch means this customer's event with this
    key was already sent with another body (a request the app executed again, with a new
    timestamp): Commet has the event. When ``event`` is given, fields the answer leaves out are
    filled from it.

    A 2xx counts only with a UsageEvent body (bare or in the ``{"success", "data"}`` envelope);
    anything else (an HTML page, a body cut short, JSON of another shape) raises a transient
    ``invalid_response`` error: only what Commet recorded counts as delivered.
    """
    request_id = _header(headers, "x-request-id")
    if 200 <= status < 300:
        data = _unwrap(_json(body))
        if not _is_usage_event(data):
            raise _invalid(status, headers, body, "a UsageEvent", secret)
        result = TrackResult.from_json(
            data,
            replayed=_flag(headers, "Idempotent-Replayed"),
            request_id=request_id,
        )
    else:
        error = parse_error(status, headers, body, secret=secret)
        if not (status == 409 and error.code in ("duplicate", "idempotency_key_mismatch")):
            raise error
        result = TrackResult(duplicate=True, request_id=request_id)
    return _fill_from_event(result, event) if event is not None else result


def _fill_from_event(result: TrackResult, event: UsageEvent) -> TrackResult:
    return TrackResult(
        id=result.id,
        feature_code=result.feature_code or event.feature,
        value=result.value if result.value is not None else event.value,
        customer_id=result.customer_id or event.customer_id,
        event_id=result.event_id or event.idempotency_key,
        ts=result.ts or event.timestamp,
        created_at=result.created_at,
        properties=result.properties or event.properties,
        duplicate=result.duplicate,
        replayed=result.replayed,
        request_id=result.request_id,
    )


def parse_quota_change(
    status: int, headers: Mapping[str, str], body: bytes, *, secret: str | None = None
) -> QuotaChangeResult:
    """Return what a quota add/remove/set answer says, or raise :class:`CommetAPIError`.

    As for :func:`parse_track`, a 2xx counts only with a UsageQuotaEvent body; anything else
    raises a transient ``invalid_response`` error.
    """
    if not 200 <= status < 300:
        raise parse_error(status, headers, body, secret=secret)
    data = _unwrap(_json(body))
    if not _is_quota_event(data):
        raise _invalid(status, headers, body, "a UsageQuotaEvent", secret)
    return QuotaChangeResult.from_json(
        data,
        replayed=_flag(headers, "Idempotent-Replayed"),
        request_id=_header(headers, "x-request-id"),
    )


def parse_operation(
    operation: Operation,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    secret: str | None = None,
) -> TrackResult | QuotaChangeResult:
    """Return the result of ``operation`` from its answer, or raise :class:`CommetAPIError`."""
    if isinstance(operation, UsageEvent):
        return parse_track(status, headers, body, event=operation, secret=secret)
    return parse_quota_change(status, headers, body, secret=secret)


def parse_quota(
    status: int, headers: Mapping[str, str], body: bytes, *, secret: str | None = None
) -> QuotaAllowance:
    """Return the allowance a quota read answered, or raise :class:`CommetAPIError`."""
    if not 200 <= status < 300:
        raise parse_error(status, headers, body, secret=secret)
    data = _unwrap(_json(body))
    if not isinstance(data, dict):
        raise _invalid(status, headers, body, "a UsageQuota object", secret)
    return QuotaAllowance.from_json(data)


def parse_all_quotas(
    status: int, headers: Mapping[str, str], body: bytes, *, secret: str | None = None
) -> list[QuotaAllowance]:
    """Return every allowance a list read answered, or raise :class:`CommetAPIError`."""
    if not 200 <= status < 300:
        raise parse_error(status, headers, body, secret=secret)
    data = _unwrap(_json(body))
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise _invalid(status, headers, body, "a list of UsageQuota objects", secret)
    return [QuotaAllowance.from_json(item) for item in data if isinstance(item, dict)]
