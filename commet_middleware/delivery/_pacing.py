"""Pacing: a sender that is behind takes less often, so what waits folds instead of costing a send.

Folding (``_folding``) bounds the queue by the groups waiting, but not the sender's work: a fold
is closed when taken, so a sender that takes as fast as its sends are answered still makes one
HTTP request per few events, and at a few thousand requests per second that is a tenth of the
server's core spent on sends nobody needs separately. The pacer is a token bucket over the
sender's *partial* takes (fewer items waiting than one take can carry): ``BURST`` of them at
once, then one every ``PACE`` seconds. At low load every event still goes alone and at once
(the bucket is full); under load the sender takes every ``PACE`` seconds, and each group's events
of that interval leave as one exact fold. A take that fills a whole batch (many groups waiting:
nothing to gain by waiting) is never paced, so a many-customers load keeps the full throughput.

No pacing while a flush or close is waiting (``QueueState.flushing``/``closing``), nor with
window aggregation (the window already decides when events leave).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ._state import QueueState

__all__ = ["BURST", "PACE", "Pacer"]

# Seconds between partial takes once the burst is spent: what an event can wait, at most, for
# the sender behind; 50 sends per second per group at most.
PACE = 0.02
# Partial takes allowed at once after a quiet spell: a short burst of events still goes alone.
BURST = 10


class Pacer:
    """The token bucket of one queue's sender; called by the one worker that takes.

    ``full``: how many items one take can carry (a take of that many is never paced).
    """

    def __init__(
        self,
        state: QueueState,
        *,
        full: int,
        pace: float | None = None,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state = state
        self.full = max(1, full)
        self._pace = PACE if pace is None else pace
        self._burst = float(BURST if burst is None else burst)
        self._clock = clock
        self._tokens = self._burst
        self._stamp = clock()

    def delay(self) -> float:
        """Seconds to wait before the next take (0: take now).

        Read without the queue's lock: a stale length only moves one take by one pace.
        """
        state = self._state
        waiting = len(state.queue)
        if not waiting or waiting >= self.full or state.flushing or state.closing:
            return 0.0
        self._refill()
        if self._tokens >= 1.0:
            return 0.0
        return (1.0 - self._tokens) * self._pace

    def took(self, count: int) -> None:
        """The sender took ``count`` items: a partial take spends a token."""
        if count >= self.full:
            return
        self._refill()
        self._tokens = max(0.0, self._tokens - 1.0)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed / self._pace)
