"""The emulator's live dashboard: its page, JSON state, fault controls and server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

from ._faults import Faults
from ._ledger import (
    Ledger,
    LedgerChange,
    LedgerSnapshot,
    RecordedEvent,
    RecordedQuotaEvent,
    RecordedRequest,
)

__all__ = ["DASHBOARD_PREFIX", "Dashboard", "change_to_json"]

DASHBOARD_PREFIX = "/_emulator/"
# A stream that falls this far behind is told to resynchronise from /_emulator/state rather
# than holding an unbounded backlog for a stalled browser tab.
_QUEUE_LIMIT = 1000
# A comment line this often lets a dead connection be noticed and keeps proxies from timing out.
_HEARTBEAT_SECONDS = 15.0
_RETRY_MS = 2000
_MAX_BODY = 64 * 1024
_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/_emulator/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/_emulator/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/_emulator/favicon.svg": ("favicon.svg", "image/svg+xml"),
    # Browsers ask for this on their own; answering it keeps the API's request log clean.
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),
}
# The page only ever talks to its own origin; data is rendered as text, and this header makes
# an injected script or inline handler inert even if that rule were ever broken.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = [
    ("content-security-policy", _CSP),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
]


class _BadRequest(Exception):
    def __init__(self, status: int, message: str, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow


def change_to_json(change: LedgerChange) -> dict[str, Any]:
    """Return a ledger change as the dashboard's JSON feed entry."""
    entry: dict[str, Any] = {"seq": change.seq, "kind": change.kind, "at": change.at}
    item = change.item
    if isinstance(item, RecordedEvent):
        entry.update(
            id=item.id,
            customerId=item.customer_id,
            featureCode=item.feature,
            value=item.value,
            eventId=item.idempotency_key,
            ts=item.timestamp,
        )
    elif isinstance(item, RecordedQuotaEvent):
        entry.update(
            id=item.id,
            customerId=item.customer_id,
            featureCode=item.feature,
            action=item.action,
            count=item.count,
            previousBalance=item.previous_balance,
            newBalance=item.new_balance,
        )
    elif isinstance(item, RecordedRequest):
        entry.update(
            method=item.method,
            path=item.path,
            status=item.status,
            requestId=item.request_id,
            dialect=item.dialect,
            replayed=item.replayed,
            fault=item.fault,
        )
    return entry


def _state_json(snapshot: LedgerSnapshot, faults: Faults) -> dict[str, Any]:
    customers = []
    for customer in snapshot.customers:
        cid = customer.customer_id
        on_plan = [f for f in snapshot.features if customer.plan is None or f.code in customer.plan]
        quotas = []
        for feature in on_plan:
            allowance = snapshot.allowances.get((cid, feature.code))
            if allowance is None:
                continue
            quotas.append(
                {
                    "featureCode": feature.code,
                    "current": allowance.current,
                    "included": allowance.included,
                    "remaining": allowance.remaining,
                    "overage": 0
                    if allowance.unlimited
                    else max(allowance.current - allowance.included, 0),
                    "billedQuantity": allowance.billed_quantity,
                    "unlimited": allowance.unlimited,
                    "overageEnabled": allowance.overage_enabled,
                }
            )
        customers.append(
            {
                "id": cid,
                "commetId": customer.commet_id,
                "subscribed": customer.subscribed,
                "features": [f.code for f in on_plan],
                "usage": {
                    f.code: snapshot.totals.get((cid, f.code), 0) for f in on_plan if not f.quota
                },
                "quotas": quotas,
            }
        )
    return {
        "seq": snapshot.seq,
        "features": [
            {
                "code": f.code,
                "kind": "quota" if f.quota else "metered",
                "included": f.included,
                "unlimited": f.unlimited,
                "overage": f.overage,
            }
            for f in snapshot.features
        ],
        "customers": customers,
        "changes": [change_to_json(c) for c in snapshot.changes],
        "faults": faults.pending(),
    }


