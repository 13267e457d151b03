"""Raw ASGI mechanics of CommetMiddleware, with a list sink and hand-written ASGI apps."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from commet_middleware import CommetMiddleware, metered, set_customer, track
from commet_middleware._keys import derive_idempotency_key
from commet_middleware.billing._context import RequestContext, get_current_context
from commet_middleware.customers import from_header, from_path_param

from .conftest import ListSink

App = ASGIApp


def http_scope(
    path: str = "/", method: str = "GET", headers: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }


async def drive(
    app: App, scope: dict[str, Any], incoming: list[Message] | None = None
) -> list[Message]:
    """Run one ASGI call; return what the app sent. After the request body, a disconnect."""
    sent: list[Message] = []
    queue = list(incoming or [{"type": "http.request", "body": b"", "more_body": False}])

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def run(app: App, scope: dict[str, Any], incoming: list[Message] | None = None) -> list[Message]:
    return asyncio.run(drive(app, scope, incoming))


def responder(
    status: int = 200,
    chunks: tuple[bytes, ...] = (b"ok",),
    *,
    before: Callable[[], None] | None = None,
    after: Callable[[], None] | None = None,
) -> App:
    """An ASGI app that runs ``before``, answers ``status`` with ``chunks``, then runs ``after``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if before is not None:
            before()
        await send({"type": "http.response.start", "status": status, "headers": []})
        for index, chunk in enumerate(chunks):
            more = index < len(chunks) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
        if after is not None:
            after()

    return app


def customer_mw(app: App, sink: ListSink, **options: Any) -> CommetMiddleware:
    return CommetMiddleware(app, customer=from_header("X-Customer"), sink=sink, **options)


def test_metered_success_is_billed_once_to_the_request_customer(sink: ListSink) -> None:
    """A 200 with one @metered call enqueues exactly one event on the header's customer."""

    @metered("api_calls")
    def work() -> None:
        pass

    mw = customer_mw(responder(before=work), sink)
    run(mw, http_scope(headers={"X-Customer": "cus_1"}))
    assert [(e.customer_id, e.feature, e.value) for e in sink.events] == [("cus_1", "api_calls", 1)]
    assert mw.stats.events_enqueued == 1


@pytest.mark.parametrize("status", [400, 404, 422, 500, 503])
def test_error_statuses_are_not_billed(sink: ListSink, status: int) -> None:
    """4xx and 5xx responses bill nothing even when usage was recorded."""
    mw = customer_mw(responder(status, before=lambda: track("api_calls")), sink)
    run(mw, http_scope(headers={"X-Customer": "cus_1"}))
    assert sink.events == []


def test_bill_status_hook_decides(sink: ListSink) -> None:
    """A custom bill_status replaces the default < 400 rule."""
    mw = customer_mw(
        responder(404, before=lambda: track("api_calls")), sink, bill_status=lambda s: s != 500
    )
    run(mw, http_scope(headers={"X-Customer": "cus_1"}))
    assert len(sink.events) == 1


def test_exception_in_the_app_is_not_billed_and_propagates(sink: ListSink) -> None:
    """An app that raises after recording usage bills nothing; the error reaches the server."""

    def boom() -> None:
        track("api_calls")
        raise RuntimeError("boom")

    mw = customer_mw(responder(before=boom), sink)
    with pytest.raises(RuntimeError, match="boom"):
        run(mw, http_scope(headers={"X-Customer": "cus_1"}))
    assert sink.events == []


def test_streaming_is_billed_only_when_the_last_chunk_is_sent(sink: ListSink) -> None:
    """A streamed response is billed once, at its more_body=False message, not mid-stream."""
    seen_during_stream: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        track("api_calls")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3):
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            seen_during_stream.append(len(sink.events))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        seen_during_stream.append(len(sink.events))

    run(customer_mw(app, sink), http_scope(headers={"X-Customer": "cus_1"}))
    assert seen_during_stream == [0, 0, 0, 1]


