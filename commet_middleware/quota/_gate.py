"""Decide, before a request runs, whether a customer's quota allows it: the core of quota_guard.

Framework-independent: the decorators ask :class:`QuotaGate` for a :class:`QuotaDecision`, run
the endpoint, then ``commit`` the decision's reservation (and enqueue the returned
:class:`QuotaChange`) or ``release`` it.

How a check is answered, cheapest first:

1. A fresh allowance in :class:`AllowanceCache` (no network). Our own commits keep it exact.
2. A cold or expired entry: ONE ``get_quota`` with ``settings.quota_timeout`` and no retries;
   concurrent misses for the same (customer, feature) share that one request (single-flight,
   in asyncio tasks and in threads alike).
3. Commet down or slow: ``on_unavailable="open"`` (default) decides from the last known
   allowance however old (``degraded=True``), or with none allows blind (``degraded=True``; the
   quota add is still enqueued, so Commet's balance reconciles); ``"closed"`` refuses (503).

Concurrent requests racing for the last units are kept honest by a :class:`ReservationStore`:
an allowed request holds ``count`` units until it commits or releases, and every check
subtracts the units held in flight.

A commit moves the cached balance at once, but the quota add reaches Commet later through the
delivery pipeline. The middleware registers :meth:`QuotaGate.confirm` as a delivery listener:
Commet's confirmed balance replaces the cached one when no other change of ours to that
(customer, feature) was in flight meanwhile (with several in flight, answers can arrive out of
order, and the cache's own accounting is the better number until they have all landed). A
known limit remains: a refetch (TTL expiry) while changes are still queued sees Commet's
older balance.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Literal

from commet_middleware._client import AsyncCommetClient, CommetClient
from commet_middleware._errors import CommetAPIError, CommetError
from commet_middleware._models import QuotaChange, validate_feature_code, validate_quota_count
from commet_middleware._results import QuotaAllowance
from commet_middleware._settings import CommetSettings

from ._cache import AllowanceCache, AllowanceLookup
from ._decide import Number, left_of
from ._reservations import InMemoryReservationStore, Reservation, ReservationStore

__all__ = [
    "COMMET_REFUSAL_CODES",
    "OnUnavailable",
    "QuotaDecision",
    "QuotaGate",
    "QuotaStats",
]

logger = logging.getLogger("commet_middleware.quota")

OnUnavailable = Literal["open", "closed"]
_Key = tuple[str, str]

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
    retries (a read on the request path gets one try within ``settings.quota_timeout``), and
    ``cache``/``store`` to in-memory ones. ``close``/``aclose`` close only the clients it made.
    """

    def __init__(
        self,
        settings: CommetSettings,
        *,
        client: CommetClient | None = None,
        async_client: AsyncCommetClient | None = None,
        cache: AllowanceCache | None = None,
        store: ReservationStore | None = None,
    ) -> None:
        self.settings = settings
        self._client = client
        self._async_client = async_client
        self._owns_client = client is None
        self._owns_async_client = async_client is None
        self._client_lock = threading.Lock()
        self.cache = cache or AllowanceCache(wait_timeout=settings.quota_timeout * 2 + 1.0)
        self.store: ReservationStore = store or InMemoryReservationStore()
        self.stats = QuotaStats()
        # Reading the allowance and reserving against it must not interleave with a commit
        # moving units from "in flight" to "balance", or one unit could be counted in neither.
        self._ledger_lock = threading.Lock()
        # Feature codes already validated: a guard checks the same few on every request.
        self._checked_features: set[str] = set()
        # Our quota changes handed to delivery and not yet confirmed, per (customer, feature):
        # [how many, whether several overlapped since the count was last zero].
        self._outstanding: dict[_Key, list[int]] = {}

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
        """Close the sync client, if this gate made it."""
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

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
        ``release`` it when it failed. Never raises for Commet's sake.
        """
        customer = self._begin(customer_id, feature, count, on_unavailable)
        if isinstance(customer, QuotaDecision):
            return customer
        client = self._sync_client()
        timeout = self.settings.quota_timeout

        def fetch() -> QuotaAllowance:
            self.stats.add("fetches")
            return client.get_quota(customer, feature, timeout=timeout)

        try:
            lookup: AllowanceLookup | CommetError = self.cache.get(customer, feature, fetch)
        except CommetError as exc:
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
        """The decision :meth:`acheck` would make, when it needs no fetch; else None.

        Decides from a fresh cached allowance (or refuses a missing customer) without a
        coroutine: the async guard's path for a warm cache. None: ask :meth:`acheck`.
        """
        customer = self._begin(customer_id, feature, count, on_unavailable)
        if isinstance(customer, QuotaDecision):
            return customer
        allowance = self.cache.fresh(customer, feature)
        if allowance is None:
            return None
        counted = ("checks", "cache_hits")
        return self._decide(customer, feature, count, allowance, hard_limit, counted=counted)

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
        client = self._async()
        timeout = self.settings.quota_timeout

        async def fetch() -> QuotaAllowance:
            self.stats.add("fetches")
            return await client.get_quota(customer, feature, timeout=timeout)

        try:
            lookup: AllowanceLookup | CommetError = await self.cache.aget(customer, feature, fetch)
        except CommetError as exc:
            lookup = exc
        except Exception as exc:  # a bug of ours must not break the host app's request
            lookup = _internal_error(exc)
        return self._finish(customer, feature, count, lookup, hard_limit, on_unavailable)

    # settling

    def commit(self, reservation: Reservation, *, idempotency_key: str) -> QuotaChange:
        """Settle ``reservation`` as used and return the quota add to enqueue.

        The cached balance moves by ``count`` at once, so the next check is warm and exact.
        Raises ``ValueError`` if the reservation was already committed or released.
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
        with self._ledger_lock:
            if not self.store.commit(reservation):
                raise ValueError(f"reservation {reservation.id} was already committed or released")
            self.cache.apply_delta(reservation.customer_id, reservation.feature, reservation.count)
            self._sent((reservation.customer_id, reservation.feature))
        self.stats.add("committed")
        return change

    def release(self, reservation: Reservation) -> None:
        """Give the reservation's units back (the work failed); safe to call twice."""
        if self.store.release(reservation):
            self.stats.add("released")

    def record_removal(
        self, customer_id: str, feature: str, count: int = 1, *, idempotency_key: str
    ) -> QuotaChange:
        """Return the quota remove to enqueue (``quota_release``), moving the cache at once."""
        change = QuotaChange.create(
            customer_id, feature, "remove", count, idempotency_key=idempotency_key
        )
        with self._ledger_lock:
            self.cache.apply_delta(customer_id, feature, -count)
            self._sent((customer_id, feature))
        return change

    # what delivery tells us

    def _sent(self, key: _Key) -> None:
        # Caller holds the ledger lock.
        entry = self._outstanding.setdefault(key, [0, 0])
        entry[0] += 1
        if entry[0] > 1:
            entry[1] = 1

    def _settled(self, key: _Key) -> bool:
        # Caller holds the ledger lock. True when this was the only change in flight throughout.
        entry = self._outstanding.get(key)
        if entry is None:
            return False
        entry[0] -= 1
        if entry[0] > 0:
            return False
        del self._outstanding[key]
        return not entry[1]

    def confirm(self, operation: object, result: object) -> None:
        """Delivery listener: learn the balance Commet confirmed for one of our quota changes.

        Applied only when no other change of ours to the same (customer, feature) overlapped it;
        otherwise the cache's own accounting is kept. Other operations are ignored.
        """
        if not isinstance(operation, QuotaChange):
            return
        key = (operation.customer_id, operation.feature)
        new_balance = getattr(result, "new_balance", None)
        with self._ledger_lock:
            if self._settled(key) and isinstance(new_balance, (int, float)):
                self.cache.apply_new_balance(key[0], key[1], new_balance)
                self.stats.add("confirmed")

    def forget(self, operation: object, error: object = None) -> None:
        """Dead-letter hook: a quota change of ours that Commet will never apply.

        The cache had already counted it, so the entry is dropped and the next check asks Commet.
        """
        if not isinstance(operation, QuotaChange):
            return
        key = (operation.customer_id, operation.feature)
        with self._ledger_lock:
            self._settled(key)
            self.cache.invalidate(key[0], key[1])
        self.stats.add("abandoned")

    # the decision, shared by check and acheck

    def _begin(
        self, customer_id: str | None, feature: str, count: int, on_unavailable: str
    ) -> str | QuotaDecision:
        # Programming errors raise; everything about the customer becomes a decision.
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

    def _finish(
        self,
        customer_id: str,
        feature: str,
        count: int,
        lookup: AllowanceLookup | CommetError,
        hard_limit: bool,
        on_unavailable: OnUnavailable,
    ) -> QuotaDecision:
        if isinstance(lookup, AllowanceLookup):
            source = "cache_hits" if lookup.source == "cache" else "cache_misses"
            return self._decide(
                customer_id,
                feature,
                count,
                lookup.allowance,
                hard_limit,
                counted=("checks", source),
            )
        self.stats.add("checks", "cache_misses")
        if isinstance(lookup, CommetAPIError) and lookup.code in COMMET_REFUSAL_CODES:
            return self._commet_refusal(customer_id, feature, count, lookup)
        return self._unavailable(customer_id, feature, count, lookup, hard_limit, on_unavailable)

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

    def _decide(
        self,
        customer_id: str,
        feature: str,
        count: int,
        allowance: QuotaAllowance,
        hard_limit: bool,
        *,
        stale: bool = False,
        counted: tuple[str, ...] = (),
    ) -> QuotaDecision:
        with self._ledger_lock:
            # Re-read under the lock: a commit since the lookup moved units from "in flight"
            # into the cached balance, and deciding from the older copy would count them twice
            # as free.
            allowance = self.cache.last_known(customer_id, feature) or allowance
            enforced = not allowance.unlimited and (hard_limit or not allowance.overage_enabled)
            left = left_of(allowance)
            reservation = self.store.reserve(
                customer_id, feature, count, left if enforced else None
            )
            held = self.store.in_flight(customer_id, feature)
        remaining = None if left is None else max(left - held, 0)
        decision = QuotaDecision(
            allowed=reservation is not None,
            feature=feature,
            count=count,
            customer_id=customer_id,
            code=None if reservation is not None else "quota_exceeded",
            current=allowance.current,
            included=allowance.included,
            remaining=remaining,
            unlimited=allowance.unlimited,
            overage_enabled=allowance.overage_enabled,
            enforced=enforced,
            reservation=reservation,
            degraded=stale,
            stale=stale,
        )
        if decision.allowed:
            self.stats.add("allowed", *counted)
            return decision
        return self._refuse(decision, counted=counted)

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
        self.stats.add("degraded_open")
        last = self.cache.last_known(customer_id, feature)
        if last is not None:
            logger.warning(
                "quota check for feature %r decided from a stale allowance: Commet unavailable: %s",
                feature,
                error,
            )
            self.stats.add("stale_served")
            return self._decide(customer_id, feature, count, last, hard_limit, stale=True)
        logger.warning(
            "quota check for feature %r allowed blind (fail-open): Commet unavailable and no "
            "allowance known: %s",
            feature,
            error,
        )
        with self._ledger_lock:
            reservation = self.store.reserve(customer_id, feature, count, None)
        self.stats.add("allowed")
        return QuotaDecision(
            allowed=True,
            feature=feature,
            count=count,
            customer_id=customer_id,
            reservation=reservation,
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
