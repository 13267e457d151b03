"""Shared fixtures of the emulator tests: a fresh FakeCommet, reached in-process or over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest
from emulator_helpers import HEADERS, Dialect
from starlette.types import ASGIApp, Receive, Scope, Send

from commet_middleware.testing import FakeCommet
from commet_middleware.testing._server import serve_app

MODES = ["transport", pytest.param("server", marks=pytest.mark.server)]


@pytest.fixture
def anyio_backend() -> str:
    """Run async tests on asyncio only."""
    return "asyncio"


@dataclass
class _Switch:
    """An ASGI app that forwards to the current test's emulator, so one server serves all."""

    target: ASGIApp | None = None
    url: str = ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.target is not None
        await self.target(scope, receive, send)


@pytest.fixture(scope="session")
def _served() -> Iterator[_Switch]:
    """One uvicorn server for the session (starting one per test would dominate run time)."""
    switch = _Switch()
    with serve_app(switch) as url:
        switch.url = url
        yield switch


@pytest.fixture
def fake() -> FakeCommet:
    """A fresh emulator with the shipped demo catalogue."""
    return FakeCommet.from_catalogue()


@pytest.fixture(params=MODES)
def client(request: pytest.FixtureRequest, fake: FakeCommet) -> Iterator[httpx.Client]:
    """A sync client on the in-process transport, then on a real uvicorn server."""
    if request.param == "transport":
        with httpx.Client(
            transport=fake.transport, base_url="https://commet.co", headers=HEADERS
        ) as c:
            yield c
    else:
        served = request.getfixturevalue("_served")
        served.target = fake.app
        with httpx.Client(base_url=served.url, headers=HEADERS, timeout=10) as c:
            yield c


@pytest.fixture(params=MODES)
async def aclient(
    request: pytest.FixtureRequest, fake: FakeCommet
) -> AsyncIterator[httpx.AsyncClient]:
    """An async client on the in-process transport, then on a real uvicorn server."""
    if request.param == "transport":
        async with httpx.AsyncClient(
            transport=fake.transport, base_url="https://commet.co", headers=HEADERS
        ) as c:
            yield c
    else:
        served = request.getfixturevalue("_served")
        served.target = fake.app
        async with httpx.AsyncClient(base_url=served.url, headers=HEADERS, timeout=10) as c:
            yield c


@pytest.fixture(params=["v1", "legacy"])
def dialect(request: pytest.FixtureRequest) -> Dialect:
    """Each test runs in the versioned and the legacy dialect."""
    return Dialect(request.param)
