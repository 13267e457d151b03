"""The pure arithmetic of a quota decision: what is left, and whether a request fits in it."""

from __future__ import annotations

from commet_middleware._results import QuotaAllowance

__all__ = ["Number", "left_of", "with_balance"]

Number = int | float


def left_of(allowance: QuotaAllowance) -> Number | None:
    # Units left before the included amount runs out; None when unlimited. An answer without
    # ``remaining`` gets it derived as Commet defines it.
    if allowance.unlimited:
        return None
    if allowance.remaining is not None:
        return allowance.remaining
    return max(allowance.included - allowance.current, 0)


def with_balance(allowance: QuotaAllowance, balance: Number) -> QuotaAllowance:
    # Built field by field rather than with dataclasses.replace: this runs on every guarded
    # request (the cache moves at commit), and replace() costs several times as much.
    if allowance.unlimited:
        remaining = allowance.remaining
        billed = allowance.billed_quantity
    else:
        remaining = max(allowance.included - balance, 0)
        # Billing follows the period's high-water mark: a lower balance never lowers it.
        billed = max(allowance.billed_quantity, balance - allowance.included, 0)
    return QuotaAllowance(
        allowance.feature_code,
        balance,
        allowance.included,
        remaining,
        billed,
        allowance.unlimited,
        allowance.overage_enabled,
        allowance.as_of,
    )
