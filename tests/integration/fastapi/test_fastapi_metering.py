"""CommetMiddleware and @metered on a real FastAPI app, through its test clients."""

# No "from __future__ import annotations": FastAPI reads these endpoints' annotations at
# runtime, and several depend on names local to a test function.

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from commet_middleware import CommetMiddleware, current_customer, metered, set_customer, track
from commet_middleware.customers import from_header
from integration.conftest import ListSink

CUSTOMER = {"X-Customer-ID": "cus_1"}


def build_app(sink: ListSink, *, is_async: bool, **options: Any) -> FastAPI:
    """One app per test: the same endpoints written sync or async."""
    app = FastAPI()
    app.add_middleware(
        CommetMiddleware, customer=from_header("X-Customer-ID"), sink=sink, **options
    )

    if is_async:

        @app.get("/search")
        @metered("api_calls")
        async def search(q: str, limit: int = 10) -> dict[str, Any]:
            return {"q": q, "limit": limit}

        @app.get("/fail/{status}")
        @metered("api_calls")
        async def fail(status: int) -> JSONResponse:
            if status == 404:
                raise HTTPException(404, "nope")
            return JSONResponse({"status": status}, status_code=status)

        @app.get("/boom")
        @metered("api_calls")
        async def boom() -> None:
            track("api_calls")
            raise RuntimeError("endpoint bug")

        @app.get("/rows")
        @metered("rows_read", value=lambda rows: len(rows))
        async def rows(n: int) -> list[int]:
            return list(range(n))

    else:

        @app.get("/search")
        @metered("api_calls")
        def search(q: str, limit: int = 10) -> dict[str, Any]:  # type: ignore[misc]
            return {"q": q, "limit": limit}

        @app.get("/fail/{status}")
        @metered("api_calls")
        def fail(status: int) -> JSONResponse:  # type: ignore[misc]
            if status == 404:
                raise HTTPException(404, "nope")
            return JSONResponse({"status": status}, status_code=status)

        @app.get("/boom")
        @metered("api_calls")
        def boom() -> None:  # type: ignore[misc]
            track("api_calls")
            raise RuntimeError("endpoint bug")

        @app.get("/rows")
        @metered("rows_read", value=lambda rows: len(rows))
        def rows(n: int) -> list[int]:  # type: ignore[misc]
            return list(range(n))

    return app


@pytest.fixture(params=["sync", "async"])
def is_async(request: pytest.FixtureRequest) -> bool:
    """Each test runs against sync (threadpool) and async endpoints."""
    return bool(request.param == "async")


@pytest.fixture
def client(sink: ListSink, is_async: bool) -> Iterator[TestClient]:
    with TestClient(build_app(sink, is_async=is_async), raise_server_exceptions=False) as c:
        yield c


def test_success_is_billed_once(client: TestClient, sink: ListSink) -> None:
    """A successful metered request enqueues exactly one event on the request's customer."""
    response = client.get("/search", params={"q": "x"}, headers=CUSTOMER)
    assert response.json() == {"q": "x", "limit": 10}
    assert [(e.customer_id, e.feature, e.value) for e in sink.events] == [("cus_1", "api_calls", 1)]


def test_value_computed_from_the_result(client: TestClient, sink: ListSink) -> None:
    """value= as a function of the endpoint's return value bills that amount."""
    client.get("/rows", params={"n": 7}, headers=CUSTOMER)
    assert [(e.feature, e.value) for e in sink.events] == [("rows_read", 7)]


@pytest.mark.parametrize("status", [400, 404, 409, 500, 503])
def test_error_responses_are_not_billed(client: TestClient, sink: ListSink, status: int) -> None:
    """Raised HTTPException and returned 4xx/5xx responses bill nothing."""
    assert client.get(f"/fail/{status}", headers=CUSTOMER).status_code == status
    assert sink.events == []


