"""The Django middleware through Django's test clients, on sync and async middleware stacks."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections.abc import Callable, Generator
from typing import Any
from wsgiref.util import FileWrapper, setup_testing_defaults

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.wsgi import WSGIHandler
from werkzeug.test import Client as WerkzeugClient

from commet_middleware import CommetWSGIMiddleware, UsageEvent
from commet_middleware.billing._refusals import REJECTION_BODY
from commet_middleware.customers import from_header
from commet_middleware.django import billing, response_data
from integration.conftest import ListSink

from . import views
from .conftest import CUSTOMER, django_error_records
from .support import Stack, body

Configure = Callable[..., Any]


def billed(sink: ListSink) -> list[tuple[str, str, float]]:
    return [(e.customer_id, e.feature, e.value) for e in sink.events]


@pytest.fixture
def by_header(commet_config: Configure, sink: ListSink) -> Callable[..., Any]:
    """COMMET with the list sink and the customer from X-Customer-ID, plus ``options``."""

    def configure(**options: Any) -> Any:
        return commet_config(sink=sink, customer_header="X-Customer-ID", **options)

    return configure


@pytest.mark.parametrize("path", ["/search/", "/asearch/"])
def test_metered_view_is_billed_once(
    stack: Stack, by_header: Configure, sink: ListSink, path: str
) -> None:
    """A successful metered view, sync or async, is billed once to the request's customer."""
    by_header()
    response = stack.get(path + "?q=x", headers=CUSTOMER)
    assert response.status_code == 200
    assert json.loads(response.content) == {"q": "x", "customer": "user_123"}
    assert billed(sink) == [("user_123", "api_calls", 1)]


@pytest.mark.parametrize("prefix", ["", "a"])
def test_failed_responses_and_raising_views_are_not_billed(
    stack: Stack, by_header: Configure, sink: ListSink, prefix: str, caplog: Any
) -> None:
    """4xx/5xx statuses and a view that raises bill nothing; only the 2xx and 3xx do."""
    by_header()
    for code in (200, 302, 404, 500):
        assert stack.get(f"/{prefix}status/{code}/", headers=CUSTOMER).status_code == code
    with caplog.at_level(logging.ERROR, logger="django.request"):
        assert stack.get(f"/{prefix}boom/", headers=CUSTOMER).status_code == 500
    assert billed(sink) == [("user_123", "api_calls", 1)] * 2


@pytest.mark.parametrize("path", ["/summarize/", "/asummarize/"])
def test_value_function_reads_a_json_response(
    stack: Stack, by_header: Configure, sink: ListSink, path: str
) -> None:
    """``value=lambda r: response_data(r)["tokens"]`` bills what a JsonResponse reports."""
    by_header()
    response = stack.post(path, data="one two three", content_type="text/plain", headers=CUSTOMER)
    assert response_data(response) == {"summary": "one two three", "tokens": 30}
    assert billed(sink) == [("user_123", "ai_tokens", 30)]


@pytest.mark.usefixtures("allow_commet_errors")
def test_value_function_indexing_the_response_is_logged_and_not_billed(
    by_header: Configure, sink: ListSink, caplog: Any
) -> None:
    """Without response_data, a value function indexing a JsonResponse reads a header: the
    request is served, the failure logged and counted, nothing billed (the issue's symptom)."""
    engine = by_header()
    response = Stack("sync").post(
        "/summarize-by-index/", data="a b", content_type="text/plain", headers=CUSTOMER
    )
    assert response.status_code == 200
    assert sink.events == []
    assert engine.stats.invalid_values == 1
    assert any("could not compute the usage" in r.getMessage() for r in caplog.records)


def test_response_data_reads_drf_json_and_leaves_others_alone() -> None:
    """response_data gives a DRF Response's data, a JsonResponse's JSON, anything else as is."""
    from django.http import HttpResponse, JsonResponse
    from rest_framework.response import Response

    assert response_data(Response({"tokens": 3})) == {"tokens": 3}
    assert response_data(JsonResponse({"tokens": 4})) == {"tokens": 4}
    text = HttpResponse("plain")
    assert response_data(text) is text
    assert response_data({"tokens": 5}) == {"tokens": 5}


def test_zero_code_table_matches_django_route_patterns(
    stack: Stack, by_header: Configure, sink: ListSink
) -> None:
    """``meter`` tables match Django route patterns (with or without the leading slash) and
    globs against the path; unmatched routes and excluded paths bill nothing."""
    by_header(
        meter={
            "GET /api/items/<int:pk>/": "api_calls",
            "api/aitems/<int:pk>/": "ai_tokens",
            "/api/legacy/*": "rows_read",
        }
    )
    for path in ("/api/items/1/", "/api/items/2/", "/api/aitems/3/", "/api/legacy/4/"):
        assert stack.get(path, headers=CUSTOMER).status_code == 200
    assert stack.post("/api/items/5/", headers=CUSTOMER).status_code == 200  # GET only
    assert stack.get("/health", headers=CUSTOMER).status_code == 200
    assert stack.get("/no/such/path/", headers=CUSTOMER).status_code == 404
    assert billed(sink) == [
        ("user_123", "api_calls", 1),
        ("user_123", "api_calls", 1),
        ("user_123", "ai_tokens", 1),
        ("user_123", "rows_read", 1),
    ]


