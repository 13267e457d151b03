"""Framework-neutral billing: the request context, the zero-code rules, refusals and the core.

The middlewares (``commet_middleware.middleware``) are thin adapters over this package; it
imports none of them.
"""

from __future__ import annotations

from ._context import (
    EventSink,
    MeteringStats,
    PendingCommit,
    RequestContext,
    commet_context,
    current_customer,
    get_current_context,
    set_customer,
)
from ._core import BillingCall, Phase
from ._refusals import CustomerRequiredError, Refusal, RequestRefusedError
from ._rules import DEFAULT_EXCLUDE, MeteringRules, MeterSpec
from ._setup import MiddlewareSetup

__all__ = [
    "DEFAULT_EXCLUDE",
    "BillingCall",
    "CustomerRequiredError",
    "EventSink",
    "MeterSpec",
    "MeteringRules",
    "MeteringStats",
    "MiddlewareSetup",
    "PendingCommit",
    "Phase",
    "Refusal",
    "RequestContext",
    "RequestRefusedError",
    "commet_context",
    "current_customer",
    "get_current_context",
    "set_customer",
]
