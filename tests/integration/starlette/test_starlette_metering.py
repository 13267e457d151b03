"""CommetMiddleware and @metered on a real Starlette app, through starlette.testclient."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message

from commet_middleware import CommetMiddleware, metered, set_customer, track
from commet_middleware.customers import first_of, from_header, from_path_param, from_scope_user

if TYPE_CHECKING:
    from integration.conftest import ListSink

CUSTOMER = {"X-Customer-ID": "cus_1"}


def make_endpoints(is_async: bool) -> list[Route]:
    """The same endpoints, written sync (threadpool) or async."""
    if is_async:

        @metered("api_calls")
        async def ok(request: Request) -> Response:
            return PlainTextResponse("ok")

        @metered("api_calls")
        async def status(request: Request) -> Response:
            return PlainTextResponse("x", status_code=int(request.path_params["code"]))

        @metered("api_calls")
        async def boom(request: Request) -> Response:
            raise RuntimeError("endpoint bug")

        @metered("org_calls")
        async def org(request: Request) -> Response:
            return JSONResponse(request.path_params)

        @metered("logins")
        async def login(request: Request) -> Response:
            set_customer(request.query_params["as"])
            return PlainTextResponse("hi")

    else:

        @metered("api_calls")
        def ok(request: Request) -> Response:  # type: ignore[misc]
            return PlainTextResponse("ok")

        @metered("api_calls")
        def status(request: Request) -> Response:  # type: ignore[misc]
            return PlainTextResponse("x", status_code=int(request.path_params["code"]))

        @metered("api_calls")
        def boom(request: Request) -> Response:  # type: ignore[misc]
            raise RuntimeError("endpoint bug")

        @metered("org_calls")
        def org(request: Request) -> Response:  # type: ignore[misc]
            return JSONResponse(request.path_params)

        def login(request: Request) -> Response:  # type: ignore[misc]
            set_customer(request.query_params["as"])
            track("logins")
            return PlainTextResponse("hi")

    return [
        Route("/ok", ok),
        Route("/status/{code:int}", status),
        Route("/boom", boom),
        Route("/orgs/{org}", org),
        Route("/login", login),
    ]


@pytest.fixture(params=["sync", "async"])
def is_async(request: pytest.FixtureRequest) -> bool:
    """Each test runs against sync (threadpool) and async endpoints."""
    return bool(request.param == "async")


def build(sink: ListSink, is_async: bool, **options: Any) -> Starlette:
    options.setdefault("customer", first_of(from_header("X-Customer-ID"), from_path_param("org")))
    return Starlette(
        routes=make_endpoints(is_async),
        middleware=[Middleware(CommetMiddleware, sink=sink, **options)],
    )


@pytest.fixture
def client(sink: ListSink, is_async: bool) -> Iterator[TestClient]:
    with TestClient(build(sink, is_async), raise_server_exceptions=False) as c:
        yield c


def test_success_is_billed_once(client: TestClient, sink: ListSink) -> None:
    """A successful metered request is billed exactly once to the header's customer."""
    assert client.get("/ok", headers=CUSTOMER).text == "ok"
    assert [(e.customer_id, e.feature) for e in sink.events] == [("cus_1", "api_calls")]


@pytest.mark.parametrize("code", [401, 404, 429, 500, 502])
def test_error_statuses_are_not_billed(client: TestClient, sink: ListSink, code: int) -> None:
    """4xx and 5xx responses bill nothing."""
    assert client.get(f"/status/{code}", headers=CUSTOMER).status_code == code
    assert sink.events == []


def test_exception_is_not_billed(client: TestClient, sink: ListSink) -> None:
    """An endpoint that raises gives a 500 and bills nothing."""
    assert client.get("/boom", headers=CUSTOMER).status_code == 500
    assert sink.events == []


def test_customer_from_path_param(client: TestClient, sink: ListSink) -> None:
    """from_path_param finds the customer once Starlette's router has matched the route."""
    assert client.get("/orgs/cus_org").json() == {"org": "cus_org"}
    assert [(e.customer_id, e.feature) for e in sink.events] == [("cus_org", "org_calls")]


def test_set_customer_inside_the_endpoint(client: TestClient, sink: ListSink) -> None:
    """set_customer in the endpoint (even in the threadpool) is seen by the middleware."""
    assert client.get("/login", params={"as": "cus_9"}).text == "hi"
    assert [(e.customer_id, e.feature) for e in sink.events] == [("cus_9", "logins")]


def test_streaming_and_background_task(sink: ListSink) -> None:
    """A stream is billed once at its end; a background task's track() is billed after it."""
    events_seen_while_streaming: list[int] = []

    async def chunks() -> AsyncIterator[str]:
        for i in range(3):
            events_seen_while_streaming.append(len(sink.events))
            yield str(i)

    def after() -> None:
        track("post_processing")

    @metered("streams")
    async def stream(request: Request) -> Response:
        return StreamingResponse(chunks(), background=BackgroundTask(after))

    app = Starlette(
        routes=[Route("/stream", stream)],
        middleware=[Middleware(CommetMiddleware, customer=from_header("X-Customer-ID"), sink=sink)],
    )
    with TestClient(app) as c:
        assert c.get("/stream", headers=CUSTOMER).text == "012"
    assert events_seen_while_streaming == [0, 0, 0]
    assert [e.feature for e in sink.events] == ["streams", "post_processing"]


