"""The billing lifecycle of one request, told by an adapter what happens and deciding the rest.

No I/O and no framework here: an adapter (ASGI, WSGI, Django) translates its own events into
calls on :class:`BillingCall` (response started with a status, body bytes about to go out, the
last of them out, client gone, endpoint refused) and acts on what it answers: a refusal to send
instead of the app's response, headers to add, whether to wait for the spool before the last
message. What the request used is settled exactly once: billed when the client gets the whole
response of a billable status, released otherwise.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING

from ._context import RequestContext
from ._refusals import CUSTOMER_REQUIRED, Refusal

if TYPE_CHECKING:
    from ._context import MeteringStats
    from ._rules import MeteringRules

__all__ = ["BillingCall", "Phase", "declared_body_length"]

logger = logging.getLogger("commet_middleware")


class Phase(enum.Enum):
    """Where a request is in its billing lifecycle; each request moves forward only."""

    # The endpoint runs; no response yet.
    RUNNING = "running"
    # The response started with a status; its body is going out.
    STARTED = "started"
    # The message that completes a non-billable response is going out; released once it is.
    FINISHING = "finishing"
    # The client has (or is being handed) the whole response; settled.
    COMPLETE = "complete"
    # Ended before the client had the whole response (client gone, endpoint raised); settled
    # unbilled.
    ABANDONED = "abandoned"
    # A refusal (a guard's, the 401, an Idempotency-Key answer) replaced the app's response.
    REFUSED = "refused"


# Phases after which nothing is left to decide.
SETTLED = frozenset({Phase.COMPLETE, Phase.ABANDONED, Phase.REFUSED})


class BillingCall:
    """One request's billing: its context, its phase, and what its response will bill.

    Made per request, so slotted and small; the rules and counters are the middleware's.
    """

    __slots__ = ("billable", "body_left", "ctx", "feature", "phase", "rules", "stats")

    def __init__(self, ctx: RequestContext, rules: MeteringRules, stats: MeteringStats) -> None:
        self.ctx = ctx
        self.rules = rules
        self.stats = stats
        self.phase = Phase.RUNNING
        # The feature the middleware itself bills (zero-code), known when the response starts.
        self.feature: str | None = None
        # Whether the response's status is billed; known when the response starts.
        self.billable = False
        # Body bytes still to go out before the client has the whole response (the declared
        # Content-Length, 0 for HEAD/204/304), or None when only the response's end marker
        # (the adapter's "last message") completes it.
        self.body_left: int | None = None

    @property
    def refused(self) -> bool:
        """True when a refusal replaced the app's response."""
        return self.phase is Phase.REFUSED

    @property
    def started(self) -> bool:
        """True once the response (the app's or a refusal) started."""
        return self.phase is not Phase.RUNNING

    def response_started(
        self,
        status: int | None,
        *,
        method: str,
        content_length: str | None,
        feature: str | None = None,
        path: str = "",
    ) -> Refusal | None:
        """The app's response starts with ``status`` (None: unreadable, never billed).

        ``feature`` is the zero-code feature the adapter found for this request (``path`` only
        names the request in a log line). Returns the
        refusal to send instead of the app's response (the request is then settled unbilled),
        or None to forward the app's start with :meth:`extra_headers`.
        """
        self.phase = Phase.STARTED
        ctx = self.ctx
        ctx.status = status
        self.feature = feature
        if ctx.refusal is not None or (ctx.reject_missing_customer and self._customer_missing()):
            return self.refuse(method, path)
        rules = self.rules
        if status is None:
            self.billable = False
        elif rules.default_bill_status:
            self.billable = status < 400
        else:
            self.billable = rules.billable_status(status)
        self.body_left = declared_body_length(method, status, content_length)
        return None

    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        """Headers to add to the app's response start: a guard's RateLimit headers, on a
        response that will use the units it reserved."""
        return self.ctx.response_headers if self.billable else ()

    @property
    def complete_at_start(self) -> bool:
        """True when the response start alone gives the client the whole response."""
        return self.body_left == 0

    def completes_with(self, size: int, *, last: bool) -> bool:
        """Count ``size`` body bytes about to go out; True when the client has the whole
        response once they are out (``last``: the adapter knows this is the final chunk)."""
        left = self.body_left
        if left is not None:
            left -= size
            self.body_left = left
            return last or left <= 0
        return last

    def before_last(self) -> bool:
        """The next message out gives the client the whole response.

        A billable response is settled (billed, usage enqueued and so spooled) now, before the
        client can have it: a crash after this loses nothing, and a send that fails from here
        on still bills (the endpoint did the work and produced the whole response). Returns
        True when the adapter must wait for ``ctx.commits`` before sending that message.
        A non-billable response is released by :meth:`after_last`.
        """
        if self.phase is not Phase.STARTED:
            return False
        if not self.billable:
            self.phase = Phase.FINISHING
            return False
        self.phase = Phase.COMPLETE
        feature = self.feature
        if feature is not None:
            self.ctx.settle_with_usage(feature)
        else:
            self.ctx.settle(billable=True)
        return bool(self.ctx.commits)

    def after_last(self) -> None:
        """The message that completes a non-billable response is out: release what it held."""
        if self.phase is Phase.FINISHING:
            self.phase = Phase.COMPLETE
            self.ctx.settle(billable=False)

    def client_gone(self) -> None:
        """Sending to the client failed: unless the request was already billed, nothing that
        follows is billed."""
        if self.phase is Phase.STARTED or self.phase is Phase.RUNNING:
            self._abandon()
        elif self.phase is Phase.FINISHING:
            self.phase = Phase.COMPLETE
            self.ctx.settle(billable=False)

    def ended(self) -> None:
        """The adapter is done with the request (always called last): settle what is left,
        unbilled, counting a started response that never completed."""
        if self.phase not in SETTLED:
            self._abandon()

    def refuse(self, method: str = "", path: str = "") -> Refusal:
        """Settle unbilled and return what to answer instead of the app's response: the
        guard's refusal left on the context, else the 401 for a missing customer."""
        self.phase = Phase.REFUSED
        ctx = self.ctx
        ctx.settle(billable=False)
        refusal = ctx.refusal
        if refusal is not None:
            return refusal
        self.stats.add("rejected_requests")
        logger.warning(
            "commet: rejected %s %s with 401: billable and no customer",
            method or "request",
            path or ctx.request_id,
        )
        return CUSTOMER_REQUIRED

    def answered(self) -> None:
        """The request was answered before the app ran (an Idempotency-Key's record)."""
        self.phase = Phase.REFUSED
        self.ctx.settle(billable=False)

    def refusal_raised(self) -> bool:
        """The endpoint raised a refusal (a guard's, or ``CustomerRequiredError``).

        Returns True when the adapter should answer with :meth:`refuse` in place of the app's
        response; False when the refusal was already sent (nothing to do) or the response had
        already started (the adapter lets the error propagate, and the request is settled).
        """
        if self.phase is Phase.RUNNING:
            return True
        if self.phase not in SETTLED:
            self._abandon()
        return False

    def _abandon(self) -> None:
        if self.phase is Phase.STARTED:
            self.stats.add("incomplete_responses")
        self.phase = Phase.ABANDONED
        self.ctx.settle(billable=False)

    def _customer_missing(self) -> bool:
        """In reject mode: True when this response would bill, or was refused, for want of a
        customer."""
        ctx = self.ctx
        if ctx.customer_required:
            return True
        would_bill = bool(ctx.pending) or self.feature is not None
        return would_bill and self.rules.billable_status(ctx.status) and ctx.customer() is None


def declared_body_length(method: str, status: int | None, content_length: str | None) -> int | None:
    """Return how many body bytes complete a response, or None when only its end marker does.

    0 for a response without a body by protocol (HEAD, 1xx, 204, 304: the client has it all
    with the headers); the ``Content-Length`` when it is valid (the client has it all with the
    last declared byte); None otherwise: a chunked or close-delimited body, which the server
    ends only after the app's last message or chunk.
    """
    if (status is not None and (status < 200 or status == 204 or status == 304)) or (
        method != "GET" and method.upper() == "HEAD"
    ):
        return 0
    if content_length is None:
        return None
    if content_length.isdigit():
        return int(content_length)
    value = content_length.strip()
    return int(value) if value.isdigit() else None
