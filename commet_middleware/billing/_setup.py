"""What every middleware builds once: settings, rules, counters, the delivery queue and the gate."""

from __future__ import annotations

import logging
import threading
from typing import Any

from commet_middleware._live import redirected, register
from commet_middleware._models import Operation
from commet_middleware._settings import (
    CommetSettings,
    DeadLetterHook,
    resolve_settings,
)
from commet_middleware._startup import averify, verify, warn_if_unconfigured
from commet_middleware.customers import CustomerResolver
from commet_middleware.quota import QuotaGate
from commet_middleware.quota._idempotency import IdempotencyGuard

from ._context import EventSink, MeteringStats, RequestContext
from ._rules import MeteringRules

__all__ = ["MiddlewareSetup", "QuotaGateOwner", "SinkOwner", "build_settings"]

logger = logging.getLogger("commet_middleware")


def build_settings(settings: CommetSettings | None, overrides: dict[str, Any]) -> CommetSettings:
    """Return the settings of a middleware being built: keyword > ``settings`` > env > default.

    Every field of ``CommetSettings`` is a keyword of both middlewares (a test checks it).
    Read now: a middleware built lazily (Starlette builds its
    stack on the first request) uses the environment of that moment.
    """
    return resolve_settings(settings, overrides)


def chain_dead_letter(first: DeadLetterHook, then: DeadLetterHook | None) -> DeadLetterHook:
    """Return a dead-letter hook that calls ``first`` (ours), then the user's ``then``."""

    def hook(operation: Operation, error: Exception) -> None:
        try:
            first(operation, error)
        except Exception:
            logger.exception("commet: forgetting a dead-lettered quota change failed")
        if then is not None:
            then(operation, error)

    return hook


class QuotaGateOwner:
    """The quota gate a middleware's guards use: built from its settings, or the one given.

    The gate hears of every quota change Commet confirms (a delivery listener) or gives up on
    (the dead-letter hook of the queue the middleware owns), so its cache stays exact.
    """

    def __init__(self, gate: QuotaGate | None, settings: CommetSettings) -> None:
        self.owned = gate is None
        self.gate = gate if gate is not None else QuotaGate(settings)

    def queue_settings(self, settings: CommetSettings) -> CommetSettings:
        """Return ``settings`` for the owned delivery queue, telling the gate of dead letters."""
        return settings.replace(
            dead_letter=chain_dead_letter(self.gate.forget, settings.dead_letter)
        )

    def listen_to(self, sink: EventSink) -> None:
        """Register the gate as a listener of ``sink`` when the sink takes listeners."""
        add_listener = getattr(sink, "add_listener", None)
        if add_listener is not None:
            add_listener(self.gate.confirm)

    def close(self) -> None:
        """Close the gate's sync client, if the middleware built the gate."""
        if self.owned:
            try:
                self.gate.close()
            except Exception:
                logger.exception("commet: closing the quota gate failed")

    async def aclose(self) -> None:
        """Close the gate's clients, if the middleware built the gate."""
        if self.owned:
            try:
                await self.gate.aclose()
            except Exception:
                logger.exception("commet: closing the quota gate failed")
            self.close()


class SinkOwner:
    """Builds, starts and closes the delivery queue a middleware owns (or uses a given sink)."""

    def __init__(self, sink: EventSink | None, settings: CommetSettings) -> None:
        self.settings = settings
        self.owned = sink is None
        if sink is None:
            from commet_middleware.delivery import (
                DeliveryQueue,  # only needed when the app really delivers
            )

            sink = DeliveryQueue(settings)
        self.sink: EventSink = sink
        # Read without the lock on every request; start() decides under it.
        self.started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the owned queue once; called at lifespan startup or on the first request."""
        if self.started:
            return
        with self._lock:
            if self.started:
                return
            self.started = True
            start = getattr(self.sink, "start", None) if self.owned else None
            if start is not None:
                try:
                    start()
                except Exception:
                    logger.exception("commet: could not start the delivery queue")

    async def aclose(self) -> None:
        """Flush and close the owned queue, within the settings' shutdown timeout."""
        if not self.owned:
            return
        self.started = False  # the queue stays usable; a later lifespan starts it again
        aclose = getattr(self.sink, "aclose", None)
        if aclose is None:
            return
        try:
            await aclose(self.settings.shutdown_timeout)
        except Exception:
            logger.exception("commet: closing the delivery queue failed")

    def close(self) -> None:
        """Flush and close the owned queue from sync code (WSGI, atexit)."""
        if not self.owned:
            return
        self.started = False
        close = getattr(self.sink, "close", None)
        if close is None:
            return
        try:
            close(self.settings.shutdown_timeout)
        except Exception:
            logger.exception("commet: closing the delivery queue failed")


