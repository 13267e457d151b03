"""The async client's own HTTP/1.1 connections (``_http11``), over real sockets on 127.0.0.1:
the emulator under uvicorn, and raw servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import pytest
from commet_script import SECRET, USAGE_EVENT

from commet_middleware import (
    AsyncCommetClient,
    CommetAPIError,
    CommetSettings,
    CommetTransportError,
    QuotaChange,
    QuotaChangeResult,
    TrackResult,
    UsageEvent,
)
from commet_middleware._retry import classify
from commet_middleware.testing import FakeCommet

pytestmark = [pytest.mark.anyio, pytest.mark.server]

ANSWER = json.dumps(USAGE_EVENT).encode()
OK = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(ANSWER),
    ANSWER,
)


def event(key: str, customer: str = "cus_1") -> UsageEvent:
    return UsageEvent.create(customer, "api_calls", 1, idempotency_key=key)


def own_client(url: str, **changes: object) -> AsyncCommetClient:
    client = AsyncCommetClient(CommetSettings(api_key=SECRET, base_url=url).replace(**changes))
    assert client._pool is not None, "the own connections must serve this client"
    return client


@pytest.fixture
def fake() -> FakeCommet:
    fake = FakeCommet()
    fake.add_feature("api_calls")
    fake.add_feature("tasks", quota=True, included=5, overage=True)
    for i in range(20):
        fake.add_customer(f"cus_{i}")
    return fake


@pytest.fixture
def served(fake: FakeCommet) -> Iterator[str]:
    with fake.serve() as url:
        yield url


# --- against the emulator under uvicorn -------------------------------------------------------


@pytest.mark.parametrize("dialect", ["v1", "legacy"])
async def test_events_and_quota_changes_are_recorded_over_real_http(
    fake: FakeCommet, served: str, dialect: str
) -> None:
    """send_once delivers usage events of many customers and quota changes, eight at a time,
    and the emulator records each once, with the key the wire module derives."""
    client = own_client(served, dialect=dialect)
    events = [event(f"k{i}", f"cus_{i % 20}") for i in range(60)]
    results = await asyncio.gather(*(client.send_once(e) for e in events[:8]))
    for e in events[8:]:
        results.append(await client.send_once(e))
    assert all(isinstance(r, TrackResult) and r.id for r in results)
    change = QuotaChange.create("cus_3", "tasks", "add", 4, idempotency_key="q1")
    assert isinstance(await client.send_once(change), QuotaChangeResult)
    allowance = await client.get_quota("cus_3", "tasks")
    assert allowance.current == 4
    assert [a.feature_code for a in await client.get_all_quotas("cus_3")] == ["tasks"]
    await client.aclose()
    recorded = {(e.customer_id, e.idempotency_key) for e in fake.events()}
    assert recorded == {(e.customer_id, e.idempotency_key) for e in events}
    assert len(fake.events()) == 60


async def test_a_base_url_path_prefix_is_kept(fake: FakeCommet, served: str) -> None:
    """A base URL with a path puts the API path under it, as httpx does (here: a 404 from the
    emulator, which a wrong prefix should be)."""
    client = own_client(served + "/proxy")
    with pytest.raises(CommetAPIError) as caught:
        await client.send_once(event("k"))
    await client.aclose()
    assert caught.value.status == 404
    assert classify(caught.value) == "configuration"
    assert caught.value.base_url == served + "/proxy"
    assert fake.events() == []


@pytest.mark.parametrize(
    ("fault", "status"),
    [("html_next", 200), ("truncated_next", 201), ("unauthorized_next", 401)],
)
async def test_answers_that_are_not_commets_are_failures(
    fake: FakeCommet, served: str, fault: str, status: int
) -> None:
    """Over real HTTP too, an HTML 200, a truncated 201 and a 401 are failures, never delivered."""
    getattr(fake.faults, fault)(1)
    client = own_client(served)
    with pytest.raises(CommetAPIError) as caught:
        await client.send_once(event("k"))
    assert caught.value.status == status
    assert fake.events() == []
    assert isinstance(await client.send_once(event("k")), TrackResult)
    await client.aclose()
    assert len(fake.events()) == 1


async def test_a_dropped_connection_is_a_transport_error_and_track_retries_it(
    fake: FakeCommet, served: str
) -> None:
    """A connection closed without an answer is a CommetTransportError; track() retries it
    and the event is recorded once."""
    fake.faults.drop_next(1)
    client = own_client(served)
    with pytest.raises(CommetTransportError):
        await client.send_once(event("k"))
    fake.faults.drop_next(1)
    waits: list[float] = []

    async def no_sleep(seconds: float) -> None:
        waits.append(seconds)

    client._sleep = no_sleep
    await client.track("cus_1", "api_calls", idempotency_key="k")
    await client.aclose()
    assert len(waits) == 1
    assert [e.idempotency_key for e in fake.events()] == ["k"]


async def test_one_client_serves_two_event_loops(fake: FakeCommet, served: str) -> None:
    """A client used on a second loop (its first loop gone) opens new connections there."""
    client = own_client(served)

    def run(key: str) -> object:
        return asyncio.run(client.send_once(event(key)))

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, run, "a")
    await loop.run_in_executor(None, run, "b")
    assert isinstance(await client.send_once(event("c")), TrackResult)
    await client.aclose()
    assert [e.idempotency_key for e in fake.events()] == ["a", "b", "c"]


# --- raw servers that misbehave -----------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[bytes]]]:
    """Serve ``handler`` on 127.0.0.1; yield the URL and the list of connections' first reads."""
    seen: list[bytes] = []

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(b"connection")
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


