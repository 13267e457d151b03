"""The pure arithmetic of a quota decision: what is left, and whether a request fits in it."""

from __future__ import annotations

from typing import NamedTuple

from commet_middleware._results import QuotaAllowance

__all__ = ["Number", "Verdict", "decide", "left_of", "with_balance"]

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


class Verdict(NamedTuple):
    """What :func:`decide` concluded for one request."""

    allowed: bool
    # A ceiling applies: not unlimited, and no overage (or ``hard_limit``).
    enforced: bool
    # Units left before ``included`` runs out, before the units held in flight; None: unlimited.
    left: Number | None


def decide(
    current: Number,
    included: Number,
    unlimited: bool,
    overage_enabled: bool,
    held: Number,
    count: Number,
    hard_limit: bool,
) -> Verdict:
    """Decide whether ``count`` more units fit: the one rule every store applies atomically.

    ``current`` is the balance with our own unconfirmed changes applied, ``held`` the units
    other requests hold in flight. The Redis store runs the same rule in Lua (``_redis``).
    """
    enforced = not unlimited and (hard_limit or not overage_enabled)
    left = None if unlimited else max(included - current, 0)
    allowed = not enforced or (left is not None and held + count <= left)
    return Verdict(allowed, enforced, left)