class _Subscriber:
    """One SSE stream's inbox: filled from any thread, drained on the server's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # Touched only on the loop thread: other threads hand over via call_soon_threadsafe.
        self._pending: deque[LedgerChange] = deque()
        self._wake = asyncio.Event()
        self._overflowed = False
        self._closed = False
        self.peer_gone = False

    def offer(self, change: LedgerChange) -> None:
        """Queue ``change`` for the stream; safe from any thread, never blocks."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
            self._loop.call_soon_threadsafe(self._accept, change)

    def close(self) -> None:
        """End the stream; safe from any thread."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._shut)

    def _accept(self, change: LedgerChange) -> None:
        if len(self._pending) >= _QUEUE_LIMIT:
            self._pending.clear()
            self._overflowed = True
        else:
            self._pending.append(change)
        self._wake.set()

    def _shut(self) -> None:
        self._closed = True
        self._wake.set()

    async def next(self) -> tuple[list[LedgerChange], bool] | None:
        """Wait for changes; return them and whether some were lost, or None once closed."""
        if not self._pending and not self._overflowed and not self._closed:
            with anyio.move_on_after(_HEARTBEAT_SECONDS):
                await self._wake.wait()
        self._wake.clear()
        if self._closed:
            return None
        changes = list(self._pending)
        self._pending.clear()
        overflowed, self._overflowed = self._overflowed, False
        return changes, overflowed


def _sse(change: LedgerChange) -> bytes:
    data = json.dumps(change_to_json(change), separators=(",", ":"))
    return f"id: {change.seq}\ndata: {data}\n\n".encode()


async def _send_json(send: Send, status: int, body: Any, extra: list[tuple[str, str]]) -> None:
    payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    await _send(send, status, payload, "application/json", extra)


async def _send(
    send: Send, status: int, body: bytes, content_type: str, extra: list[tuple[str, str]]
) -> None:
    headers = [("content-type", content_type), *_SECURITY_HEADERS, *extra]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _number(
    data: dict[str, Any], name: str, default: float | None, low: float, high: float
) -> float:
    value = data.get(name, default)
    if value is None:
        raise _BadRequest(400, f"{name} is required.")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _BadRequest(400, f"{name} must be a number.")
    if not low <= value <= high:
        raise _BadRequest(400, f"{name} must be between {low:g} and {high:g}.")
    return float(value)


def _whole(data: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadRequest(400, f"{name} must be a whole number.")
    if not low <= value <= high:
        raise _BadRequest(400, f"{name} must be between {low} and {high}.")
    return value


class Dashboard:
    """Serves ``/`` and ``/_emulator/...``: read-only state and fault controls, no API key.

    Server-sent events need an asyncio loop (uvicorn's); the rest is plain ASGI.
    ``close_streams`` ends every open stream (and refuses new ones) so a server can shut down
    without waiting for browsers to hang up; ``open_streams`` allows them again.
    """

    def __init__(self, ledger: Ledger, faults: Faults) -> None:
        self._ledger = ledger
        self._faults = faults
        self._lock = threading.Lock()
        self._streams: set[_Subscriber] = set()
        self._closed = False
        self._assets: dict[str, bytes] = {}
        self._controls: dict[str, Callable[[dict[str, Any]], None]] = {
            "error-rate": self._error_rate,
            "latency": self._latency,
            "fail-next": self._fail_next,
            "rate-limit-next": self._rate_limit_next,
            "drop-next": self._drop_next,
            "html-next": self._canned(self._faults.html_next),
            "truncated-next": self._canned(self._faults.truncated_next),
            "unauthorized-next": self._canned(self._faults.unauthorized_next),
            "forbidden-next": self._canned(self._faults.forbidden_next),
            "bare-not-found-next": self._canned(self._faults.bare_not_found_next),
            "clear": lambda _data: self._faults.clear(),
        }

    @staticmethod
    def handles(path: str) -> bool:
        """Whether ``path`` is the dashboard's rather than the emulated API's."""
        return path in _ASSETS or path.startswith(DASHBOARD_PREFIX)

    def open_streams(self) -> None:
        """Accept event streams again after ``close_streams``."""
        with self._lock:
            self._closed = False

    def close_streams(self) -> None:
        """End every open event stream and refuse new ones; safe from any thread."""
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for stream in streams:
            stream.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one dashboard request."""
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if path in _ASSETS:
                self._allow(method, "GET")
                name, content_type = _ASSETS[path]
                await _send(send, 200, self._asset(name), content_type, [])
            elif path == "/_emulator/state":
                self._allow(method, "GET")
                state = _state_json(self._ledger.snapshot(), self._faults)
                await _send_json(send, 200, state, [])
            elif path == "/_emulator/stream":
                self._allow(method, "GET")
                await self._stream(receive, send)
            elif path == "/_emulator/faults":
                self._allow(method, "GET")
                await _send_json(send, 200, {"faults": self._faults.pending()}, [])
            elif path.startswith("/_emulator/faults/"):
                control = self._controls.get(path.removeprefix("/_emulator/faults/"))
                if control is None:
                    raise _BadRequest(404, f"No dashboard route {path!r}.")
                self._allow(method, "POST")
                control(await _read_json(scope, receive))
                await _send_json(send, 200, {"faults": self._faults.pending()}, [])
            else:
                raise _BadRequest(404, f"No dashboard route {path!r}.")
        except _BadRequest as problem:
            extra = [("allow", problem.allow)] if problem.allow else []
            await _send_json(send, problem.status, {"error": problem.message}, extra)

    @staticmethod
    def _allow(method: str, allowed: str) -> None:
        if method != allowed:
            raise _BadRequest(405, f"{method} is not allowed here.", allow=allowed)

    def _asset(self, name: str) -> bytes:
        if name not in self._assets:
            files = resources.files("commet_middleware.testing").joinpath("dashboard")
            self._assets[name] = files.joinpath(name).read_bytes()
        return self._assets[name]

    # fault controls

    def _error_rate(self, data: dict[str, Any]) -> None:
        rate = _number(data, "rate", None, 0.0, 1.0)
        self._faults.error_rate(rate, _whole(data, "status", 500, 400, 599))

    def _latency(self, data: dict[str, Any]) -> None:
        self._faults.latency(_number(data, "seconds", None, 0.0, 30.0))

    def _fail_next(self, data: dict[str, Any]) -> None:
        n = _whole(data, "n", 1, 1, 1000)
        self._faults.fail_next(n, _whole(data, "status", 503, 400, 599))

    def _rate_limit_next(self, data: dict[str, Any]) -> None:
        n = _whole(data, "n", 1, 1, 1000)
        self._faults.rate_limit_next(n, _whole(data, "retry_after", 1, 0, 3600))

    def _drop_next(self, data: dict[str, Any]) -> None:
        self._faults.drop_next(_whole(data, "n", 1, 1, 1000))

    @staticmethod
    def _canned(arm: Callable[[int], None]) -> Callable[[dict[str, Any]], None]:
        return lambda data: arm(_whole(data, "n", 1, 1, 1000))

    # server-sent events

    async def _stream(self, receive: Receive, send: Send) -> None:
        subscriber = _Subscriber(asyncio.get_running_loop())
        with self._lock:
            closed = self._closed
            if not closed:
                self._streams.add(subscriber)
        if closed:
            # 204 is how an event stream tells EventSource to stop reconnecting.
            await _send(send, 204, b"", "text/plain", [])
            return
        unsubscribe = self._ledger.subscribe(subscriber.offer)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            hello = f"retry: {_RETRY_MS}\n: connected\n\n".encode()
            await send({"type": "http.response.body", "body": hello, "more_body": True})
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_close_on_disconnect, receive, subscriber)
                await _pump(subscriber, send)
                tasks.cancel_scope.cancel()
            if not subscriber.peer_gone:
                # Finish the body properly, so the browser sees an ended stream, not an error.
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the browser went away mid-write
        finally:
            unsubscribe()
            with self._lock:
                self._streams.discard(subscriber)


