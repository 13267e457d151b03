"""The example's views: search, summaries, a CSV export, documents, and quota-guarded tasks.

Run it against the local emulator (demo customers ``user_123`` and ``user_free``)::

    commet-middleware emulator &                   # http://127.0.0.1:8787
    export COMMET_API_KEY=ck_test_demo COMMET_BASE_URL=http://127.0.0.1:8787
    python examples/django_app/manage.py runserver 127.0.0.1:8000 --noreload
    gunicorn -b 127.0.0.1:8000 examples.django_app.wsgi             # WSGI, sync workers
    uvicorn --port 8000 examples.django_app.asgi:application        # ASGI

    curl -H 'X-Customer-ID: user_123' 'http://127.0.0.1:8000/search?q=policy'
    curl -H 'Authorization: Bearer sk_demo_acme' -H 'Content-Type: application/json' \\
         -d '{"text": "Invoices are due in thirty days"}' http://127.0.0.1:8000/summarize
    curl -X POST -H 'X-Customer-ID: user_123' -H 'Content-Type: application/json' \\
         -d '{"title": "Call the bank"}' http://127.0.0.1:8000/tasks    # 402 at the quota
"""

from __future__ import annotations

import io
import itertools
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from commet_middleware import metered, quota_guard, quota_release, set_customer, track
from commet_middleware.django import response_data

DOCUMENTS: dict[str, str] = {
    "doc-1": "Invoice policy: invoices are due thirty days after issue.",
    "doc-2": "Refund policy: refunds are paid to the original payment method.",
    "doc-3": "Shipping policy: orders ship within two business days.",
}

# Demo API keys. A real app looks these up in its own store.
API_KEYS: dict[str, str] = {"sk_demo_acme": "user_123", "sk_demo_free": "user_free"}


def customer_of(request: HttpRequest) -> str | None:
    """``COMMET["customer"]``: the customer named by the gateway's ``X-Customer-ID`` header.

    Header identity is only safe behind a trusted gateway that authenticates the caller, sets
    this header itself and strips any value the client sent. With django.contrib.auth, leave
    ``customer`` out of COMMET: the logged-in ``request.user.pk`` pays.
    """
    return request.headers.get("X-Customer-ID")


def api_key_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Bill a request carrying ``Authorization: Bearer <key>`` to that key's customer."""

    def authenticated(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            scheme, _, key = authorization.partition(" ")
            customer_id = API_KEYS.get(key) if scheme.lower() == "bearer" else None
            if customer_id is None:
                return JsonResponse({"error": "invalid API key"}, status=401)
            set_customer(customer_id)  # wins over the X-Customer-ID header
        return view(request, *args, **kwargs)

    return authenticated


def _search(request: HttpRequest) -> JsonResponse:
    query = request.GET.get("q", "").strip().lower()
    if not query:
        return JsonResponse({"error": "q is required"}, status=400)  # a 400 is never billed
    found = [doc_id for doc_id, text in DOCUMENTS.items() if query in text.lower()]
    return JsonResponse({"results": found})


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """Liveness probe: never metered (``/health`` is excluded by default)."""
    return JsonResponse({"status": "ok"})


@require_GET
@metered("api_calls")
def search(request: HttpRequest) -> JsonResponse:
    """Full-text search; one api_calls unit per successful search, none for a 400."""
    return _search(request)


@metered("api_calls")
async def search_async(request: HttpRequest) -> JsonResponse:
    """The same search as an async view: the middleware serves sync and async stacks."""
    return _search(request)


@require_POST
@api_key_required
@metered("ai_tokens", value=lambda summary: response_data(summary).get("tokens", 0))
def summarize(request: HttpRequest) -> JsonResponse:
    """Summarise the posted text; billed by the tokens the summary reports.

    ``value`` receives what the view returned, a JsonResponse: ``response_data`` reads its
    JSON (and a DRF Response's ``data``).
    """
    try:
        text = json.loads(request.body).get("text")
    except (ValueError, AttributeError):
        text = None
    if not isinstance(text, str) or not text.strip():
        return JsonResponse({"error": "text is required"}, status=422)
    words = text.split()
    return JsonResponse({"summary": " ".join(words[:5]), "tokens": len(words) * 10})


@require_GET
def export_csv(request: HttpRequest) -> StreamingHttpResponse:
    """Stream every document as CSV; the rows are billed only if the stream completes."""

    def rows() -> Iterator[str]:
        yield "id,text\n"
        for doc_id, text in DOCUMENTS.items():
            yield f'{doc_id},"{text}"\n'
        # Recorded at the end of the stream: a client that disconnects early is not billed.
        track("api_calls", len(DOCUMENTS))

    return StreamingHttpResponse(rows(), content_type="text/csv")


@require_GET
@metered("api_calls")
def download(request: HttpRequest, doc_id: str) -> HttpResponse:
    """One document as a file download; billed once the server has sent the file."""
    text = DOCUMENTS.get(doc_id)
    if text is None:
        return JsonResponse({"error": "no such document"}, status=404)
    return FileResponse(io.BytesIO(text.encode()), filename=f"{doc_id}.txt")


# The tasks store: one process's memory, enough for a demo (run one worker).
TASKS: dict[int, str] = {}
_tasks_lock = threading.Lock()
_task_ids = itertools.count(1)


@require_POST
@quota_guard("tasks")
def create_task(request: HttpRequest) -> JsonResponse:
    """Create a task; refused with 402 ``quota_exceeded`` once the plan's tasks are used up."""
    try:
        title = json.loads(request.body).get("title")
    except (ValueError, AttributeError):
        title = None
    if not isinstance(title, str) or not title.strip():
        # An error: the reserved unit is released, nothing is added to the quota.
        return JsonResponse({"error": "title is required"}, status=422)
    with _tasks_lock:
        task_id = next(_task_ids)
        TASKS[task_id] = title
    return JsonResponse({"id": task_id, "title": title}, status=201)


@require_http_methods(["DELETE"])
@quota_release("tasks")
def delete_task(request: HttpRequest, task_id: int) -> JsonResponse:
    """Delete a task and give its quota unit back; a 404 releases nothing."""
    with _tasks_lock:
        found = TASKS.pop(task_id, None)
    if found is None:
        return JsonResponse({"error": "no such task"}, status=404)
    return JsonResponse({"deleted": task_id})


@require_GET
@metered("api_calls")
def usage_report(request: HttpRequest) -> HttpResponse:
    """Needs a reporting backend this demo lacks: it always fails, and a failure is not billed."""
    raise RuntimeError("reporting backend unavailable")