def test_validation_error_is_not_billed(client: TestClient, sink: ListSink) -> None:
    """A 422 from FastAPI's parameter validation never reaches the endpoint and bills nothing."""
    assert (
        client.get("/search", params={"q": "x", "limit": "many"}, headers=CUSTOMER).status_code
        == 422
    )
    assert sink.events == []


def test_exception_is_not_billed(client: TestClient, sink: ListSink) -> None:
    """An endpoint that raises gives a 500 and bills nothing, not even its track() call."""
    assert client.get("/boom", headers=CUSTOMER).status_code == 500
    assert sink.events == []


def test_set_customer_from_a_dependency(sink: ListSink, is_async: bool) -> None:
    """set_customer in a (sync or async) dependency decides the customer; the endpoint sees it."""
    app = FastAPI()
    app.add_middleware(CommetMiddleware, sink=sink)

    if is_async:

        async def auth(x_api_token: Annotated[str, Header()]) -> str:
            set_customer("cus_" + x_api_token)
            return x_api_token

    else:

        def auth(x_api_token: Annotated[str, Header()]) -> str:  # type: ignore[misc]
            set_customer("cus_" + x_api_token)
            return x_api_token

    @app.get("/me")
    @metered("api_calls")
    def me(token: Annotated[str, Depends(auth)]) -> dict[str, Any]:
        return {"customer": current_customer()}

    with TestClient(app) as c:
        assert c.get("/me", headers={"X-Api-Token": "42"}).json() == {"customer": "cus_42"}
    assert [e.customer_id for e in sink.events] == ["cus_42"]


def test_streaming_response_is_billed_at_completion(sink: ListSink, is_async: bool) -> None:
    """A stream is billed once, after its last chunk, with the usage tracked while streaming."""
    app = FastAPI()
    app.add_middleware(CommetMiddleware, customer=from_header("X-Customer-ID"), sink=sink)
    progress: list[int] = []

    async def agen() -> AsyncIterator[bytes]:
        for i in range(3):
            track("chunks")
            progress.append(len(sink.events))
            yield str(i).encode()

    def sgen() -> Iterator[bytes]:
        for i in range(3):
            progress.append(len(sink.events))
            yield str(i).encode()

    @app.get("/stream")
    @metered("streams")
    async def stream() -> StreamingResponse:
        return StreamingResponse(agen() if is_async else sgen())

    with TestClient(app) as c:
        assert c.get("/stream", headers=CUSTOMER).text == "012"
    assert progress == [0, 0, 0]
    expected = ["streams", "chunks", "chunks", "chunks"] if is_async else ["streams"]
    assert sorted(e.feature for e in sink.events) == sorted(expected)


def test_background_tasks_run_and_billing_happens_once(sink: ListSink, is_async: bool) -> None:
    """BackgroundTasks still run; the request is billed once, and usage they track is billed too."""
    app = FastAPI()
    app.add_middleware(CommetMiddleware, customer=from_header("X-Customer-ID"), sink=sink)
    ran: list[str] = []

    def send_email(to: str) -> None:
        ran.append(to)
        track("emails_sent")

    @app.post("/signup")
    @metered("signups")
    def signup(email: str, background: BackgroundTasks) -> dict[str, bool]:
        background.add_task(send_email, email)
        return {"ok": True}

    with TestClient(app) as c:
        assert c.post("/signup", params={"email": "a@b.c"}, headers=CUSTOMER).json() == {"ok": True}
    assert ran == ["a@b.c"]
    assert sorted(e.feature for e in sink.events) == ["emails_sent", "signups"]
    assert {e.customer_id for e in sink.events} == {"cus_1"}


def test_keys_are_distinct_per_request(client: TestClient, sink: ListSink) -> None:
    """Every executed request gets its own idempotency key, of the documented shape."""
    for _ in range(5):
        client.get("/search", params={"q": "x"}, headers=CUSTOMER)
    keys = [e.idempotency_key for e in sink.events]
    assert len(set(keys)) == 5
    assert all(k.startswith("cm_") and len(k) == 35 for k in keys)


