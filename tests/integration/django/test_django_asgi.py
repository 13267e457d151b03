"""Django's own ASGI handler in process: no lifespan, and clients that leave mid-stream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from django.core.handlers.asgi import ASGIHandler

from commet_middleware.django import with_lifespan
from commet_middleware.testing import FakeCommet

from .conftest import CUSTOMER

if TYPE_CHECKING:
    from integration.conftest import ListSink

Configure = Callable[..., Any]


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` on the loop until it holds (True) or ``timeout`` passes (False)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.asyncio
# /stream/ is a sync iterator, which Django's ASGI handler reads in a thread (and says so).
@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous iterators")
async def test_asgi_handler_without_lifespan_starts_delivery(
    commet_emulator: FakeCommet, commet_config: Configure
) -> None:
    """Django's ASGI app has no lifespan: the first request starts the delivery sender, and
    usage reaches Commet without any flush."""
    engine = commet_config(customer_header="X-Customer-ID")
    transport = httpx.ASGITransport(app=ASGIHandler())
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for path in ("/asearch/", "/search/", "/astream/", "/stream/", "/status/404/"):
            response = await client.get(path, headers=CUSTOMER)
            assert response.status_code in (200, 404)
        assert (await client.get("/health")).status_code == 200
    assert engine._sinks.started
    assert await eventually(lambda: commet_emulator.usage_total("user_123", "api_calls") == 8)
    assert await commet_emulator.asettle()
    assert commet_emulator.usage_total("user_123", "api_calls") == 8


def asgi_scope(path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"x-customer-id", b"user_123")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def serve_stream(*, leave_after_first_chunk: bool) -> list[dict[str, Any]]:
    """Serve /slow-stream/ (50 chunks) through Django's ASGI handler; the client disconnects
    after the first body chunk when asked. Returns the messages sent."""
    first_chunk = asyncio.Event()
    never = asyncio.Event()
    request_sent = False
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await (first_chunk if leave_after_first_chunk else never).wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()

    await ASGIHandler()(asgi_scope("/slow-stream/"), receive, send)
    return sent


@pytest.mark.asyncio
async def test_client_gone_mid_stream_is_not_billed(
    commet_config: Configure, sink: ListSink
) -> None:
    """Under Django's ASGI handler, a client that disconnects mid-stream is not billed (and is
    counted); one that stays to the end is billed once."""
    engine = commet_config(sink=sink, customer_header="X-Customer-ID")
    left = await serve_stream(leave_after_first_chunk=True)
    chunks = [m for m in left if m["type"] == "http.response.body" and m.get("body")]
    assert 1 <= len(chunks) < 50
    assert sink.events == []
    assert engine.stats.incomplete_responses == 1
    stayed = await serve_stream(leave_after_first_chunk=False)
    assert len([m for m in stayed if m["type"] == "http.response.body" and m.get("body")]) == 50
    assert [(e.customer_id, e.feature) for e in sink.events] == [("user_123", "api_calls")]


@pytest.mark.asyncio
async def test_with_lifespan_shutdown_flushes_what_is_queued(
    commet_emulator: FakeCommet, commet_config: Configure
) -> None:
    """with_lifespan answers startup and shutdown; the shutdown delivers everything queued,
    with no flush of the test's own, before it reports complete."""
    commet_config(customer_header="X-Customer-ID")
    app = with_lifespan(ASGIHandler())
    lifespan: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    answers: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        answers.append(message["type"])

    await lifespan.put({"type": "lifespan.startup"})
    server = asyncio.ensure_future(app({"type": "lifespan"}, lifespan.get, send))
    assert await eventually(lambda: answers == ["lifespan.startup.complete"])
    gate = commet_emulator.faults.hold_next(1)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for path in ("/asearch/", "/search/", "/astatus/201/"):
            assert (await client.get(path, headers=CUSTOMER)).status_code < 300
    assert await eventually(lambda: gate.held == 1)
    await lifespan.put({"type": "lifespan.shutdown"})
    await asyncio.sleep(0.2)
    assert not server.done()  # the shutdown waits for the delivery Commet holds
    gate.release()
    await asyncio.wait_for(server, 10)
    assert answers == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert commet_emulator.usage_total("user_123", "api_calls") == 3