async def test_keep_alive_connections_are_reused() -> None:
    """Sequential sends go over one connection."""

    async def answer_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(OK)

    async with raw_server(answer_all) as (url, connections):
        client = own_client(url)
        for i in range(5):
            await client.send_once(event(f"k{i}"))
        await client.aclose()
    assert len(connections) == 1


async def test_a_reused_connection_closed_by_the_server_is_retried_on_a_fresh_one() -> None:
    """The server closes a kept-alive connection when the next request arrives, without an
    answer: the client sends the same bytes once more on a new connection, transparently."""
    requests: list[bytes] = []

    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        requests.append(await read_request(reader))
        writer.write(OK)
        await writer.drain()
        await read_request(reader)  # the next request on this connection: dropped, unanswered

    async with raw_server(one_per_connection) as (url, connections):
        client = own_client(url)
        await client.send_once(event("first"))
        result = await client.send_once(event("second"))
        await client.aclose()
    assert isinstance(result, TrackResult)
    assert len(connections) == 2
    assert b"second" in requests[1]


async def test_a_connection_closed_mid_answer_is_a_transport_error() -> None:
    """Part of an answer, then the connection closes: CommetTransportError, not retried."""

    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK[:60])
        await writer.drain()

    async with raw_server(half) as (url, connections):
        client = own_client(url)
        with pytest.raises(CommetTransportError, match="RemoteProtocolError"):
            await client.send_once(event("k"))
        await client.aclose()
    assert len(connections) == 1


async def test_a_silent_server_times_out() -> None:
    """No answer within settings.timeout: a CommetTransportError that says it timed out, and
    the connection is not reused."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with raw_server(silent) as (url, connections):
        client = own_client(url, timeout=0.2)
        with pytest.raises(CommetTransportError, match="timed out") as caught:
            await client.send_once(event("k"))
        assert caught.value.retryable
        with pytest.raises(CommetTransportError):
            await client.send_once(event("k"))
        await client.aclose()
    assert len(connections) == 2


async def test_connection_refused_is_a_transport_error() -> None:
    """Nothing listening: CommetTransportError (ConnectError), retryable."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    client = own_client(f"http://127.0.0.1:{port}")
    with pytest.raises(CommetTransportError, match="ConnectError") as caught:
        await client.send_once(event("k"))
    await client.aclose()
    assert classify(caught.value) == "transient"


async def test_chunked_and_close_delimited_answers_are_read() -> None:
    """A chunked answer and one whose body ends with the connection both parse; an interim 100
    answer before them is skipped."""
    half = len(ANSWER) // 2
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (half, ANSWER[:half], len(ANSWER) - half, ANSWER[half:])
    )
    unsized = b"HTTP/1.1 201 Created\r\nConnection: close\r\n\r\n" + ANSWER
    answers = [chunked, unsized]

    async def scripted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while answers:
            await read_request(reader)
            answer = answers.pop(0)
            writer.write(answer)
            await writer.drain()
            if answer is unsized:
                return

    async with raw_server(scripted) as (url, connections):
        client = own_client(url)
        first = await client.send_once(event("a"))
        second = await client.send_once(event("b"))
        await client.aclose()
    assert first.id == second.id == "evt_1"
    assert len(connections) == 1


async def test_the_request_on_the_wire() -> None:
    """One request carries the documented headers once, the exact body and its length."""
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(OK)

    async with raw_server(record) as (url, _):
        client = own_client(url)
        body = b'{"featureCode":"api_calls","customerId":"cus_1","value":1,"eventId":"k"}'
        await client.send_once(event("k"), request_body=body)
        await client.aclose()
    head, _, sent = seen[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /api/v1/usage/events HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["x-api-key"] == SECRET
    assert headers["Commet-Version"] == CommetSettings().api_version
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Idempotency-Key"].startswith("cm_")
    assert headers["Host"] == url.removeprefix("http://")
    assert sent == body


async def test_a_key_with_a_line_break_is_never_sent() -> None:
    """An API key pasted with its newline fails as a transport error, and nothing is sent."""
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(100))

    async with raw_server(record) as (url, connections):
        client = AsyncCommetClient(CommetSettings(api_key=SECRET + "\n", base_url=url))
        with pytest.raises(CommetTransportError) as caught:
            await client.send_once(event("k"))
        await client.aclose()
    assert SECRET not in str(caught.value)
    assert connections == []


