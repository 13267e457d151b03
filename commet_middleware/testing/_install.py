"""Points every Commet middleware of the process at one emulator for a test, and back after."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from commet_middleware._live import live_middlewares, redirect, redirected
from commet_middleware._models import Operation
from commet_middleware._settings import CommetSettings, DeadLetterHook
from commet_middleware.delivery import aflush, close_default_queues, flush

if TYPE_CHECKING:
    from ._fake import FakeCommet

__all__ = ["Installation", "asettle", "clear_caches", "install", "settle"]

# The key a middleware gets when the emulator accepts any ck_ key.
TEST_KEY = "ck_test_commet_emulator"


class Installation:
    """One emulator installed: the dead letters it saw and what strict mode checks at the end."""

    def __init__(self, fake: FakeCommet, *, url: str | None, strict: bool) -> None:
        self.fake = fake
        self.url = url
        self.strict = strict
        self.dead_letters: list[tuple[Operation, Exception]] = []
        self._lock = threading.Lock()
        self._redirected: list[tuple[CommetSettings, CommetSettings]] = []

    def _record(self, operation: Operation, error: Exception) -> None:
        with self._lock:
            self.dead_letters.append((operation, error))

    def settings_for(self, settings: CommetSettings) -> CommetSettings:
        """``settings`` pointed at the emulator; the app's own dead-letter hook still runs.

        The same settings give the same object back, so the process's default queue (what
        ``@metered(customer=...)`` in a job uses) is one queue per installation, not one per call.
        """
        with self._lock:
            for known, redirected in self._redirected:
                if (
                    known == settings
                    and known.transport is settings.transport
                    and known.dead_letter is settings.dead_letter
                ):
                    return redirected
        redirected = self._redirect(settings)
        with self._lock:
            self._redirected.append((settings, redirected))
        return redirected

    def _redirect(self, settings: CommetSettings) -> CommetSettings:
        keys = self.fake.api_keys
        key = settings.api_key if keys is None and settings.api_key else TEST_KEY
        if keys is not None:
            key = sorted(keys)[0]
        changes: dict[str, Any] = {
            "api_key": key,
            "dead_letter": _chain(self._record, settings.dead_letter),
            "verify_on_startup": False,
            # A test's spool would outlive the test and replay into the next one's emulator.
            "spool_path": None,
        }
        if self.url is None:
            changes["transport"] = self.fake.transport
        else:
            changes.update(base_url=self.url, transport=None)
        return settings.replace(**changes)

    def problems(self, delivered: bool) -> list[str]:
        """What strict mode fails a test for: dead letters, and events still undelivered."""
        found = [
            f"dead letter: {type(op).__name__} {getattr(op, 'feature', '')} for "
            f"{getattr(op, 'customer_id', '')}: {error}"
            for op, error in self.dead_letters
        ]
        if not delivered:
            found.append("events still undelivered when the test ended (settle timed out)")
        return found


def _chain(first: DeadLetterHook, then: DeadLetterHook | None) -> DeadLetterHook:
    def hook(operation: Operation, error: Any) -> None:
        first(operation, error)
        if then is not None:
            then(operation, error)

    return hook


def clear_caches() -> None:
    """Forget the quota allowances every live middleware's gate has cached."""
    for middleware in live_middlewares():
        cache = getattr(getattr(middleware, "gate", None), "cache", None)
        clear = getattr(cache, "clear", None)
        if clear is not None:
            clear()


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def settle(timeout: float = 10.0) -> bool:
    """Deliver everything queued in this process (sync tests); False if ``timeout`` ran out."""
    if _in_event_loop():
        raise RuntimeError("settle() inside an event loop: use `await fake_commet.asettle()`")
    return flush(timeout)


def flush_unless_in_loop(timeout: float = 10.0) -> bool:
    """Deliver what is queued when called from plain code; inside an event loop do nothing."""
    return True if _in_event_loop() else flush(timeout)


async def asettle(timeout: float = 10.0) -> bool:
    """Like :func:`settle`, awaited (async tests, whose sender runs on the test's loop)."""
    return await aflush(timeout)


@contextmanager
def install(
    fake: FakeCommet, *, url: str | None = None, strict: bool = False, timeout: float = 10.0
) -> Iterator[Installation]:
    """Point every Commet middleware of this process, built or to be built, at ``fake``.

    In-process (its transport), or over HTTP to ``url`` (``fake.serve()``). At the end what
    was queued is delivered to ``fake``, the middlewares go back to their own settings, and
    with ``strict`` a dead letter or an undelivered event raises ``AssertionError``.
    """
    installation = Installation(fake, url=url, strict=strict)
    for middleware in live_middlewares():
        middleware.retarget(installation.settings_for(middleware.configured_settings))
    previous = redirect(installation.settings_for)
    fake.installations.append(installation)
    delivered = True
    try:
        yield installation
    finally:
        fake.installations.remove(installation)
        redirect(previous)
        if not _in_event_loop():
            delivered = flush(timeout)
        # Every middleware, built before the test or during it, goes back to its own
        # settings: a module-level app must not keep sending to this test's emulator. The
        # default queues (jobs' @metered) are closed: the next use builds fresh ones.
        # An outer installation (a session one around per-test ones) takes them back.
        for middleware in live_middlewares():
            middleware.retarget(redirected(middleware.configured_settings))
        if not close_default_queues(timeout):
            delivered = False
    problems = installation.problems(delivered)
    if strict and problems:
        raise AssertionError("commet strict mode: " + "; ".join(problems))
