"""Usage-based billing for ASGI and WSGI apps through Commet."""

from __future__ import annotations

from ._errors import CommetAPIError, CommetError, CommetTransportError
from ._models import QuotaChange, UsageEvent
from ._settings import CommetSettings

__all__ = [
    "CommetAPIError",
    "CommetError",
    "CommetSettings",
    "CommetTransportError",
    "QuotaChange",
    "UsageEvent",
]
