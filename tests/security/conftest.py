"""Fixtures of the security tests: the error-log guard of the middleware tests, a fixed umask."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from unit.support import ListSink, _fail_on_swallowed_errors, allow_commet_errors, sink

__all__ = ["ListSink", "_fail_on_swallowed_errors", "allow_commet_errors", "sink", "usual_umask"]


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """Run under umask 022, the common default, under which new files are world-readable."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)
