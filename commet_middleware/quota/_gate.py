"""Decide, before a request runs, whether a customer's quota allows it: the core of quota_guard.

Framework-independent: the decorators ask :class:`QuotaGate` for a :class:`QuotaDecision`, run
the endpoint, then ``commit`` the decision's reservation (and enqueue the returned
:class:`QuotaChange`) or ``release`` it.

How a check is answered, cheapest first:

1. A fresh allowance in the quota store (``_store``): one atomic step of the store decides and
   reserves (no call to Commet). Our own commits keep it exact.
2. A cold or expired entry: ONE ``get_quota`` with ``settings.quota_timeout`` and no retries,
   for the whole fleet sharing the store (a read claim; the other processes wait for its
   answer); in one process, concurrent misses share that one request (single-flight, in asyncio
   tasks and in threads alike).
3. Commet down or slow: ``on_unavailable="open"`` (default) decides from the last known
   allowance however old (``degraded=True``), or with none allows blind (``degraded=True``; the
   quota add is still enqueued, so Commet's balance reconciles); ``"closed"`` refuses (503).
   A store that fails is the same kind of outage. A 401/403 on the read is not an outage: it
   refuses with ``commet_key_rejected`` whatever the policy, and says so once at ERROR.

Concurrent requests racing for the last units are kept honest by the store: an allowed request
holds ``count`` units (leased, in a shared store) until it commits or releases, and every check
subtracts the units held in flight.

A commit counts the units as an unconfirmed change at once, but the quota add reaches Commet
later through the delivery pipeline. The middleware registers :meth:`QuotaGate.confirm` as a
delivery listener: Commet's confirmed balance replaces the stored one when no other change of
ours to that (customer, feature) was in flight meanwhile (with several in flight, answers can
arrive out of order, and our own accounting is the better number until they have all landed).
A read of Commet while changes are unconfirmed keeps the higher of its balance and ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from commet_middleware._client import AsyncCommetClient, CommetClient
from commet_middleware._errors import CommetAPIError, CommetError, CommetTransportError
from commet_middleware._models import QuotaChange, validate_feature_code, validate_quota_count
from commet_middleware._results import QuotaAllowance
from commet_middleware._settings import CommetSettings

from ._cache import AllowanceCache, AllowanceLookup
from ._decide import Number
from ._reservations import InMemoryReservationStore, Reservation
from ._store import (
    MemoryQuotaStore,
    QuotaStore,
    QuotaStoreError,
    ReserveMode,
    StoreOutcome,
    open_store,
)
from ._workers import warn_if_per_process

__all__ = [
    "COMMET_REFUSAL_CODES",
    "OnUnavailable",
    "QuotaDecision",
    "QuotaGate",
    "QuotaStats",
]

logger = logging.getLogger("commet_middleware.quota")

OnUnavailable = Literal["open", "closed"]
# How often a process waiting for another's read of Commet looks at the store.
_POLL = 0.005
# How long a change of ours counts as unconfirmed before the store forgets it (a worker that
# died before delivering it); a read of Commet then says what really happened.
_PENDING_TTL = 600.0
# At most one warning this often while the quota store is failing.
_STORE_ERROR_EVERY = 10.0

# Commet answers that mean "this customer may not use this feature": refusals, never outages.
COMMET_REFUSAL_CODES = frozenset(
    {"customer_not_found", "no_active_subscription", "feature_not_found", "feature_not_in_plan"}
)


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """The answer to one quota check.

    ``code`` is None when allowed, else why not: ``quota_exceeded``, ``customer_required``,
    ``quota_unavailable`` or Commet's own code (see ``COMMET_REFUSAL_CODES``). The numbers are
    the allowance the decision was made from (None when there was none); ``remaining`` is net
    of the units held in flight, and of this request's own ``count`` when allowed.
    ``enforced`` says a ceiling applied (not unlimited; no overage, or ``hard_limit``).
    ``degraded`` says Commet could not be asked: the decision came from a stale allowance
    (``stale``) or none at all.
    """

    allowed: bool
    feature: str
    count: int
    customer_id: str | None = None
    code: str | None = None
    current: Number | None = None
    included: Number | None = None
    remaining: Number | None = None
    unlimited: bool = False
    overage_enabled: bool = False
    enforced: bool = False
    reservation: Reservation | None = None
    degraded: bool = False
    stale: bool = False
    request_id: str | None = None


# --- stats ---


_COUNTERS = (
    "checks",
    "cache_hits",
    "cache_misses",
    "fetches",
    "allowed",
    "refused",
    "degraded_open",
    "stale_served",
    "closed_unavailable",
    "key_rejected",
    "store_errors",
    "committed",
    "released",
    "confirmed",
    "abandoned",
)


class QuotaStats:
    """Thread-safe counters of quota check outcomes; read them with :meth:`snapshot`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)

    def add(self, *names: str) -> None:
        """Add one to each counter named (one lock for all: a check counts three)."""
        with self._lock:
            for name in names:
                self._counts[name] += 1

    def snapshot(self) -> dict[str, int]:
        """Return a copy of every counter."""
        with self._lock:
            return dict(self._counts)


