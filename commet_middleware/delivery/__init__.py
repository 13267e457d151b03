"""Delivery: takes billable operations off the request path and gets them to Commet."""

from __future__ import annotations

__all__: list[str] = []
