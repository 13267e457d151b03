"""The pytest plugin: a ``fake_commet`` fixture (and a served variant) for users' test suites."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._fake import FakeCommet

__all__ = ["fake_commet", "fake_commet_url"]


@pytest.fixture
def fake_commet() -> FakeCommet:
    """A fresh FakeCommet loaded with the shipped demo catalogue (any ck_/rk_ key works)."""
    return FakeCommet.from_catalogue()


@pytest.fixture
def fake_commet_url(fake_commet: FakeCommet) -> Iterator[str]:
    """The base URL of ``fake_commet`` served by uvicorn on 127.0.0.1 for this test."""
    with fake_commet.serve() as url:
        yield url
