"""Usage-based billing for ASGI and WSGI apps through Commet."""

from __future__ import annotations

from ._client import AsyncCommetClient, CommetClient
from ._errors import CommetAPIError, CommetError, CommetTransportError
from ._models import QuotaChange, UsageEvent
from ._results import QuotaAllowance, QuotaChangeResult, TrackResult
from ._settings import CommetSettings

__all__ = [
    "AsyncCommetClient",
    "CommetAPIError",
    "CommetClient",
    "CommetError",
    "CommetSettings",
    "CommetTransportError",
    "QuotaAllowance",
    "QuotaChange",
    "QuotaChangeResult",
    "TrackResult",
    "UsageEvent",
]
