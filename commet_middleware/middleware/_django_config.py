"""Django's configuration of billing: the ``COMMET`` settings dict, one billing per config.

Django builds a middleware per handler (its test client, a handler per client), so every
middleware built from an equal ``COMMET`` dict shares one billing: one delivery queue and one
quota gate per process, started on the first request (Django has no lifespan of its own;
:func:`with_lifespan` adds one for ASGI servers).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from django.conf import settings as django_settings  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]
from django.utils.module_loading import import_string  # type: ignore[import-untyped]
from starlette.types import ASGIApp, Receive, Scope, Send

from commet_middleware._settings import SETTING_FIELDS, CommetSettings, env_name, from_config
from commet_middleware.billing._rules import DEFAULT_EXCLUDE, MeteringRules
from commet_middleware.billing._setup import MiddlewareSetup, build_settings
from commet_middleware.customers import from_header

from ._django_users import CustomerLookup, loop_running

__all__ = ["DjangoBilling", "billing", "with_lifespan"]

# The COMMET keys that are not CommetSettings fields: the middleware's own options.
_OPTIONS = frozenset(
    {
        "customer",
        "customer_header",
        "meter",
        "exclude",
        "bill_status",
        "on_missing_customer",
        "idempotency_header",
        "idempotency_replay",
        "sink",
        "quota_gate",
        "settings",
    }
)
# Options (and settings fields) that may name a callable by its dotted path.
_DOTTED = ("customer", "bill_status", "dead_letter", "meter")


def _importable(key: str, value: Any) -> Any:
    # A feature code never has a dot, so a meter with one is a path; the others are callables.
    if isinstance(value, str) and key in _DOTTED and "." in value:
        try:
            return import_string(value)
        except ImportError as exc:
            raise ImproperlyConfigured(f"settings.COMMET[{key!r}]: {exc}") from exc
    return value


class DjangoBilling(MiddlewareSetup):
    """Rules, settings, counters, delivery queue and quota gate of one ``COMMET`` config.

    Django builds its middleware once per handler, and its test client builds a handler per
    client: every ``CommetMiddleware`` built from an equal ``COMMET`` dict shares one of these
    (see :func:`billing`), so a test suite runs one delivery queue, not one per test client.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        unknown = sorted(set(config) - _OPTIONS - SETTING_FIELDS)
        if unknown:
            known = ", ".join(sorted(_OPTIONS | SETTING_FIELDS))
            raise ImproperlyConfigured(
                f"settings.COMMET has unknown key(s) {', '.join(unknown)}; known keys: {known}"
            )
        values: dict[str, Any] = {key: _importable(key, value) for key, value in config.items()}
        customer = values.get("customer")
        header = values.get("customer_header")
        if customer is None and header:
            customer = from_header(str(header))
        if customer is not None and not callable(customer):
            raise ImproperlyConfigured(
                "settings.COMMET['customer'] must be a function of the request or its dotted path"
            )
        self.customers = CustomerLookup(customer)
        settings_object = values.get("settings")
        if settings_object is not None and not isinstance(settings_object, CommetSettings):
            raise ImproperlyConfigured("settings.COMMET['settings'] must be a CommetSettings")
        try:
            # Text is read like the environment ("100" for queue_limit), so values may come
            # straight from os.environ in settings.py.
            given = from_config(
                {env_name(key): value for key, value in values.items() if key in SETTING_FIELDS}
            )
            header_name = values.get("idempotency_header")
            self._set_up(
                customer=None,
                rules=MeteringRules(
                    meter=values.get("meter"),
                    exclude=values.get("exclude", DEFAULT_EXCLUDE),
                    bill_status=values.get("bill_status"),
                    on_missing_customer=values.get("on_missing_customer", "serve"),
                ),
                idempotency_header=str(header_name) if header_name else None,
                settings=build_settings(settings_object, given),
                sink=values.get("sink"),
                quota_gate=values.get("quota_gate"),
                idempotency_replay=bool(values.get("idempotency_replay", False)),
            )
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"settings.COMMET: {exc}") from exc
        if not loop_running():
            # Built as the process starts (WSGI): a wrong key is one line in its start-up log.
            self._startup_checks()

    def begin(self) -> None:
        """Start delivery on the first request (Django has no lifespan) and run the checks."""
        if not self._sinks.started:
            self._sinks.start()
            self._startup_checks()

    async def abegin(self) -> None:
        """Like :meth:`begin`, on the event loop (the sender becomes a task of it)."""
        if not self._sinks.started:
            self._sinks.start()
            await self._astartup_checks()

    async def aclose(self) -> None:
        """Flush and close the delivery queue (a lifespan shutdown), then the gate's clients.

        The queue stays usable: a later request starts it again.
        """
        await self._sinks.aclose()
        await self._gates.aclose()


_billings: list[tuple[dict[str, Any], DjangoBilling]] = []
_billings_lock = threading.Lock()


def billing(config: Mapping[str, Any] | None = None) -> DjangoBilling:
    """The billing of ``config`` (default ``settings.COMMET``), built on first use.

    It carries what the middleware counts and uses: ``stats`` (billed, unattributed, rejected,
    refused...), ``sink`` (the delivery queue) and ``gate`` (the quota gate). Raises
    ``ImproperlyConfigured`` for an unknown key or a value that cannot be read.
    """
    if config is None:
        config = getattr(django_settings, "COMMET", None) or {}
    if not isinstance(config, Mapping):
        raise ImproperlyConfigured("settings.COMMET must be a dict")
    wanted = dict(config)
    with _billings_lock:
        for known, built in _billings:
            if known == wanted:
                return built
        built = DjangoBilling(wanted)
        _billings.append((wanted, built))
        return built


def with_lifespan(application: ASGIApp) -> ASGIApp:
    """Django's ASGI application, answering the ASGI lifespan protocol for Commet.

    Django's ASGI app refuses lifespan. Without it delivery still starts (on the first
    request), but nothing tells the process it is about to stop, and uvicorn ends a SIGTERM'd
    process by re-raising the signal, so exit hooks never run: usage still queued then is
    lost. Wrapped (``application = with_lifespan(get_asgi_application())``), the server's
    startup starts delivery and its shutdown flushes every Commet billing of the process
    before the server exits. Every other scope goes to Django untouched.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await application(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    for built in _live_billings():
                        await built.abegin()
                except Exception as exc:
                    # verify_on_startup="raise": the server reports it and does not serve.
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for built in _live_billings():
                    await built.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app


def _live_billings() -> list[DjangoBilling]:
    with _billings_lock:
        return [built for _, built in _billings]
