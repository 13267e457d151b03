"""What a request is answered with instead of the app's response: a guard's refusal or a 401."""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from commet_middleware._errors import CustomerRequiredError

__all__ = [
    "CUSTOMER_REQUIRED",
    "REJECTION_BODY",
    "CustomerRequiredError",
    "Refusal",
    "RequestRefusedError",
    "status_line",
]


@dataclass(frozen=True, slots=True)
class Refusal:
    """The response a middleware sends instead of the app's: a guard said no, or a billable
    request has no customer. Every adapter sends it as it is, plus a ``Content-Length``."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


if TYPE_CHECKING:
    _RefusalBase = Exception
else:
    try:
        # Flask answers a werkzeug HTTPException with its response instead of logging a
        # traceback and answering 500: a refusal is an expected outcome, not a crash.
        from werkzeug.exceptions import HTTPException as _RefusalBase
    except ImportError:
        _RefusalBase = Exception


class RequestRefusedError(_RefusalBase):
    """Raised by ``@quota_guard`` before the endpoint runs; the middleware answers instead.

    The refusal is also left on the request context, so the middleware still answers with it
    when a framework turns the exception into a response of its own first (a WSGI framework's
    500). With werkzeug installed it is also a werkzeug ``HTTPException`` whose response is
    the refusal, so Flask answers with it directly.
    """

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(f"request refused with {refusal.status}")
        self.refusal = refusal
        self.code = refusal.status

    def get_response(self, environ: object = None, scope: object = None) -> object:
        """Return the refusal as a werkzeug response (what Flask sends for an HTTPException)."""
        from werkzeug.wrappers import Response

        refusal = self.refusal
        return Response(refusal.body, refusal.status, list(refusal.headers))


REJECTION_BODY = json.dumps(
    {
        "error": {
            "type": "authentication_error",
            "code": "customer_required",
            "message": "This request is billable and no customer could be identified for it.",
        }
    },
    separators=(",", ":"),
).encode("utf-8")

# The answer to a billable request nobody can be billed for (``on_missing_customer="reject"``).
CUSTOMER_REQUIRED = Refusal(401, REJECTION_BODY, (("Content-Type", "application/json"),))


def status_line(status: int) -> str:
    """Return the WSGI status line of ``status`` (``"402 Payment Required"``)."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Refused"