# --- the gate ---


def _internal_error(exc: Exception) -> CommetError:
    logger.exception("quota check failed inside commet_middleware; treating Commet as unavailable")
    return CommetError(f"internal error: {type(exc).__name__}")


class QuotaGate:
    """Checks quota before a request and settles it after: the engine behind ``quota_guard``.

    Built from settings; ``client``/``async_client`` default to clients of its own with no
    retries (a read on the request path gets one try within ``settings.quota_timeout``).
    ``quota_store`` defaults to the store ``settings.quota_store`` names (``memory``: this
    process; ``cache``/``store`` customise the memory one). ``close``/``aclose`` close only
    the clients and the store it made.
    """

    def __init__(
        self,
        settings: CommetSettings,
        *,
        client: CommetClient | None = None,
        async_client: AsyncCommetClient | None = None,
        cache: AllowanceCache | None = None,
        store: InMemoryReservationStore | None = None,
        quota_store: QuotaStore | None = None,
    ) -> None:
        self.settings = settings
        self._client = client
        self._async_client = async_client
        self._owns_client = client is None
        self._owns_async_client = async_client is None
        self._client_lock = threading.Lock()
        wait = settings.quota_timeout * 2 + 1.0
        self._owns_store = quota_store is None
        if quota_store is None:
            if cache is not None or store is not None or settings.quota_store == "memory":
                quota_store = MemoryQuotaStore(
                    cache=cache or AllowanceCache(wait_timeout=wait), reservations=store
                )
            else:
                quota_store = open_store(settings)
        self.quota_store: QuotaStore = quota_store
        # The memory store's parts, for tests and tools that look inside one process.
        self.cache: AllowanceCache | None = None
        self.store: InMemoryReservationStore | None = None
        if isinstance(quota_store, MemoryQuotaStore):
            self.cache = quota_store.cache
            self.store = quota_store.reservations
            # The cache is also the single-flight of this process's reads.
            self._reads = quota_store.cache
            self.ttl = quota_store.cache.ttl
        else:
            # Only the single-flight of this process's reads: freshness lives in the store.
            self._reads = AllowanceCache(0.0, max_entries=1, wait_timeout=wait)
            self.ttl = 5.0
        self.stats = QuotaStats()
        # Feature codes already validated: a guard checks the same few on every request.
        self._checked_features: set[str] = set()
        # Loud lines said once, not per request.
        self._workers_checked = quota_store.shared
        self._key_rejection_told = False
        self._store_error_told_at = -1e9

    def __repr__(self) -> str:
        return f"<QuotaGate store={self.quota_store.url!r}>"

    # clients

    def _request_path_settings(self) -> CommetSettings:
        return self.settings.replace(max_retries=0)

    def _sync_client(self) -> CommetClient:
        with self._client_lock:
            if self._client is None:
                self._client = CommetClient(self._request_path_settings())
            return self._client

    def _async(self) -> AsyncCommetClient:
        with self._client_lock:
            if self._async_client is None:
                self._async_client = AsyncCommetClient(self._request_path_settings())
            return self._async_client

    def close(self) -> None:
        """Close the sync client and the store, if this gate made them."""
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None
        if self._owns_store:
            self.quota_store.close()

    async def aclose(self) -> None:
        """Close the async client, if this gate made it."""
        if self._owns_async_client and self._async_client is not None:
            await self._async_client.aclose()
            self._async_client = None

    # checks

    def check(
        self,
        customer_id: str | None,
        feature: str,
        count: int = 1,
        *,
        hard_limit: bool = False,
        on_unavailable: OnUnavailable = "open",
    ) -> QuotaDecision:
        """Decide whether ``customer_id`` may use ``count`` more units of ``feature`` (sync).

        An allowed decision holds a reservation: ``commit`` it when the work succeeded,
        ``release`` it when it failed. Never raises for Commet's or the store's sake.
        """
        customer = self._begin(customer_id, feature, count, on_unavailable)
        if isinstance(customer, QuotaDecision):
            return customer
        warm = self._warm(customer, feature, count, hard_limit, on_unavailable)
        if warm is not None:
            return warm
        client = self._sync_client()
        timeout = self.settings.quota_timeout

        def ask_commet() -> QuotaAllowance:
            self.stats.add("fetches")
            return client.get_quota(customer, feature, timeout=timeout)

        read = self._fleet_read(customer, feature, ask_commet)
        try:
            lookup: AllowanceLookup | Exception = self._reads.get(customer, feature, read)
        except (CommetError, QuotaStoreError) as exc:
            lookup = exc
        except Exception as exc:  # a bug of ours must not break the host app's request
            lookup = _internal_error(exc)
        return self._finish(customer, feature, count, lookup, hard_limit, on_unavailable)

    def check_cached(
        self,
        customer_id: str | None,
        feature: str,
        count: int = 1,
        *,
        hard_limit: bool = False,
        on_unavailable: OnUnavailable = "open",
    ) -> QuotaDecision | None:
        """The decision :meth:`acheck` would make, when it needs no read of Commet; else None.

        Decides from a fresh stored allowance (or refuses a missing customer) without a
        coroutine: the async guard's path for a warm cache. None: ask :meth:`acheck`.
        """
        customer = self._begin(customer_id, feature, count, on_unavailable)
        if isinstance(customer, QuotaDecision):
            return customer
        return self._warm(customer, feature, count, hard_limit, on_unavailable)

    async def acheck(
        self,
        customer_id: str | None,
        feature: str,
        count: int = 1,
        *,
        hard_limit: bool = False,
        on_unavailable: OnUnavailable = "open",
    ) -> QuotaDecision:
        """Decide whether ``customer_id`` may use ``count`` more units of ``feature`` (async).

        The same rules as :meth:`check`, with the async client.
        """
        customer = self._begin(customer_id, feature, count, on_unavailable)
        if isinstance(customer, QuotaDecision):
            return customer
        warm = self._warm(customer, feature, count, hard_limit, on_unavailable)
        if warm is not None:
            return warm
        client = self._async()
        timeout = self.settings.quota_timeout

        async def ask_commet() -> QuotaAllowance:
            self.stats.add("fetches")
            return await client.get_quota(customer, feature, timeout=timeout)

        read = self._afleet_read(customer, feature, ask_commet)
        try:
            lookup: AllowanceLookup | Exception = await self._reads.aget(customer, feature, read)
        except (CommetError, QuotaStoreError) as exc:
            lookup = exc
        except Exception as exc:  # a bug of ours must not break the host app's request
            lookup = _internal_error(exc)
        return self._finish(customer, feature, count, lookup, hard_limit, on_unavailable)

    def _warm(
        self,
        customer: str,
        feature: str,
        count: int,
        hard_limit: bool,
        on_unavailable: OnUnavailable,
    ) -> QuotaDecision | None:
        # A fresh allowance in the store decides in one atomic step; None: read Commet first.
        outcome = self._reserve(customer, feature, count, "fresh", hard_limit)
        if isinstance(outcome, QuotaStoreError):
            self.stats.add("checks")
            return self._store_down(customer, feature, count, outcome, on_unavailable)
        if outcome.kind == "miss":
            return None
        return self._from_outcome(customer, feature, count, outcome, ("checks", "cache_hits"))

    # one read of Commet per (customer, feature) and TTL, for every process sharing the store

    def _read_lease(self) -> float:
        return self.settings.quota_timeout + 1.0

    def _fleet_read(
        self, customer: str, feature: str, ask_commet: Callable[[], QuotaAllowance]
    ) -> Callable[[], QuotaAllowance]:
        store = self.quota_store

        def read() -> QuotaAllowance:
            deadline = time.monotonic() + self._read_lease() + 0.5
            while True:
                if store.claim_read(customer, feature, self._read_lease(), self.ttl):
                    return self._read_and_save(customer, feature, ask_commet)
                # Another process is reading: its answer, saved in the store, is ours too.
                if store.fresh(customer, feature, self.ttl):
                    known = store.last_known(customer, feature)
                    if known is not None:
                        return known
                if time.monotonic() >= deadline:
                    raise CommetTransportError("timed out waiting for another process's read")
                time.sleep(_POLL)

        return read

    def _afleet_read(
        self, customer: str, feature: str, ask_commet: Callable[[], Awaitable[QuotaAllowance]]
    ) -> Callable[[], Awaitable[QuotaAllowance]]:
        store = self.quota_store

        async def read() -> QuotaAllowance:
            deadline = time.monotonic() + self._read_lease() + 0.5
            while True:
                if store.claim_read(customer, feature, self._read_lease(), self.ttl):
                    try:
                        allowance = await ask_commet()
                    except BaseException:
                        self._end_read(customer, feature)
                        raise
                    store.save_allowance(customer, feature, allowance)
                    return store.last_known(customer, feature) or allowance
                if store.fresh(customer, feature, self.ttl):
                    known = store.last_known(customer, feature)
                    if known is not None:
                        return known
                if time.monotonic() >= deadline:
                    raise CommetTransportError("timed out waiting for another process's read")
                await asyncio.sleep(_POLL)

        return read

    def _read_and_save(
        self, customer: str, feature: str, ask_commet: Callable[[], QuotaAllowance]
    ) -> QuotaAllowance:
        try:
            allowance = ask_commet()
        except BaseException:
            self._end_read(customer, feature)
            raise
        self.quota_store.save_allowance(customer, feature, allowance)
        # What the store kept (our unconfirmed changes stay counted), not the bare answer.
        return self.quota_store.last_known(customer, feature) or allowance

    def _end_read(self, customer: str, feature: str) -> None:
        # On a failure the claim's lease ends it anyway.
        with contextlib.suppress(QuotaStoreError):
            self.quota_store.end_read(customer, feature)

    # settling

    def commit(self, reservation: Reservation, *, idempotency_key: str) -> QuotaChange:
        """Settle ``reservation`` as used and return the quota add to enqueue.

        The stored balance moves by ``count`` at once (as an unconfirmed change), so the next
        check is warm and exact. Raises ``ValueError`` if the reservation was already committed
        or released (memory store; a shared store says so in a warning and the add is still
        returned: its idempotency key keeps a repeat from counting twice at Commet).
        """
        if not idempotency_key:
            raise ValueError("an idempotency key is required: it is what makes a retry safe")
        # The reservation's customer, feature and count were checked when it was made.
        change = QuotaChange(
            reservation.customer_id,
            reservation.feature,
            "add",
            reservation.count,
            idempotency_key,
        )
        if reservation.stored:
            try:
                held = self.quota_store.commit(reservation, idempotency_key, _PENDING_TTL)
            except QuotaStoreError as exc:
                # The work is done: it is billed even though the store cannot count it now.
                self._store_failed(exc, "a commit")
                held = True
            if not held:
                if not self.quota_store.shared:
                    raise ValueError(
                        f"reservation {reservation.id} was already committed or released"
                    )
                logger.warning(
                    "quota reservation %s of feature %r was no longer held at commit (settled "
                    "already, or its lease of %ss ran out); the add is sent all the same",
                    reservation.id,
                    reservation.feature,
                    self.settings.quota_lease,
                )
        self.stats.add("committed")
        return change

    def release(self, reservation: Reservation) -> None:
        """Give the reservation's units back (the work failed); safe to call twice."""
        if not reservation.stored:
            return
        try:
            released = self.quota_store.release(reservation)
        except QuotaStoreError as exc:
            self._store_failed(exc, "a release (the lease frees the units)")
            return
        if released:
            self.stats.add("released")

    def record_removal(
        self, customer_id: str, feature: str, count: int = 1, *, idempotency_key: str
    ) -> QuotaChange:
        """Return the quota remove to enqueue (``quota_release``), moving the balance at once."""
        change = QuotaChange.create(
            customer_id, feature, "remove", count, idempotency_key=idempotency_key
        )
        try:
            self.quota_store.add_pending(
                customer_id, feature, idempotency_key, -count, _PENDING_TTL
            )
        except QuotaStoreError as exc:
            self._store_failed(exc, "a removal (sent all the same)")
        return change

    # what delivery tells us

    def confirm(self, operation: object, result: object) -> None:
        """Delivery listener: learn the balance Commet confirmed for one of our quota changes.

        Commet's balance is taken as it is only when no other change of ours to the same
        (customer, feature) overlapped it; otherwise our own accounting is kept (answers can
        arrive out of order). Other operations are ignored.
        """
        if not isinstance(operation, QuotaChange):
            return
        new_balance = getattr(result, "new_balance", None)
        if not isinstance(new_balance, (int, float)):
            new_balance = None
        try:
            exact = self.quota_store.confirm(
                operation.customer_id, operation.feature, operation.idempotency_key, new_balance
            )
        except QuotaStoreError as exc:
            self._store_failed(exc, "a confirmation")
            return
        if exact:
            self.stats.add("confirmed")

    def forget(self, operation: object, error: object = None) -> None:
        """Dead-letter hook: a quota change of ours that Commet will never apply.

        The store had counted it, so it is dropped and the next check asks Commet.
        """
        if not isinstance(operation, QuotaChange):
            return
        try:
            self.quota_store.forget(
                operation.customer_id, operation.feature, operation.idempotency_key
            )
        except QuotaStoreError as exc:
            self._store_failed(exc, "forgetting a dead-lettered change")
        self.stats.add("abandoned")

    # the decision, shared by check and acheck

    def _begin(
        self, customer_id: str | None, feature: str, count: int, on_unavailable: str
    ) -> str | QuotaDecision:
        # Programming errors raise; everything about the customer becomes a decision.
        if not self._workers_checked:
            # At the first guarded request rather than at import: an app that never guards
            # anything needs no shared store, and gets no warning.
            self._workers_checked = True
            warn_if_per_process(self.quota_store.url)
        if feature not in self._checked_features:
            self._checked_features.add(validate_feature_code(feature))
        validate_quota_count(count)
        if on_unavailable not in ("open", "closed"):
            raise ValueError(f"on_unavailable must be 'open' or 'closed', got {on_unavailable!r}")
        # "checks" is counted with the outcome, in one lock (_finish, _refuse).
        if not isinstance(customer_id, str) or not customer_id.strip():
            return self._refuse(
                QuotaDecision(
                    allowed=False, feature=feature, count=count, code="customer_required"
                ),
                counted=("checks",),
            )
        return customer_id

    def _reserve(
        self, customer: str, feature: str, count: int, mode: ReserveMode, hard_limit: bool
    ) -> StoreOutcome | QuotaStoreError:
        try:
            return self.quota_store.reserve(
                customer,
                feature,
                count,
                mode=mode,
                hard_limit=hard_limit,
                ttl=self.ttl,
                lease=self.settings.quota_lease,
            )
        except QuotaStoreError as exc:
            return exc
        except Exception as exc:  # a bug of ours must not break the host app's request
            logger.exception("quota store failed inside commet_middleware")
            return QuotaStoreError(f"internal error: {type(exc).__name__}")

    def _finish(
        self,
        customer_id: str,
        feature: str,
        count: int,
        lookup: AllowanceLookup | Exception,
        hard_limit: bool,
        on_unavailable: OnUnavailable,
    ) -> QuotaDecision:
        if isinstance(lookup, AllowanceLookup):
            source = "cache_hits" if lookup.source == "cache" else "cache_misses"
            outcome = self._reserve(customer_id, feature, count, "any", hard_limit)
            if isinstance(outcome, QuotaStoreError):
                self.stats.add("checks", source)
                return self._store_down(customer_id, feature, count, outcome, on_unavailable)
            if outcome.kind != "miss":
                return self._from_outcome(customer_id, feature, count, outcome, ("checks", source))
            lookup = CommetError("the allowance read was not kept by the quota store")
        self.stats.add("checks", "cache_misses")
        if isinstance(lookup, QuotaStoreError):
            return self._store_down(customer_id, feature, count, lookup, on_unavailable)
        if isinstance(lookup, CommetAPIError) and lookup.status in (401, 403):
            return self._key_rejected(customer_id, feature, count, lookup)
        if isinstance(lookup, CommetAPIError) and lookup.code in COMMET_REFUSAL_CODES:
            return self._commet_refusal(customer_id, feature, count, lookup)
        error = lookup if isinstance(lookup, CommetError) else _internal_error(lookup)
        return self._unavailable(customer_id, feature, count, error, hard_limit, on_unavailable)

    def _from_outcome(
        self,
        customer_id: str,
        feature: str,
        count: int,
        outcome: StoreOutcome,
        counted: tuple[str, ...],
        *,
        stale: bool = False,
    ) -> QuotaDecision:
        allowance = outcome.allowance
        left = outcome.left
        allowed = outcome.kind == "allowed"
        decision = QuotaDecision(
            allowed=allowed,
            feature=feature,
            count=count,
            customer_id=customer_id,
            code=None if allowed else "quota_exceeded",
            current=None if allowance is None else allowance.current,
            included=None if allowance is None else allowance.included,
            remaining=None if left is None else max(left - outcome.held, 0),
            unlimited=False if allowance is None else allowance.unlimited,
            overage_enabled=False if allowance is None else allowance.overage_enabled,
            enforced=outcome.enforced,
            reservation=outcome.reservation,
            degraded=stale or allowance is None,
            stale=stale,
        )
        if allowed:
            self.stats.add("allowed", *counted)
            return decision
        return self._refuse(decision, counted=counted)

    def _commet_refusal(
        self, customer_id: str, feature: str, count: int, error: CommetAPIError
    ) -> QuotaDecision:
        # A feature Commet does not know is our configuration error, worth an error line.
        log = logger.error if error.code == "feature_not_found" else logger.info
        log("quota check refused by Commet for feature %r: %s", feature, error)
        return self._refuse(
            QuotaDecision(
                allowed=False,
                feature=feature,
                count=count,
                customer_id=customer_id,
                code=error.code,
                request_id=error.request_id,
            ),
            quiet=True,
        )

    def _key_rejected(
        self, customer_id: str, feature: str, count: int, error: CommetAPIError
    ) -> QuotaDecision:
        # Not an outage: no policy lets a request through on a key Commet refuses, since every
        # quota add it would send is refused too (unbilled work).
        if not self._key_rejection_told:
            self._key_rejection_told = True
            logger.error(
                "Commet rejected the API key on a quota read (HTTP %s): every @quota_guard "
                "request is refused with 503 commet_key_rejected until it is fixed. Set "
                "COMMET_API_KEY (or api_key=) to a valid key of this Commet account with "
                "access to the usage API: %s",
                error.status,
                error,
            )
        self.stats.add("key_rejected")
        return self._refuse(
            QuotaDecision(
                allowed=False,
                feature=feature,
                count=count,
                customer_id=customer_id,
                code="commet_key_rejected",
                request_id=error.request_id,
            ),
            quiet=True,
        )

    def _store_failed(self, error: Exception, doing: str) -> None:
        self.stats.add("store_errors")
        now = time.monotonic()
        # One line every few seconds, not one per request, while the store is down.
        if now - self._store_error_told_at >= _STORE_ERROR_EVERY:
            self._store_error_told_at = now
            logger.warning(
                "quota store %s failed during %s: %s", self.quota_store.url, doing, error
            )

    def _refuse_unavailable(self, customer_id: str, feature: str, count: int) -> QuotaDecision:
        """The closed policy's answer when Commet or the store cannot be asked."""
        self.stats.add("closed_unavailable")
        return self._refuse(
            QuotaDecision(
                allowed=False,
                feature=feature,
                count=count,
                customer_id=customer_id,
                code="quota_unavailable",
                degraded=True,
            ),
            quiet=True,
        )

    def _store_down(
        self,
        customer_id: str,
        feature: str,
        count: int,
        error: QuotaStoreError,
        on_unavailable: OnUnavailable,
    ) -> QuotaDecision:
        self._store_failed(error, f"a check ({on_unavailable} policy applies)")
        if on_unavailable == "closed":
            return self._refuse_unavailable(customer_id, feature, count)
        self.stats.add("degraded_open", "allowed")
        # Held nowhere (the store is out of reach), but committed and billed like any other.
        return QuotaDecision(
            allowed=True,
            feature=feature,
            count=count,
            customer_id=customer_id,
            reservation=Reservation(customer_id, feature, count, stored=False),
            degraded=True,
        )

    def _unavailable(
        self,
        customer_id: str,
        feature: str,
        count: int,
        error: CommetError,
        hard_limit: bool,
        on_unavailable: OnUnavailable,
    ) -> QuotaDecision:
        if on_unavailable == "closed":
            logger.warning(
                "quota check for feature %r refused: Commet unavailable and the policy is "
                "closed: %s",
                feature,
                error,
            )
            return self._refuse_unavailable(customer_id, feature, count)
        self.stats.add("degraded_open")
        outcome = self._reserve(customer_id, feature, count, "any", hard_limit)
        if isinstance(outcome, QuotaStoreError):
            return self._store_down(customer_id, feature, count, outcome, on_unavailable)
        if outcome.kind != "miss":
            logger.warning(
                "quota check for feature %r decided from a stale allowance: Commet unavailable: %s",
                feature,
                error,
            )
            self.stats.add("stale_served")
            return self._from_outcome(customer_id, feature, count, outcome, (), stale=True)
        logger.warning(
            "quota check for feature %r allowed blind (fail-open): Commet unavailable and no "
            "allowance known: %s",
            feature,
            error,
        )
        outcome = self._reserve(customer_id, feature, count, "blind", hard_limit)
        if isinstance(outcome, QuotaStoreError):
            return self._store_down(customer_id, feature, count, outcome, on_unavailable)
        self.stats.add("allowed")
        return QuotaDecision(
            allowed=True,
            feature=feature,
            count=count,
            customer_id=customer_id,
            reservation=outcome.reservation,
            degraded=True,
        )

    def _refuse(
        self, decision: QuotaDecision, *, quiet: bool = False, counted: tuple[str, ...] = ()
    ) -> QuotaDecision:
        self.stats.add("refused", *counted)
        if not quiet:
            logger.info(
                "quota check refused (%s) for feature %r: %s more, %s remaining",
                decision.code,
                decision.feature,
                decision.count,
                decision.remaining,
            )
        return decision
