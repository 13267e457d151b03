"""What a failed Commet call means, and how long to wait before the next try: one rule set.

Every part of the toolkit that talks to Commet (the sync and async clients, the background
delivery pipeline) asks :func:`classify` what a failure is and :func:`retry_delay` how long to
wait; nothing else keeps a list of retryable statuses. The classes follow the table at the end
of ``COMMET_API.md``:

- ``transient``: the event may not have reached Commet and can: a transport error or timeout,
  408, 429 (with or without ``Retry-After``), 409 ``idempotency_in_progress``, any 5xx, and a
  2xx whose body is not Commet's documented answer (a proxy, a captive portal or a wrong URL
  answered; code ``invalid_response``). Retry with backoff, never sooner than ``Retry-After``.
- ``configuration``: no event can get through until someone fixes the setup: 401, 403, 407,
  a redirect, a 404 without one of Commet's resource codes (a wrong base URL), 410 (a retired
  path). Keep the events, retry slowly (:data:`CONFIG_RETRY_CAP`), say
  :func:`configuration_hint` once.
- ``permanent``: Commet refused this very operation (validation, ``customer_not_found``,
  billing codes, ``idempotency_key_mismatch`` where it is not read as delivered, any other
  4xx), or the client refused it as invalid before sending (``ValueError``, ``TypeError``).
- ``unexpected``: anything else; a bug, to be retried a bounded number of times at most.

The direct client's bounded retries (:class:`RetryPolicy`) differ in one documented way: a 429
without ``Retry-After`` is raised to the caller rather than waited out, as Commet's own SDK does;
a background pipeline retries it, since for it a 429 is never final.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from ._errors import CommetAPIError, CommetError
from ._settings import CommetSettings

__all__ = [
    "BACKOFF_CAP",
    "COMMET_NOT_FOUND_CODES",
    "CONFIG_RETRY_CAP",
    "FailureClass",
    "RetryPolicy",
    "classify",
    "classify_answer",
    "configuration_hint",
    "is_retryable",
    "retry_delay",
]

FailureClass = Literal["transient", "configuration", "permanent", "unexpected"]

# The background pipeline's longest wait between two tries of a transient failure.
BACKOFF_CAP = 30.0
# The slow schedule for configuration failures: nothing gets through until someone fixes the
# setup, so a few minutes between tries is enough, and a fixed key is noticed within them.
CONFIG_RETRY_CAP = 300.0

# The 404 codes with which Commet says a named resource is missing (its error reference):
# the request reached Commet's usage API and was refused for this operation. Any other 404
# (no code, ``not_found``, ``endpoint_not_available``, an HTML page) means the path itself is
# not Commet's usage API: a wrong base URL, dialect or API version.
COMMET_NOT_FOUND_CODES = frozenset(
    {
        "customer_not_found",
        "feature_not_found",
        "no_active_subscription",
        "subscription_not_found",
        "plan_not_found",
    }
)
# 407: a proxy between the app and Commet wants credentials.
_CONFIGURATION_STATUSES = frozenset({401, 403, 407, 410})
_TRANSIENT_4XX = frozenset({408, 429})


def classify(error: BaseException) -> FailureClass:
    """Return what ``error``, raised by a Commet call, means for the operation that failed."""
    if isinstance(error, CommetAPIError):
        return classify_answer(error.status, error.code)
    if isinstance(error, CommetError):
        # CommetTransportError and any error a custom sender marks as worth another try.
        return "transient" if error.retryable else "unexpected"
    if isinstance(error, (ValueError, TypeError)):
        return "permanent"  # the client refused an invalid operation: no retry can fix it
    return "unexpected"


def classify_answer(status: int, code: str | None) -> FailureClass:
    """Return the class of an answer with this HTTP status and Commet error code."""
    if 200 <= status < 300:
        return "transient"  # a 2xx raised as an error: its body was not Commet's answer
    if 300 <= status < 400:
        return "configuration"  # Commet's API never redirects: the base URL is not Commet's
    if status in _CONFIGURATION_STATUSES:
        return "configuration"
    if status == 404:
        return "permanent" if code in COMMET_NOT_FOUND_CODES else "configuration"
    if status in _TRANSIENT_4XX or (status == 409 and code == "idempotency_in_progress"):
        return "transient"
    if 400 <= status < 500:
        return "permanent"
    if 500 <= status < 600:
        # 500/502/503/504 in the reference, and a CDN's 520-524: the server failed; it did
        # not refuse the event.
        return "transient"
    return "unexpected"


def is_retryable(status: int, code: str | None, retry_after: float | None) -> bool:
    """Return whether a direct call retries an answer: transient, and a 429 names its wait.

    This is ``CommetAPIError.retryable``, worked out by the wire module from the same rules as
    :func:`classify`.
    """
    if classify_answer(status, code) != "transient":
        return False
    return status != 429 or retry_after is not None


def _equal_jitter(
    attempt: int,
    base: float,
    cap: float,
    retry_after: float | None,
    retry_after_cap: float,
    uniform: float,
) -> float:
    step = min(cap, base * 2.0 ** min(attempt - 1, 32))
    delay = step / 2 + uniform * step / 2
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, retry_after_cap))
    return delay


def retry_delay(
    attempt: int,
    *,
    base: float,
    cap: float = BACKOFF_CAP,
    retry_after: float | None = None,
    retry_after_cap: float = 30.0,
    rng: _random.Random | None = None,
) -> float:
    """Return the wait before retry ``attempt`` (1-based): jittered, capped, >= Retry-After.

    The step is ``min(cap, base * 2**(attempt-1))`` and the wait a random point in its upper
    half (*equal jitter*: a retry of ``idempotency_in_progress`` that fired almost at once would
    only find the first request still in flight). A ``Retry-After`` from Commet, capped at
    ``retry_after_cap``, is a floor. For a configuration failure pass
    ``cap=CONFIG_RETRY_CAP``.
    """
    uniform = (rng or _random).random()
    return _equal_jitter(attempt, base, cap, retry_after, retry_after_cap, uniform)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The bounded retries of one direct client call, on :func:`classify` and the one backoff.

    A call is retried while its failure is transient, at most ``max_retries`` times, with
    :func:`retry_delay`'s schedule (``base``, ``cap``) and never sooner than a ``Retry-After``
    (capped at ``retry_after_cap``). A 429 without ``Retry-After`` is raised at once (see the
    module docstring); configuration and permanent failures are never retried in a call.
    """

    max_retries: int = 3
    base: float = 0.5
    cap: float = 8.0
    retry_after_cap: float = 30.0
    # Returns a float in [0, 1); injectable so tests can pin the jitter.
    random: Callable[[], float] = _random.random

    @classmethod
    def from_settings(
        cls, settings: CommetSettings, *, random: Callable[[], float] | None = None
    ) -> RetryPolicy:
        """Return the policy that ``settings`` describes."""
        return cls(
            max_retries=settings.max_retries,
            base=settings.backoff_base,
            cap=settings.backoff_cap,
            retry_after_cap=settings.retry_after_cap,
            random=random or _random.random,
        )

    def backoff(self, retry: int) -> float:
        """Return the jittered wait before retry number ``retry`` (0-based), no Retry-After."""
        return _equal_jitter(retry + 1, self.base, self.cap, None, 0.0, self.random())

    def delay(self, error: BaseException, retry: int) -> float | None:
        """Return how long to wait before retry ``retry`` after ``error``, or None to give up."""
        if retry >= self.max_retries or classify(error) != "transient":
            return None
        retry_after: float | None = getattr(error, "retry_after", None)
        if isinstance(error, CommetAPIError) and error.status == 429 and retry_after is None:
            return None
        return _equal_jitter(
            retry + 1, self.base, self.cap, retry_after, self.retry_after_cap, self.random()
        )

    def schedule(self) -> Iterator[float]:
        """Yield the backoff before each retry, as used when Commet names no wait."""
        for retry in range(self.max_retries):
            yield self.backoff(retry)


