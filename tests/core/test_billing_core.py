"""The framework-neutral billing core: what a request's events decide, without any framework.

The ASGI, WSGI and Django adapters only translate their protocols into these calls; the
decisions (bill, release, refuse, count as incomplete) are pinned here once.
"""

from __future__ import annotations

import pytest

from commet_middleware import UsageEvent
from commet_middleware._models import Operation
from commet_middleware.billing import BillingCall, MeteringRules, MeteringStats, Phase, Refusal
from commet_middleware.billing._context import RequestContext
from commet_middleware.billing._core import declared_body_length
from commet_middleware.billing._refusals import CUSTOMER_REQUIRED


class Sink:
    def __init__(self) -> None:
        self.operations: list[Operation] = []

    def enqueue(self, operation: Operation, /) -> None:
        self.operations.append(operation)


def make_call(
    *, customer: str | None = "cus_1", reject: bool = False, bill_status: object = None
) -> tuple[BillingCall, Sink]:
    sink = Sink()
    rules = MeteringRules(
        meter="api_calls",
        exclude=(),
        bill_status=bill_status,  # type: ignore[arg-type]
        on_missing_customer="reject" if reject else "serve",
    )
    stats = MeteringStats()
    ctx = RequestContext(
        sink=sink, customer_id=customer, reject_missing_customer=reject, stats=stats
    )
    return BillingCall(ctx, rules, stats), sink


def events(sink: Sink) -> list[UsageEvent]:
    return [op for op in sink.operations if isinstance(op, UsageEvent)]


def test_billable_response_is_billed_before_its_last_message() -> None:
    """A 200 is settled (its usage enqueued) by before_last, before the adapter sends it."""
    call, sink = make_call()
    assert (
        call.response_started(200, method="GET", content_length=None, feature="api_calls") is None
    )
    assert call.phase is Phase.STARTED
    assert not call.completes_with(5, last=False)
    assert call.completes_with(5, last=True)
    call.before_last()
    assert call.phase is Phase.COMPLETE
    assert [(e.customer_id, e.feature, e.value) for e in events(sink)] == [
        ("cus_1", "api_calls", 1)
    ]
    call.after_last()
    call.ended()
    assert len(events(sink)) == 1


def test_content_length_completes_before_the_final_message() -> None:
    """The chunk that carries the last declared byte completes the response."""
    call, _ = make_call()
    call.response_started(200, method="GET", content_length="10", feature=None)
    assert not call.completes_with(4, last=False)
    assert call.completes_with(6, last=False)


@pytest.mark.parametrize(
    ("method", "status", "length", "expected"),
    [
        ("HEAD", 200, "50", 0),
        ("GET", 204, None, 0),
        ("GET", 304, "12", 0),
        ("GET", 200, " 12 ", 12),
        ("GET", 200, "x", None),
        ("GET", 200, None, None),
    ],
)
def test_declared_body_length(
    method: str, status: int, length: str | None, expected: int | None
) -> None:
    """Bodyless responses complete with their start; a valid Content-Length with its last byte."""
    assert declared_body_length(method, status, length) == expected


def test_error_status_is_released_after_its_last_message_and_never_billed() -> None:
    """A 500 bills nothing; its release waits until the final message is out."""
    call, sink = make_call()
    call.response_started(500, method="GET", content_length=None, feature="api_calls")
    assert call.before_last() is False
    assert call.phase is Phase.FINISHING
    assert not call.ctx.settled
    call.after_last()
    assert call.phase is Phase.COMPLETE
    assert call.ctx.settled
    assert events(sink) == []


def test_client_gone_mid_body_bills_nothing_and_counts_incomplete() -> None:
    """A send that fails before the last message abandons the request: not billed, counted."""
    call, sink = make_call()
    call.response_started(200, method="GET", content_length=None, feature="api_calls")
    call.client_gone()
    assert call.phase is Phase.ABANDONED
    assert call.before_last() is False
    call.ended()
    assert events(sink) == []
    assert call.stats.incomplete_responses == 1


def test_client_gone_after_billing_keeps_the_bill() -> None:
    """Once settled billable, a failing send of the last message still bills (work was done)."""
    call, sink = make_call()
    call.response_started(200, method="GET", content_length=None, feature="api_calls")
    call.before_last()
    call.client_gone()
    call.ended()
    assert len(events(sink)) == 1
    assert call.stats.incomplete_responses == 0


def test_ended_without_a_response_settles_unbilled_without_counting() -> None:
    """An endpoint that raised before responding is settled unbilled and not 'incomplete'."""
    call, sink = make_call()
    call.ctx.record("api_calls", 1, None)
    call.ended()
    assert call.phase is Phase.ABANDONED
    assert call.ctx.settled
    assert events(sink) == []
    assert call.stats.incomplete_responses == 0


def test_reject_mode_refuses_a_billable_response_without_customer() -> None:
    """In reject mode a billable start with no customer is answered with the 401 refusal."""
    call, sink = make_call(customer=None, reject=True)
    refusal = call.response_started(200, method="GET", content_length=None, feature="api_calls")
    assert refusal == CUSTOMER_REQUIRED
    assert refusal is not None
    assert refusal.status == 401
    assert call.refused
    assert call.ctx.settled
    assert call.stats.rejected_requests == 1
    assert events(sink) == []


def test_reject_mode_serves_a_non_billable_response_without_customer() -> None:
    """A 404 would bill nothing, so reject mode lets it through."""
    call, _ = make_call(customer=None, reject=True)
    assert (
        call.response_started(404, method="GET", content_length=None, feature="api_calls") is None
    )


def test_guard_refusal_on_the_context_replaces_the_response() -> None:
    """A refusal a guard left on the context is what the start answers with."""
    call, _ = make_call()
    refusal = Refusal(402, b'{"error":{}}', (("Content-Type", "application/json"),))
    call.ctx.refusal = refusal
    assert call.response_started(500, method="GET", content_length=None) is refusal
    assert call.refused
    assert call.stats.rejected_requests == 0


def test_refusal_raised_before_the_response_is_answered() -> None:
    """A refusal raised by the endpoint before any response is answered in its place."""
    call, _ = make_call()
    assert call.refusal_raised() is True


def test_refusal_raised_after_the_response_started_propagates_and_settles() -> None:
    """Raised once the response started, a refusal cannot replace it: settled, counted."""
    call, sink = make_call()
    call.response_started(200, method="GET", content_length=None, feature="api_calls")
    assert call.refusal_raised() is False
    assert call.phase is Phase.ABANDONED
    assert events(sink) == []
    assert call.stats.incomplete_responses == 1


def test_extra_headers_only_on_billable_responses() -> None:
    """A guard's RateLimit headers go on responses that will use the reserved units only."""
    call, _ = make_call()
    call.ctx.add_response_headers([("RateLimit", "x")])
    call.response_started(200, method="GET", content_length=None)
    assert call.extra_headers() == (("RateLimit", "x"),)
    other, _ = make_call()
    other.ctx.add_response_headers([("RateLimit", "x")])
    other.response_started(429, method="GET", content_length=None)
    assert other.extra_headers() == ()


def test_failing_bill_status_hook_bills_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """A bill_status hook that raises makes the response non-billable, logged, not a crash."""

    def broken(status: int) -> bool:
        raise RuntimeError("boom")

    call, sink = make_call(bill_status=broken)
    call.response_started(200, method="GET", content_length=None, feature="api_calls")
    call.before_last()
    call.after_last()
    assert events(sink) == []
    assert "bill_status hook failed" in caplog.text