def test_many_concurrent_customers_never_mix(sink: ListSink, is_async: bool) -> None:
    """200 concurrent requests from 50 customers: every event is on its own request's customer."""
    app = FastAPI()
    app.add_middleware(CommetMiddleware, customer=from_header("X-Customer-ID"), sink=sink)

    if is_async:

        @app.get("/work")
        @metered("api_calls", properties=lambda r: {"echo": r["customer"]})
        async def work(n: int) -> dict[str, Any]:
            await asyncio.sleep(0.001 * (n % 5))
            return {"customer": current_customer(), "n": n}

    else:

        @app.get("/work")
        @metered("api_calls", properties=lambda r: {"echo": r["customer"]})
        def work(n: int) -> dict[str, Any]:  # type: ignore[misc]
            return {"customer": current_customer(), "n": n}

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(
                *(
                    http.get("/work", params={"n": i}, headers={"X-Customer-ID": f"cus_{i % 50}"})
                    for i in range(200)
                )
            )

    responses = asyncio.run(main())
    assert all(r.status_code == 200 for r in responses)
    assert len(sink.events) == 200
    for event in sink.events:
        assert dict(event.properties)["echo"] == event.customer_id
    counts: dict[str, int] = {}
    for event in sink.events:
        counts[event.customer_id] = counts.get(event.customer_id, 0) + 1
    assert counts == {f"cus_{i}": 4 for i in range(50)}
    assert len({e.idempotency_key for e in sink.events}) == 200