def test_client_disconnect_mid_stream_is_not_billed(sink: ListSink) -> None:
    """A stream that ends because the client left (no final chunk) is not billed, but counted."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        track("api_calls")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await receive()  # the body
        message = await receive()
        assert message["type"] == "http.disconnect"

    mw = customer_mw(app, sink)
    run(mw, http_scope(headers={"X-Customer": "cus_1"}))
    assert sink.events == []
    assert mw.stats.incomplete_responses == 1


async def drive_recording(
    app: App, scope: dict[str, Any], sink: ListSink, *, fail_on: int | None = None
) -> list[tuple[str, bool, int]]:
    """Run one ASGI call; return (type, more_body, events already enqueued) per message sent.

    ``fail_on`` makes the server's send raise (client gone) on that message index.
    """
    seen: list[tuple[str, bool, int]] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        seen.append((message["type"], bool(message.get("more_body")), len(sink.events)))
        if fail_on is not None and len(seen) - 1 == fail_on:
            raise OSError("client went away")

    await app(scope, receive, send)
    return seen


def test_event_is_enqueued_before_the_final_body_reaches_the_server(sink: ListSink) -> None:
    """The server's send already finds the event in the sink when more_body=False arrives."""
    mw = customer_mw(responder(chunks=(b"a", b"b", b"c"), before=lambda: track("api")), sink)
    seen = asyncio.run(drive_recording(mw, http_scope(headers={"X-Customer": "cus_1"}), sink))
    assert seen == [
        ("http.response.start", False, 0),
        ("http.response.body", True, 0),
        ("http.response.body", True, 0),
        ("http.response.body", False, 1),
    ]
    assert mw.stats.events_enqueued == 1


def test_zero_code_event_is_enqueued_before_the_final_body(sink: ListSink) -> None:
    """The meter= event is also in the sink before the final body message is forwarded."""
    mw = customer_mw(responder(), sink, meter="api_calls")
    seen = asyncio.run(drive_recording(mw, http_scope(headers={"X-Customer": "cus_1"}), sink))
    assert seen[-1] == ("http.response.body", False, 1)
    assert [e.feature for e in sink.events] == ["api_calls"]


def test_failing_final_send_still_bills(sink: ListSink) -> None:
    """A client that leaves on the very last send is billed: the whole response was produced."""
    mw = customer_mw(responder(chunks=(b"a", b"b"), before=lambda: track("api")), sink)
    with pytest.raises(OSError, match="client went away"):
        asyncio.run(
            drive_recording(mw, http_scope(headers={"X-Customer": "cus_1"}), sink, fail_on=2)
        )
    assert [e.feature for e in sink.events] == ["api"]
    assert mw.stats.incomplete_responses == 0


def test_failing_send_before_the_last_chunk_is_not_billed(sink: ListSink) -> None:
    """A client that leaves before the last chunk is not billed, even if the app sends on."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        track("api")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b", "more_body": False})

    mw = customer_mw(app, sink)
    seen = asyncio.run(
        drive_recording(mw, http_scope(headers={"X-Customer": "cus_1"}), sink, fail_on=1)
    )
    assert [kind for kind, _, _ in seen] == ["http.response.start", *["http.response.body"] * 2]
    assert sink.events == []


def test_declared_length_bills_before_the_chunk_that_completes_it(sink: ListSink) -> None:
    """With Content-Length, the event precedes the chunk carrying the last byte, not the end."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        track("downloads")
        headers = [(b"content-length", b"4")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ab", "more_body": True})
        await send({"type": "http.response.body", "body": b"cd", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    mw = customer_mw(app, sink)
    seen = asyncio.run(drive_recording(mw, http_scope(headers={"X-Customer": "cus_1"}), sink))
    assert [count for _, _, count in seen] == [0, 0, 1, 1]
    assert len(sink.events) == 1


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_bodyless_response_bills_before_its_start(sink: ListSink, method: str, status: int) -> None:
    """HEAD, 204 and 304 are whole with their headers: the event precedes the response start."""
    mw = customer_mw(responder(status, chunks=(b"",), before=lambda: track("api")), sink)
    scope = http_scope(method=method, headers={"X-Customer": "cus_1"})
    seen = asyncio.run(drive_recording(mw, scope, sink))
    assert seen == [("http.response.start", False, 1), ("http.response.body", False, 1)]
    assert len(sink.events) == 1


def test_pathsend_bills_before_forwarding(sink: ListSink) -> None:
    """An http.response.pathsend response is settled before the server is told to send the file."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        track("downloads")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/dev/null"})

    mw = customer_mw(app, sink)
    seen = asyncio.run(drive_recording(mw, http_scope(headers={"X-Customer": "cus_1"}), sink))
    assert seen[-1] == ("http.response.pathsend", False, 1)


def test_non_billable_final_send_failure_bills_nothing(sink: ListSink) -> None:
    """A 500 whose last send fails is settled unbilled, as before."""
    mw = customer_mw(responder(500, before=lambda: track("api")), sink)
    with pytest.raises(OSError, match="client went away"):
        asyncio.run(
            drive_recording(mw, http_scope(headers={"X-Customer": "cus_1"}), sink, fail_on=1)
        )
    assert sink.events == []


def test_a_second_final_body_does_not_bill_twice(sink: ListSink) -> None:
    """Completion happens once: a stray extra final message adds no zero-code event."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a"})
        await send({"type": "http.response.body", "body": b""})

    mw = customer_mw(app, sink, meter="api_calls")
    asyncio.run(drive_recording(mw, http_scope(headers={"X-Customer": "cus_1"}), sink))
    assert len(sink.events) == 1


def test_messages_are_forwarded_immediately(sink: ListSink) -> None:
    """The response start reaches the server before the app sends the body (no buffering)."""
    sent: list[Message] = []
    observed: list[list[str]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        observed.append([m["type"] for m in sent])
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        observed.append([m["type"] for m in sent])
        await send({"type": "http.response.body", "body": b"b"})

    async def main() -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": b""}

        async def send(message: Message) -> None:
            sent.append(message)

        await customer_mw(app, sink)(http_scope(), receive, send)

    asyncio.run(main())
    assert observed == [
        ["http.response.start"],
        ["http.response.start", "http.response.body"],
    ]


def test_context_var_is_reset_after_the_request(sink: ListSink) -> None:
    """The request context is visible inside the app and gone afterwards."""
    inside: list[object] = []

    async def main() -> None:
        mw = customer_mw(responder(before=lambda: inside.append(get_current_context())), sink)
        await drive(mw, http_scope())
        assert get_current_context() is None

    asyncio.run(main())
    assert inside[0] is not None


def test_non_http_scopes_pass_through(sink: ListSink) -> None:
    """Websocket scopes go straight to the app, with no billing context."""
    seen: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["type"], get_current_context()))

    asyncio.run(customer_mw(app, sink)({"type": "websocket", "path": "/"}, None, None))  # type: ignore[arg-type]
    assert seen == [("websocket", None)]


