"""FakeCommet: an in-memory Commet usage and quota API for tests and local development."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ._app import EmulatorApp, RequestHandler
from ._catalogue import Catalogue, load_catalogue
from ._faults import Faults
from ._ledger import (
    Customer,
    Feature,
    Ledger,
    QuotaAllowance,
    RecordedEvent,
    RecordedQuotaEvent,
    RecordedRequest,
    new_id,
)
from ._server import serve_app
from ._transport import EmulatorTransport

if TYPE_CHECKING:
    from ._install import Installation

__all__ = ["FakeCommet"]


class FakeCommet:
    """An emulated Commet: both API dialects, faults, and assertions on what it recorded.

    Reach it through ``transport`` (an httpx transport, sync and async, no server needed), as
    the ASGI ``app``, or over real HTTP with ``serve()``. ``api_keys`` None accepts any key
    starting ``ck_`` or ``rk_``. The ``app`` answers only requests addressed to a loopback name
    or address, or its own bound address; ``allowed_hosts`` adds names (``"*"``: any, which
    lets any web page the developer visits reach it through DNS rebinding).
    """

    def __init__(
        self,
        api_keys: Collection[str] | None = None,
        *,
        seed: int = 0,
        allowed_hosts: Collection[str] = (),
    ) -> None:
        self._ledger = Ledger()
        # The installs (``install()``) pointing middlewares here now; reset() clears their caches.
        self.installations: list[Installation] = []
        self.faults = Faults(seed)
        self._handler = RequestHandler(self._ledger, self.faults, api_keys)
        self.app = EmulatorApp(self._handler, allowed_hosts=allowed_hosts)
        self.transport = EmulatorTransport(self._handler)

    @classmethod
    def from_catalogue(
        cls,
        path: str | Path | Catalogue | None = None,
        *,
        api_keys: Collection[str] | None = None,
        allowed_hosts: Collection[str] = (),
    ) -> FakeCommet:
        """Return a FakeCommet loaded from a TOML catalogue (None: the shipped demo one)."""
        catalogue = path if isinstance(path, Catalogue) else load_catalogue(path)
        fake = cls(
            api_keys=api_keys if api_keys is not None else catalogue.api_keys,
            allowed_hosts=allowed_hosts,
        )
        for feature in catalogue.features:
            fake.add_feature(
                feature.code,
                quota=feature.quota,
                included=feature.included,
                unlimited=feature.unlimited,
                overage=feature.overage,
            )
        for customer in catalogue.customers:
            fake.add_customer(
                customer.customer_id,
                None if customer.features is None else list(customer.features),
                subscribed=customer.subscribed,
            )
        return fake

    # catalogue

    def add_feature(
        self,
        code: str,
        *,
        quota: bool = False,
        included: int = 0,
        unlimited: bool = False,
        overage: bool = False,
    ) -> None:
        """Add a metered feature, or a quota one (``quota=True``) with its plan terms."""
        self._ledger.add_feature(Feature(code, quota, included, unlimited, overage))

    def add_customer(
        self,
        customer_id: str,
        features: Collection[str] | None = None,
        *,
        subscribed: bool = True,
    ) -> str:
        """Add a customer subscribed to ``features`` (None: all); return its ``cus_`` id.

        The API accepts either id. ``subscribed=False`` gives 404 no_active_subscription.
        """
        commet_id = new_id("cus")
        plan = None if features is None else frozenset(features)
        self._ledger.add_customer(Customer(customer_id, commet_id, plan, subscribed))
        return commet_id

    # assertions

    def events(
        self, customer_id: str | None = None, feature: str | None = None
    ) -> list[RecordedEvent]:
        """Return the recorded usage events in arrival order, optionally filtered."""
        return self._ledger.events(customer_id, feature)

    def usage_total(self, customer_id: str, feature: str) -> int | float:
        """Return the sum of the recorded usage values of one customer and feature."""
        return self._ledger.usage_total(customer_id, feature)

    def quota(self, customer_id: str, feature: str) -> QuotaAllowance:
        """Return the allowance (UsageQuota fields in snake_case); KeyError if none."""
        return self._ledger.quota(customer_id, feature)

    def quota_events(
        self, customer_id: str | None = None, feature: str | None = None
    ) -> list[RecordedQuotaEvent]:
        """Return the committed quota changes in order, optionally filtered."""
        return self._ledger.quota_events(customer_id, feature)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received (dropped ones have ``status`` None)."""
        return self._ledger.requests()

    def start_new_period(self) -> None:
        """Start a billing period: billed quantities restart from the current balances."""
        self._ledger.start_new_period()

    def reset(self) -> None:
        """Forget events, balances, idempotency keys, requests and faults; keep the catalogue.

        While installed (``install()``, the ``commet_emulator`` fixture) it first delivers what
        the apps queued (outside an event loop) and then clears their quota caches.
        """
        if self.installations:
            # What installed apps queued before the reset lands before it, not after; and they
            # must not answer from allowances read before it.
            from ._install import clear_caches, flush_unless_in_loop

            flush_unless_in_loop()
            self._ledger.reset()
            self.faults.clear()
            clear_caches()
            return
        self._ledger.reset()
        self.faults.clear()

    @property
    def api_keys(self) -> frozenset[str] | None:
        """The keys it accepts; None: any key starting ``ck_`` or ``rk_``."""
        return self._handler.api_keys

    # the testing story

    @contextmanager
    def install(self, *, url: str | None = None, strict: bool = False) -> Iterator[Installation]:
        """Point every Commet middleware of the process (built or not yet) here, then back.

        The ``commet_emulator`` fixture does this per test. ``url`` (from ``serve()``) goes
        over HTTP instead of the in-process transport. On exit what was queued is delivered;
        with ``strict`` a dead letter or an undelivered event raises ``AssertionError``.
        """
        from ._install import install

        with install(self, url=url, strict=strict) as installation:
            yield installation

    def settle(self, timeout: float = 10.0) -> bool:
        """Deliver everything the process has queued before asserting (sync tests).

        True when all was delivered (or given up) within ``timeout``. In async code use
        ``await asettle()``: there the sender runs on the test's own event loop.
        """
        from ._install import settle

        return settle(timeout)

    async def asettle(self, timeout: float = 10.0) -> bool:
        """Like :meth:`settle`, awaited: for async tests (pytest-asyncio, anyio)."""
        from ._install import asettle

        return await asettle(timeout)

    @contextmanager
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
        """Serve the API under uvicorn in a background thread; yield ``http://host:port``."""
        with serve_app(self.app, host, port) as url:
            yield url
