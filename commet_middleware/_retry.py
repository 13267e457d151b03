"""When to try a Commet call again, and how long to wait first: one schedule for sync and async."""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ._errors import CommetError
from ._settings import CommetSettings

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The retry schedule of one client call.

    Backoff before retry ``n`` (0 for the first retry) is *equal jitter*:
    ``d = min(cap, base * 2**n)``, then wait ``d/2 + uniform(0, d/2)``. Equal rather than full
    jitter because a retry of ``idempotency_in_progress`` that fires almost at once only
    finds the first request still in flight; half the step is always waited. A ``Retry-After``
    from Commet replaces the backoff and is waited as given, capped at ``retry_after_cap``.
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
        """Return the jittered wait before retry number ``retry`` (0-based)."""
        step = min(self.cap, self.base * 2.0**retry)
        half = step / 2
        return half + half * self.random()

    def delay(self, error: BaseException, retry: int) -> float | None:
        """Return how long to wait before retry ``retry`` after ``error``, or None to give up.

        Only errors marked ``retryable`` are retried (transport errors, 408, 409
        ``idempotency_in_progress``, 429 with ``Retry-After``, 500/502/503/504), and only
        ``max_retries`` times.
        """
        if not isinstance(error, CommetError) or not error.retryable:
            return None
        if retry >= self.max_retries:
            return None
        retry_after: float | None = getattr(error, "retry_after", None)
        if retry_after is not None:
            return max(0.0, min(retry_after, self.retry_after_cap))
        return self.backoff(retry)

    def schedule(self) -> Iterator[float]:
        """Yield the backoff before each retry, as used when Commet names no wait."""
        for retry in range(self.max_retries):
            yield self.backoff(retry)
