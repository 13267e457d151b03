"""The Commet client: the wire module's requests sent over httpx, sync and async, with retries."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlencode

import anyio
import httpx

from . import _http11
from ._errors import CommetAPIError, CommetError, CommetTransportError
from ._models import (
    Operation,
    QuotaAction,
    QuotaChange,
    UsageEvent,
    UsageValue,
    validate_customer_id,
    validate_feature_code,
    validate_quota_count,
    validate_usage_value,
)
from ._results import QuotaAllowance, QuotaChangeResult, TrackResult
from ._retry import RetryPolicy
from ._settings import CommetSettings
from ._wire import (
    WireRequest,
    base_headers,
    build_get_all_quotas,
    build_get_quota,
    build_request,
    encode_body,
    is_deprecated,
    parse_all_quotas,
    parse_quota,
    parse_quota_change,
    parse_track,
    request_idempotency_key,
    route,
)

__all__ = ["AsyncCommetClient", "CommetClient"]

logger = logging.getLogger("commet_middleware")

T = TypeVar("T")
# A parser of one answer: (status, headers, body) to a typed result, or raises CommetAPIError.
Parser = Callable[[int, Mapping[str, str], bytes], T]

_deprecation_lock = threading.Lock()
_deprecation_warned = False


def _warn_if_deprecated(headers: Mapping[str, str], path: str) -> None:
    # Once per process: a deprecated path answers every request, and one line is the message.
    global _deprecation_warned
    if _deprecation_warned or not is_deprecated(headers):
        return
    with _deprecation_lock:
        if _deprecation_warned:
            return
        _deprecation_warned = True
    logger.warning(
        "Commet marks %s as deprecated (sunset %s; successor %s): switch to dialect='v1'",
        path,
        headers.get("Sunset", "unannounced"),
        headers.get("Link", "unknown"),
    )


def _resolve_settings(settings: CommetSettings | None, overrides: dict[str, Any]) -> CommetSettings:
    if settings is None:
        return CommetSettings.from_env(**overrides)
    return settings.replace(**overrides) if overrides else settings


def _validate_operation(operation: Operation) -> None:
    # An operation built with the plain constructor skipped validation; nothing invalid is sent.
    if not isinstance(operation, (UsageEvent, QuotaChange)):
        raise TypeError(f"expected a UsageEvent or QuotaChange, got {type(operation).__name__}")
    validate_customer_id(operation.customer_id)
    validate_feature_code(operation.feature)
    if not operation.idempotency_key:
        raise ValueError("an idempotency key is required: it is what makes a retry safe")
    if isinstance(operation, UsageEvent):
        if validate_usage_value(operation.value) is not operation.value:
            # A Decimal or Fraction is converted by UsageEvent.create(); sent raw, JSON fails.
            raise ValueError(
                f"usage value {operation.value!r} must be an int or a float here: build the "
                "event with UsageEvent.create(), which converts other real numbers exactly"
            )
    else:
        if operation.action not in ("add", "remove", "set"):
            raise ValueError(f"quota action must be add, remove or set, got {operation.action!r}")
        validate_quota_count(operation.count)


def _usage_event(
    customer_id: str,
    feature: str,
    value: UsageValue,
    idempotency_key: str | None,
    timestamp: str | None,
    properties: dict[str, str] | None,
) -> UsageEvent:
    return UsageEvent.create(
        customer_id,
        feature,
        value,
        idempotency_key=idempotency_key or str(uuid.uuid4()),
        timestamp=timestamp,
        properties=properties,
    )


def _quota_change(
    customer_id: str, feature: str, action: QuotaAction, count: int, idempotency_key: str | None
) -> QuotaChange:
    return QuotaChange.create(
        customer_id, feature, action, count, idempotency_key=idempotency_key or str(uuid.uuid4())
    )


def _locate(error: CommetAPIError, request: WireRequest, settings: CommetSettings) -> None:
    # Where the request went, for configuration_hint ("404 ... at POST /api/v1/usage/events").
    error.method = request.method
    error.path = request.path
    error.base_url = settings.base_url


def _transport_error(exc: httpx.RequestError, request: WireRequest, secret: str) -> CommetError:
    what = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    detail = str(exc).replace(secret, "[redacted]") if secret else str(exc)
    message = f"{request.method} {request.path} {what}: {type(exc).__name__}"
    if detail:
        message += f": {detail}"
    return CommetTransportError(message)


def _pool_error(exc: OSError, request: WireRequest, secret: str) -> CommetError:
    # The same message shape as an httpx failure: what was asked, what failed, why.
    kind = {
        _http11.TimedOut: "ReadTimeout",
        _http11.ConnectFailed: "ConnectError",
    }.get(type(exc), "RemoteProtocolError")
    what = "timed out" if isinstance(exc, _http11.TimedOut) else "failed"
    detail = str(exc).replace(secret, "[redacted]") if secret else str(exc)
    message = f"{request.method} {request.path} {what}: {kind}"
    if detail:
        message += f": {detail}"
    return CommetTransportError(message)


def _timeout(settings: CommetSettings, total: float | None = None) -> httpx.Timeout:
    if total is None:
        return httpx.Timeout(settings.timeout, connect=settings.connect_timeout)
    return httpx.Timeout(total, connect=min(total, settings.connect_timeout))


class _ClientBase:
    """What the sync and async clients share: settings, retry policy, request building."""

    def __init__(self, settings: CommetSettings, random: Callable[[], float] | None) -> None:
        self._settings = settings
        self._policy = RetryPolicy.from_settings(settings, random=random)

    @property
    def settings(self) -> CommetSettings:
        """The settings this client was built from."""
        return self._settings

    def __repr__(self) -> str:
        # Never the key: only where the client talks to, and how.
        return (
            f"{type(self).__name__}(base_url={self._settings.base_url!r}, "
            f"dialect={self._settings.dialect!r})"
        )

    def _finish(self, request: WireRequest, response: httpx.Response, parse: Parser[T]) -> T:
        _warn_if_deprecated(response.headers, request.path)
        try:
            return parse(response.status_code, response.headers, response.content)
        except CommetAPIError as error:
            _locate(error, request, self._settings)
            raise

    def _parse_track(self, event: UsageEvent) -> Parser[TrackResult]:
        secret = self._settings.api_key
        return lambda status, headers, body: parse_track(
            status, headers, body, event=event, secret=secret
        )

    def _parse_change(self) -> Parser[QuotaChangeResult]:
        secret = self._settings.api_key
        return lambda status, headers, body: parse_quota_change(
            status, headers, body, secret=secret
        )

    def _parse_quota(self) -> Parser[QuotaAllowance]:
        secret = self._settings.api_key
        return lambda status, headers, body: parse_quota(status, headers, body, secret=secret)

    def _parse_all_quotas(self) -> Parser[list[QuotaAllowance]]:
        secret = self._settings.api_key
        return lambda status, headers, body: parse_all_quotas(status, headers, body, secret=secret)

    def _log_retry(
        self, request: WireRequest, error: CommetError, retry: int, delay: float
    ) -> None:
        logger.debug(
            "retrying %s %s in %.2fs (retry %d of %d) after: %s",
            request.method,
            request.path,
            delay,
            retry + 1,
            self._policy.max_retries,
            error,
        )


class CommetClient(_ClientBase):
    """A synchronous Commet client over one pooled ``httpx.Client``.

    Build it from :class:`CommetSettings`, or from keyword overrides applied to
    ``CommetSettings.from_env()``. ``sleep`` replaces ``time.sleep`` between retries and
    ``random`` the jitter source (both for tests).
    """

    def __init__(
        self,
        settings: CommetSettings | None = None,
        *,
        sleep: Callable[[float], None] | None = None,
        random: Callable[[], float] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(_resolve_settings(settings, overrides), random)
        self._sleep = sleep or time.sleep
        self._http = httpx.Client(
            base_url=self._settings.base_url,
            timeout=_timeout(self._settings),
            transport=self._settings.transport,
        )

    # --- lifecycle ---

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> CommetClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- one attempt, and retries ---

    def _attempt(
        self, request: WireRequest, parse: Parser[T], attempt_timeout: float | None = None
    ) -> T:
        try:
            response = self._http.request(
                request.method,
                request.path,
                params=request.params,
                headers=request.headers,
                content=request.body,
                timeout=_timeout(self._settings, attempt_timeout),
            )
        # RequestError: transport failures, timeouts, and a body that could not be decoded.
        except httpx.RequestError as exc:
            raise _transport_error(exc, request, self._settings.api_key) from exc
        return self._finish(request, response, parse)

    def _with_retries(
        self, request: WireRequest, parse: Parser[T], attempt_timeout: float | None = None
    ) -> T:
        retry = 0
        while True:
            try:
                return self._attempt(request, parse, attempt_timeout)
            except CommetError as error:
                delay = self._policy.delay(error, retry)
                if delay is None:
                    raise
                self._log_retry(request, error, retry, delay)
                self._sleep(delay)
                retry += 1

    # --- the operations ---

    def send_once(
        self, operation: Operation, *, request_body: bytes | None = None
    ) -> TrackResult | QuotaChangeResult:
        """Send ``operation`` exactly once, no retries; raise ``CommetAPIError`` or
        ``CommetTransportError``. ``request_body`` re-sends the bytes of an earlier attempt."""
        _validate_operation(operation)
        request = build_request(operation, self._settings, body=request_body)
        if isinstance(operation, UsageEvent):
            return self._attempt(request, self._parse_track(operation))
        return self._attempt(request, self._parse_change())

    def send(self, operation: Operation) -> TrackResult | QuotaChangeResult:
        """Send ``operation`` with this client's retries, the same key and bytes each time."""
        _validate_operation(operation)
        # Encoded once: every retry sends these very bytes.
        body = encode_body(operation, self._settings.dialect)
        request = build_request(operation, self._settings, body=body)
        if isinstance(operation, UsageEvent):
            return self._with_retries(request, self._parse_track(operation))
        return self._with_retries(request, self._parse_change())

    def track(
        self,
        customer_id: str,
        feature: str,
        value: UsageValue = 1,
        *,
        idempotency_key: str | None = None,
        timestamp: str | None = None,
        properties: dict[str, str] | None = None,
    ) -> TrackResult:
        """Record ``value`` units of ``feature`` for ``customer_id``.

        Without ``idempotency_key`` a fresh one is made, so the retries of this call are safe
        (but a second call is a second event).
        """
        event = _usage_event(customer_id, feature, value, idempotency_key, timestamp, properties)
        request = build_request(event, self._settings)
        return self._with_retries(request, self._parse_track(event))

    def _change(
        self, customer_id: str, feature: str, action: QuotaAction, count: int, key: str | None
    ) -> QuotaChangeResult:
        change = _quota_change(customer_id, feature, action, count, key)
        return self._with_retries(build_request(change, self._settings), self._parse_change())

    def add_quota(
        self, customer_id: str, feature: str, count: int = 1, *, idempotency_key: str | None = None
    ) -> QuotaChangeResult:
        """Add ``count`` units to the customer's ``feature`` quota balance."""
        return self._change(customer_id, feature, "add", count, idempotency_key)

    def remove_quota(
        self, customer_id: str, feature: str, count: int = 1, *, idempotency_key: str | None = None
    ) -> QuotaChangeResult:
        """Remove ``count`` units; below zero Commet answers 400 ``insufficient_balance``."""
        return self._change(customer_id, feature, "remove", count, idempotency_key)

    def set_quota(
        self, customer_id: str, feature: str, count: int, *, idempotency_key: str | None = None
    ) -> QuotaChangeResult:
        """Set the customer's ``feature`` quota balance to exactly ``count``."""
        return self._change(customer_id, feature, "set", count, idempotency_key)

    def get_quota(
        self, customer_id: str, feature: str, *, timeout: float | None = None
    ) -> QuotaAllowance:
        """Return the customer's allowance for ``feature``.

        Each attempt is bounded by ``timeout``, default ``settings.quota_timeout``: a read on
        the request path must be quick.
        """
        validate_customer_id(customer_id)
        validate_feature_code(feature)
        request = build_get_quota(customer_id, feature, self._settings)
        limit = self._settings.quota_timeout if timeout is None else timeout
        return self._with_retries(request, self._parse_quota(), limit)

    def get_all_quotas(self, customer_id: str) -> list[QuotaAllowance]:
        """Return the customer's allowance for every quota feature of their subscription."""
        validate_customer_id(customer_id)
        request = build_get_all_quotas(customer_id, self._settings)
        return self._with_retries(request, self._parse_all_quotas())


