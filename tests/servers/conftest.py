"""Fixtures for the real-server tests: a served Commet emulator and a server launcher."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest

from commet_middleware.testing import FakeCommet

from ._harness import Launch, ServerProcess, free_port, server_env

CUSTOMERS = ("user_123", "user_free", "user_other")
FEATURES = ("api_calls", "ai_tokens")


@pytest.fixture
def commet() -> FakeCommet:
    """An emulator with the examples' features and three customers."""
    fake = FakeCommet()
    for feature in FEATURES:
        fake.add_feature(feature)
    for customer in CUSTOMERS:
        fake.add_customer(customer)
    return fake


@pytest.fixture
def commet_url(commet: FakeCommet) -> Iterator[str]:
    """The emulator served by uvicorn on 127.0.0.1 for the whole test."""
    with commet.serve() as url:
        try:
            yield url
        finally:
            commet.faults.clear()  # opens any gate a failed test left parked


@pytest.fixture
def launch(commet_url: str) -> Iterator[Launch]:
    """Start a server from ``argv_for(port)`` on a free port, ready; kill it at teardown."""
    started: list[ServerProcess] = []

    def start(argv_for: Callable[[int], Sequence[str]]) -> ServerProcess:
        port = free_port()
        server = ServerProcess(argv_for(port), server_env(commet_url), port)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        try:
            server.kill()
            # Shown by pytest only when the test failed.
            print(f"--- {' '.join(server.argv)} ---\n{server.output()}")
        finally:
            server.close()