async def test_a_cancelled_send_leaves_the_client_usable(fake: FakeCommet, served: str) -> None:
    """Cancelling a send in flight drops its connection; the next send works."""
    hold = fake.faults.hold_next(1)
    client = own_client(served)
    task = asyncio.ensure_future(client.send_once(event("held")))
    await asyncio.get_running_loop().run_in_executor(None, hold.wait_until_held, 1, 5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    hold.release()
    assert isinstance(await client.send_once(event("next")), TrackResult)
    await client.aclose()


# --- when httpx serves instead ------------------------------------------------------------------


def test_httpx_serves_a_transport_a_proxy_and_credentials_in_the_url(
    monkeypatch: pytest.MonkeyPatch, fake: FakeCommet
) -> None:
    """The own connections are used only where they cannot change behaviour."""
    assert AsyncCommetClient(CommetSettings(transport=fake.transport))._pool is None
    assert AsyncCommetClient(CommetSettings(base_url="https://u:p@commet.co"))._pool is None
    assert AsyncCommetClient(CommetSettings(base_url="https://commet.co"))._pool is not None
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    assert AsyncCommetClient(CommetSettings(base_url="https://commet.co"))._pool is None


# --- TLS, as to https://commet.co ---------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = str(where / "cert.pem"), str(where / "key.pem")
    command = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    command += ["-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(  # noqa: S603 - the openssl command with fixed arguments
        command,
        check=True,
        capture_output=True,
    )
    return cert, key


@asynccontextmanager
async def tls_server(certificate: tuple[str, str], handler: Handler) -> AsyncIterator[str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.close()


async def test_https_with_a_trusted_certificate(
    certificate: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TLS the events go through, on one kept-alive connection, trusting SSL_CERT_FILE as
    httpx does."""
    monkeypatch.setenv("SSL_CERT_FILE", certificate[0])
    connections: list[int] = []

    async def answer_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                await read_request(reader)
                writer.write(OK)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async with tls_server(certificate, answer_all) as url:
        client = own_client(url)
        for i in range(3):
            assert isinstance(await client.send_once(event(f"k{i}")), TrackResult)
        await client.aclose()
    assert len(connections) == 1


async def test_https_with_an_untrusted_certificate_is_a_transport_error(
    certificate: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A certificate the client does not trust fails the connection: nothing is sent."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    requests: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            requests.append(await read_request(reader))
        writer.close()

    async with tls_server(certificate, record) as url:
        client = own_client(url)
        with pytest.raises(CommetTransportError, match="ConnectError"):
            await client.send_once(event("k"))
        await client.aclose()
    assert requests == []


async def test_an_answer_that_is_not_http_is_a_transport_error() -> None:
    """Bytes that are not an HTTP/1.x answer fail the send as a transport error."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_server(garbage) as (url, _):
        client = own_client(url)
        with pytest.raises(CommetTransportError, match=r"not an HTTP/1\.1 answer"):
            await client.send_once(event("k"))
        await client.aclose()


async def test_a_gzipped_answer_is_decoded() -> None:
    """A proxy that gzips the answer anyway: the body is decoded before it is parsed."""
    packed = gzip.compress(ANSWER)
    answer = b"HTTP/1.1 201 Created\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (
        len(packed),
        packed,
    )

    async def gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async with raw_server(gzipped) as (url, _):
        client = own_client(url)
        result = await client.send_once(event("k"))
        await client.aclose()
    assert result.id == "evt_1"


async def test_connections_of_a_closed_loop_are_let_go() -> None:
    """A client used in one asyncio.run after another closes the first loop's connection
    (the server sees it end) instead of keeping it, and its socket, forever."""
    ended: list[int] = []

    async def answer_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request(reader)
                writer.write(OK)
        except (asyncio.IncompleteReadError, ConnectionError):
            ended.append(1)

    async with raw_server(answer_all) as (url, connections):
        client = own_client(url)

        def run(key: str) -> object:
            return asyncio.run(client.send_once(event(key)))

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, run, "a")
        assert (len(connections), ended) == (1, [])
        await loop.run_in_executor(None, run, "b")
        for _ in range(200):  # the server's side of the first connection ends soon after
            if ended:
                break
            await asyncio.sleep(0.01)
        assert len(connections) == 2
        assert ended == [1]
        await client.aclose()
