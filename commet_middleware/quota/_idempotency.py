"""Client ``Idempotency-Key`` handling: one key, one request, run and billed at most once.

A key is bound to the whole request: the customer (a key is scoped to its customer), the
method, path, query and a SHA-256 of the body. The record lives in the quota store, so every
worker and host sees it:

- a key never seen: the request runs (the key is "running" until it settles);
- the same key for a different request: 422 ``idempotency_key_reused``;
- the same request while the first still runs: 409 ``idempotency_in_progress``;
- the same request after it succeeded: 409 ``idempotency_key_already_used``, or with
  ``idempotency_replay`` the stored answer (bounded size, kept ``idempotency_ttl``);
- the same request after it failed (not billable, or not completed): it runs again, and its
  events get the same keys as any earlier attempt, so it is billed once.

A store that cannot answer does not block the request: it runs unguarded (its events' keys
still come from the key and the request, so Commet still bills a repeat once).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, NamedTuple

from commet_middleware._keys import client_request_seed

from ._store import QuotaStore, QuotaStoreError

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_REPLAY_BYTES",
    "IdempotencyAnswer",
    "IdempotencyClaim",
    "IdempotencyGuard",
    "ResponseCapture",
    "capture_asgi",
    "decode_response",
    "read_asgi_body",
    "refusal",
    "replay_receive",
]

logger = logging.getLogger("commet_middleware.quota")

# An ASGI message, typed as Starlette types it (without importing Starlette here).
Message = MutableMapping[str, Any]

# A request body larger than this cannot carry an Idempotency-Key here (it is read whole to be
# hashed before the app runs): 413 with a clear code, nothing run, nothing billed.
MAX_BODY_BYTES = 10 * 1024 * 1024
# A succeeded response larger than this is not kept for replay (the repeat gets the 409).
MAX_REPLAY_BYTES = 64 * 1024
# Response headers never replayed: per-connection or per-response, or a session of its own.
_NOT_REPLAYED = frozenset(
    {"content-length", "connection", "date", "server", "set-cookie", "transfer-encoding"}
)
_MESSAGES = {
    "idempotency_key_reused": "This Idempotency-Key was already used for a different request "
    "(another method, path, query or body). Use a new key for new work.",
    "idempotency_key_already_used": "This request already succeeded with this Idempotency-Key; "
    "it is not run again.",
    "idempotency_in_progress": "A request with this Idempotency-Key is still running; retry "
    "with the same key once it has finished.",
    "idempotency_body_too_large": "The request body is too large to be bound to an "
    "Idempotency-Key.",
}
_STATUS = {
    "idempotency_key_reused": 422,
    "idempotency_key_already_used": 409,
    "idempotency_in_progress": 409,
    "idempotency_body_too_large": 413,
}


class IdempotencyAnswer(NamedTuple):
    """What the middleware sends instead of running the app."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def refusal(code: str) -> IdempotencyAnswer:
    """Return the JSON answer of an idempotency refusal ``code``."""
    body = json.dumps(
        {"error": {"type": "idempotency_error", "code": code, "message": _MESSAGES[code]}},
        separators=(",", ":"),
    ).encode("utf-8")
    headers = [("Content-Type", "application/json")]
    if code == "idempotency_in_progress":
        headers.append(("Retry-After", "1"))
    return IdempotencyAnswer(_STATUS[code], headers, body)


