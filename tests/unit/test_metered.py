"""``@metered`` and ``track`` on their own: validation, signatures, and use outside requests."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from commet_middleware import commet_context, current_customer, metered, set_customer, track
from commet_middleware._keys import derive_idempotency_key
from commet_middleware.billing._context import CustomerRequiredError, get_current_context

from .conftest import ListSink


def test_invalid_feature_code_fails_at_decoration() -> None:
    """A bad feature code is a ValueError when the decorator is applied, not per call."""
    with pytest.raises(ValueError, match="feature code"):
        metered("API-calls")


@pytest.mark.parametrize("value", [-1, float("nan"), "3", True])
def test_invalid_constant_value_fails_at_decoration(value: Any) -> None:
    """A constant value that is not a finite number >= 0 is rejected at decoration."""
    with pytest.raises(ValueError, match="usage value"):
        metered("api_calls", value)


def test_invalid_constant_properties_fail_at_decoration() -> None:
    """Constant properties must be str to str."""
    with pytest.raises(ValueError, match="propert"):
        metered("api_calls", properties={"a": 1})  # type: ignore[dict-item]


def test_signature_and_kind_are_preserved() -> None:
    """The wrapper keeps the signature, the name, and sync-ness or async-ness."""

    def sync_fn(a: int, b: str = "x") -> str:
        return b * a

    async def async_fn(a: int, *, b: str = "x") -> str:
        return b * a

    for fn in (sync_fn, async_fn):
        wrapped = metered("api_calls")(fn)
        assert inspect.signature(wrapped) == inspect.signature(fn)
        assert wrapped.__name__ == fn.__name__
        assert inspect.iscoroutinefunction(wrapped) == inspect.iscoroutinefunction(fn)


def test_outside_any_context_without_customer_raises_before_running() -> None:
    """Outside a request with no customer, @metered raises and the function does not run."""
    ran: list[int] = []

    @metered("api_calls")
    def job() -> None:
        ran.append(1)

    with pytest.raises(CustomerRequiredError, match="customer"):
        job()
    assert ran == []


def test_outside_any_context_with_customer_enqueues_directly(
    monkeypatch: pytest.MonkeyPatch, sink: ListSink
) -> None:
    """@metered(customer=fn of the arguments) in a plain job enqueues on success."""
    monkeypatch.setattr("commet_middleware._metered.default_sink", lambda: sink)

    @metered("jobs_run", customer=lambda customer_id: customer_id)
    def job(customer_id: str) -> str:
        return "done"

    assert job("cus_9") == "done"
    assert job("cus_9") == "done"
    assert [(e.customer_id, e.feature) for e in sink.events] == [("cus_9", "jobs_run")] * 2
    assert sink.events[0].idempotency_key != sink.events[1].idempotency_key


def test_commet_context_enqueues_on_success_only(sink: ListSink) -> None:
    """Inside commet_context usage is enqueued at once; an exception records nothing."""

    @metered("jobs_run", value=lambda result: result)
    def job(n: int) -> int:
        if n < 0:
            raise RuntimeError("failed job")
        return n

    with commet_context("cus_1", sink=sink):
        job(3)
        assert len(sink.events) == 1
        with pytest.raises(RuntimeError):
            job(-1)
    assert [(e.customer_id, e.value) for e in sink.events] == [("cus_1", 3)]
    assert get_current_context() is None


def test_commet_context_set_customer_and_track(sink: ListSink) -> None:
    """set_customer inside commet_context decides the customer of later track calls."""
    with commet_context(sink=sink):
        assert current_customer() is None
        with pytest.raises(CustomerRequiredError):
            track("api_calls")
        set_customer("cus_7")
        assert current_customer() == "cus_7"
        track("api_calls", 2.5, {"source": "job"})
    assert [(e.customer_id, e.value, e.properties) for e in sink.events] == [
        ("cus_7", 2.5, (("source", "job"),))
    ]


def test_idempotency_seed_makes_a_retried_job_produce_the_same_keys(sink: ListSink) -> None:
    """Two runs of a job with the same seed produce the same keys (Commet dedupes the retry)."""
    for _ in range(2):
        with commet_context("cus_1", sink=sink, idempotency_seed="job-42"):
            track("api_calls")
            track("api_calls")
    keys = [e.idempotency_key for e in sink.events]
    assert keys[:2] == keys[2:]
    assert keys[0] != keys[1]
    assert keys[0] == derive_idempotency_key("job\x1fjob-42", "api_calls", 1)


def test_async_function_in_commet_context(sink: ListSink) -> None:
    """An async decorated function stays async and bills after it is awaited."""

    @metered("api_calls", properties=lambda result: {"result": result})
    async def work() -> str:
        await asyncio.sleep(0)
        return "ok"

    async def main() -> None:
        with commet_context("cus_1", sink=sink):
            assert await work() == "ok"

    asyncio.run(main())
    assert [(e.customer_id, e.properties) for e in sink.events] == [("cus_1", (("result", "ok"),))]


def test_bad_computed_value_is_logged_counted_and_not_billed(
    sink: ListSink, allow_commet_errors: None, caplog: pytest.LogCaptureFixture
) -> None:
    """A computed value that is invalid logs an error, is counted, and the result is returned."""

    @metered("api_calls", value=lambda result: -5)
    def job() -> str:
        return "served"

    with commet_context("cus_1", sink=sink) as ctx:
        assert job() == "served"
        track("api_calls", float("inf"))
        track("Bad Feature")
    assert sink.events == []
    assert ctx.invalid_values == 3
    assert any(r.levelname == "ERROR" and "NOT billed" in r.getMessage() for r in caplog.records)


def test_set_customer_and_track_outside_a_context_raise() -> None:
    """set_customer and track outside any request or commet_context say how to fix it."""
    with pytest.raises(RuntimeError, match="commet_context"):
        set_customer("cus_1")
    with pytest.raises(RuntimeError, match="commet_context"):
        track("api_calls")
    assert current_customer() is None