def test_installed_twice_bills_once(sink: ListSink) -> None:
    """The commet.applied scope key stops a second instance from billing the same request."""
    app = responder(before=lambda: track("api_calls"))
    mw = customer_mw(customer_mw(app, sink), sink, meter="api_calls")
    run(mw, http_scope(headers={"X-Customer": "cus_1"}))
    assert [e.feature for e in sink.events] == ["api_calls", "api_calls"]  # track + zero-code
    assert len({e.idempotency_key for e in sink.events}) == 2


def test_set_customer_late_in_the_request_wins(sink: ListSink) -> None:
    """set_customer from app code (after the resolver ran) decides who is billed."""

    def auth() -> None:
        set_customer("cus_from_auth")
        track("api_calls")

    run(customer_mw(responder(before=auth), sink), http_scope(headers={"X-Customer": "cus_1"}))
    assert [e.customer_id for e in sink.events] == ["cus_from_auth"]


def test_path_param_resolver_finds_the_customer_after_routing(sink: ListSink) -> None:
    """A resolver that needs routing (path params) is asked again once the router has run."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["path_params"] = {"org": "cus_routed"}  # what a router does
        track("api_calls")
        await responder()(scope, receive, send)

    mw = CommetMiddleware(app, customer=from_path_param("org"), sink=sink)
    run(mw, http_scope("/orgs/cus_routed"))
    assert [e.customer_id for e in sink.events] == ["cus_routed"]


def test_usage_after_the_response_completed_is_billed(sink: ListSink) -> None:
    """track() in a background task (after the body was sent) is still billed, exactly once."""
    mw = customer_mw(responder(after=lambda: track("emails_sent")), sink)
    run(mw, http_scope(headers={"X-Customer": "cus_1"}))
    assert [e.feature for e in sink.events] == ["emails_sent"]


def test_keys_are_distinct_per_request_and_per_call(sink: ListSink) -> None:
    """Two calls in one request and the same call in two requests all get different keys."""

    def twice() -> None:
        track("api_calls")
        track("api_calls")

    mw = customer_mw(responder(before=twice), sink)
    for _ in range(2):
        run(mw, http_scope(headers={"X-Customer": "cus_1"}))
    assert len({e.idempotency_key for e in sink.events}) == 4


def test_client_idempotency_key_opt_in_runs_a_request_once(sink: ListSink) -> None:
    """With idempotency_header, a repeat of a succeeded request is refused (409, not run again);
    the key on another path is refused too (422): one key, one request."""
    mw = customer_mw(
        responder(before=lambda: track("api_calls")), sink, idempotency_header="Idempotency-Key"
    )
    headers = {"X-Customer": "cus_1", "Idempotency-Key": "abc"}
    answers = [run(mw, http_scope(path, "POST", headers)) for path in ("/a", "/a", "/b")]
    assert [sent[0]["status"] for sent in answers] == [200, 409, 422]
    assert len(sink.events) == 1


def test_zero_code_bills_every_successful_request(sink: ListSink) -> None:
    """meter='api_calls' bills each 2xx request once and never a 4xx."""
    ok = customer_mw(responder(), sink, meter="api_calls")
    bad = customer_mw(responder(404), sink, meter="api_calls")
    for _ in range(3):
        run(ok, http_scope("/search", headers={"X-Customer": "cus_1"}))
    run(bad, http_scope("/missing", headers={"X-Customer": "cus_1"}))
    assert [(e.customer_id, e.feature) for e in sink.events] == [("cus_1", "api_calls")] * 3


@pytest.mark.parametrize(
    ("path", "method", "headers"),
    [
        ("/health", "GET", {}),
        ("/healthz", "GET", {}),
        ("/docs", "GET", {}),
        ("/docs/oauth2-redirect", "GET", {}),
        ("/redoc", "GET", {}),
        ("/openapi.json", "GET", {}),
        ("/favicon.ico", "GET", {}),
        ("/search", "OPTIONS", {"Access-Control-Request-Method": "GET"}),
    ],
)
def test_zero_code_default_exclusions(
    sink: ListSink, path: str, method: str, headers: dict[str, str]
) -> None:
    """Health checks, docs and CORS preflights are never billed in zero-code mode."""
    mw = customer_mw(responder(), sink, meter="api_calls")
    run(mw, http_scope(path, method, {"X-Customer": "cus_1", **headers}))
    assert sink.events == []


def test_zero_code_mapping_and_callable_meters(sink: ListSink) -> None:
    """A meter table matches METHOD+pattern, pattern, glob or method; a callable decides itself."""

    async def routed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"].startswith("/items/"):
            scope["route"] = type("Route", (), {"path": "/items/{item_id}"})()
        await responder()(scope, receive, send)

    table = {
        "POST /items/{item_id}": "item_writes",
        "/items/{item_id}": "item_reads",
        "/export/*": "exports",
        "DELETE": "deletes",
    }
    mw = customer_mw(routed, sink, meter=table)
    for path, method in [
        ("/items/1", "POST"),
        ("/items/2", "GET"),
        ("/export/csv", "GET"),
        ("/other", "DELETE"),
        ("/other", "GET"),
    ]:
        run(mw, http_scope(path, method, {"X-Customer": "cus_1"}))
    assert [e.feature for e in sink.events] == ["item_writes", "item_reads", "exports", "deletes"]

    sink.operations.clear()
    by_fn = customer_mw(
        responder(), sink, meter=lambda scope: "posts" if scope["method"] == "POST" else None
    )
    run(by_fn, http_scope("/x", "POST", {"X-Customer": "cus_1"}))
    run(by_fn, http_scope("/x", "GET", {"X-Customer": "cus_1"}))
    assert [e.feature for e in sink.events] == ["posts"]


def test_missing_customer_is_served_counted_and_never_billed(sink: ListSink) -> None:
    """Default mode serves a billable request with no customer, bills nobody, counts it."""
    mw = customer_mw(responder(before=lambda: track("api_calls")), sink, meter="api_calls")
    sent = run(mw, http_scope())
    assert sent[0]["status"] == 200
    assert sink.events == []
    assert mw.stats.unattributed_requests == 1


def test_reject_mode_zero_code_answers_401_json(sink: ListSink) -> None:
    """on_missing_customer='reject' replaces a billable response with a 401 customer_required."""
    mw = customer_mw(responder(), sink, meter="api_calls", on_missing_customer="reject")
    sent = run(mw, http_scope("/search"))
    assert sent[0]["status"] == 401
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "customer_required"
    assert sink.events == []
    assert mw.stats.rejected_requests == 1
    # Requests that would not bill are served as usual.
    assert run(mw, http_scope("/health"))[0]["status"] == 200


def test_reject_mode_metered_refuses_before_running(sink: ListSink) -> None:
    """In reject mode a @metered function with no customer does not run; the client gets 401."""
    ran: list[int] = []

    @metered("api_calls")
    def work() -> None:
        ran.append(1)

    mw = customer_mw(responder(before=work), sink, on_missing_customer="reject")
    sent = run(mw, http_scope())
    assert sent[0]["status"] == 401
    assert ran == []
    ok = run(mw, http_scope(headers={"X-Customer": "cus_1"}))
    assert ok[0]["status"] == 200
    assert ran == [1]
    assert len(sink.events) == 1


class _FakeQueue:
    """Stands in for DeliveryQueue to observe the lifecycle calls."""

    log: list[str]

    def __init__(self, settings: object) -> None:
        self.log = []

    def enqueue(self, operation: object) -> None:
        self.log.append("enqueue")

    def start(self) -> None:
        self.log.append("start")

    async def aclose(self, timeout: float | None = None) -> None:
        self.log.append("aclose")


def test_lifespan_starts_and_flushes_the_owned_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Startup starts the queue; the queue is closed before shutdown.complete is forwarded."""
    monkeypatch.setattr("commet_middleware.delivery.DeliveryQueue", _FakeQueue)
    order: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    mw = CommetMiddleware(app, api_key="ck_test")
    queue = mw.sink
    assert isinstance(queue, _FakeQueue)

    async def main() -> None:
        incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

        async def receive() -> Message:
            return incoming.pop(0)

        async def send(message: Message) -> None:
            order.extend(queue.log)
            queue.log.clear()
            order.append(message["type"])

        await mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    asyncio.run(main())
    assert order == ["start", "lifespan.startup.complete", "aclose", "lifespan.shutdown.complete"]


