"""The quota store protocol, the per-process memory store, and ``open_store`` for a URL.

A store holds what an exact decision needs, in one place every process serving the app sees:
the allowance last read from Commet (and when), the units held by requests in flight, and our
quota changes handed to delivery but not yet confirmed by Commet. A decision is one atomic
step of the store (:meth:`QuotaStore.reserve`), so a fleet of workers or hosts cannot let more
through than the allowance has left.

- ``memory``: this process only (the default; exact for one process).
- ``sqlite:///PATH``: every process on one host (``sqlite://relative.db`` for a relative path).
- ``redis://HOST:PORT/DB``, ``rediss://...``: every host; needs ``commet-middleware[redis]``.

Idempotency records (the client's ``Idempotency-Key``) live in the same store.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from commet_middleware._results import QuotaAllowance
from commet_middleware._settings import describe_store_url, validate_store_url

from ._cache import AllowanceCache
from ._decide import Number, left_of, with_balance
from ._reservations import InMemoryReservationStore, Reservation

if TYPE_CHECKING:
    from commet_middleware._settings import CommetSettings

__all__ = [
    "IdempotencyState",
    "MemoryQuotaStore",
    "QuotaStore",
    "QuotaStoreError",
    "ReserveMode",
    "StoreOutcome",
    "describe_store_url",
    "open_store",
    "validate_store_url",
]

ReserveMode = Literal["fresh", "any", "blind"]
_Key = tuple[str, str]


class QuotaStoreError(Exception):
    """The quota store could not answer (down, slow, locked): an outage, never an error page."""


class StoreOutcome(NamedTuple):
    """The result of one atomic :meth:`QuotaStore.reserve`.

    ``kind`` is ``"miss"`` when the store had no allowance fit for the mode (nothing reserved),
    else ``"allowed"`` (``reservation`` holds the units) or ``"refused"``. ``allowance`` is the
    one decided from, its balance including our unconfirmed changes; ``left`` the units left
    before ``included`` (None: unlimited or blind); ``held`` the units in flight after this
    request's own reservation.
    """

    kind: Literal["miss", "allowed", "refused"]
    allowance: QuotaAllowance | None = None
    left: Number | None = None
    held: int = 0
    enforced: bool = False
    reservation: Reservation | None = None


MISS = StoreOutcome("miss")


class IdempotencyState(NamedTuple):
    """What the store knows of a client's idempotency key when a request claims it.

    ``state``: ``"new"`` (claimed now: run the request), ``"running"`` (another request with
    this key has not finished), ``"done"`` (it succeeded; ``response`` is its stored answer or
    None), ``"reused"`` (the key was used for a different request).
    """

    state: Literal["new", "running", "done", "reused"]
    response: bytes | None = None


class QuotaStore(Protocol):
    """Where quota state lives. Every method is atomic for every process sharing the store.

    Methods raise :class:`QuotaStoreError` when the store cannot answer within its timeout.
    """

    url: str
    # True when other processes see the same state (the gate then reads Commet once per TTL for
    # the whole fleet, and says so in the startup check).
    shared: bool

    def reserve(
        self,
        customer_id: str,
        feature: str,
        count: int,
        *,
        mode: ReserveMode,
        hard_limit: bool,
        ttl: float,
        lease: float,
    ) -> StoreOutcome:
        """Decide from the stored allowance and hold ``count`` units if they fit.

        ``mode``: ``"fresh"`` decides only from an allowance younger than ``ttl`` (else a
        miss), ``"any"`` from the last one known however old, ``"blind"`` holds the units
        with no allowance at all (fail-open with nothing known). Held units stop counting
        after ``lease`` seconds unless committed or released first (a worker that died).
        """
        ...

    def claim_read(self, customer_id: str, feature: str, lease: float, ttl: float) -> bool:
        """Return True if this caller is the one to read Commet now (for ``lease`` seconds):
        nobody else holds the claim and no allowance younger than ``ttl`` is stored."""
        ...

    def end_read(self, customer_id: str, feature: str) -> None:
        """Give the read claim back without saving (the read failed)."""
        ...

    def reading(self, customer_id: str, feature: str) -> bool:
        """Return True while some process holds the read claim."""
        ...

    def fresh(self, customer_id: str, feature: str, ttl: float) -> bool:
        """Return True when the stored allowance is younger than ``ttl``."""
        ...

    def save_allowance(self, customer_id: str, feature: str, allowance: QuotaAllowance) -> None:
        """Store what Commet just answered (fresh from now) and end the read claim.

        While changes of ours are unconfirmed the answer may or may not include them, so the
        stored balance keeps our own accounting and only the plan's terms are taken.
        """
        ...

    def commit(self, reservation: Reservation, change_key: str, pending_ttl: float) -> bool:
        """Turn the held units into an unconfirmed change; False if already settled."""
        ...

    def release(self, reservation: Reservation) -> bool:
        """Give the held units back; False if already settled."""
        ...

    def add_pending(
        self, customer_id: str, feature: str, change_key: str, delta: int, pending_ttl: float
    ) -> None:
        """Count a change of ours (a removal: ``delta`` < 0) as unconfirmed."""
        ...

    def confirm(
        self, customer_id: str, feature: str, change_key: str, new_balance: Number | None
    ) -> bool:
        """Commet applied the change: fold it into the balance; True if Commet's balance was
        taken as it is (no other change of ours overlapped it)."""
        ...

    def forget(self, customer_id: str, feature: str, change_key: str) -> None:
        """Commet will never apply the change: drop it and make the next check read Commet."""
        ...

    def in_flight(self, customer_id: str, feature: str) -> int:
        """Return the units held by requests in flight (leases not expired)."""
        ...

    def last_known(self, customer_id: str, feature: str) -> QuotaAllowance | None:
        """Return the stored allowance with our unconfirmed changes applied, or None."""
        ...

    def begin_idempotent(self, record: str, fingerprint: str, lease: float) -> IdempotencyState:
        """Claim the idempotency ``record`` for a request with this ``fingerprint``."""
        ...

    def finish_idempotent(
        self, record: str, fingerprint: str, response: bytes | None, ttl: float
    ) -> None:
        """The request succeeded: keep the record (and its answer, if given) for ``ttl``."""
        ...

    def abandon_idempotent(self, record: str, fingerprint: str) -> None:
        """The request failed: forget the record, so a true retry runs."""
        ...

    def close(self) -> None:
        """Release connections (the store's data stays)."""
        ...


def open_store(settings: CommetSettings) -> QuotaStore:
    """Return the store ``settings.quota_store`` names (raises ValueError for a bad URL)."""
    url = validate_store_url(settings.quota_store)
    if url == "memory":
        return MemoryQuotaStore()
    if url.startswith("sqlite://"):
        from ._sqlite import SQLiteQuotaStore

        return SQLiteQuotaStore(url[len("sqlite://") :], timeout=settings.quota_store_timeout)
    from ._redis import RedisQuotaStore

    return RedisQuotaStore(url, timeout=settings.quota_store_timeout)


class MemoryQuotaStore:
    """The store of one process: an :class:`AllowanceCache`, an in-memory reservation store
    and the count of our unconfirmed changes, behind one lock.

    Our commits move the cached balance at once (``apply_delta``); Commet's confirmed balance
    replaces it when no other change of ours overlapped. Leases are not needed: reservations
    die with the process that holds them.
    """

    url = "memory"
    shared = False

    def __init__(
        self,
        ttl: float = 5.0,
        *,
        cache: AllowanceCache | None = None,
        reservations: InMemoryReservationStore | None = None,
    ) -> None:
        self.cache = cache if cache is not None else AllowanceCache(ttl)
        self.reservations = reservations if reservations is not None else InMemoryReservationStore()
        # Reading the allowance and reserving against it must not interleave with a commit
        # moving units from "in flight" to "balance", or one unit could be counted in neither.
        self._lock = threading.Lock()
        # Our changes handed to delivery and not yet confirmed, per (customer, feature):
        # [how many, whether several overlapped since the count was last zero].
        self._outstanding: dict[_Key, list[int]] = {}
        self._idempotency: dict[str, tuple[str, str, bytes | None, float]] = {}

    def reserve(
        self,
        customer_id: str,
        feature: str,
        count: int,
        *,
        mode: ReserveMode,
        hard_limit: bool,
        ttl: float,
        lease: float,
    ) -> StoreOutcome:
        """Decide from the cached allowance and hold ``count`` units if they fit."""
        cache = self.cache
        reservations = self.reservations
        with self._lock:
            if mode == "blind":
                reservation = reservations.reserve(customer_id, feature, count, None)
                held = reservations.in_flight(customer_id, feature)
                return StoreOutcome("allowed", None, None, held, False, reservation)
            if mode == "fresh":
                allowance = cache.fresh(customer_id, feature)
            else:
                allowance = cache.last_known(customer_id, feature)
            if allowance is None:
                return MISS
            # decide()'s rule, inlined on the hot path of every guarded request: the reservation
            # store checks held + count against what is left atomically, and an answer's own
            # ``remaining`` is Commet's word for what is left.
            enforced = not allowance.unlimited and (hard_limit or not allowance.overage_enabled)
            left = left_of(allowance)
            reservation = reservations.reserve(
                customer_id, feature, count, left if enforced else None
            )
            held = reservations.in_flight(customer_id, feature)
        kind: Literal["allowed", "refused"] = "allowed" if reservation is not None else "refused"
        return StoreOutcome(kind, allowance, left, held, enforced, reservation)

    def claim_read(self, customer_id: str, feature: str, lease: float, ttl: float) -> bool:
        """Always True: the gate's own single-flight is the only coordination one process needs."""
        return True

    def end_read(self, customer_id: str, feature: str) -> None:
        """Nothing to give back."""

    def reading(self, customer_id: str, feature: str) -> bool:
        """Always False (see :meth:`claim_read`)."""
        return False

    def fresh(self, customer_id: str, feature: str, ttl: float) -> bool:
        """Return True when the cached allowance is younger than the cache's TTL."""
        return self.cache.fresh(customer_id, feature) is not None

    def save_allowance(self, customer_id: str, feature: str, allowance: QuotaAllowance) -> None:
        """Cache what Commet just answered; while changes of ours are unconfirmed, with our
        own balance (the answer may predate them)."""
        with self._lock:
            known = self.cache.last_known(customer_id, feature)
            if known is not None and (customer_id, feature) in self._outstanding:
                allowance = with_balance(allowance, max(known.current, allowance.current))
            self.cache.put(customer_id, feature, allowance)

    def commit(self, reservation: Reservation, change_key: str, pending_ttl: float) -> bool:
        """Settle the reservation as used and move the cached balance by its count."""
        with self._lock:
            if not self.reservations.commit(reservation):
                return False
            self.cache.apply_delta(reservation.customer_id, reservation.feature, reservation.count)
            self._sent((reservation.customer_id, reservation.feature))
        return True

    def release(self, reservation: Reservation) -> bool:
        """Give the units back."""
        return self.reservations.release(reservation)

    def add_pending(
        self, customer_id: str, feature: str, change_key: str, delta: int, pending_ttl: float
    ) -> None:
        """Move the cached balance by ``delta`` now; Commet confirms later."""
        with self._lock:
            self.cache.apply_delta(customer_id, feature, delta)
            self._sent((customer_id, feature))

    def confirm(
        self, customer_id: str, feature: str, change_key: str, new_balance: Number | None
    ) -> bool:
        """Take Commet's balance when this change was the only one of ours in flight."""
        key = (customer_id, feature)
        with self._lock:
            if self._settled(key) and new_balance is not None:
                self.cache.apply_new_balance(customer_id, feature, new_balance)
                return True
        return False

    def forget(self, customer_id: str, feature: str, change_key: str) -> None:
        """Drop the cached allowance: it had counted a change Commet will never apply."""
        with self._lock:
            self._settled((customer_id, feature))
            self.cache.invalidate(customer_id, feature)

    def in_flight(self, customer_id: str, feature: str) -> int:
        """Return the units held in flight."""
        return self.reservations.in_flight(customer_id, feature)

    def last_known(self, customer_id: str, feature: str) -> QuotaAllowance | None:
        """Return the cached allowance however old."""
        return self.cache.last_known(customer_id, feature)

    def _sent(self, key: _Key) -> None:
        # Caller holds the lock.
        entry = self._outstanding.setdefault(key, [0, 0])
        entry[0] += 1
        if entry[0] > 1:
            entry[1] = 1

    def _settled(self, key: _Key) -> bool:
        # Caller holds the lock. True when this was the only change in flight throughout.
        entry = self._outstanding.get(key)
        if entry is None:
            return False
        entry[0] -= 1
        if entry[0] > 0:
            return False
        del self._outstanding[key]
        return not entry[1]

    # idempotency records: (fingerprint, state, response, expires at)

    def begin_idempotent(self, record: str, fingerprint: str, lease: float) -> IdempotencyState:
        """Claim ``record`` for this request, or say why not."""
        now = time.monotonic()
        with self._lock:
            self._expire_records(now)
            found = self._idempotency.get(record)
            if found is None or found[3] <= now:
                self._idempotency[record] = (fingerprint, "running", None, now + lease)
                return IdempotencyState("new")
            if found[0] != fingerprint:
                return IdempotencyState("reused")
            if found[1] == "running":
                return IdempotencyState("running")
            return IdempotencyState("done", found[2])

    def finish_idempotent(
        self, record: str, fingerprint: str, response: bytes | None, ttl: float
    ) -> None:
        """Keep the succeeded request's record for ``ttl`` seconds."""
        with self._lock:
            self._idempotency[record] = (fingerprint, "done", response, time.monotonic() + ttl)

    def abandon_idempotent(self, record: str, fingerprint: str) -> None:
        """Forget the failed request's record."""
        with self._lock:
            found = self._idempotency.get(record)
            if found is not None and found[0] == fingerprint and found[1] == "running":
                del self._idempotency[record]

    def _expire_records(self, now: float) -> None:
        # Caller holds the lock. A sweep only when the table has grown: O(1) on most calls.
        if len(self._idempotency) < 1024:
            return
        for record, found in list(self._idempotency.items()):
            if found[3] <= now:
                del self._idempotency[record]

    def close(self) -> None:
        """Nothing to close."""
