"""What delivery tells the operator: one line per kind of trouble and interval, with counts.

An outage or a refused key touches every event; a line per event would bury the one line that
matters (and cost the app its disk). So:

- retries: the first failure after a success is logged at INFO, then at most one INFO summary
  per ``interval`` with the count; once delivery has failed for ``warn_after`` seconds without a
  success, one WARNING says so (and how many operations wait); a success after that logs
  "recovered" at WARNING, with the outage's length;
- configuration failures (a refused key, a wrong URL): one ERROR naming the fix the first time,
  then one summary ERROR per ``config_interval`` with the count, until a send succeeds;
- dead letters: one ERROR per (error code, feature) per ``interval``: the first at once with the
  operation, the rest counted into the next line of that pair (or the final summary at close).

The counters in the queue's stats stay exact; only the log lines are rate-limited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DeliveryReport"]


@dataclass
class _Tally:
    last_logged: float
    suppressed: int = 0


class DeliveryReport:
    """Rate-limited log lines about delivery trouble; thread-safe, and cheap when all is well."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 60.0,
        warn_after: float = 30.0,
        config_interval: float = 300.0,
    ) -> None:
        self._logger = logger
        self._clock = clock
        self.interval = interval
        self.warn_after = warn_after
        self.config_interval = config_interval
        self._lock = threading.Lock()
        # When the current run of failures began (None: the last send succeeded).
        self._failing_since: float | None = None
        self._failures = 0
        self._last_retry_line = 0.0
        self._retry_lines_suppressed = 0
        self._warned = False
        self._config: _Tally | None = None
        self._dead: dict[tuple[str, str], _Tally] = {}

    def failing_for(self) -> float:
        """Seconds since the current run of failures began (0 when the last send succeeded)."""
        since = self._failing_since
        return 0.0 if since is None else self._clock() - since

    def retrying(self, what: str, error: str, waiting: int) -> None:
        """A send failed and will be retried (``what`` describes it, ``error`` is redacted)."""
        now = self._clock()
        line: tuple[int, str, tuple[object, ...]] | None = None
        with self._lock:
            self._failures += 1
            if self._failing_since is None:
                self._failing_since = now
                self._last_retry_line = now
                line = (
                    logging.INFO,
                    "commet: sending %s failed, will retry: %s",
                    (what, error),
                )
            elif not self._warned and now - self._failing_since >= self.warn_after:
                self._warned = True
                self._last_retry_line = now
                line = (
                    logging.WARNING,
                    "commet: delivery has been failing for %.0f s (%d failed attempts, %d "
                    "operations waiting; nothing is lost, retrying with backoff); last error: %s",
                    (now - self._failing_since, self._failures, waiting, error),
                )
            elif now - self._last_retry_line >= self.interval:
                self._last_retry_line = now
                line = (
                    logging.INFO,
                    "commet: delivery still failing after %.0f s (%d failed attempts, %d "
                    "operations waiting); last error: %s",
                    (now - self._failing_since, self._failures, waiting, error),
                )
        if line is not None:
            self._logger.log(line[0], line[1], *line[2])

    def configuration(self, hint: str, error: str, waiting: int) -> None:
        """Commet refused the setup (key, URL): the events are held; say so once, with the fix."""
        now = self._clock()
        first = False
        summary: int | None = None
        with self._lock:
            if self._failing_since is None:
                self._failing_since = now
            self._failures += 1
            tally = self._config
            if tally is None:
                self._config = _Tally(last_logged=now)
                first = True
            elif now - tally.last_logged >= self.config_interval:
                summary = tally.suppressed + 1
                tally.suppressed = 0
                tally.last_logged = now
            else:
                tally.suppressed += 1
        if first:
            self._logger.error(
                "commet: %s. Delivery is paused: %d operations are held and retried every few "
                "minutes until this is fixed; nothing is dropped (%s)",
                hint,
                waiting,
                error,
            )
        elif summary is not None:
            self._logger.error(
                "commet: still refused (%d more attempts): %s; %d operations held",
                summary,
                hint,
                waiting,
            )

    def delivered(self) -> None:
        """A send succeeded: end the current run of failures, if any."""
        if self._failing_since is None:  # the common case, without the lock
            return
        now = self._clock()
        with self._lock:
            since = self._failing_since
            if since is None:
                return
            failures, warned, config = self._failures, self._warned, self._config is not None
            self._failing_since = None
            self._failures = 0
            self._warned = False
            self._config = None
        level = logging.WARNING if warned or config else logging.INFO
        self._logger.log(
            level,
            "commet: delivery recovered after %.0f s (%d failed attempts)",
            now - since,
            failures,
        )

    def dead_letter(self, code: str, feature: str, what: str, error: str) -> None:
        """An operation was given up for good (``what`` describes it, ``error`` is redacted)."""
        now = self._clock()
        pair = (code, feature)
        earlier: int | None = None
        with self._lock:
            tally = self._dead.get(pair)
            if tally is None:
                self._dead[pair] = _Tally(last_logged=now)
            elif now - tally.last_logged >= self.interval:
                earlier = tally.suppressed
                tally.suppressed = 0
                tally.last_logged = now
            else:
                tally.suppressed += 1
                return
        if earlier:
            self._logger.error(
                "commet: giving up on %s: %s (and on %d more %s/%s operations since the last "
                "such line)",
                what,
                error,
                earlier,
                code,
                feature,
            )
        else:
            self._logger.error("commet: giving up on %s: %s", what, error)

    def close(self) -> None:
        """Log what the rate limits held back, so the totals are in the log at shutdown."""
        with self._lock:
            dead = [(pair, tally.suppressed) for pair, tally in self._dead.items()]
            self._dead.clear()
        for (code, feature), count in dead:
            if count:
                self._logger.error(
                    "commet: gave up on %d more %s/%s operations (not logged one by one)",
                    count,
                    code,
                    feature,
                )