def test_lifespan_is_answered_for_an_app_that_refuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An app that raises on lifespan without reading it (Django's ASGI app) still gets its
    queue started at startup and flushed before shutdown.complete: the middleware answers."""
    monkeypatch.setattr("commet_middleware.delivery.DeliveryQueue", _FakeQueue)
    order: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise ValueError(f"cannot handle {scope['type']}")

    mw = CommetMiddleware(app, api_key="ck_test")
    queue = mw.sink
    assert isinstance(queue, _FakeQueue)

    async def main() -> None:
        incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

        async def receive() -> Message:
            return incoming.pop(0)

        async def send(message: Message) -> None:
            order.extend(queue.log)
            queue.log.clear()
            order.append(message["type"])

        await mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    asyncio.run(main())
    assert order == ["start", "lifespan.startup.complete", "aclose", "lifespan.shutdown.complete"]


def test_an_app_failing_its_own_startup_is_not_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """An app that read the startup and then raised failed its startup: the error propagates."""
    monkeypatch.setattr("commet_middleware.delivery.DeliveryQueue", _FakeQueue)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise RuntimeError("database unreachable")

    mw = CommetMiddleware(app, api_key="ck_test")

    async def main() -> None:
        async def receive() -> Message:
            return {"type": "lifespan.startup"}

        async def send(message: Message) -> None:
            raise AssertionError(f"nothing is answered for the app: {message}")

        await mw({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    with pytest.raises(RuntimeError, match="database unreachable"):
        asyncio.run(main())


def test_queue_starts_lazily_without_lifespan(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no lifespan, the first request starts the owned queue (once)."""
    monkeypatch.setattr("commet_middleware.delivery.DeliveryQueue", _FakeQueue)
    mw = CommetMiddleware(responder(), api_key="ck_test")
    run(mw, http_scope())
    run(mw, http_scope())
    assert isinstance(mw.sink, _FakeQueue)
    assert mw.sink.log == ["start"]


def test_resolver_errors_never_break_the_request(sink: ListSink, allow_commet_errors: None) -> None:
    """A resolver that raises is logged; the request is served and billed to nobody."""

    def broken(source: Any) -> str:
        raise RuntimeError("resolver bug")

    mw = CommetMiddleware(responder(before=lambda: track("api_calls")), customer=broken, sink=sink)
    assert run(mw, http_scope())[0]["status"] == 200
    assert sink.events == []


def test_keys_are_derived_once_from_the_request_seed(sink: ListSink) -> None:
    """Each event's key is the request seed + feature + ordinal, fixed when it was recorded."""
    contexts: list[RequestContext] = []

    def work() -> None:
        context = get_current_context()
        assert context is not None
        contexts.append(context)
        track("api_calls")
        track("api_calls")
        track("tokens", 5)

    run(customer_mw(responder(before=work), sink), http_scope(headers={"X-Customer": "cus_1"}))
    seed = contexts[0].key_seed
    assert [e.idempotency_key for e in sink.events] == [
        derive_idempotency_key(seed, "api_calls", 1),
        derive_idempotency_key(seed, "api_calls", 2),
        derive_idempotency_key(seed, "tokens", 1),
    ]
