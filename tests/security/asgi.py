"""A raw ASGI call for the security tests: headers exactly as given, bytes included."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def call(app: ASGIApp, headers: list[tuple[bytes, bytes]], path: str = "/") -> list[Message]:
    """Run one GET ``path`` with raw ``headers``; return the messages the app sent."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
    }
    sent: list[Message] = []
    incoming = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def status(sent: list[Message]) -> int:
    """The status of the response in ``sent``."""
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    """An endpoint that answers 200."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
