"""Run the emulator's ASGI app under a real uvicorn server, in the foreground or a thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from ._app import EmulatorApp
from ._faults import ConnectionDropped

__all__ = ["bind_socket", "run_forever", "serve_app"]

_Registry = dict[tuple[str, int], asyncio.Transport]


class _DroppingApp:
    """Turns ``ConnectionDropped`` into a closed socket with no response at all."""

    def __init__(self, app: ASGIApp, registry: _Registry) -> None:
        self._app = app
        self._registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._app(scope, receive, send)
        except ConnectionDropped:
            client = scope.get("client")
            transport = self._registry.get(tuple(client)) if client else None
            if transport is None:
                raise
            transport.close()
            # Wait for uvicorn to notice the disconnect, so it does not try to answer 500.
            with anyio.move_on_after(5):
                while (await receive())["type"] != "http.disconnect":
                    pass


def _config(app: ASGIApp, host: str) -> Any:
    try:
        import uvicorn
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError as exc:  # pragma: no cover - uvicorn is in the server extra
        raise RuntimeError(
            "the emulator server needs uvicorn: pip install 'commet-middleware[server]'"
        ) from exc

    registry: _Registry = {}

    class _TrackedProtocol(H11Protocol):
        # The ASGI scope has no handle on the socket; this map from peer address to transport
        # is what lets a "drop" fault close the right connection.
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if self.client is not None:
                registry[self.client] = transport

        def connection_lost(self, exc: Exception | None) -> None:
            if self.client is not None:
                registry.pop(self.client, None)
            super().connection_lost(exc)

    return uvicorn.Config(
        _DroppingApp(app, registry),
        host=host,
        http=_TrackedProtocol,
        ws="none",
        loop="asyncio",
        lifespan="off",
        proxy_headers=False,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )


def _server(app: ASGIApp, host: str) -> Any:
    """Return a uvicorn server for ``app`` that ends the dashboard's event streams on shutdown.

    uvicorn waits for open responses before it exits; an event stream never finishes on its
    own, so without this every shutdown with a dashboard open would wait out the grace period.
    """
    import uvicorn

    dashboard = app.dashboard if isinstance(app, EmulatorApp) else None
    if dashboard is not None:
        dashboard.open_streams()

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if dashboard is not None:
                dashboard.close_streams()
            await super().shutdown(sockets)

    return _Server(_config(app, host))


def bind_socket(host: str, port: int) -> socket.socket:
    """Return a listening TCP socket on ``host:port`` (0 picks a free port).

    It listens at once, so a client told the address can connect before uvicorn is up: the
    connection waits in the backlog instead of being refused. The protocol is named
    (``IPPROTO_TCP``, not 0) because asyncio sets ``TCP_NODELAY`` on accepted connections only
    then; without it Nagle's algorithm adds ~40 ms to every answer.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def run_forever(app: ASGIApp, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` in this thread until SIGINT or SIGTERM."""
    host = sock.getsockname()[0]
    _server(app, host).run(sockets=[sock])


@contextmanager
def serve_app(app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a background thread; yield its base URL once it accepts connections."""
    sock = bind_socket(host, port)
    server = _server(app, host)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="commet-emulator", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the Commet emulator server did not start")
            time.sleep(0.01)
        bound_host, bound_port = sock.getsockname()[:2]
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
