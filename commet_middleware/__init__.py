"""Usage-based billing for ASGI and WSGI apps through Commet."""

from __future__ import annotations

from ._client import AsyncCommetClient, CommetClient
from ._errors import CommetAPIError, CommetError, CommetTransportError
from ._guard import CountSpec, RefusalHandler, quota_guard, quota_release
from ._metered import MeteredCustomer, PropertiesSpec, ValueSpec, metered, track
from ._models import Operation, QuotaAction, QuotaChange, UsageEvent, UsageValue
from ._results import QuotaAllowance, QuotaChangeResult, TrackResult
from ._settings import CommetSettings, DeadLetterHook, Dialect, OverflowPolicy, StartupCheck
from ._startup import CommetStartupError
from .billing import (
    CustomerRequiredError,
    EventSink,
    MeteringRules,
    MeteringStats,
    MeterSpec,
    PendingCommit,
    Refusal,
    RequestContext,
    RequestRefusedError,
    commet_context,
    current_customer,
    set_customer,
)
from .delivery import UndeliveredError, aflush, flush
from .middleware import CommetMiddleware, CommetWSGIMiddleware
from .quota import OnUnavailable, QuotaDecision, QuotaGate

# Besides what an app calls, every type its public signatures name: an app can annotate a
# dead-letter hook, a sink or an on_refused handler, and catch what is raised, without
# importing a private module. A test walks the signatures to keep this complete.
__all__ = [
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
