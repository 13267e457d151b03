"""Usage-based billing for ASGI and WSGI apps through Commet."""

from __future__ import annotations

from ._client import AsyncCommetClient, CommetClient
from ._errors import CommetAPIError, CommetError, CommetTransportError
from ._guard import quota_guard, quota_release
from ._metered import metered, track
from ._models import QuotaChange, UsageEvent
from ._results import QuotaAllowance, QuotaChangeResult, TrackResult
from ._settings import CommetSettings
from ._startup import CommetStartupError
from .billing import commet_context, current_customer, set_customer
from .delivery import aflush, flush
from .middleware import CommetMiddleware, CommetWSGIMiddleware

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
    "QuotaAllowance",
    "QuotaChange",
    "QuotaChangeResult",
    "TrackResult",
    "UsageEvent",
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