class ResponseCapture:
    """The status, headers and body of a response, kept while they fit for a replay."""

    __slots__ = ("body", "headers", "overflow", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.overflow = False

    def start(self, status: int, headers: Iterable[tuple[str, str]]) -> None:
        """Keep the status line and the headers worth replaying."""
        self.status = status
        self.headers = [(k, v) for k, v in headers if k.lower() not in _NOT_REPLAYED]

    def add(self, chunk: bytes) -> None:
        """Keep a body chunk, unless the body has outgrown what a replay keeps."""
        if self.overflow:
            return
        if len(self.body) + len(chunk) > MAX_REPLAY_BYTES:
            self.overflow = True
            self.body = bytearray()
            return
        self.body += chunk

    def encoded(self) -> bytes | None:
        """The response as stored, or None when it cannot be replayed."""
        if self.overflow or not self.status:
            return None
        head = json.dumps({"status": self.status, "headers": self.headers}).encode("utf-8")
        return head + b"\n" + bytes(self.body)


def decode_response(stored: bytes) -> IdempotencyAnswer | None:
    """Return a stored response as an answer (marked as a replay), or None if unreadable."""
    head, _, body = stored.partition(b"\n")
    try:
        meta = json.loads(head)
        headers = [(str(k), str(v)) for k, v in meta["headers"]]
        status = int(meta["status"])
    except (ValueError, KeyError, TypeError):
        return None
    return IdempotencyAnswer(status, [*headers, ("Idempotent-Replayed", "true")], body)


class IdempotencyClaim:
    """One request's hold on a client key, settled once with the request."""

    __slots__ = ("_guard", "capture", "fingerprint", "record", "seed", "settled")

    def __init__(self, guard: IdempotencyGuard, record: str, fingerprint: str, seed: str) -> None:
        self._guard = guard
        self.record = record
        self.fingerprint = fingerprint
        # What the request's event keys derive from.
        self.seed = seed
        self.capture: ResponseCapture | None = ResponseCapture() if guard.replay else None
        self.settled = False

    def finish(self, succeeded: bool) -> None:
        """Keep the key as used (with the answer, for a replay) or free it for a retry."""
        if self.settled:
            return
        self.settled = True
        store = self._guard.store
        try:
            if succeeded:
                response = None if self.capture is None else self.capture.encoded()
                store.finish_idempotent(self.record, self.fingerprint, response, self._guard.ttl)
            else:
                store.abandon_idempotent(self.record, self.fingerprint)
        except QuotaStoreError as exc:
            # A running record left behind ends with its lease.
            logger.warning("commet: could not settle an Idempotency-Key record: %s", exc)


class IdempotencyGuard:
    """Admits or answers requests that carry a client key (see the module docstring)."""

    def __init__(self, store: QuotaStore, *, ttl: float, lease: float, replay: bool) -> None:
        self.store = store
        self.ttl = ttl
        self.lease = lease
        self.replay = replay
        self._down_told_at = -1e9

    def begin(
        self,
        client_key: str,
        customer_id: str | None,
        method: str,
        path: str,
        query: str,
        body: bytes | None,
    ) -> IdempotencyClaim | IdempotencyAnswer:
        """Claim the key for this request, or return what to answer instead of running it.

        ``body`` None means it was too large to read (413).
        """
        if body is None:
            return refusal("idempotency_body_too_large")
        record, fingerprint, seed = client_request_seed(
            client_key, customer_id or "", method, path, query, body
        )
        claim = IdempotencyClaim(self, record, fingerprint, seed)
        try:
            state = self.store.begin_idempotent(record, fingerprint, self.lease)
        except QuotaStoreError as exc:
            now = time.monotonic()
            if now - self._down_told_at >= 10.0:
                self._down_told_at = now
                logger.warning(
                    "commet: the quota store cannot check Idempotency-Key records; requests "
                    "run unchecked (billing still deduplicates a repeat): %s",
                    exc,
                )
            claim.settled = True  # nothing to settle in a store that did not answer
            return claim
        if state.state == "new":
            return claim
        if state.state == "reused":
            return refusal("idempotency_key_reused")
        if state.state == "running":
            return refusal("idempotency_in_progress")
        if self.replay and state.response is not None:
            answer = decode_response(state.response)
            if answer is not None:
                return answer
        return refusal("idempotency_key_already_used")


async def read_asgi_body(
    receive: Callable[[], Awaitable[Message]],
) -> tuple[bytes | None, list[Message]]:
    """Read a whole request body from ASGI ``receive``.

    Returns the body (None when it passed :data:`MAX_BODY_BYTES`) and the messages read, to be
    handed to the app again in order.
    """
    messages: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return b"".join(chunks), messages  # a disconnect: what came is the body
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None, messages
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), messages


def replay_receive(
    messages: list[Message], receive: Callable[[], Awaitable[Message]]
) -> Callable[[], Awaitable[Message]]:
    """Return an ASGI ``receive`` that hands out ``messages`` first, then the real ones."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def capture_asgi(capture: ResponseCapture, message: Message) -> None:
    """Keep what an ASGI response message adds to the response (for a replay)."""
    kind = message["type"]
    if kind == "http.response.start":
        capture.start(
            int(message["status"]),
            (
                (bytes(k).decode("latin-1"), bytes(v).decode("latin-1"))
                for k, v in message.get("headers", ())
            ),
        )
    elif kind == "http.response.body":
        capture.add(bytes(message.get("body", b"")))
    else:  # a file sent by the server (pathsend, zero-copy): not kept
        capture.overflow = True