def test_zero_code_single_feature_skips_excluded_paths_and_failures(
    stack: Stack, by_header: Configure, sink: ListSink
) -> None:
    """``meter="api_calls"`` bills every successful request except excluded paths."""
    by_header(meter="api_calls", exclude=["/health", "/api/aitems"])
    for path in ("/api/items/1/", "/health", "/api/aitems/2/", "/no/such/path/"):
        stack.get(path, headers=CUSTOMER)
    assert billed(sink) == [("user_123", "api_calls", 1)]


def test_meter_function_receives_the_request(
    stack: Stack, by_header: Configure, sink: ListSink
) -> None:
    """A ``meter`` function is given the HttpRequest (its resolver match included)."""
    seen: list[str] = []

    def meter(request: Any) -> str | None:
        seen.append(request.resolver_match.route)
        return "api_calls" if request.GET.get("bill") else None

    by_header(meter=meter)
    stack.get("/api/items/1/?bill=1", headers=CUSTOMER)
    stack.get("/api/items/2/", headers=CUSTOMER)
    assert seen == ["api/items/<int:pk>/"] * 2
    assert billed(sink) == [("user_123", "api_calls", 1)]


def test_set_customer_in_a_view_names_the_customer(
    stack: Stack, by_header: Configure, sink: ListSink
) -> None:
    """set_customer() and track() work in a view under the test client (no RuntimeError)."""
    by_header()
    assert stack.get("/login-as/cus_9/").status_code == 200
    assert billed(sink) == [("cus_9", "api_calls", 2)]


def test_no_customer_is_served_and_counted_unattributed(
    stack: Stack, by_header: Configure, sink: ListSink
) -> None:
    """Without a customer, a metered view is served and billed to nobody, and counted."""
    engine = by_header()
    assert stack.get("/search/").status_code == 200
    assert sink.events == []
    assert engine.stats.unattributed_requests == 1


@pytest.mark.parametrize("path", ["/search/", "/asearch/"])
def test_reject_mode_answers_401_before_the_view_runs(
    stack: Stack, by_header: Configure, sink: ListSink, path: str, caplog: Any
) -> None:
    """``on_missing_customer="reject"``: a metered view without a customer gets the 401
    ``customer_required`` body, does not run, and Django logs no error."""
    engine = by_header(on_missing_customer="reject")
    caplog.set_level(logging.INFO)
    response = stack.get(path)
    assert response.status_code == 401
    assert response.content == REJECTION_BODY
    assert response["Content-Type"] == "application/json"
    assert views.RAN == []
    assert django_error_records(caplog.records) == []
    assert engine.stats.rejected_requests == 1
    assert stack.get(path, headers=CUSTOMER).status_code == 200
    assert billed(sink) == [("user_123", "api_calls", 1)]


def test_reject_mode_zero_code_answers_401(
    stack: Stack, by_header: Configure, sink: ListSink
) -> None:
    """Zero-code in reject mode: a billable request without a customer is answered 401."""
    by_header(meter="api_calls", on_missing_customer="reject")
    assert stack.get("/api/items/1/").status_code == 401
    assert stack.get("/health").status_code == 200  # excluded: not billable, served
    assert sink.events == []


@pytest.mark.parametrize("path", ["/stream/", "/astream/"])
def test_streaming_response_is_billed_once_consumed(
    stack: Stack, by_header: Configure, sink: ListSink, path: str
) -> None:
    """A streamed body (sync or async iterator) is billed only once read to its end, and
    ``track`` inside the generator finds its request."""
    by_header()
    response = stack.get(path, headers=CUSTOMER)
    assert response.status_code == 200
    assert sink.events == []  # nothing until the body is consumed
    assert body(response) == b"0\n1\n2\n"
    assert billed(sink) == [("user_123", "api_calls", 3)]


# Closing a response outside the test client fires request_finished, whose receiver checks
# the database connection: pytest-django lets it only with the mark.
@pytest.mark.django_db
def test_stream_closed_early_is_not_billed(by_header: Configure, sink: ListSink) -> None:
    """A stream closed before its end (the client went away) bills nothing and is counted."""
    engine = by_header()
    response = Stack("sync").get("/stream/", headers=CUSTOMER)
    chunks = iter(response.streaming_content)
    assert next(chunks) == b"0\n"
    response.close()
    assert sink.events == []
    assert engine.stats.incomplete_responses == 1


