"""Drive Django's sync and async test clients through one interface (the request's "stack")."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Any

from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client

STACKS = ("sync", "async")


class Stack:
    """Django's ``Client`` (a sync middleware chain) or ``AsyncClient`` (an async one).

    Requests are made from sync test code either way; an async request runs on an event loop
    of its own, as ``async_to_sync`` gives it.
    """

    def __init__(self, kind: str, **options: Any) -> None:
        self.kind = kind
        self.client: Any = Client(**options) if kind == "sync" else AsyncClient(**options)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; the response as the test client returns it."""
        send = getattr(self.client, method.lower())
        return send(path, **kwargs) if self.kind == "sync" else async_to_sync(send)(path, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)


def body(response: Any) -> bytes:
    """The whole body, reading a streaming response to its end (as a server does)."""
    if not getattr(response, "streaming", False):
        return bytes(response.content)
    content = response.streaming_content
    if isinstance(content, AsyncIterable):
        return async_to_sync(_collect)(content)
    return b"".join(content)


async def _collect(content: AsyncIterable[bytes]) -> bytes:
    return b"".join([chunk async for chunk in content])