class MiddlewareSetup:
    """What every middleware shares: rules, settings, counters, sink and gate.

    The middlewares keep their own explicit keyword signatures (typed for ``add_middleware``)
    and hand the result to :meth:`_set_up`.
    """

    customer: CustomerResolver | None
    rules: MeteringRules
    idempotency_header: str | None
    settings: CommetSettings
    stats: MeteringStats

    def _set_up(
        self,
        *,
        customer: CustomerResolver | None,
        rules: MeteringRules,
        idempotency_header: str | None,
        settings: CommetSettings,
        sink: EventSink | None,
        quota_gate: QuotaGate | None,
        idempotency_replay: bool = False,
    ) -> None:
        self.customer = customer
        self.rules = rules
        # Lowercase once, for every adapter (HTTP header names are case-insensitive).
        self.idempotency_header = idempotency_header.lower() if idempotency_header else None
        self.idempotency_replay = idempotency_replay
        self.stats = MeteringStats()
        self._checked = False
        # The settings the app asked for, before any test redirection (``retarget`` goes back).
        self.configured_settings = settings
        self._build_owners(redirected(settings), sink, quota_gate)
        register(self)

    def _build_owners(
        self, settings: CommetSettings, sink: EventSink | None, quota_gate: QuotaGate | None
    ) -> None:
        self.settings = settings
        self._gates = QuotaGateOwner(quota_gate, settings)
        self._sinks = SinkOwner(
            sink, self._gates.queue_settings(settings) if sink is None else settings
        )
        self._gates.listen_to(self._sinks.sink)
        # Client keys are recorded in the quota store, so every worker and host sees them.
        self._idempotency = (
            IdempotencyGuard(
                self._gates.gate.quota_store,
                ttl=settings.idempotency_ttl,
                lease=settings.quota_lease,
                replay=self.idempotency_replay,
            )
            if self.idempotency_header
            else None
        )

    def retarget(self, settings: CommetSettings) -> None:
        """Deliver to ``settings`` from the next request on (the testing tools' seam).

        What the middleware's own queue holds is flushed and closed first, to where it was
        going; its own quota gate (and so its allowance cache) is replaced. A ``sink=`` or
        ``quota_gate=`` given at build time stays.
        """
        old_sinks, old_gates = self._sinks, self._gates
        old_sinks.close()
        old_gates.close()
        self._build_owners(
            settings,
            None if old_sinks.owned else old_sinks.sink,
            None if old_gates.owned else old_gates.gate,
        )

    def _startup_checks(self) -> None:
        """Once per middleware, at start: warn of a missing key; ``verify_on_startup``."""
        if self._checked:
            return
        self._checked = True
        if self._sinks.owned:
            warn_if_unconfigured(self.settings)
        verify(self.settings)

    async def _astartup_checks(self) -> None:
        """Like :meth:`_startup_checks`, on an event loop."""
        if self._checked:
            return
        self._checked = True
        if self._sinks.owned:
            warn_if_unconfigured(self.settings)
        await averify(self.settings)

    def new_context(self) -> RequestContext:
        """Return the billing context of a request arriving now."""
        return RequestContext(
            sink=self._sinks.sink,
            settings=self.settings,
            reject_missing_customer=self.rules.reject_missing_customer,
            stats=self.stats,
            gate=self._gates.gate,
        )

    @property
    def sink(self) -> EventSink:
        """The sink billable operations go to."""
        return self._sinks.sink

    @property
    def gate(self) -> QuotaGate:
        """The quota gate ``@quota_guard`` and ``@quota_release`` use in this middleware."""
        return self._gates.gate
