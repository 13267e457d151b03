"""An httpx transport, sync and async at once, that answers from the emulator in-process."""

from __future__ import annotations

import httpx

from ._app import EmulatorRequest, Reply, RequestHandler, run_async, run_sync
from ._faults import ConnectionDropped

__all__ = ["EmulatorTransport"]


def _to_emulator(request: httpx.Request, body: bytes) -> EmulatorRequest:
    return EmulatorRequest(
        method=request.method,
        path=request.url.path,
        query=request.url.query.decode("ascii"),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=body,
    )


def _to_httpx(reply: Reply) -> httpx.Response:
    return httpx.Response(reply.status, headers=reply.headers, content=reply.body)


def _dropped(request: httpx.Request) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError(
        "Server disconnected without sending a response.", request=request
    )


class EmulatorTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Serves ``httpx.Client`` and ``httpx.AsyncClient`` with no server and no network.

    The sync path runs in the calling thread (any thread); the async path in the running loop.
    Closing a client does not close the emulator: the transport can be shared and reused.
    """

    def __init__(self, handler: RequestHandler) -> None:
        self._handler = handler

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Answer one request synchronously."""
        body = request.read()
        try:
            return _to_httpx(run_sync(self._handler.process(_to_emulator(request, body))))
        except ConnectionDropped:
            raise _dropped(request) from None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Answer one request in the running event loop."""
        body = await request.aread()
        try:
            reply = await run_async(self._handler.process(_to_emulator(request, body)))
        except ConnectionDropped:
            raise _dropped(request) from None
        return _to_httpx(reply)

    def close(self) -> None:
        """Do nothing: the emulator outlives the clients that use it."""

    async def aclose(self) -> None:
        """Do nothing: the emulator outlives the clients that use it."""
