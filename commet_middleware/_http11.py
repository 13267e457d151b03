"""The async client's own HTTP/1.1 keep-alive connections on asyncio: the cheap way to send.

Why not httpx here: one usage event through ``httpx.AsyncClient`` costs about 1.2 ms of client
CPU on the bench machine (~5,000 Python calls, most of them httpcore's pool bookkeeping, anyio's
socket wrappers and httpx's URL and header models; ``bench/sender_cost.py``). The delivery
pipeline sends one small JSON POST per event to one host, so this module does only that: a
pool of keep-alive connections (``asyncio.Protocol``), request heads prebuilt per path, and a
strict response reader (status line, headers, ``Content-Length``, chunked, or read to close):
about 65 µs and 270 Python calls per event, 17.8x the events per core of httpx on 1,000
customers round-robin (bench/RESULTS.md, 2026-12-04).

It is used only where it keeps the behaviour httpx gives: the async client under asyncio, with no
``settings.transport`` (the test and emulator seam), an ``http``/``https`` base URL without
credentials in it, and no proxy configured in the environment (httpx honours those; see
:func:`usable`). TLS uses the context httpx would build (certifi, or ``SSL_CERT_FILE`` /
``SSL_CERT_DIR``).

Failures are ``OSError`` subclasses the client maps to ``CommetTransportError``:
:class:`ConnectFailed`, :class:`TimedOut`, :class:`ProtocolFailure`. A request that finds its
reused keep-alive connection closed by the server before any byte of the answer is sent once
more on a fresh connection: that is the race every keep-alive client has (the server closed the
idle connection as the request went out). It adds no risk the callers do not already take: they
retry every transport error with the same bytes, and the request carries its
``Idempotency-Key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import urllib.request
import zlib
from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "ConnectFailed",
    "ConnectionPool",
    "ProtocolFailure",
    "Response",
    "ResponseHeaders",
    "TimedOut",
    "usable",
]

_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}

# Keep-alive connections idle longer than this are closed rather than reused (httpx's default
# keepalive_expiry): servers drop idle connections after a few seconds, and a reuse that races
# the server's close costs a retry.
_KEEPALIVE_EXPIRY = 5.0
# Idle connections kept for reuse (httpx's default max_keepalive_connections).
_MAX_IDLE = 20
# An answer larger than this is not Commet's: refused rather than buffered.
_MAX_RESPONSE = 8 * 1024 * 1024
_MAX_HEAD = 64 * 1024


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("commet-middleware")
    except PackageNotFoundError:
        return "dev"


_USER_AGENT = f"commet-middleware/{_version()}"


class ConnectFailed(OSError):
    """The connection could not be opened (refused, unreachable, DNS, TLS handshake)."""


class TimedOut(OSError):
    """The connect or the answer took longer than its timeout."""


class ProtocolFailure(OSError):
    """The server closed the connection early or answered something that is not HTTP/1.1."""


class ResponseHeaders(dict[str, str]):
    """Response headers by lower-case name; ``get`` takes any case."""

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self, key.lower(), default)


class Response:
    """One answer: status, headers and the whole body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: ResponseHeaders, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def usable(base_url: str, transport: object) -> bool:
    """Return whether requests to ``base_url`` may go through this module instead of httpx."""
    if transport is not None:
        return False
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.username is not None or parts.password is not None:
        return False  # httpx would send them as Basic auth
    # httpx routes through HTTP(S)_PROXY / ALL_PROXY (minus NO_PROXY); so does the fallback.
    proxies = urllib.request.getproxies()
    return not any(proxies.get(scheme) for scheme in ("http", "https", "all"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer parsed as bytes arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._received_any = False
        # The answer being read.
        self._status = 0
        self._headers: ResponseHeaders | None = None
        self._length: int | None = None
        self._chunked = False
        self._keep_alive = True
        self._chunks: list[bytes] = []
        self._size = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._received_any = True
        if self._waiter is None:
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self._close()
            return
        self._buffer += data
        try:
            done = self._parse()
        except ProtocolFailure as exc:
            self._fail(exc)
            return
        if done:
            self._finish()

    def eof_received(self) -> bool | None:
        unsized = self._headers is not None and self._length is None and not self._chunked
        if self._waiter is not None and unsized:
            # No length and no chunking: the body ends with the connection.
            self._chunks.append(bytes(self._buffer))
            self._buffer.clear()
            self._keep_alive = False
            self._finish()
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(
                _Closed(
                    "the server closed the connection before answering"
                    if not self._received_any
                    else "the server closed the connection in the middle of its answer",
                    early=not self._received_any,
                )
            )
        self._waiter = None

    # requests

    def send(self, data: bytes) -> asyncio.Future[Response]:
        """Write one request; return the future of its answer."""
        assert self.transport is not None
        self._waiter = self.loop.create_future()
        self._received_any = False
        self._status, self._headers, self._length = 0, None, None
        self._chunked, self._keep_alive, self._size = False, True, 0
        self._chunks = []
        self.transport.write(data)
        return self._waiter

    def abort(self) -> None:
        """Drop the connection at once (a timeout, a cancelled request)."""
        self.closed = True
        self._waiter = None
        if self.transport is not None:
            self.transport.abort()

    def abandon(self) -> None:
        """Drop the connection, even if its event loop has been closed."""
        transport, self.transport = self.transport, None
        self.closed = True
        self._waiter = None
        if transport is None:
            return
        try:
            transport.abort()
        except RuntimeError:
            # Its loop is closed: abort cannot schedule the close. Tell the server at once;
            # the descriptor goes when the garbage collector frees the transport.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.abort()

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        headers = self._headers
        assert headers is not None
        body = b"".join(self._chunks)
        coding = headers.get("content-encoding", "identity").strip().lower()
        if self._buffer or not self._keep_alive:
            self._close()  # extra bytes after the answer, or the server said close
        if waiter is None or waiter.done():
            return
        if coding not in ("", "identity"):
            # Nothing asks for a coding (no Accept-Encoding is sent), but a proxy may use one.
            try:
                body = zlib.decompress(body, _CODINGS[coding])
            except (KeyError, zlib.error):
                waiter.set_exception(ProtocolFailure(f"cannot decode content-encoding {coding!r}"))
                return
        waiter.set_result(Response(self._status, headers, body))

    # the response reader

    def _parse(self) -> bool:
        """Consume what the buffer holds; True once the whole answer is in."""
        buffer = self._buffer
        if self._headers is None:
            while True:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD:
                        raise ProtocolFailure("the answer's head is too large")
                    return False
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                if self._read_head(head):
                    break  # a final answer; 1xx interim answers are skipped
        if self._chunked:
            return self._read_chunks()
        if self._length is None:
            return False  # read until the server closes (eof_received)
        if len(buffer) < self._length:
            if self._length > _MAX_RESPONSE:
                raise ProtocolFailure("the answer's body is too large")
            return False
        self._chunks.append(bytes(buffer[: self._length]))
        del buffer[: self._length]
        return True

    def _read_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise ProtocolFailure(f"not an HTTP/1.1 answer: {lines[0][:40]!r}")
        try:
            status = int(status_line[1])
        except ValueError:
            raise ProtocolFailure(f"bad status line: {lines[0][:40]!r}") from None
        if 100 <= status < 200:
            return False
        headers = ResponseHeaders()
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise ProtocolFailure(f"bad header line: {line[:40]!r}")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            if key in headers:
                # Repeated headers fold into one, comma-separated (RFC 9110 5.3).
                text = f"{headers[key]}, {text}"
            headers[key] = text
        connection = headers.get("connection", "").lower()
        self._keep_alive = status_line[0] == b"HTTP/1.1" and "close" not in connection
        if status_line[0] == b"HTTP/1.0" and "keep-alive" in connection:
            self._keep_alive = True
        encoding = headers.get("transfer-encoding", "").lower()
        if encoding:
            if encoding.rsplit(",", 1)[-1].strip() != "chunked":
                raise ProtocolFailure(f"unsupported transfer-encoding {encoding!r}")
            self._chunked = True
        elif status in (204, 304):
            self._length = 0
        elif "content-length" in headers:
            try:
                self._length = int(headers["content-length"])
            except ValueError:
                raise ProtocolFailure("bad content-length") from None
            if self._length < 0:
                raise ProtocolFailure("bad content-length")
        else:
            self._keep_alive = False
        self._status, self._headers = status, headers
        return True

    def _read_chunks(self) -> bool:
        buffer = self._buffer
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                return False
            size_text = bytes(buffer[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolFailure("bad chunk size") from None
            if size == 0:
                # The last chunk, then optional trailers, then an empty line.
                trailer_end = buffer.find(b"\r\n\r\n", line_end)
                if trailer_end == line_end:
                    del buffer[: line_end + 4]
                    return True
                if buffer[line_end + 2 : line_end + 4] == b"\r\n":
                    del buffer[: line_end + 4]
                    return True
                if trailer_end < 0:
                    return False
                del buffer[: trailer_end + 4]
                return True
            if len(buffer) < line_end + 2 + size + 2:
                if self._size + size > _MAX_RESPONSE:
                    raise ProtocolFailure("the answer's body is too large")
                return False
            start = line_end + 2
            self._chunks.append(bytes(buffer[start : start + size]))
            self._size += size
            if buffer[start + size : start + size + 2] != b"\r\n":
                raise ProtocolFailure("bad chunk framing")
            del buffer[: start + size + 2]


class _Closed(ProtocolFailure):
    def __init__(self, message: str, *, early: bool) -> None:
        super().__init__(message)
        self.early = early


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one origin.

    ``request`` sends prebuilt bytes and returns the :class:`Response`. Connections are opened
    as concurrent requests need them and up to ``_MAX_IDLE`` idle ones per event loop are kept
    for reuse; each loop uses only the connections it opened (a client outlives a loop).
    """

    def __init__(self, base_url: str, *, connect_timeout: float, timeout: float) -> None:
        parts = urlsplit(base_url)
        assert parts.hostname is not None
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = parts.port is None or parts.port == (443 if self.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if default_port else f"{host}:{self.port}"
        self.prefix = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        # Idle connections per event loop: a connection belongs to the loop that opened it.
        # Those of a loop that has been closed are let go when a new loop turns up.
        self._idle: dict[asyncio.AbstractEventLoop, deque[_Connection]] = {}
        self._closed = False

    def head(self, method: str, path: str, headers: Iterable[tuple[str, str]]) -> bytes:
        """Return the request line and the fixed headers of ``method path``, CRLF-terminated.

        Header values are checked once here: a CR or LF in one (an API key pasted with its
        newline) would split the request.
        """
        lines = [
            f"{method} {self.prefix}{path} HTTP/1.1",
            f"Host: {self.authority}",
            f"User-Agent: {_USER_AGENT}",
        ]
        for name, value in headers:
            _check_header(name, value)
            lines.append(f"{name}: {value}")
        try:
            return ("\r\n".join(lines) + "\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise ProtocolFailure("a header value is not latin-1 text") from None

    async def request(
        self, data: bytes, *, timeout: float | None = None, connect_timeout: float | None = None
    ) -> Response:
        """Send ``data`` (a whole request) and return the answer."""
        if self._closed:
            raise ProtocolFailure("the client is closed")
        loop = asyncio.get_running_loop()
        read_timeout = self.timeout if timeout is None else timeout
        connection, reused = await self._checkout(
            loop, self.connect_timeout if connect_timeout is None else connect_timeout
        )
        try:
            return await self._exchange(loop, connection, data, read_timeout)
        except _Closed as closed:
            if not (reused and closed.early):
                raise
        # The server closed a reused connection as the request went out: once more, fresh.
        connection, _ = await self._checkout(
            loop, self.connect_timeout if connect_timeout is None else connect_timeout, fresh=True
        )
        return await self._exchange(loop, connection, data, read_timeout)

    async def _exchange(
        self,
        loop: asyncio.AbstractEventLoop,
        connection: _Connection,
        data: bytes,
        read_timeout: float,
    ) -> Response:
        waiter = connection.send(data)
        timer = loop.call_later(read_timeout, _expire, waiter)
        try:
            response = await waiter
        except BaseException:
            connection.abort()  # timed out, cancelled or broken: its state is unknown
            raise
        finally:
            timer.cancel()
        self._checkin(loop, connection)
        return response

    async def _checkout(
        self, loop: asyncio.AbstractEventLoop, connect_timeout: float, *, fresh: bool = False
    ) -> tuple[_Connection, bool]:
        now = loop.time()
        idle = self._idle.get(loop)
        while idle and not fresh:
            connection = idle.pop()
            if connection.closed or connection.transport is None:
                continue
            if connection.transport.is_closing():
                continue
            if now - connection.idle_since > _KEEPALIVE_EXPIRY:
                connection.abort()
                continue
            return connection, True
        return await self._connect(loop, connect_timeout), False

    def _checkin(self, loop: asyncio.AbstractEventLoop, connection: _Connection) -> None:
        if connection.closed:
            return
        if self._closed:
            connection.abort()
            return
        idle = self._idle.get(loop)
        if idle is None:
            self._forget_closed_loops()
            idle = self._idle[loop] = deque()
        if len(idle) >= _MAX_IDLE:
            connection._close()
            return
        connection.idle_since = loop.time()
        idle.append(connection)

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, connect_timeout: float
    ) -> _Connection:
        ssl_context: ssl.SSLContext | None = None
        if self.scheme == "https":
            if self._ssl is None:
                self._ssl = _ssl_context()
            ssl_context = self._ssl
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Connection(loop),
                    self.host,
                    self.port,
                    ssl=ssl_context,
                    server_hostname=self.host if ssl_context is not None else None,
                ),
                connect_timeout,
            )
        except asyncio.TimeoutError:
            raise TimedOut(f"connecting to {self.authority} timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"could not connect to {self.authority}: {exc}") from exc
        transport = connection.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None and ssl_context is None:
                # One write per request; waiting for an ACK before it would cost 40 ms.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    def _forget_closed_loops(self) -> None:
        for loop in [loop for loop in self._idle if loop.is_closed()]:
            for connection in self._idle.pop(loop):
                connection.abandon()

    def _drop_idle(self) -> None:
        every = list(self._idle.values())
        self._idle.clear()
        for idle in every:
            for connection in idle:
                connection.abandon()

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their answer is in."""
        self._closed = True
        self._drop_idle()


def _expire(waiter: asyncio.Future[Response]) -> None:
    if not waiter.done():
        waiter.set_exception(TimedOut("no answer within the timeout"))


def _check_header(name: str, value: str) -> None:
    # A transport failure, as httpx reports an invalid header (h11's LocalProtocolError).
    if any(c in name for c in "\r\n:") or not name.strip():
        raise ProtocolFailure(f"invalid header name {name!r}")
    if "\r" in value or "\n" in value:
        raise ProtocolFailure(f"the value of header {name} contains a line break")


def _ssl_context() -> ssl.SSLContext:
    import httpx

    return httpx.create_ssl_context()
