"""The emulated Commet API: request validation and routing, and the pure ASGI app around it."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs

from starlette.types import Receive, Scope, Send

from commet_middleware._models import FEATURE_CODE_PATTERN, utc_timestamp

from ._dashboard import Dashboard
from ._faults import ConnectionDropped, FaultDecision, Faults, Wait
from ._ledger import ApiProblem, Dialect, Ledger, RecordedRequest, StoredReply, new_id

__all__ = [
    "LEGACY_SUNSET",
    "EmulatorApp",
    "EmulatorRequest",
    "Reply",
    "RequestHandler",
    "host_allowed",
    "run_async",
    "run_sync",
]

# When the unversioned paths stop working, as the emulator announces it (RFC 8594 HTTP-date).
LEGACY_SUNSET = "Wed, 30 Jun 2027 00:00:00 GMT"
_MAX_IDEMPOTENCY_KEY = 255
_ISO_8601 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?"
    r"(Z|z|[+-]\d{2}(?::?\d{2})?)?"
)

_QUOTA_METHODS = {"GET": "get", "POST": "add", "DELETE": "remove", "PUT": "set"}
_ROUTES: dict[str, tuple[Dialect, dict[str, str]]] = {
    "/api/v1/usage/events": ("v1", {"POST": "track"}),
    "/api/v1/usage/quota": ("v1", _QUOTA_METHODS),
    "/api/v1/usage/quota/remove": ("v1", {"POST": "remove"}),
    "/api/v1/usage/quota/all": ("v1", {"GET": "get_all"}),
    "/api/usage/events": ("legacy", {"POST": "track"}),
    "/api/usage/quota": ("legacy", _QUOTA_METHODS),
    "/api/usage/quota/all": ("legacy", {"GET": "get_all"}),
}
_EVENT_FIELDS: dict[Dialect, tuple[str, str]] = {
    "v1": ("featureCode", "eventId"),
    "legacy": ("feature", "idempotencyKey"),
}


@dataclass(frozen=True)
class EmulatorRequest:
    """One HTTP request as the handler sees it; header names are lower case."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    """One HTTP answer."""

    status: int
    body: bytes
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Work:
    """A validated request, run under the ledger lock once the delays have passed."""

    run: Callable[[], tuple[int, Any]]
    mutation: bool
    idempotency_key: tuple[str, str] | None = None


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _validation(errors: list[dict[str, str]]) -> ApiProblem:
    first = errors[0]
    message = first["message"] if len(errors) == 1 else f"{len(errors)} fields are invalid."
    return ApiProblem(
        400, "validation_error", "validation_error", message, param=first["field"], details=errors
    )


def _fault_problem(decision: FaultDecision) -> ApiProblem:
    if decision.status == 429:
        retry_after = decision.retry_after or 1
        return ApiProblem(
            429,
            "rate_limit_error",
            "rate_limited",
            "Too many requests.",
            headers={
                "Retry-After": str(retry_after),
                "RateLimit-Limit": "100",
                "RateLimit-Remaining": "0",
                "RateLimit-Reset": str(retry_after),
            },
        )
    return ApiProblem(
        decision.status, "internal_error", "internal_error", "Injected failure (emulator fault)."
    )


class _Fields:
    """Collects every field error of one body, so one answer lists them all."""

    def __init__(self, data: dict[str, Any], allowed: Collection[str]) -> None:
        self.data = data
        self.errors: list[dict[str, str]] = []
        for name in data:
            if name not in allowed:
                self.fail(name, f"Unknown field {name!r}.")

    def fail(self, name: str, message: str) -> None:
        self.errors.append({"field": name, "message": message})

    def check(self) -> None:
        if self.errors:
            raise _validation(self.errors)

    def customer_id(self) -> str:
        value = self.data.get("customerId")
        if value is None:
            self.fail("customerId", "customerId is required.")
        elif not isinstance(value, str) or not value.strip():
            self.fail("customerId", "customerId must be a non-empty string.")
        else:
            return value
        return ""

    def feature(self, name: str) -> str:
        value = self.data.get(name)
        if value is None:
            self.fail(name, f"{name} is required.")
        elif not isinstance(value, str) or not FEATURE_CODE_PATTERN.fullmatch(value):
            self.fail(name, f"{name} may only contain a-z, 0-9 and _.")
        else:
            return value
        return ""

    def value(self) -> int | float:
        value = self.data.get("value")
        if value is None:
            return 1
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail("value", "value must be a number.")
        elif not math.isfinite(value):
            self.fail("value", "value must be a finite number.")
        elif value < 0:
            self.fail("value", "value must be >= 0.")
        else:
            return value
        return 0

    def optional_key(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(name, f"{name} must be a non-empty string.")
            return None
        return value

    def timestamp(self) -> str | None:
        value = self.data.get("timestamp")
        if value is None:
            return None
        moment = _parse_iso8601(value) if isinstance(value, str) else None
        if moment is None:
            self.fail("timestamp", "timestamp must be an ISO 8601 date-time string.")
            return None
        return utc_timestamp(moment)

    def properties(self, dialect: Dialect) -> dict[str, str]:
        value = self.data.get("properties")
        if value is None:
            return {}
        if dialect == "legacy":
            if isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                return dict(value)
            self.fail("properties", "properties must be an object of string to string.")
            return {}
        result: dict[str, str] = {}
        if isinstance(value, list):
            for item in value:
                if (
                    not isinstance(item, dict)
                    or set(item) != {"property", "value"}
                    or not isinstance(item["property"], str)
                    or not isinstance(item["value"], str)
                ):
                    break
                result[item["property"]] = item["value"]
            else:
                return result
        self.fail(
            "properties",
            'properties must be a list of {"property": string, "value": string} objects.',
        )
        return {}

    def count(self, *, required: bool) -> int:
        value = self.data.get("count")
        if value is None:
            if required:
                self.fail("count", "count is required.")
            return 1
        # JSON has one number type: 2.0 is the whole number 2, as for a JavaScript server.
        whole = isinstance(value, int) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer()
        )
        if isinstance(value, bool) or not whole:
            self.fail("count", "count must be a whole number.")
        elif value < 0:
            self.fail("count", "count must be >= 0.")
        else:
            return int(value)
        return 0


def _parse_iso8601(text: str) -> datetime | None:
    match = _ISO_8601.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        micro = int((fraction or "0")[:6].ljust(6, "0"))
        tz = timezone.utc
        if zone and zone not in ("Z", "z"):
            sign = -1 if zone[0] == "-" else 1
            digits = zone[1:].replace(":", "")
            offset = timedelta(hours=int(digits[:2]), minutes=int(digits[2:] or 0))
            tz = timezone(sign * offset)
        return datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second or 0), micro, tz
        )
    except ValueError:
        return None


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiProblem(
            400, "validation_error", "invalid_json", "The request body is not valid JSON."
        ) from None
    if not isinstance(data, dict):
        raise _validation([{"field": "body", "message": "The body must be a JSON object."}])
    return data


class RequestHandler:
    """Turns an :class:`EmulatorRequest` into a :class:`Reply`, pausing where faults say.

    ``process`` is a generator that yields the pauses (latency, holds), so one implementation
    serves the sync transport (which sleeps) and the async app (which awaits).
    """

    def __init__(
        self, ledger: Ledger, faults: Faults, api_keys: Collection[str] | None = None
    ) -> None:
        self.ledger = ledger
        self.faults = faults
        self.api_keys = None if api_keys is None else frozenset(api_keys)

    def process(self, request: EmulatorRequest) -> Generator[Wait, None, Reply]:
        """Handle one request; raises ``ConnectionDropped`` when a fault drops it."""
        request_id = new_id("req")
        path = request.path.rstrip("/") or "/"
        route = _ROUTES.get(path)
        dialect: Dialect | None = route[0] if route else None
        replayed = False

        def finish(
            reply: Reply, fault: str | None = None, content_type: str | None = None
        ) -> Reply:
            reply.headers += [
                ("content-type", content_type or "application/json"),
                ("x-request-id", request_id),
            ]
            if dialect == "legacy":
                successor = path.replace("/api/usage", "/api/v1/usage", 1)
                reply.headers += [
                    ("deprecation", "true"),
                    ("sunset", LEGACY_SUNSET),
                    ("link", f'<{successor}>; rel="successor-version"'),
                ]
            if replayed:
                reply.headers.append(("idempotent-replayed", "true"))
            self.ledger.log_request(
                RecordedRequest(
                    request.method, path, reply.status, request_id, dialect, replayed, fault
                )
            )
            return reply

        def problem_reply(problem: ApiProblem) -> Reply:
            return Reply(problem.status, _dumps(problem.body()), list(problem.headers.items()))

        def drop(kind: str) -> ConnectionDropped:
            self.ledger.log_request(
                RecordedRequest(request.method, path, None, request_id, dialect, False, kind)
            )
            return ConnectionDropped(kind)

        decision = self.faults.before()
        if decision is not None:
            if decision.kind == "drop_next":
                raise drop(decision.kind)
            if decision.body is not None:  # a canned answer, exactly as the fault gives it
                reply = Reply(decision.status, decision.body)
                return finish(reply, decision.kind, decision.content_type)
            return finish(problem_reply(_fault_problem(decision)), decision.kind)

        delay = self.faults.delay()
        outcome: ApiProblem | StoredReply | _Work
        try:
            outcome = self._prepare(request, path, route)
        except ApiProblem as problem:
            outcome = problem
        if delay is not None:
            yield delay
        if isinstance(outcome, ApiProblem):
            return finish(problem_reply(outcome))
        if isinstance(outcome, StoredReply):
            replayed = True
            return finish(Reply(outcome.status, outcome.body))

        stored = False
        try:
            hold = self.faults.hold() if outcome.mutation else None
            if hold is not None:
                yield hold
            try:
                status, body = outcome.run()
                reply = Reply(status, _dumps(body))
            except ApiProblem as problem:
                reply = problem_reply(problem)
            if outcome.idempotency_key is not None:
                self.ledger.finish_idempotent(
                    outcome.idempotency_key, StoredReply(reply.status, reply.body)
                )
                stored = True
        finally:
            if outcome.idempotency_key is not None and not stored:
                self.ledger.finish_idempotent(outcome.idempotency_key, None)

        if outcome.mutation and reply.status < 300:
            after = self.faults.after_write()
            if after is not None:
                if after.kind == "drop_after_write_next":
                    raise drop(after.kind)
                return finish(problem_reply(_fault_problem(after)), after.kind)
        return finish(reply)

    def _prepare(
        self,
        request: EmulatorRequest,
        path: str,
        route: tuple[Dialect, dict[str, str]] | None,
    ) -> StoredReply | _Work:
        api_key = request.headers.get("x-api-key", "")
        if self.api_keys is not None:
            authorised = api_key in self.api_keys
        else:
            authorised = api_key.startswith(("ck_", "rk_")) and len(api_key) > 3
        if not authorised:
            raise ApiProblem(
                401, "authentication_error", "unauthorized", "Missing or invalid x-api-key."
            )
        if route is None:
            raise ApiProblem(404, "not_found_error", "not_found", f"No route {path!r}.")
        dialect, methods = route
        operation = methods.get(request.method)
        if operation is None:
            raise ApiProblem(
                405,
                "invalid_request_error",
                "method_not_allowed",
                f"{request.method} is not allowed on {path}.",
                headers={"Allow": ", ".join(sorted(methods))},
            )
        if operation in ("get", "get_all"):
            return self._read(operation, request.query)

        fields = self._validate(operation, dialect, _parse_json(request.body))
        work = _Work(run=fields, mutation=True)
        header_key = request.headers.get("idempotency-key")
        if dialect == "v1" and header_key is not None:
            if not header_key.strip() or len(header_key) > _MAX_IDEMPOTENCY_KEY:
                raise _validation(
                    [
                        {
                            "field": "Idempotency-Key",
                            "message": "Idempotency-Key must be 1 to 255 characters.",
                        }
                    ]
                )
            key = (api_key, header_key)
            digest = hashlib.sha256(request.body).digest()
            replay = self.ledger.begin_idempotent(key, (request.method, path, digest))
            if replay is not None:
                return replay
            work.idempotency_key = key
        return work

    def _read(self, operation: str, query: str) -> _Work:
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        allowed = ("customerId",) if operation == "get_all" else ("customerId", "featureCode")
        fields = _Fields(params, allowed)
        customer = fields.customer_id()
        if operation == "get_all":
            fields.check()
            return _Work(
                run=lambda: (
                    200,
                    {
                        "object": "list",
                        "data": [a.to_wire() for a in self.ledger.allowances(customer)],
                        "hasMore": False,
                    },
                ),
                mutation=False,
            )
        feature = fields.feature("featureCode")
        fields.check()
        return _Work(
            run=lambda: (200, self.ledger.allowance(customer, feature).to_wire()),
            mutation=False,
        )

    def _validate(
        self, operation: str, dialect: Dialect, data: dict[str, Any]
    ) -> Callable[[], tuple[int, Any]]:
        if operation == "track":
            feature_name, key_name = _EVENT_FIELDS[dialect]
            allowed = (feature_name, key_name, "customerId", "value", "timestamp", "properties")
            fields = _Fields(data, allowed)
            customer = fields.customer_id()
            feature = fields.feature(feature_name)
            value = fields.value()
            event_id = fields.optional_key(key_name)
            timestamp = fields.timestamp()
            properties = fields.properties(dialect)
            fields.check()
            return lambda: (
                201,
                self.ledger.record_usage(
                    customer,
                    feature,
                    value,
                    event_id=event_id,
                    timestamp=timestamp,
                    properties=properties,
                    dialect=dialect,
                    param=feature_name,
                ).to_wire(),
            )
        fields = _Fields(data, ("customerId", "featureCode", "count"))
        customer = fields.customer_id()
        feature = fields.feature("featureCode")
        count = fields.count(required=operation == "set")
        fields.check()
        action: Any = operation
        return lambda: (
            200,
            self.ledger.change_quota(customer, feature, action, count, dialect=dialect).to_wire(),
        )


# Names that only ever mean this machine: "localhost" and its subdomains (RFC 6761; browsers
# resolve them to loopback without asking DNS) and "testserver", the name Starlette's TestClient
# sends in-process. An attacker's page can only be served from a name whose DNS it controls,
# which none of these is: that is what makes DNS rebinding fail against the allow-list.
_LOCAL_NAMES = frozenset({"localhost", "testserver"})
_HOST_REFUSED = (
    b'{"error":{"type":"invalid_request_error","code":"host_not_allowed","message":'
    b'"This emulator only answers requests addressed to a loopback name or its own address. '
    b'Start it with --allow-host NAME to reach it under another name."}}'
)


def _host_name(header: str) -> str:
    """Return the host of a ``Host`` header, lower case, without port, brackets or final dot."""
    text = header.strip().lower()
    if text.startswith("["):  # [::1]:8787
        return text[1 : text.find("]")] if "]" in text else text
    if text.count(":") == 1:
        text = text.split(":", 1)[0]
    return text.rstrip(".")


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_allowed(
    host_header: str | None, allowed: Collection[str], bound: str | None = None
) -> bool:
    """Whether a request whose ``Host`` header is ``host_header`` may reach the emulator.

    Allowed: loopback names (``localhost``, ``*.localhost``, ``testserver``), loopback
    addresses (``127.0.0.0/8``, ``::1``), the address the server is bound to (``bound``, when it
    is an IP address), every name in ``allowed``, and anything when ``allowed`` holds ``"*"``.
    A request without a ``Host`` header is not from a browser and is allowed.
    """
    if host_header is None or "*" in allowed:
        return True
    name = _host_name(host_header)
    if name in _LOCAL_NAMES or name.endswith(".localhost") or name in allowed:
        return True
    address = _ip(name)
    if address is None:
        return False
    if address.is_loopback:
        return True
    bound_address = _ip(bound) if bound else None
    return bound_address is not None and bound_address == address


def run_sync(steps: Generator[Wait, None, Reply]) -> Reply:
    """Drive ``RequestHandler.process`` in the calling thread."""
    try:
        while True:
            next(steps).block()
    except StopIteration as done:
        reply: Reply = done.value
        return reply
    finally:
        steps.close()


async def run_async(steps: Generator[Wait, None, Reply]) -> Reply:
    """Drive ``RequestHandler.process`` in the running event loop."""
    try:
        while True:
            await next(steps).ablock()
    except StopIteration as done:
        reply: Reply = done.value
        return reply
    finally:
        steps.close()


class EmulatorApp:
    """The pure ASGI app of the emulated API (HTTP and lifespan scopes), and its dashboard.

    ``/`` and ``/_emulator/...`` go to the :class:`Dashboard`, outside the API's key check,
    fault injection and request log; every other path is the emulated API.

    Both answer only requests whose ``Host`` passes :func:`host_allowed` (loopback names and
    addresses, the bound address, and ``allowed_hosts``); any other gets 403 before anything
    is read or recorded. A page a developer opens in a browser cannot then reach the emulator
    through a DNS name that it points at 127.0.0.1 (DNS rebinding).
    """

    def __init__(self, handler: RequestHandler, *, allowed_hosts: Collection[str] = ()) -> None:
        self._handler = handler
        self.allowed_hosts = frozenset(_host_name(h) if h != "*" else h for h in allowed_hosts)
        self.dashboard = Dashboard(handler.ledger, handler.faults)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if not self._host_allowed(scope):
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _HOST_REFUSED})
            return
        if self.dashboard.handles(scope["path"]):
            await self.dashboard(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request = EmulatorRequest(
            method=scope["method"],
            path=scope["path"],
            query=scope.get("query_string", b"").decode("latin-1"),
            headers=headers,
            body=b"".join(chunks),
        )
        reply = await run_async(self._handler.process(request))
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers],
            }
        )
        await send({"type": "http.response.body", "body": reply.body})

    def _host_allowed(self, scope: Scope) -> bool:
        host = None
        for key, value in scope.get("headers") or ():
            if key.lower() == b"host":
                host = value.decode("latin-1")
                break
        server = scope.get("server")
        return host_allowed(host, self.allowed_hosts, server[0] if server else None)
