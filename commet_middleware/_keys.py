"""Idempotency keys for billable operations, derived from who and what made them."""

from __future__ import annotations

import hashlib
import itertools
import os

__all__ = ["KEY_PREFIX", "client_request_seed", "derive_idempotency_key", "new_request_id"]

KEY_PREFIX = "cm_"
# 32 hex characters (128 bits) is far beyond any collision risk for one customer's events and
# keeps the key short enough for every Commet field that carries it.
_DIGEST_LENGTH = 32
# A separator that cannot appear in a feature code, a decimal ordinal or an HTTP method, so two
# different inputs can never join into the same string.
_SEP = "\x1f"


def _fresh_nonce() -> str:
    return os.urandom(8).hex()


# A request id is this process's random nonce (64 bits, drawn again in a forked child) and a
# counter: unique across processes and restarts like a uuid4, at a tenth of its cost (no
# system call per request). It only has to be unique, not secret: nothing is authorised by it.
_nonce = _fresh_nonce()
_counter = itertools.count(1)


def _reseed_after_fork() -> None:
    global _nonce, _counter
    _nonce = _fresh_nonce()
    _counter = itertools.count(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_after_fork)


def new_request_id() -> str:
    """Return a fresh id for one executed request (or job): 32 hex characters, never reused."""
    return f"{_nonce}{next(_counter):016x}"


def client_request_seed(
    client_key: str, customer_id: str, method: str, path: str, query: str, body: bytes
) -> tuple[str, str, str]:
    """Return (record, fingerprint, seed) for a request carrying the client's own key.

    ``record`` names the key for this customer (one client's key never collides with another
    customer's); ``fingerprint`` is the whole request (method, path, query, a SHA-256 of the
    body), so one key reused for other work is recognised; ``seed`` derives the events' keys
    from both, so a true retry of the same request produces the same keys and other work
    never shares them.
    """
    record = hashlib.sha256(
        _SEP.join(("commet-middleware/idempotency/v1", customer_id, client_key)).encode("utf-8")
    ).hexdigest()
    fingerprint = hashlib.sha256(
        _SEP.join((method.upper(), path, query, hashlib.sha256(body).hexdigest())).encode("utf-8")
    ).hexdigest()
    return record, fingerprint, _SEP.join(("client", record, fingerprint))


def derive_idempotency_key(seed: str, feature: str, ordinal: int) -> str:
    """Return ``cm_`` + 32 hex chars of sha256 over the request seed, feature and ordinal.

    The same inputs always give the same key, so a retried delivery is recognised by Commet;
    two executed requests have different seeds, so their events never collide.
    """
    material = _SEP.join(("commet-middleware/v1", seed, feature, str(ordinal)))
    return KEY_PREFIX + hashlib.sha256(material.encode("utf-8")).hexdigest()[:_DIGEST_LENGTH]
