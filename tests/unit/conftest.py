"""Fixtures for the raw ASGI/WSGI middleware tests, defined in ``support`` and shared."""

from __future__ import annotations

from .support import ListSink, _fail_on_swallowed_errors, allow_commet_errors, sink

__all__ = ["ListSink", "_fail_on_swallowed_errors", "allow_commet_errors", "sink"]
