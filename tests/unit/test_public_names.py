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
