"""Shared by the unit and integration middleware tests: a list sink and an error-log guard."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from commet_middleware import UsageEvent
from commet_middleware._models import Operation


class ListSink:
    """An ``EventSink`` that keeps every operation in a list, thread-safely."""

    def __init__(self) -> None:
        self.operations: list[Operation] = []
        self._lock = threading.Lock()

    def enqueue(self, operation: Operation, /) -> None:
        with self._lock:
            self.operations.append(operation)

    @property
    def events(self) -> list[UsageEvent]:
        with self._lock:
            return [op for op in self.operations if isinstance(op, UsageEvent)]


@pytest.fixture
def sink() -> ListSink:
    """A fresh list sink."""
    return ListSink()


@pytest.fixture
def allow_commet_errors() -> None:
    """Mark a test whose point is that the toolkit logs an error (and swallows it)."""


@pytest.fixture(autouse=True)
def _fail_on_swallowed_errors(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    # The toolkit never lets its own errors break a request; it logs them. A test that did not
    # expect one must not pass while one was swallowed.
    caplog.set_level(logging.WARNING, logger="commet_middleware")
    yield
    if "allow_commet_errors" in request.fixturenames:
        return
    # Child loggers too (commet_middleware.delivery, .quota): an error anywhere in the toolkit.
    errors = [
        r
        for r in caplog.get_records("call")
        if r.name.startswith("commet_middleware") and r.levelno >= 40
    ]
    if errors:
        pytest.fail("commet_middleware logged errors: " + "; ".join(r.getMessage() for r in errors))
