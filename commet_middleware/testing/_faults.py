"""Failures to inject into the emulator: errors, rate limits, latency, dropped connections, and
answers that are not Commet's (an HTML page, a body cut short, a rejected key, a wrong URL)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

import anyio

__all__ = ["CANNED_ANSWERS", "ConnectionDropped", "FaultDecision", "Faults", "Hold", "Wait"]


class ConnectionDropped(Exception):
    """Raised inside the emulator to drop the connection without an answer."""


@dataclass(frozen=True)
class FaultDecision:
    """What to do instead of (or after) the real answer.

    ``body`` set: answer exactly ``status``, ``body`` and ``content_type`` (a canned answer,
    see :data:`CANNED_ANSWERS`); otherwise the handler renders Commet's error body for ``status``.
    """

    kind: str
    status: int = 0
    retry_after: int = 0
    body: bytes | None = None
    content_type: str = "application/json"


def _commet_error(type_: str, code: str, message: str) -> bytes:
    error = {"type": type_, "code": code, "message": message, "param": None, "details": None}
    error["doc_url"] = f"https://commet.co/docs/errors#{code}"
    return json.dumps({"error": error}, separators=(",", ":")).encode()


_TRUNCATED_EVENT = json.dumps(
    {
        "id": "uev_truncated",
        "featureCode": "api_calls",
        "value": 1,
        "customerId": "user_123",
        "object": "usage_event",
    },
    separators=(",", ":"),
).encode()

# The canned answers of the ``*_next`` faults that replace Commet's answer without reaching the
# ledger: (status, content type, body). The first two are 2xx that are not Commet's answer, the
# last three are what a wrong key or a wrong base URL gets.
CANNED_ANSWERS: dict[str, tuple[int, str, bytes]] = {
    # A proxy's or captive portal's login page.
    "html_next": (
        200,
        "text/html; charset=utf-8",
        b"<!DOCTYPE html><html><head><title>Sign in</title></head>"
        b"<body><form action='/login'></form></body></html>",
    ),
    # A UsageEvent cut off mid-body (a connection closed early behind a proxy).
    "truncated_next": (201, "application/json", _TRUNCATED_EVENT[: len(_TRUNCATED_EVENT) // 2]),
    "unauthorized_next": (
        401,
        "application/json",
        _commet_error("authentication_error", "unauthorized", "Missing or invalid x-api-key."),
    ),
    "forbidden_next": (
        403,
        "application/json",
        _commet_error("authentication_error", "forbidden", "This API key may not do this."),
    ),
    # Some other server's 404 page: no Commet error body at all.
    "bare_not_found_next": (404, "text/plain; charset=utf-8", b"Not Found"),
}


class Hold:
    """A gate that parks requests mid-processing until :meth:`release` (see ``hold_next``)."""

    def __init__(self) -> None:
        self._released = threading.Event()
        self._arrived = threading.Condition()
        self._held = 0

    @property
    def held(self) -> int:
        """How many requests have reached the gate so far."""
        with self._arrived:
            return self._held

    def wait_until_held(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until ``count`` requests are parked at the gate; False on timeout."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self._held >= count, timeout)

    def release(self) -> None:
        """Let every parked (and future) request through."""
        self._released.set()

    def _arrive(self) -> None:
        with self._arrived:
            self._held += 1
            self._arrived.notify_all()

    def block(self) -> None:
        """Park the calling thread until released."""
        self._arrive()
        self._released.wait()

    async def ablock(self) -> None:
        """Park the calling task until released, without blocking the event loop."""
        self._arrive()
        # The gate is opened from other threads, which an anyio.Event cannot be.
        while not self._released.is_set():  # noqa: ASYNC110
            await anyio.sleep(0.005)


@dataclass(frozen=True)
class Wait:
    """A pause inside request processing: a sleep, or a :class:`Hold`."""

    seconds: float = 0.0
    hold: Hold | None = None

    def block(self) -> None:
        """Pause the calling thread."""
        if self.hold is not None:
            self.hold.block()
        elif self.seconds > 0:
            time.sleep(self.seconds)

    async def ablock(self) -> None:
        """Pause the calling task."""
        if self.hold is not None:
            await self.hold.ablock()
        elif self.seconds > 0:
            await anyio.sleep(self.seconds)


class Faults:
    """Failure injection, shared by the transport and the real server; thread-safe.

    Before processing, in this order: ``drop_next``, ``rate_limit_next``, ``fail_next``, the
    canned answers (``html_next``, ``truncated_next``, ``unauthorized_next``, ``forbidden_next``,
    ``bare_not_found_next``, in the order they were armed), ``error_rate`` (nothing is written).
    Then ``latency`` delays every request. After a mutation committed:
    ``drop_after_write_next``, then ``fail_after_write_next`` replace the answer, which is how a
    "lost response" is simulated. ``injected`` counts each kind.
    """

    def __init__(self, seed: int = 0) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._counts: Counter[str] = Counter()
        self._holds: list[Hold] = []
        self.clear()

    def clear(self) -> None:
        """Remove every fault, release any hold and zero the counters."""
        with self._lock:
            self._drop = 0
            self._rate_limit: list[int] = []
            self._fail: list[int] = []
            self._canned: list[str] = []
            self._rate = 0.0
            self._rate_status = 500
            self._random = random.Random(self._seed)
            self._latency = 0.0
            self._fail_after: list[int] = []
            self._drop_after = 0
            holds, self._holds = self._holds, []
            self._counts.clear()
        for hold in holds:
            hold.release()

    @property
    def injected(self) -> dict[str, int]:
        """How many faults of each kind were injected so far (kinds as the method names)."""
        with self._lock:
            return dict(self._counts)

    def pending(self) -> dict[str, object]:
        """Return the faults armed now, for the dashboard (the ``injected`` counts included)."""
        with self._lock:
            return {
                "error_rate": self._rate,
                "error_rate_status": self._rate_status,
                "latency": self._latency,
                "fail_next": list(self._fail),
                **{kind: self._canned.count(kind) for kind in CANNED_ANSWERS},
                "rate_limit_next": len(self._rate_limit),
                "drop_next": self._drop,
                "fail_after_write_next": list(self._fail_after),
                "drop_after_write_next": self._drop_after,
                "hold_next": len(self._holds),
                "injected": dict(self._counts),
            }

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """Answer the next ``n`` requests with ``status`` and an internal_error body."""
        with self._lock:
            self._fail.extend([status] * n)

    def html_next(self, n: int = 1) -> None:
        """Answer the next ``n`` requests with 200 and an HTML page; nothing is recorded."""
        self._arm("html_next", n)

    def truncated_next(self, n: int = 1) -> None:
        """Answer the next ``n`` requests with 201 and a JSON body cut in half; nothing recorded."""
        self._arm("truncated_next", n)

    def unauthorized_next(self, n: int = 1) -> None:
        """Answer the next ``n`` requests with 401 ``unauthorized``, whatever their key."""
        self._arm("unauthorized_next", n)

    def forbidden_next(self, n: int = 1) -> None:
        """Answer the next ``n`` requests with 403 ``forbidden``."""
        self._arm("forbidden_next", n)

    def bare_not_found_next(self, n: int = 1) -> None:
        """Answer the next ``n`` requests with a plain-text 404 and no Commet error code, as a
        server that is not Commet would (a wrong base URL)."""
        self._arm("bare_not_found_next", n)

    def _arm(self, kind: str, n: int) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._canned.extend([kind] * n)

    def error_rate(self, rate: float, status: int = 500, *, seed: int | None = None) -> None:
        """Answer a seeded-random ``rate`` (0..1) of requests with ``status``."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        with self._lock:
            self._rate = rate
            self._rate_status = status
            self._random = random.Random(self._seed if seed is None else seed)

    def latency(self, seconds: float) -> None:
        """Delay every request by ``seconds`` (0 turns it off)."""
        with self._lock:
            self._latency = max(seconds, 0.0)

    def rate_limit_next(self, n: int = 1, retry_after: int = 1) -> None:
        """Answer the next ``n`` requests with 429 rate_limited and ``Retry-After``."""
        with self._lock:
            self._rate_limit.extend([retry_after] * n)

    def drop_next(self, n: int = 1) -> None:
        """Drop the connection of the next ``n`` requests before processing them."""
        with self._lock:
            self._drop += n

    def fail_after_write_next(self, n: int = 1, status: int = 503) -> None:
        """Commit the next ``n`` successful mutations, then answer ``status`` anyway."""
        with self._lock:
            self._fail_after.extend([status] * n)

    def drop_after_write_next(self, n: int = 1) -> None:
        """Commit the next ``n`` successful mutations, then drop the connection."""
        with self._lock:
            self._drop_after += n

    def hold_next(self, n: int = 1) -> Hold:
        """Park the next ``n`` mutations after their idempotency reservation until released."""
        hold = Hold()
        with self._lock:
            self._holds.extend([hold] * n)
        return hold

    # used by the request handler

    def before(self) -> FaultDecision | None:
        """Return the fault to inject before processing a request, if any."""
        with self._lock:
            if self._drop:
                self._drop -= 1
                return self._count(FaultDecision("drop_next"))
            if self._rate_limit:
                return self._count(FaultDecision("rate_limit_next", 429, self._rate_limit.pop(0)))
            if self._fail:
                return self._count(FaultDecision("fail_next", self._fail.pop(0)))
            if self._canned:
                kind = self._canned.pop(0)
                status, content_type, body = CANNED_ANSWERS[kind]
                return self._count(
                    FaultDecision(kind, status, body=body, content_type=content_type)
                )
            if self._rate and self._random.random() < self._rate:
                return self._count(FaultDecision("error_rate", self._rate_status))
            return None

    def delay(self) -> Wait | None:
        """Return the latency to add to a request, if any."""
        with self._lock:
            if self._latency <= 0:
                return None
            self._counts["latency"] += 1
            return Wait(seconds=self._latency)

    def hold(self) -> Wait | None:
        """Return the hold a mutation must pass, if any."""
        with self._lock:
            if not self._holds:
                return None
            self._counts["hold_next"] += 1
            return Wait(hold=self._holds.pop(0))

    def after_write(self) -> FaultDecision | None:
        """Return the fault to inject after a mutation committed, if any."""
        with self._lock:
            if self._drop_after:
                self._drop_after -= 1
                return self._count(FaultDecision("drop_after_write_next"))
            if self._fail_after:
                return self._count(FaultDecision("fail_after_write_next", self._fail_after.pop(0)))
            return None

    def _count(self, decision: FaultDecision) -> FaultDecision:
        self._counts[decision.kind] += 1
        return decision