class AsyncCommetClient(_ClientBase):
    """An asynchronous Commet client: the same API as :class:`CommetClient`, awaited.

    Under asyncio, with no ``settings.transport`` and no proxy in the environment, requests go
    over the client's own keep-alive HTTP/1.1 connections (``_http11``): about a sixteenth of
    the CPU of ``httpx.AsyncClient`` per event (``./dev bench sender_cost``). Otherwise (a transport
    given, as tests and the emulator do; a proxy; another async library) over one pooled
    ``httpx.AsyncClient``. ``sleep`` replaces ``anyio.sleep``.
    """

    def __init__(
        self,
        settings: CommetSettings | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        random: Callable[[], float] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(_resolve_settings(settings, overrides), random)
        self._sleep = sleep or anyio.sleep
        self._httpx: httpx.AsyncClient | None = None
        self._pool: _http11.ConnectionPool | None = None
        if _http11.usable(self._settings.base_url, self._settings.transport):
            self._pool = _http11.ConnectionPool(
                self._settings.base_url,
                connect_timeout=self._settings.connect_timeout,
                timeout=self._settings.timeout,
            )
        else:
            self._httpx = self._new_httpx()
        # (method, path) -> the request line and fixed headers, encoded once.
        self._heads: dict[tuple[str, str], bytes] = {}

    def _new_httpx(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self._settings.base_url,
            timeout=_timeout(self._settings),
            transport=self._settings.transport,
        )

    @property
    def _http(self) -> httpx.AsyncClient:
        # Made on first use when the own connections serve this client (another async library).
        if self._httpx is None:
            self._httpx = self._new_httpx()
        return self._httpx

    async def aclose(self) -> None:
        """Close the connections."""
        if self._pool is not None:
            await self._pool.aclose()
        if self._httpx is not None:
            await self._httpx.aclose()

    async def __aenter__(self) -> AsyncCommetClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _own_connections(self) -> _http11.ConnectionPool | None:
        if self._pool is None:
            return None
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None  # not asyncio (trio through anyio): httpx serves it
        return self._pool

    def _encode(self, pool: _http11.ConnectionPool, request: WireRequest) -> bytes:
        target = request.path
        if request.params:
            target += "?" + urlencode(request.params)
        head = pool.head(request.method, target, request.headers)
        body = request.body
        if body is None:
            return head + b"\r\n"
        return b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)

    async def _attempt(
        self, request: WireRequest, parse: Parser[T], attempt_timeout: float | None = None
    ) -> T:
        pool = self._own_connections()
        if pool is not None:
            try:
                data = self._encode(pool, request)
            except OSError as exc:  # a header that would split the request
                raise _pool_error(exc, request, self._settings.api_key) from exc
            return await self._attempt_own(pool, request, data, parse, attempt_timeout)
        try:
            response = await self._http.request(
                request.method,
                request.path,
                params=request.params,
                headers=request.headers,
                content=request.body,
                timeout=_timeout(self._settings, attempt_timeout),
            )
        # RequestError: transport failures, timeouts, and a body that could not be decoded.
        except httpx.RequestError as exc:
            raise _transport_error(exc, request, self._settings.api_key) from exc
        return self._finish(request, response, parse)

    async def _attempt_own(
        self,
        pool: _http11.ConnectionPool,
        request: WireRequest,
        data: bytes,
        parse: Parser[T],
        attempt_timeout: float | None = None,
    ) -> T:
        connect = None
        if attempt_timeout is not None:
            connect = min(attempt_timeout, self._settings.connect_timeout)
        try:
            response = await pool.request(data, timeout=attempt_timeout, connect_timeout=connect)
        except OSError as exc:
            raise _pool_error(exc, request, self._settings.api_key) from exc
        _warn_if_deprecated(response.headers, request.path)
        try:
            return parse(response.status, response.headers, response.body)
        except CommetAPIError as error:
            _locate(error, request, self._settings)
            raise

    async def _with_retries(
        self, request: WireRequest, parse: Parser[T], attempt_timeout: float | None = None
    ) -> T:
        retry = 0
        while True:
            try:
                return await self._attempt(request, parse, attempt_timeout)
            except CommetError as error:
                delay = self._policy.delay(error, retry)
                if delay is None:
                    raise
                self._log_retry(request, error, retry, delay)
                await self._sleep(delay)
                retry += 1

    async def send_once(
        self, operation: Operation, *, request_body: bytes | None = None
    ) -> TrackResult | QuotaChangeResult:
        """Send ``operation`` exactly once, no retries; raise ``CommetAPIError`` or
        ``CommetTransportError``. ``request_body`` re-sends the bytes of an earlier attempt."""
        _validate_operation(operation)
        pool = self._own_connections()
        if pool is None:
            request = build_request(operation, self._settings, body=request_body)
            if isinstance(operation, UsageEvent):
                return await self._attempt(request, self._parse_track(operation))
            return await self._attempt(request, self._parse_change())
        # The pipeline's hot path: the head of each (method, path) is encoded once; per event
        # only the key, the length and the body bytes it already holds are joined to it.
        settings = self._settings
        body = encode_body(operation, settings.dialect) if request_body is None else request_body
        method, path = route(operation, settings.dialect)
        head = self._heads.get((method, path))
        if head is None:
            try:
                head = pool.head(method, path, base_headers(settings, has_body=True))
            except OSError as exc:  # a header that would split the request
                raise _pool_error(exc, WireRequest(method, path), settings.api_key) from exc
            self._heads[(method, path)] = head
        key = request_idempotency_key(operation)
        data = b"%sIdempotency-Key: %s\r\nContent-Length: %d\r\n\r\n%s" % (
            head,
            key.encode("ascii"),
            len(body),
            body,
        )
        request = WireRequest(method, path, body=body)
        if isinstance(operation, UsageEvent):
            return await self._attempt_own(pool, request, data, self._parse_track(operation))
        return await self._attempt_own(pool, request, data, self._parse_change())

    async def send(self, operation: Operation) -> TrackResult | QuotaChangeResult:
        """Send ``operation`` with this client's retries, the same key and bytes each time."""
        _validate_operation(operation)
        # Encoded once: every retry sends these very bytes.
        body = encode_body(operation, self._settings.dialect)
        request = build_request(operation, self._settings, body=body)
        if isinstance(operation, UsageEvent):
            return await self._with_retries(request, self._parse_track(operation))
        return await self._with_retries(request, self._parse_change())

    async def track(
        self,
        customer_id: str,
        feature: str,
        value: UsageValue = 1,
        *,
        idempotency_key: str | None = None,
        timestamp: str | None = None,
        properties: dict[str, str] | None = None,
    ) -> TrackResult:
        """Record ``value`` units of ``feature`` for ``customer_id`` (see CommetClient.track)."""
        event = _usage_event(customer_id, feature, value, idempotency_key, timestamp, properties)
        request = build_request(event, self._settings)
        return await self._with_retries(request, self._parse_track(event))

    async def _change(
        self, customer_id: str, feature: str, action: QuotaAction, count: int, key: str | None
    ) -> QuotaChangeResult:
        change = _quota_change(customer_id, feature, action, count, key)
        return await self._with_retries(build_request(change, self._settings), self._parse_change())

    async def add_quota(
        self, customer_id: str, feature: str, count: int = 1, *, idempotency_key: str | None = None
    ) -> QuotaChangeResult:
        """Add ``count`` units to the customer's ``feature`` quota balance."""
        return await self._change(customer_id, feature, "add", count, idempotency_key)

    async def remove_quota(
        self, customer_id: str, feature: str, count: int = 1, *, idempotency_key: str | None = None
    ) -> QuotaChangeResult:
        """Remove ``count`` units; below zero Commet answers 400 ``insufficient_balance``."""
        return await self._change(customer_id, feature, "remove", count, idempotency_key)

    async def set_quota(
        self, customer_id: str, feature: str, count: int, *, idempotency_key: str | None = None
    ) -> QuotaChangeResult:
        """Set the customer's ``feature`` quota balance to exactly ``count``."""
        return await self._change(customer_id, feature, "set", count, idempotency_key)

    async def get_quota(
        self,
        customer_id: str,
        feature: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the httpx limit of each attempt
    ) -> QuotaAllowance:
        """Return the customer's allowance for ``feature`` (each attempt bounded by
        ``timeout``, default ``settings.quota_timeout``)."""
        validate_customer_id(customer_id)
        validate_feature_code(feature)
        request = build_get_quota(customer_id, feature, self._settings)
        limit = self._settings.quota_timeout if timeout is None else timeout
        return await self._with_retries(request, self._parse_quota(), limit)

    async def get_all_quotas(self, customer_id: str) -> list[QuotaAllowance]:
        """Return the customer's allowance for every quota feature of their subscription."""
        validate_customer_id(customer_id)
        request = build_get_all_quotas(customer_id, self._settings)
        return await self._with_retries(request, self._parse_all_quotas())