def _plain_app(decorate: bool) -> FastAPI:
    app = FastAPI()
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]] = (
        metered("api_calls") if decorate else (lambda fn: fn)
    )

    @app.get("/items/{item_id}")
    @wrap
    async def read_item(
        item_id: int, q: str | None = None, x_trace: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        return {"item_id": item_id, "q": q, "trace": x_trace}

    @app.post("/things")
    @wrap
    def create(name: str, tags: list[str] | None = None, count: int = 1) -> dict[str, Any]:
        return {"name": name, "count": count}

    return app


def test_openapi_and_parameter_parsing_are_unchanged_by_the_decorator(sink: ListSink) -> None:
    """@metered leaves FastAPI's OpenAPI schema and its parameter parsing exactly as they were."""
    plain, decorated = _plain_app(False), _plain_app(True)
    assert decorated.openapi() == plain.openapi()
    decorated.add_middleware(CommetMiddleware, customer=from_header("X-Customer-ID"), sink=sink)
    with TestClient(plain) as a, TestClient(decorated) as b:
        for method, url, kwargs in [
            ("GET", "/items/3", {"params": {"q": "z"}, "headers": {"X-Trace": "t"}}),
            ("GET", "/items/notint", {}),
            ("POST", "/things", {"params": {"name": "n", "count": "2"}}),
            ("POST", "/things", {"params": {"count": "2"}}),
        ]:
            ra = a.request(method, url, **kwargs)
            rb = b.request(method, url, **kwargs)
            assert (ra.status_code, ra.json()) == (rb.status_code, rb.json())
    # The decorated endpoints did run: the two successful calls were metered (no customer).
    assert _find_middleware(decorated).stats.unattributed_requests == 2


def test_zero_code_mode_and_exclusions(sink: ListSink) -> None:
    """meter='api_calls' bills each successful request and skips docs, health and preflights."""
    app = FastAPI()
    app.add_middleware(
        CommetMiddleware, customer=from_header("X-Customer-ID"), sink=sink, meter="api_calls"
    )

    @app.get("/search")
    def search() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    with TestClient(app) as c:
        c.get("/search", headers=CUSTOMER)
        c.get("/search", headers=CUSTOMER)
        c.get("/health", headers=CUSTOMER)
        c.get("/docs", headers=CUSTOMER)
        c.get("/openapi.json", headers=CUSTOMER)
        c.get("/nope", headers=CUSTOMER)
        c.options("/search", headers={**CUSTOMER, "Access-Control-Request-Method": "GET"})
    assert [(e.customer_id, e.feature) for e in sink.events] == [("cus_1", "api_calls")] * 2


def test_zero_code_by_route_template(sink: ListSink) -> None:
    """A meter table keyed by FastAPI route templates picks the feature per route."""
    app = FastAPI()
    app.add_middleware(
        CommetMiddleware,
        customer=from_header("X-Customer-ID"),
        sink=sink,
        meter={"/items/{item_id}": "item_reads", "POST /items": "item_writes"},
    )

    @app.get("/items/{item_id}")
    def read(item_id: int) -> int:
        return item_id

    @app.post("/items")
    def write() -> int:
        return 1

    with TestClient(app) as c:
        c.get("/items/1", headers=CUSTOMER)
        c.get("/items/2", headers=CUSTOMER)
        c.post("/items", headers=CUSTOMER)
    assert [e.feature for e in sink.events] == ["item_reads", "item_reads", "item_writes"]


def test_missing_customer_serve_mode(sink: ListSink, is_async: bool) -> None:
    """Default: a metered request with no customer is served, billed to nobody and counted."""
    app = build_app(sink, is_async=is_async)
    with TestClient(app) as c:
        assert c.get("/search", params={"q": "x"}).status_code == 200
    assert sink.events == []
    middleware = _find_middleware(app)
    assert middleware.stats.unattributed_requests == 1


def test_missing_customer_reject_mode(sink: ListSink, is_async: bool) -> None:
    """Reject mode: 401 customer_required, the endpoint body never runs, nothing billed."""
    app = build_app(sink, is_async=is_async, on_missing_customer="reject")
    with TestClient(app) as c:
        response = c.get("/search", params={"q": "x"})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "customer_required"
        assert c.get("/search", params={"q": "x"}, headers=CUSTOMER).status_code == 200
    assert [e.customer_id for e in sink.events] == ["cus_1"]


def _find_middleware(app: FastAPI) -> CommetMiddleware:
    node: Any = app.middleware_stack
    while node is not None and not isinstance(node, CommetMiddleware):
        node = getattr(node, "app", None)
    assert isinstance(node, CommetMiddleware)
    return node


async def _drive_recording(
    app: Any, path: str, query: bytes, sink: ListSink, *, fail_final: bool = False
) -> list[tuple[str, bool, int]]:
    """Call ``app`` as a server would; note (type, more_body, events enqueued) at each send."""
    seen: list[tuple[str, bool, int]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"x-customer-id", b"cus_1")],
        "server": ("test", 80),
        "client": ("test", 1234),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        more = bool(message.get("more_body"))
        seen.append((message["type"], more, len(sink.events)))
        if fail_final and message["type"] == "http.response.body" and not more:
            raise OSError("client went away")

    await app(scope, receive, send)
    return seen


def test_event_is_enqueued_before_the_last_body_message(sink: ListSink, is_async: bool) -> None:
    """A FastAPI JSON response's event is in the sink before its body reaches the server."""
    app = build_app(sink, is_async=is_async)
    seen = asyncio.run(_drive_recording(app, "/search", b"q=x", sink))
    assert seen == [("http.response.start", False, 0), ("http.response.body", False, 1)]


def test_client_gone_on_the_last_send_is_still_billed(sink: ListSink, is_async: bool) -> None:
    """A send of the last body message that fails leaves the request billed, once."""
    app = build_app(sink, is_async=is_async)
    with pytest.raises(OSError, match="client went away"):
        asyncio.run(_drive_recording(app, "/search", b"q=x", sink, fail_final=True))
    assert [e.feature for e in sink.events] == ["api_calls"]
