"""The public names this part of the toolkit adds."""

from __future__ import annotations

import commet_middleware
from commet_middleware import customers


def test_request_metering_names_are_exported() -> None:
    """The middlewares, decorators and context helpers are importable from the package root."""
    for name in (
        "CommetMiddleware",
        "CommetWSGIMiddleware",
        "aflush",
        "commet_context",
        "flush",
        "current_customer",
        "metered",
        "quota_guard",
        "quota_release",
        "set_customer",
        "track",
    ):
        assert name in commet_middleware.__all__
        assert hasattr(commet_middleware, name)
    assert commet_middleware.__all__ == sorted(commet_middleware.__all__)


def test_root_exports_exactly_the_public_surface() -> None:
    """The root's ``__all__`` is this list: what an app calls and every type it names."""
    assert commet_middleware.__all__ == [
        "AsyncCommetClient",
        "CommetAPIError",
        "CommetClient",
        "CommetError",
        "CommetMiddleware",
        "CommetSettings",
        "CommetStartupError",
        "CommetTransportError",
        "CommetWSGIMiddleware",
        "CountSpec",
        "CustomerRequiredError",
        "DeadLetterHook",
        "Dialect",
        "EventSink",
        "MeterSpec",
        "MeteredCustomer",
        "MeteringRules",
        "MeteringStats",
        "OnUnavailable",
        "Operation",
        "OverflowPolicy",
        "PendingCommit",
        "PropertiesSpec",
        "QuotaAction",
        "QuotaAllowance",
        "QuotaChange",
        "QuotaChangeResult",
        "QuotaDecision",
        "QuotaGate",
        "Refusal",
        "RefusalHandler",
        "RequestContext",
        "RequestRefusedError",
        "StartupCheck",
        "TrackResult",
        "UndeliveredError",
        "UsageEvent",
        "UsageValue",
        "ValueSpec",
        "aflush",
        "commet_context",
        "current_customer",
        "flush",
        "metered",
        "quota_guard",
        "quota_release",
        "set_customer",
        "track",
    ]
    for name in commet_middleware.__all__:
        assert getattr(commet_middleware, name) is not None


def test_customers_module_exports_the_resolvers() -> None:
    """commet_middleware.customers exports every resolver, the combinator and the error."""
    assert customers.__all__ == sorted(customers.__all__)
    for name in (
        "CustomerRequiredError",
        "first_of",
        "from_callable",
        "from_cookie",
        "from_environ",
        "from_header",
        "from_path_param",
        "from_query",
        "from_scope_user",
        "from_state",
    ):
        assert name in customers.__all__
