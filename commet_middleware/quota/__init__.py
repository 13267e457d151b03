"""Quota enforcement: stores behind one protocol, a pure decision, the gate, HTTP presentation.

An internal package: the public names (``quota_guard``, ``quota_release``, the settings) are
exported from ``commet_middleware``; these are for the middlewares, the decorators and tests.
"""

from __future__ import annotations

from ._cache import AllowanceCache, AllowanceLookup
from ._decide import left_of, with_balance
from ._gate import COMMET_REFUSAL_CODES, OnUnavailable, QuotaDecision, QuotaGate, QuotaStats
from ._http import ratelimit_headers, refusal_body, status_for
from ._reservations import InMemoryReservationStore, Reservation, ReservationStore

__all__ = [
    "COMMET_REFUSAL_CODES",
    "AllowanceCache",
    "AllowanceLookup",
    "InMemoryReservationStore",
    "OnUnavailable",
    "QuotaDecision",
    "QuotaGate",
    "QuotaStats",
    "Reservation",
    "ReservationStore",
    "left_of",
    "ratelimit_headers",
    "refusal_body",
    "status_for",
    "with_balance",
]
