"""How a quota decision is answered over HTTP: statuses, JSON bodies, RateLimit headers.

Used by the middlewares (through the guard) only; the gate and the stores know nothing of HTTP.
"""

from __future__ import annotations

from ._decide import Number
from ._gate import QuotaDecision

__all__ = ["ratelimit_headers", "refusal_body", "status_for"]

# The HTTP status a refusal maps to; see status_for for the reasoning.
_STATUS = {
    "quota_exceeded": 402,
    "no_active_subscription": 402,
    "customer_not_found": 402,
    "feature_not_in_plan": 403,
    "customer_required": 401,
    "feature_not_found": 500,
    "quota_unavailable": 503,
    "commet_key_rejected": 503,
}

_MESSAGES = {
    "quota_exceeded": "The {feature!r} quota is used up: {remaining} of {included} left, "
    "{count} needed. Upgrade the plan or free some units.",
    "no_active_subscription": "No active subscription: subscribe to a plan to use {feature!r}.",
    "customer_not_found": "No billing account for this customer: subscribe to use {feature!r}.",
    "feature_not_in_plan": "The current plan does not include {feature!r}.",
    "customer_required": "Sign in to use {feature!r}: no customer was identified.",
    "feature_not_found": "{feature!r} is not configured for billing.",
    "quota_unavailable": "The {feature!r} quota cannot be checked right now; try again shortly.",
    "commet_key_rejected": "The {feature!r} quota cannot be checked: the service's billing "
    "configuration is being fixed.",
}


def status_for(decision: QuotaDecision) -> int:
    """Return the HTTP status for a decision: 200 when allowed.

    - 402 ``quota_exceeded``, ``no_active_subscription``, ``customer_not_found``: paying
      (upgrading, subscribing) is what lets the request through. ``customer_not_found`` is
      402, not 404: the app authenticated the caller, Commet just has no account for them
      yet, and a 404 would claim the URL does not exist.
    - 403 ``feature_not_in_plan``: the customer has a plan, and it does not include this.
    - 401 ``customer_required``: no customer was identified (an anonymous caller).
    - 500 ``feature_not_found``: the endpoint names a feature Commet does not know, a server
      configuration error, not the client's.
    - 503 ``quota_unavailable``: Commet (or the quota store) could not be asked and the policy
      is ``"closed"``.
    - 503 ``commet_key_rejected``: Commet refused our API key (401/403) on the quota read: a
      server configuration error, whatever the ``on_unavailable`` policy (allowing would do
      work whose quota adds Commet refuses too).
    """
    if decision.allowed:
        return 200
    return _STATUS.get(decision.code or "", 403)


def refusal_body(decision: QuotaDecision) -> dict[str, dict[str, object]]:
    """Return the stable JSON body of a refusal; every key is always present (null when
    unknown)."""
    code = decision.code or "quota_exceeded"
    message = _MESSAGES.get(code, "Quota check refused ({code}).").format(
        feature=decision.feature,
        remaining=decision.remaining,
        included=decision.included,
        count=decision.count,
        code=code,
    )
    return {
        "error": {
            "type": "quota_error",
            "code": code,
            "message": message,
            "feature": decision.feature,
            "current": decision.current,
            "included": decision.included,
            "remaining": decision.remaining,
        }
    }


def _sf_integer(value: Number) -> int:
    # Structured-field Integers only: a fractional allowance is rounded down, never up.
    return max(int(value), 0)


def ratelimit_headers(decision: QuotaDecision) -> list[tuple[str, str]]:
    """Return RateLimit headers (draft-ietf-httpapi-ratelimit-headers, -08 to -11 form).

    Only for a ceiling that applies (``enforced``) with known numbers, e.g. for plan "tasks"
    with 50 included and 3 left::

        RateLimit-Policy: "tasks";q=50
        RateLimit: "tasks";r=3

    The policy name is the feature code (a String item). ``w`` and ``t`` are left out: a quota
    balance has no window and does not reset with time; ``qu`` is left out because none of the
    registered units (requests, content-bytes, concurrent-requests) describes feature units.
    A ``quota_unavailable`` refusal gets ``Retry-After: 1`` instead.
    """
    if decision.code == "quota_unavailable":
        return [("Retry-After", "1")]
    if not decision.enforced or decision.included is None or decision.remaining is None:
        return []
    name = f'"{decision.feature}"'
    return [
        ("RateLimit-Policy", f"{name};q={_sf_integer(decision.included)}"),
        ("RateLimit", f"{name};r={_sf_integer(decision.remaining)}"),
    ]