def test_zero_code_and_missing_customer_reject(sink: ListSink, is_async: bool) -> None:
    """Zero-code mode bills each successful request; in reject mode no customer gets a 401."""
    app = build(sink, is_async, meter="requests", on_missing_customer="reject")
    with TestClient(app) as c:
        assert c.get("/ok", headers=CUSTOMER).status_code == 200
        rejected = c.get("/ok")
        assert rejected.status_code == 401
        assert rejected.json()["error"]["code"] == "customer_required"
        assert c.get("/health").status_code == 404  # excluded and unrouted: served, not billed
    assert sorted(e.feature for e in sink.events) == ["api_calls", "requests"]


def _stream_app(sink: ListSink) -> Starlette:
    async def endless() -> AsyncIterator[bytes]:
        yield b"first"
        yield b"second"
        await asyncio.Event().wait()  # never finishes on its own
        yield b"never"

    @metered("streams")
    async def stream(request: Request) -> Response:
        return StreamingResponse(endless())

    return Starlette(
        routes=[Route("/stream", stream)],
        middleware=[Middleware(CommetMiddleware, customer=from_header("X-Customer-ID"), sink=sink)],
    )


@pytest.mark.parametrize("spec_version", ["2.0", "2.4"])
def test_client_disconnect_mid_stream_is_not_billed(sink: ListSink, spec_version: str) -> None:
    """A client that leaves mid-stream (disconnect message, or a failing send) is not billed."""
    app = _stream_app(sink)
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/stream",
        "raw_path": b"/stream",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-customer-id", b"cus_1")],
        "server": ("test", 80),
        "client": ("test", 1234),
    }
    first_chunk_sent = asyncio.Event()
    chunks: list[bytes] = []

    async def receive() -> Message:
        if not first_chunk_sent.is_set():
            await first_chunk_sent.wait()
            return {"type": "http.request", "body": b"", "more_body": False}
        await first_chunk_sent.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            if chunks and spec_version == "2.4":
                raise OSError("client went away")
            chunks.append(message["body"])
            first_chunk_sent.set()

    async def main() -> None:
        try:
            await app(scope, receive, send)
        except ClientDisconnect:
            assert spec_version == "2.4"

    asyncio.run(main())
    assert chunks[0] == b"first"
    assert sink.events == []


def test_customer_from_authentication_middleware(sink: ListSink) -> None:
    """from_scope_user finds the user set by Starlette's AuthenticationMiddleware further in."""

    class TokenAuth(AuthenticationBackend):
        async def authenticate(
            self, conn: HTTPConnection
        ) -> tuple[AuthCredentials, SimpleUser] | None:
            token = conn.headers.get("authorization")
            if token is None:
                return None
            return AuthCredentials(["authenticated"]), SimpleUser("cus_" + token)

    @metered("api_calls")
    async def me(request: Request) -> Response:
        return PlainTextResponse(request.user.identity)

    app = Starlette(
        routes=[Route("/me", me)],
        middleware=[
            Middleware(CommetMiddleware, customer=from_scope_user(), sink=sink),
            Middleware(AuthenticationMiddleware, backend=TokenAuth()),
        ],
    )
    with TestClient(app) as client:
        assert client.get("/me", headers={"Authorization": "5"}).text == "cus_5"
        assert client.get("/me").status_code == 200  # anonymous: served, billed to nobody
    assert [e.customer_id for e in sink.events] == ["cus_5"]


def test_file_response_is_billed_before_its_last_byte(sink: ListSink, tmp_path: Any) -> None:
    """A FileResponse whose last bytes go out with more_body=True is billed before that chunk."""
    from starlette.responses import FileResponse

    path = tmp_path / "exact.bin"
    path.write_bytes(b"x" * FileResponse.chunk_size)  # the final message is then an empty one

    @metered("downloads")
    async def download(request: Request) -> Response:
        return FileResponse(path)

    app = Starlette(
        routes=[Route("/file", download)],
        middleware=[Middleware(CommetMiddleware, customer=from_header("X-Customer-ID"), sink=sink)],
    )
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/file",
        "raw_path": b"/file",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-customer-id", b"cus_1")],
        "server": ("test", 80),
        "client": ("test", 1234),
    }
    seen: list[tuple[int, bool, int]] = []
    requested: list[bool] = []

    async def receive() -> Message:
        if requested:
            await asyncio.Event().wait()  # the client stays until the response is sent
        requested.append(True)
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            seen.append((len(message["body"]), message["more_body"], len(sink.events)))

    asyncio.run(app(scope, receive, send))
    assert seen == [(FileResponse.chunk_size, True, 1), (0, False, 1)]
