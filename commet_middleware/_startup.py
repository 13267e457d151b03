"""Checks a middleware runs once when it starts: a missing key, and ``verify_on_startup``."""

from __future__ import annotations

import logging
import os
import sys
import threading

from ._errors import CommetAPIError, CommetError, CommetTransportError
from ._retry import classify, configuration_hint
from ._settings import CommetSettings

__all__ = ["CommetStartupError", "averify", "verify", "warn_if_unconfigured"]

logger = logging.getLogger("commet_middleware")

# A customer id no real account uses: Commet answers a good key with "customer not found"
# (or an empty list), which is all the check needs to know.
_PROBE_CUSTOMER = "commet-middleware-startup-check"

_warned_lock = threading.Lock()
_warned_missing_key = False


class CommetStartupError(CommetError):
    """``verify_on_startup="raise"``: Commet refused the configuration; the message is the fix."""


def _under_tests() -> bool:
    # A test suite builds apps without a key all the time; the warning is for deployments.
    return "PYTEST_CURRENT_TEST" in os.environ or "pytest" in sys.modules


def warn_if_unconfigured(settings: CommetSettings) -> None:
    """Log one WARNING per process when no API key is set (outside tests, without a transport)."""
    global _warned_missing_key
    if settings.api_key or settings.transport is not None or _under_tests():
        return
    with _warned_lock:
        if _warned_missing_key:
            return
        _warned_missing_key = True
    logger.warning(
        "commet: no API key (set COMMET_API_KEY or api_key=): usage is queued and held, "
        "and nothing reaches Commet until a key is configured"
    )


def _problem(error: BaseException, settings: CommetSettings) -> str:
    """The one-line fix for ``error``, or "" when the answer proves the configuration works."""
    hint = configuration_hint(error, base_url=settings.base_url)
    if hint:
        return hint
    if isinstance(error, CommetTransportError):
        return (
            f"could not reach Commet at {settings.base_url}: check COMMET_BASE_URL "
            "and that this host can reach it"
        )
    if isinstance(error, CommetAPIError) and classify(error) == "transient":
        return ""  # Commet is there and knows the key well enough to be busy; not a config issue
    return ""


def _report(problem: str, settings: CommetSettings) -> None:
    if not problem:
        logger.info("commet: startup check passed (%s)", settings.base_url)
        return
    if settings.verify_on_startup == "raise":
        raise CommetStartupError(f"commet startup check failed: {problem}")
    logger.error("commet: startup check failed: %s", problem)


def _check_settings(settings: CommetSettings) -> CommetSettings:
    # One try, bounded like a quota read: a startup must not hang on a dead address.
    return settings.replace(max_retries=0)


def verify(settings: CommetSettings) -> None:
    """One authenticated read; log one ERROR naming the fix, or raise with ``"raise"``."""
    if not settings.verify_on_startup:
        return
    from ._client import CommetClient

    problem = ""
    try:
        with CommetClient(_check_settings(settings)) as client:
            client.get_all_quotas(_PROBE_CUSTOMER)
    except CommetError as error:
        problem = _problem(error, settings)
    _report(problem, settings)


async def averify(settings: CommetSettings) -> None:
    """Like :func:`verify`, awaited."""
    if not settings.verify_on_startup:
        return
    from ._client import AsyncCommetClient

    problem = ""
    try:
        async with AsyncCommetClient(_check_settings(settings)) as client:
            await client.get_all_quotas(_PROBE_CUSTOMER)
    except CommetError as error:
        problem = _problem(error, settings)
    _report(problem, settings)
