"""The middlewares alive in this process, and the redirection tests put on their settings."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from ._settings import CommetSettings

__all__ = ["live_middlewares", "redirect", "redirected", "register"]

Redirect = Callable[[CommetSettings], CommetSettings]

# Weak: an app that a test dropped is not kept alive for the rest of the run.
_live: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_redirect: Redirect | None = None


def register(middleware: object) -> None:
    """Remember a middleware just built (the testing tools reach apps built before them)."""
    with _lock:
        _live.add(middleware)


def live_middlewares() -> list[Any]:
    """The middlewares of this process still alive, in no particular order."""
    with _lock:
        return list(_live)


def redirect(change: Redirect | None) -> Redirect | None:
    """Apply ``change`` to the settings of every middleware built from now on; return the last.

    The testing tools point middlewares that a test's app builds lazily (Starlette builds its
    stack at the first request) at the emulator this way; None ends it.
    """
    global _redirect
    with _lock:
        previous, _redirect = _redirect, change
    return previous


def redirected(settings: CommetSettings) -> CommetSettings:
    """``settings`` as the current redirection (if any) wants them."""
    change = _redirect
    return settings if change is None else change(settings)
