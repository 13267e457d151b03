"""The side-by-side HTTP benchmark: apps, the runner and the vendor sink; see ``runner``."""

from __future__ import annotations

from bench.http.runner import main

__all__ = ["main"]