def test_stream_never_read_is_not_billed(by_header: Configure, sink: ListSink) -> None:
    """A streamed response dropped unread (never sent) is settled unbilled when collected."""
    import gc

    engine = by_header()
    response = Stack("sync").get("/stream/", headers=CUSTOMER)
    del response
    gc.collect()
    assert sink.events == []
    assert engine.stats.incomplete_responses == 1


def test_file_response_is_billed_once_downloaded(
    stack: Stack, by_header: Configure, sink: ListSink
) -> None:
    """A FileResponse is billed once its file was read to the end."""
    by_header()
    response = stack.get("/download/", headers=CUSTOMER)
    assert response["Content-Length"] == "10000"
    assert body(response) == b"x" * 10_000
    assert billed(sink) == [("user_123", "downloads", 1)]


def test_idempotency_key_repeat_is_answered_and_billed_once(
    stack: Stack, by_header: Configure, sink: ListSink
) -> None:
    """With ``idempotency_header``, a repeated request is answered 409 without running."""
    by_header(idempotency_header="Idempotency-Key")
    headers = {**CUSTOMER, "Idempotency-Key": "key-1"}
    first = stack.post("/summarize/", data="a b", content_type="text/plain", headers=headers)
    again = stack.post("/summarize/", data="a b", content_type="text/plain", headers=headers)
    assert first.status_code == 200
    assert again.status_code == 409
    assert json.loads(again.content)["error"]["code"] == "idempotency_key_already_used"
    assert billed(sink) == [("user_123", "ai_tokens", 20)]
    # The event's key derives from the client's key, so a retry elsewhere bills once too.
    assert sink.events[0].idempotency_key is not None


def test_customer_function_sync_async_and_dotted(
    stack: Stack, commet_config: Configure, sink: ListSink
) -> None:
    """COMMET["customer"] may be a sync or async function of the request, or its dotted path."""

    def from_token(request: Any) -> str | None:
        return request.headers.get("X-Token", "").removeprefix("tok_") or None

    async def from_token_async(request: Any) -> str | None:
        return from_token(request)

    for customer in (from_token, from_token_async, f"{__name__}.token_customer"):
        commet_config(sink=sink, customer=customer)
        stack.get("/search/", headers={"X-Token": "tok_acme"})
    assert billed(sink) == [("acme", "api_calls", 1)] * 3


def token_customer(request: Any) -> str | None:
    """The dotted-path customer function of the test above."""
    token: str = request.headers.get("X-Token", "")
    return token.removeprefix("tok_") or None


def test_shipped_resolvers_read_the_request_meta(
    stack: Stack, commet_config: Configure, sink: ListSink
) -> None:
    """A resolver from commet_middleware.customers works as COMMET["customer"]."""
    commet_config(sink=sink, customer=from_header("X-Customer-ID"))
    stack.get("/search/", headers=CUSTOMER)
    assert billed(sink) == [("user_123", "api_calls", 1)]


def test_every_commet_settings_field_is_a_commet_key(commet_config: Configure) -> None:
    """Every CommetSettings field may be set in COMMET; text is read like the environment."""
    engine = commet_config(
        api_key="ck_test_fields",
        base_url="http://127.0.0.1:9",
        queue_limit="123",
        aggregate_window=0.5,
        quota_store="memory",
        sink=None,
    )
    assert engine.settings.queue_limit == 123
    assert engine.settings.aggregate_window == 0.5
    assert "ck_test_fields" not in repr(engine.settings)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"metre": "api_calls"}, "unknown key(s) metre"),
        ({"queue_limit": "many"}, "COMMET_QUEUE_LIMIT must be a whole number"),
        ({"meter": "Not A Feature"}, "settings.COMMET"),
        ({"customer": "no_such_module.customer"}, "settings.COMMET['customer']"),
        ({"on_missing_customer": "drop"}, "on_missing_customer"),
    ],
)
def test_bad_commet_settings_raise_a_clear_error(config: dict[str, Any], message: str) -> None:
    """A COMMET dict with an unknown key or a bad value is ImproperlyConfigured, named."""
    with pytest.raises(ImproperlyConfigured, match=re.escape(message)):
        billing(config)


def test_clients_built_from_one_config_share_one_billing(
    by_header: Configure, sink: ListSink
) -> None:
    """Every test client (one Django handler each) of one COMMET config shares its billing."""
    engine = by_header()
    for _ in range(3):
        Stack("sync").get("/search/", headers=CUSTOMER)
    assert engine.stats.events_enqueued == 3
    assert billing() is engine


