"""Fixtures of the client tests: asyncio for anyio, a fresh deprecation flag, a sleep recorder."""

from __future__ import annotations

import pytest
from commet_script import Sleeps

from commet_middleware import _client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def fresh_deprecation_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a fresh process as far as the once-per-process warning goes."""
    monkeypatch.setattr(_client, "_deprecation_warned", False)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()