async def _close_on_disconnect(receive: Receive, subscriber: _Subscriber) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    subscriber.peer_gone = True
    subscriber.close()


async def _pump(subscriber: _Subscriber, send: Send) -> None:
    """Forward changes, batched, until the stream is closed (by the server or the peer)."""
    while True:
        batch = await subscriber.next()
        if batch is None:
            return
        changes, overflowed = batch
        chunks = [b"event: resync\ndata: {}\n\n"] if overflowed else []
        chunks += [_sse(change) for change in changes]
        if not chunks:
            chunks = [b": keep-alive\n\n"]
        await send({"type": "http.response.body", "body": b"".join(chunks), "more_body": True})


async def _read_json(scope: Scope, receive: Receive) -> dict[str, Any]:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    # A JSON content type makes a cross-site form post impossible without a CORS preflight,
    # which the emulator never grants; a foreign Origin is refused outright.
    if headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise _BadRequest(415, "Send the control as application/json.")
    origin = headers.get("origin")
    if origin is not None and origin != f"http://{headers.get('host', '')}":
        raise _BadRequest(403, "Cross-origin control requests are refused.")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _BadRequest(400, "The client went away.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            raise _BadRequest(413, "The body is too large.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    try:
        data = json.loads(body) if body.strip() else {}
    except (ValueError, RecursionError):
        raise _BadRequest(400, "The body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise _BadRequest(400, "The body must be a JSON object.")
    return data
