"""The pytest plugin: the emulator as fixtures, installed into the app under test if asked."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._fake import FakeCommet
from ._install import clear_caches

__all__ = [
    "commet_emulator",
    "fake_commet",
    "fake_commet_url",
    "pytest_addoption",
    "pytest_configure",
]

_STRICT_MARKER = "commet_strict"


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register the ``commet_strict`` ini option."""
    parser.addini(
        _STRICT_MARKER,
        "commet_emulator fails a test that left a dead letter or an undelivered event",
        type="bool",
        default=False,
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``commet_strict`` marker."""
    config.addinivalue_line(
        "markers",
        f"{_STRICT_MARKER}(enabled=True): commet_emulator fails this test on a dead letter or "
        "an event still undelivered at its end",
    )


@pytest.fixture
def fake_commet() -> FakeCommet:
    """A fresh FakeCommet loaded with the shipped demo catalogue (any ck_/rk_ key works)."""
    return FakeCommet.from_catalogue()


@pytest.fixture
def fake_commet_url(fake_commet: FakeCommet) -> Iterator[str]:
    """The base URL of ``fake_commet`` served by uvicorn on 127.0.0.1 for this test."""
    with fake_commet.serve() as url:
        yield url


def _strict(request: pytest.FixtureRequest) -> bool:
    marker = request.node.get_closest_marker(_STRICT_MARKER)
    if marker is not None:
        return bool(marker.args[0]) if marker.args else True
    return bool(request.config.getini(_STRICT_MARKER))


@pytest.fixture
def commet_emulator(
    request: pytest.FixtureRequest, fake_commet: FakeCommet
) -> Iterator[FakeCommet]:
    """``fake_commet``, with every Commet middleware of the process pointed at it.

    Apps built before the test (a module-level app) and during it alike; over HTTP when the
    test also asks for ``fake_commet_url``, else in process. At the end what was queued is
    delivered to it and the apps go back to their own settings. Strict (marker
    ``commet_strict`` or ini ``commet_strict = true``): a dead letter or an undelivered event
    fails the test.
    """
    url = (
        request.getfixturevalue("fake_commet_url")
        if "fake_commet_url" in request.fixturenames
        else None
    )
    with fake_commet.install(url=url, strict=_strict(request)):
        yield fake_commet


@pytest.fixture(autouse=True)
def _commet_clear_caches() -> Iterator[None]:
    # A quota allowance cached in one test must not answer in the next (a session app).
    yield
    clear_caches()