def _where(error: CommetAPIError) -> str:
    if error.path:
        return f"{error.method or ''} {error.path}".strip()
    return "its path"


def _base_url(error: CommetAPIError, base_url: str | None) -> str:
    url = error.base_url or base_url
    if not url:
        return "unknown"
    # A base URL may carry a proxy's user:password; a log line must not.
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def configuration_hint(error: BaseException, *, base_url: str | None = None) -> str:
    """Return the one-line fix for a configuration failure, or ``""`` for any other failure.

    The line names the setting to check (``COMMET_API_KEY``, ``COMMET_BASE_URL``, the dialect)
    and never contains the API key. ``base_url`` is used when the error does not say where the
    request went (errors from this toolkit's clients do).
    """
    if not isinstance(error, CommetAPIError) or classify(error) != "configuration":
        return ""
    status, code = error.status, error.code
    url = _base_url(error, base_url)
    if status == 401:
        return (
            "Commet refused the API key (401 unauthorized): check COMMET_API_KEY "
            "(a secret key starts with ck_)"
        )
    if status == 403:
        return (
            "Commet answered 403 forbidden: the API key may not do this: "
            "use a secret ck_ key with usage access"
        )
    if status == 407:
        return (
            "a proxy between this app and Commet wants credentials (407): "
            "check the HTTPS_PROXY settings"
        )
    if status == 410:
        return (
            f"Commet retired {_where(error)} (410): switch to dialect='v1' "
            "(and upgrade commet-middleware)"
        )
    if 300 <= status < 400:
        return (
            f"{_where(error)} was answered with a redirect ({status}): check COMMET_BASE_URL "
            f"(now {url}; Commet's is https://commet.co)"
        )
    if code:
        return (
            f"404 {code!r} at {_where(error)} is not Commet's answer for a missing customer or "
            f"feature: check COMMET_BASE_URL (now {url})"
        )
    return f"404 without a Commet error code at {_where(error)}: check COMMET_BASE_URL (now {url})"
