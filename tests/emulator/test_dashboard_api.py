"""The emulator dashboard's JSON, fault-control and server-sent-event endpoints."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from emulator_helpers import HEADERS

from commet_middleware.testing import FakeCommet
from commet_middleware.testing._dashboard import _QUEUE_LIMIT, _Subscriber
from commet_middleware.testing._ledger import Ledger, LedgerChange

pytestmark = pytest.mark.server

EVENTS = "/api/v1/usage/events"
QUOTA = "/api/v1/usage/quota"


@pytest.fixture
def served(fake: FakeCommet) -> Iterator[httpx.Client]:
    """A client (no API key) of ``fake`` served on 127.0.0.1 for this test."""
    with fake.serve() as url, httpx.Client(base_url=url, timeout=5) as client:
        yield client


def _track(client: httpx.Client, customer: str = "user_123", value: int = 1) -> httpx.Response:
    body = {"customerId": customer, "featureCode": "api_calls", "value": value}
    return client.post(EVENTS, json=body, headers=HEADERS)


def _customer(state: dict[str, Any], customer_id: str) -> dict[str, Any]:
    return next(c for c in state["customers"] if c["id"] == customer_id)


def _read_events(url: str, found: queue.Queue[Any], ready: threading.Event) -> None:
    """Read the event stream, putting each data payload (then "END") on ``found``."""
    timeout = httpx.Timeout(10, read=10)
    try:
        with httpx.stream("GET", f"{url}/_emulator/stream", timeout=timeout) as response:
            found.put(("status", response.status_code, response.headers["content-type"]))
            for line in response.iter_lines():
                if line.startswith(": connected"):
                    ready.set()
                elif line.startswith("data: "):
                    found.put(json.loads(line.removeprefix("data: ")))
        found.put("END")
    except Exception as exc:  # handed to the test thread, which fails on it
        found.put(exc)
    finally:
        ready.set()


# the page and its assets


def test_page_is_served_at_root_without_an_api_key(served: httpx.Client) -> None:
    """GET / answers the HTML page with no x-api-key, under a strict content security policy."""
    response = served.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "Commet emulator" in response.text
    assert "script-src 'self'" in response.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("path", "kind"),
    [("/_emulator/dashboard.js", "text/javascript"), ("/_emulator/dashboard.css", "text/css")],
)
def test_static_assets_are_shipped_in_the_package(
    served: httpx.Client, path: str, kind: str
) -> None:
    """The script and stylesheet load from package data with their content types."""
    response = served.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(kind)
    assert response.content


def test_page_script_never_renders_data_as_html(served: httpx.Client) -> None:
    """The script writes text only: no innerHTML, outerHTML, insertAdjacentHTML or eval."""
    script = served.get("/_emulator/dashboard.js").text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "eval(", "document.write"):
        assert sink not in script


def test_api_still_requires_an_api_key(served: httpx.Client) -> None:
    """Only the dashboard is key-less: the API answers 401 without x-api-key."""
    response = served.get("/api/v1/usage/quota/all", params={"customerId": "user_123"})
    assert response.status_code == 401


def test_dashboard_bypasses_faults_and_the_request_log(
    served: httpx.Client, fake: FakeCommet
) -> None:
    """With every API request failing, the dashboard still answers and logs nothing."""
    fake.faults.error_rate(1.0)
    assert served.get("/_emulator/state").status_code == 200
    assert served.get("/").status_code == 200
    assert fake.requests == []


def test_unknown_dashboard_path_is_404(served: httpx.Client) -> None:
    """A path under /_emulator/ that is no endpoint answers 404 with a JSON error."""
    response = served.get("/_emulator/nothing")
    assert response.status_code == 404
    assert "error" in response.json()


# state snapshot


def test_state_lists_customers_and_features(served: httpx.Client) -> None:
    """The snapshot names every catalogue customer and feature with its kind."""
    state = served.get("/_emulator/state").json()
    assert [c["id"] for c in state["customers"]] == ["user_123", "user_free", "user_unsubscribed"]
    kinds = {f["code"]: f["kind"] for f in state["features"]}
    assert kinds["api_calls"] == "metered"
    assert kinds["tasks"] == "quota"
    assert _customer(state, "user_unsubscribed")["subscribed"] is False


def test_state_shows_usage_totals_per_feature(served: httpx.Client) -> None:
    """Tracked values add up per customer and metered feature."""
    assert _track(served, value=2).status_code == 201
    assert _track(served, value=3).status_code == 201
    state = served.get("/_emulator/state").json()
    assert _customer(state, "user_123")["usage"]["api_calls"] == 5
    assert _customer(state, "user_free")["usage"]["api_calls"] == 0


def test_state_shows_quota_balance_against_included_with_overage(served: httpx.Client) -> None:
    """A balance past ``included`` reports the overage beside current and included."""
    body = {"customerId": "user_123", "featureCode": "tasks", "count": 12}
    assert served.post(QUOTA, json=body, headers=HEADERS).status_code == 200
    state = served.get("/_emulator/state").json()
    tasks = next(q for q in _customer(state, "user_123")["quotas"] if q["featureCode"] == "tasks")
    assert (tasks["current"], tasks["included"], tasks["overage"]) == (12, 10, 2)


def test_state_carries_recent_changes_in_sequence_order(served: httpx.Client) -> None:
    """Usage events and the requests that carried them appear as numbered changes."""
    _track(served)
    state = served.get("/_emulator/state").json()
    kinds = [c["kind"] for c in state["changes"]]
    assert kinds == ["usage", "request"]
    seqs = [c["seq"] for c in state["changes"]]
    assert seqs == sorted(seqs)
    assert seqs[-1] == state["seq"]
    request = state["changes"][-1]
    assert (request["method"], request["path"], request["status"]) == ("POST", EVENTS, 201)


def test_reset_empties_the_recent_changes(served: httpx.Client, fake: FakeCommet) -> None:
    """After ``reset`` the snapshot holds only the reset marker."""
    _track(served)
    fake.reset()
    assert [c["kind"] for c in served.get("/_emulator/state").json()["changes"]] == ["reset"]


# fault controls


def test_error_rate_toggle_takes_effect_on_the_api(served: httpx.Client) -> None:
    """Starting an error rate of 1 fails API requests; a rate of 0 stops it."""
    started = served.post("/_emulator/faults/error-rate", json={"rate": 1, "status": 500})
    assert started.status_code == 200
    assert started.json()["faults"]["error_rate"] == 1.0
    assert _track(served).status_code == 500
    assert served.post("/_emulator/faults/error-rate", json={"rate": 0}).status_code == 200
    assert _track(served).status_code == 201


def test_fail_next_fails_exactly_n_requests(served: httpx.Client) -> None:
    """fail-next n=2 answers the next two API requests with the chosen status."""
    assert served.post("/_emulator/faults/fail-next", json={"n": 2, "status": 502}).is_success
    assert [_track(served).status_code for _ in range(3)] == [502, 502, 201]


def test_latency_toggle_is_armed_and_counted(served: httpx.Client, fake: FakeCommet) -> None:
    """Latency set from the dashboard is applied to the next API request."""
    answer = served.post("/_emulator/faults/latency", json={"seconds": 0.01}).json()
    assert answer["faults"]["latency"] == 0.01
    assert _track(served).status_code == 201
    assert fake.faults.injected["latency"] == 1


def test_rate_limit_and_drop_controls(served: httpx.Client) -> None:
    """rate-limit-next answers 429 with Retry-After; drop-next closes the connection."""
    served.post("/_emulator/faults/rate-limit-next", json={"retry_after": 7})
    limited = _track(served)
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "7")
    served.post("/_emulator/faults/drop-next", json={})
    with pytest.raises(httpx.RemoteProtocolError):
        _track(served)


def test_clear_removes_every_fault(served: httpx.Client) -> None:
    """clear disarms every fault and zeroes the counters."""
    served.post("/_emulator/faults/fail-next", json={"n": 5})
    served.post("/_emulator/faults/latency", json={"seconds": 0.01})
    faults = served.post("/_emulator/faults/clear", json={}).json()["faults"]
    assert (faults["fail_next"], faults["latency"], faults["injected"]) == ([], 0.0, {})
    assert _track(served).status_code == 201


def test_fault_state_endpoint(served: httpx.Client, fake: FakeCommet) -> None:
    """GET /_emulator/faults shows faults armed from Python too."""
    fake.faults.drop_next(2)
    assert served.get("/_emulator/faults").json()["faults"]["drop_next"] == 2


@pytest.mark.parametrize(
    ("control", "body"),
    [
        ("error-rate", {"rate": 1.5}),
        ("error-rate", {}),
        ("error-rate", {"rate": 0.5, "status": 200}),
        ("latency", {"seconds": "slow"}),
        ("fail-next", {"n": 0}),
        ("fail-next", {"n": True}),
    ],
)
def test_invalid_control_is_400_and_changes_nothing(
    served: httpx.Client, fake: FakeCommet, control: str, body: dict[str, Any]
) -> None:
    """Out-of-range or mistyped control values are refused and arm nothing."""
    response = served.post(f"/_emulator/faults/{control}", json=body)
    assert response.status_code == 400
    assert response.json()["error"]
    assert fake.faults.pending()["error_rate"] == 0.0
    assert fake.faults.pending()["fail_next"] == []


def test_control_needs_a_json_content_type(served: httpx.Client, fake: FakeCommet) -> None:
    """A form-encoded post (what a foreign page can send without CORS) is refused with 415."""
    response = served.post("/_emulator/faults/fail-next", data={"n": "1"})
    assert response.status_code == 415
    assert fake.faults.pending()["fail_next"] == []


def test_control_refuses_a_foreign_origin(served: httpx.Client, fake: FakeCommet) -> None:
    """A control request whose Origin is another site is refused with 403."""
    response = served.post(
        "/_emulator/faults/fail-next", json={"n": 1}, headers={"origin": "http://evil.example"}
    )
    assert response.status_code == 403
    assert fake.faults.pending()["fail_next"] == []


def test_control_accepts_its_own_origin(served: httpx.Client) -> None:
    """The page's own Origin (the emulator's host) is accepted."""
    origin = f"http://{served.base_url.netloc.decode()}"
    response = served.post("/_emulator/faults/fail-next", json={}, headers={"origin": origin})
    assert response.status_code == 200


def test_control_is_post_only(served: httpx.Client) -> None:
    """GET on a control answers 405 with Allow: POST."""
    response = served.get("/_emulator/faults/clear")
    assert (response.status_code, response.headers["allow"]) == (405, "POST")


# server-sent events


def test_stream_emits_an_event_when_usage_is_tracked(fake: FakeCommet) -> None:
    """A usage event sent to the API arrives on the event stream with its customer and value."""
    found: queue.Queue[Any] = queue.Queue()
    ready = threading.Event()
    with fake.serve() as url:
        reader = threading.Thread(target=_read_events, args=(url, found, ready), daemon=True)
        reader.start()
        assert ready.wait(10)
        with httpx.Client(base_url=url, timeout=5) as client:
            assert _track(client, value=4).status_code == 201
        status = found.get(timeout=10)
        assert status == ("status", 200, "text/event-stream; charset=utf-8")
        usage = found.get(timeout=10)
        assert isinstance(usage, dict)
        assert (usage["kind"], usage["customerId"], usage["value"]) == ("usage", "user_123", 4)
        request = found.get(timeout=10)
        assert (request["kind"], request["status"]) == ("request", 201)
        assert request["seq"] > usage["seq"]
    reader.join(10)


def test_stream_ends_cleanly_when_the_server_stops(fake: FakeCommet) -> None:
    """Leaving serve() ends an open stream with a complete response, not a cut connection."""
    found: queue.Queue[Any] = queue.Queue()
    ready = threading.Event()
    with fake.serve() as url:
        reader = threading.Thread(target=_read_events, args=(url, found, ready), daemon=True)
        reader.start()
        assert ready.wait(10)
    reader.join(10)
    assert not reader.is_alive()
    assert found.get(timeout=1)[0] == "status"
    # "END" (rather than a RemoteProtocolError) means the body finished: the dashboard closed
    # the stream itself instead of uvicorn cancelling it after its grace period.
    assert found.get(timeout=1) == "END"


def test_stream_is_refused_with_204_while_closed(fake: FakeCommet) -> None:
    """After close_streams a new stream is told, with 204, not to reconnect."""
    with fake.serve() as url:
        fake.app.dashboard.close_streams()
        response = httpx.get(f"{url}/_emulator/stream", timeout=5)
        assert response.status_code == 204
        fake.app.dashboard.open_streams()


def test_ledger_tells_subscribers_of_every_write_in_order() -> None:
    """Writes from many threads reach a subscriber once each, in increasing seq order."""
    ledger = FakeCommet.from_catalogue()._ledger
    seen: list[LedgerChange] = []
    unsubscribe = ledger.subscribe(seen.append)

    def write() -> None:
        for _ in range(50):
            ledger.record_usage(
                "user_123",
                "api_calls",
                1,
                event_id=None,
                timestamp=None,
                properties={},
                dialect="v1",
                param="featureCode",
            )

    threads = [threading.Thread(target=write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    unsubscribe()
    ledger.reset()
    seqs = [change.seq for change in seen]
    assert len(seqs) == 400
    assert seqs == sorted(set(seqs))
    assert ledger.usage_total("user_123", "api_calls") == 0


def test_a_failing_subscriber_never_fails_a_write(caplog: pytest.LogCaptureFixture) -> None:
    """A subscriber that raises is logged and dropped; the write still succeeds."""
    ledger = Ledger()
    calls: list[int] = []

    def broken(change: LedgerChange) -> None:
        calls.append(change.seq)
        raise RuntimeError("boom")

    ledger.subscribe(broken)
    ledger.reset()
    ledger.reset()
    assert calls == [1]
    assert "subscriber failed" in caplog.text


@pytest.mark.anyio
async def test_slow_stream_is_told_to_resync_instead_of_growing() -> None:
    """Past its bound a stream's backlog is dropped and it is flagged to resynchronise."""
    subscriber = _Subscriber(asyncio.get_running_loop())
    for seq in range(_QUEUE_LIMIT + 5):
        subscriber.offer(LedgerChange(seq + 1, "reset", None, ""))
    await asyncio.sleep(0)
    batch = await subscriber.next()
    assert batch is not None
    changes, overflowed = batch
    assert overflowed
    assert len(changes) < _QUEUE_LIMIT
    subscriber.close()
    await asyncio.sleep(0)
    assert await subscriber.next() is None


def test_stream_unsubscribes_when_the_browser_goes_away(fake: FakeCommet) -> None:
    """A client closing its stream ends the server side: no subscriber is left behind."""
    dashboard = fake.app.dashboard
    with fake.serve() as url:
        with httpx.stream("GET", f"{url}/_emulator/stream", timeout=5) as response:
            lines = response.iter_lines()
            assert next(lines) == "retry: 2000"
            assert dashboard._streams
        gone = threading.Event()
        for _ in range(500):
            with dashboard._lock:
                if not dashboard._streams and not fake._ledger._subscribers:
                    gone.set()
                    break
            gone.wait(0.01)
        assert gone.is_set()
