"""A Flask search and export service whose usage is billed through Commet.

Settings come from the environment: ``COMMET_API_KEY`` and ``COMMET_BASE_URL`` (default
https://commet.co). To try it against the local emulator (demo customers ``user_123`` and
``user_free``)::

    commet-middleware emulator &                   # http://127.0.0.1:8787
    export COMMET_API_KEY=ck_test_demo COMMET_BASE_URL=http://127.0.0.1:8787
    python examples/flask_app.py                    # Flask's dev server on http://127.0.0.1:8000
    gunicorn -b 127.0.0.1:8000 examples.flask_app:app             # sync workers
    gunicorn -b 127.0.0.1:8000 --threads 4 examples.flask_app:app # gthread workers

    curl -H 'X-Customer-ID: user_123' 'http://127.0.0.1:8000/search?q=policy'
    curl -H 'Authorization: Bearer sk_demo_acme' -H 'Content-Type: application/json' \\
         -d '{"text": "Invoices are due in thirty days"}' http://127.0.0.1:8000/summarize
    curl -X POST -H 'X-Customer-ID: user_123' -H 'Content-Type: application/json' \\
         -d '{"title": "Call the bank"}' http://127.0.0.1:8000/tasks     # 402 at the quota
    curl -X DELETE -H 'X-Customer-ID: user_123' http://127.0.0.1:8000/tasks/1

WSGI has no lifespan: each worker starts its delivery sender on its first request (also after
a ``--preload`` fork) and flushes it when the worker process exits.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

from flask import Flask, Response, abort, jsonify, request, stream_with_context

from commet_middleware import (
    CommetWSGIMiddleware,
    metered,
    quota_guard,
    quota_release,
    set_customer,
    track,
)
from commet_middleware.customers import from_header

DOCUMENTS: dict[str, str] = {
    "doc-1": "Invoice policy: invoices are due thirty days after issue.",
    "doc-2": "Refund policy: refunds are paid to the original payment method.",
    "doc-3": "Shipping policy: orders ship within two business days.",
}

# Demo API keys. A real app looks these up in its own store.
API_KEYS: dict[str, str] = {"sk_demo_acme": "user_123", "sk_demo_free": "user_free"}

app = Flask(__name__)
# The customer comes from the X-Customer-ID header. Header identity is only safe behind a
# trusted gateway that authenticates the caller, sets this header itself and strips any value
# the client sent; otherwise anyone can bill anyone. authenticate() below shows the
# alternative: set_customer() from your own auth code.
app.wsgi_app = CommetWSGIMiddleware(  # type: ignore[method-assign]
    app.wsgi_app, customer=from_header("X-Customer-ID")
)

# The tasks store: one process's memory, enough for a demo (run one gunicorn worker; threads
# are fine).
TASKS: dict[int, str] = {}
_tasks_lock = threading.Lock()
_task_ids = itertools.count(1)


@app.before_request
def authenticate() -> None:
    """Bill a request carrying ``Authorization: Bearer <key>`` to that key's customer."""
    authorization = request.headers.get("Authorization")
    if authorization is None:
        return
    scheme, _, key = authorization.partition(" ")
    customer_id = API_KEYS.get(key) if scheme.lower() == "bearer" else None
    if customer_id is None:
        abort(401, description="invalid API key")
    set_customer(customer_id)  # wins over the X-Customer-ID header


@app.get("/health")
def health() -> dict[str, str]:
    """Liveness probe: never metered."""
    return {"status": "ok"}


@app.get("/search")
@metered("api_calls")
def search() -> Response:
    """Full-text search; one api_calls unit per successful search, none for a 400."""
    query = request.args.get("q", "").strip().lower()
    if not query:
        abort(400, description="q is required")
    found = [doc_id for doc_id, text in DOCUMENTS.items() if query in text.lower()]
    return jsonify(results=found)


@app.post("/summarize")
@metered("ai_tokens", value=lambda summary: summary["tokens"])
def summarize() -> dict[str, str | int]:
    """Summarise the posted text; billed by the tokens the summary reports."""
    body = request.get_json(silent=True)
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip():
        abort(422, description="text is required")
    words = text.split()
    return {"summary": " ".join(words[:5]), "tokens": len(words) * 10}


@app.get("/export.csv")
def export_csv() -> Response:
    """Stream every document as CSV; the rows are billed only if the stream completes."""

    def rows() -> Iterator[str]:
        yield "id,text\n"
        for doc_id, text in DOCUMENTS.items():
            yield f'{doc_id},"{text}"\n'
        # Recorded at the end of the stream: a client that disconnects early is not billed.
        track("api_calls", len(DOCUMENTS))

    return Response(stream_with_context(rows()), mimetype="text/csv")


@app.post("/tasks")
@quota_guard("tasks")
def create_task() -> tuple[dict[str, str | int], int]:
    """Create a task; refused with 402 ``quota_exceeded`` once the plan's tasks are used up."""
    body = request.get_json(silent=True)
    title = body.get("title") if isinstance(body, dict) else None
    if not isinstance(title, str) or not title.strip():
        abort(422, description="title is required")  # an error: the reserved unit is released
    with _tasks_lock:
        task_id = next(_task_ids)
        TASKS[task_id] = title
    return {"id": task_id, "title": title}, 201


@app.delete("/tasks/<int:task_id>")
@quota_release("tasks")
def delete_task(task_id: int) -> dict[str, int]:
    """Delete a task and give its quota unit back; a 404 releases nothing."""
    with _tasks_lock:
        found = TASKS.pop(task_id, None)
    if found is None:
        abort(404, description="no such task")
    return {"deleted": task_id}


@app.get("/reports/usage")
@metered("api_calls")
def usage_report() -> Response:
    """Needs a reporting backend this demo lacks: it always fails, and a failure is not billed."""
    raise RuntimeError("reporting backend unavailable")


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=8000)
