"""Fixtures for the operations tests: the sink and the error-log guard."""

from __future__ import annotations

from unit.support import ListSink, _fail_on_swallowed_errors, allow_commet_errors, sink

__all__ = ["ListSink", "_fail_on_swallowed_errors", "allow_commet_errors", "sink"]
