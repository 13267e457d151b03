"""The Flask extension: ``Commet(app)`` or ``commet.init_app(app)``, set up from ``app.config``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from ._settings import CommetSettings, from_config
from .billing._rules import DEFAULT_EXCLUDE, MeterSpec
from .customers import CustomerResolver, from_header
from .middleware._wsgi import CommetWSGIMiddleware

if TYPE_CHECKING:
    from flask import Flask

__all__ = ["Commet"]

EXTENSION_KEY = "commet"


class Commet:
    """Bill a Flask app's requests through Commet: the WSGI middleware, set up from config.

    Every ``CommetSettings`` field can be set as ``app.config["COMMET_<FIELD>"]`` (text is
    read like the environment, ``"100"`` for a number); ``COMMET_CUSTOMER_HEADER`` names a
    header that carries the customer id when no ``customer=`` is given. Precedence: keyword
    given here > ``app.config`` > ``settings=`` > environment > default. One ``Commet`` may
    serve several apps (``init_app`` per app, the application-factory pattern); each app gets
    its own middleware around its ``wsgi_app``, found again with :meth:`middleware`.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        customer: CustomerResolver | None = None,
        meter: MeterSpec = None,
        exclude: Iterable[str] = DEFAULT_EXCLUDE,
        bill_status: Callable[[int], bool] | None = None,
        on_missing_customer: Literal["serve", "reject"] = "serve",
        idempotency_header: str | None = None,
        settings: CommetSettings | None = None,
        **setting_keywords: Any,
    ) -> None:
        self._options: dict[str, Any] = {
            "meter": meter,
            "exclude": exclude,
            "bill_status": bill_status,
            "on_missing_customer": on_missing_customer,
            "idempotency_header": idempotency_header,
        }
        self.customer = customer
        self.settings = settings
        self.setting_keywords = setting_keywords
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Wrap ``app.wsgi_app`` with a middleware built from ``app.config`` now."""
        extensions = app.extensions
        if EXTENSION_KEY in extensions:
            raise RuntimeError("Commet is already set up on this app")
        config = dict(app.config)
        values = from_config(config)
        values.update({k: v for k, v in self.setting_keywords.items() if v is not None})
        customer = self.customer
        header = config.get("COMMET_CUSTOMER_HEADER")
        if customer is None and header:
            customer = from_header(str(header))
        middleware = CommetWSGIMiddleware(
            app.wsgi_app,
            customer=customer,
            settings=self.settings,
            **self._options,
            **values,
        )
        app.wsgi_app = middleware  # type: ignore[method-assign]
        extensions[EXTENSION_KEY] = middleware

    def middleware(self, app: Flask | None = None) -> CommetWSGIMiddleware:
        """The middleware of ``app`` (default: the current app)."""
        if app is None:
            from flask import current_app

            app = current_app
        middleware: CommetWSGIMiddleware = app.extensions[EXTENSION_KEY]
        return middleware