@pytest.mark.django_db  # the WSGI handler's request_started checks the database connection
def test_outer_wsgi_middleware_bills_once(by_header: Configure, sink: ListSink) -> None:
    """Django wrapped in CommetWSGIMiddleware too: the request is billed once, not twice."""
    by_header()
    app = CommetWSGIMiddleware(WSGIHandler(), sink=sink, customer=from_header("X-Customer-ID"))
    response = WerkzeugClient(app).get(
        "/search/", headers={"X-Customer-ID": "user_123"}, buffered=True
    )
    assert response.status_code == 200
    assert [type(op) for op in sink.operations] == [UsageEvent]


class GatedCommit:
    """A spool group commit that completes only when ``opened`` is set."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.waited = threading.Event()

    def wait(self, timeout: float | None = None, /) -> bool:
        self.waited.set()
        return self.opened.wait(timeout)

    def __await__(self) -> Generator[Any, None, None]:
        self.waited.set()
        while not self.opened.is_set():
            yield from asyncio.sleep(0.005).__await__()


class CommittingSink(ListSink):
    """A list sink whose every enqueue hands back one gated commit (as a spool does)."""

    def __init__(self) -> None:
        super().__init__()
        self.commit = GatedCommit()

    def enqueue(self, operation: Any, /) -> GatedCommit:  # type: ignore[override]
        super().enqueue(operation)
        return self.commit


@pytest.mark.parametrize("path", ["/search/", "/stream/", "/astream/"])
def test_usage_is_committed_before_the_response_goes_back(
    stack: Stack, commet_config: Configure, path: str
) -> None:
    """A billable response reaches Django (or its last chunk the server) only once the usage
    it enqueued is committed: a crash after the client had it all loses nothing."""
    sink = CommittingSink()
    commet_config(sink=sink, customer_header="X-Customer-ID")
    got: list[bytes] = []
    request = threading.Thread(target=lambda: got.append(body(stack.get(path, headers=CUSTOMER))))
    request.start()
    assert sink.commit.waited.wait(10)
    request.join(0.1)
    assert request.is_alive()
    assert got == []
    assert len(sink.events) == 1
    sink.commit.opened.set()
    request.join(10)
    assert len(got) == 1


def test_head_response_is_billed_with_its_headers(
    stack: Stack, by_header: Configure, sink: ListSink
) -> None:
    """A HEAD response is whole with its headers: billed without any body being read."""
    by_header()
    assert stack.request("HEAD", "/download/", headers=CUSTOMER).status_code == 200
    assert billed(sink) == [("user_123", "downloads", 1)]


def serve_then_fail(result: Any) -> None:
    """What a WSGI server does when a write fails: close the body while the error propagates."""
    try:
        try:
            raise BrokenPipeError
        finally:
            result.close()
    except BrokenPipeError:
        pass


def wsgi_environ(path: str) -> dict[str, Any]:
    environ: dict[str, Any] = {"PATH_INFO": path, "HTTP_X_CUSTOMER_ID": "user_123"}
    setup_testing_defaults(environ)
    environ["wsgi.file_wrapper"] = FileWrapper
    return environ


@pytest.mark.django_db  # the WSGI handler's request signals check the database connection
@pytest.mark.parametrize("client_stays", [True, False])
def test_file_sent_by_the_server_is_billed_when_closed_after_sending(
    by_header: Configure, sink: ListSink, client_stays: bool
) -> None:
    """Under a WSGI server's file_wrapper (sendfile), a FileResponse is billed when the server
    closes it after sending; closed while an error propagates (client gone), it is not."""
    engine = by_header()
    started: list[str] = []
    result = WSGIHandler()(
        wsgi_environ("/download/"), lambda status, headers: started.append(status)
    )
    assert isinstance(result, FileWrapper)  # Django handed the server the file itself
    assert sink.events == []
    if client_stays:
        assert b"".join(result) == b"x" * 10_000
        result.close()
    else:
        assert next(iter(result))
        serve_then_fail(result)
    assert started == ["200 OK"]
    assert billed(sink) == ([("user_123", "downloads", 1)] if client_stays else [])
    assert engine.stats.incomplete_responses == (0 if client_stays else 1)


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/search/", "/asearch/"])
def test_user_is_found_when_authentication_runs_after_commet(
    stack: Stack, commet_config: Configure, sink: ListSink, settings: Any, path: str
) -> None:
    """With AuthenticationMiddleware after CommetMiddleware the user is unknown on arrival and
    found later, on both stacks: the logged-in user still pays."""
    settings.MIDDLEWARE = [
        "django.contrib.sessions.middleware.SessionMiddleware",
        "commet_middleware.django.CommetMiddleware",
        "django.contrib.auth.middleware.AuthenticationMiddleware",
    ]
    commet_config(sink=sink)
    user = User.objects.create_user("lin")
    stack.client.force_login(user)
    assert stack.get(path).status_code == 200
    assert billed(sink) == [(str(user.pk), "api_calls", 1)]
