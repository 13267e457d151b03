"""A Starlette search and export service whose usage is billed through Commet.

Settings come from the environment: ``COMMET_API_KEY`` and ``COMMET_BASE_URL`` (default
https://commet.co). To try it against the local emulator (demo customers ``user_123`` and
``user_free``)::

    commet-middleware emulator &                   # http://127.0.0.1:8787
    export COMMET_API_KEY=ck_test_demo COMMET_BASE_URL=http://127.0.0.1:8787
    python examples/starlette_app.py                # serves on http://127.0.0.1:8000
    uvicorn examples.starlette_app:app --port 8000  # the same, with your own server options

    curl -H 'X-Customer-ID: user_123' 'http://127.0.0.1:8000/search?q=policy'
    curl -H 'X-Customer-ID: user_123' http://127.0.0.1:8000/export.csv
    curl -X POST -H 'X-Customer-ID: user_123' -H 'Content-Type: application/json' \\
         -d '{"title": "Call the bank"}' http://127.0.0.1:8000/tasks     # 402 at the quota
    curl -X DELETE -H 'X-Customer-ID: user_123' http://127.0.0.1:8000/tasks/1

Usage is sent in the background and flushed when uvicorn shuts down (lifespan shutdown).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from commet_middleware import CommetMiddleware, metered, quota_guard, quota_release, track
from commet_middleware.customers import from_header

DOCUMENTS: dict[str, str] = {
    "doc-1": "Invoice policy: invoices are due thirty days after issue.",
    "doc-2": "Refund policy: refunds are paid to the original payment method.",
    "doc-3": "Shipping policy: orders ship within two business days.",
}

# The tasks store: one process's memory, enough for a demo (run one worker).
TASKS: dict[int, str] = {}
_task_ids = itertools.count(1)


@dataclass(frozen=True)
class Summary:
    """A summary and the model tokens it cost."""

    text: str
    tokens: int


@metered("ai_tokens", value=lambda summary: summary.tokens)
async def summarize_text(text: str) -> Summary:
    """Summarise ``text``; ``@metered`` works on any function called inside a request."""
    words = text.split()
    return Summary(text=" ".join(words[:5]), tokens=len(words) * 10)


async def health(request: Request) -> Response:
    """Liveness probe: never metered."""
    return JSONResponse({"status": "ok"})


@metered("api_calls")
async def search(request: Request) -> Response:
    """Full-text search; one api_calls unit per successful search, none for a 400."""
    query = request.query_params.get("q", "").strip().lower()
    if not query:
        # Returned, not raised: the middleware still bills only responses below 400.
        return JSONResponse({"error": "q is required"}, status_code=400)
    found = [doc_id for doc_id, text in DOCUMENTS.items() if query in text.lower()]
    return JSONResponse({"results": found})


async def summarize(request: Request) -> Response:
    """Summarise the posted text; billed by the tokens the summary reports."""
    body = await request.json()
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str) or not text.strip():
        return JSONResponse({"error": "text is required"}, status_code=422)
    summary = await summarize_text(text)
    return JSONResponse({"summary": summary.text, "tokens": summary.tokens})


async def export_csv(request: Request) -> Response:
    """Stream every document as CSV; the rows are billed only if the stream completes."""

    async def rows() -> AsyncIterator[str]:
        yield "id,text\n"
        for doc_id, text in DOCUMENTS.items():
            yield f'{doc_id},"{text}"\n'
        # Recorded at the end of the stream: a client that disconnects early is not billed.
        track("api_calls", len(DOCUMENTS))

    return StreamingResponse(rows(), media_type="text/csv")


@quota_guard("tasks")
async def create_task(request: Request) -> Response:
    """Create a task; refused with 402 ``quota_exceeded`` once the plan's tasks are used up."""
    body = await request.json()
    title = body.get("title") if isinstance(body, dict) else None
    if not isinstance(title, str) or not title.strip():
        # A 4xx is not a success: the unit reserved for this request is released.
        return JSONResponse({"error": "title is required"}, status_code=422)
    task_id = next(_task_ids)
    TASKS[task_id] = title
    return JSONResponse({"id": task_id, "title": title}, status_code=201)


@quota_release("tasks")
async def delete_task(request: Request) -> Response:
    """Delete a task and give its quota unit back; a 404 releases nothing."""
    task_id = request.path_params["task_id"]
    if TASKS.pop(task_id, None) is None:
        return JSONResponse({"error": "no such task"}, status_code=404)
    return JSONResponse({"deleted": task_id})


@metered("api_calls")
async def usage_report(request: Request) -> Response:
    """Needs a reporting backend this demo lacks: it always fails, and a failure is not billed."""
    raise RuntimeError("reporting backend unavailable")


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/search", search),
        Route("/summarize", summarize, methods=["POST"]),
        Route("/export.csv", export_csv),
        Route("/tasks", create_task, methods=["POST"]),
        Route("/tasks/{task_id:int}", delete_task, methods=["DELETE"]),
        Route("/reports/usage", usage_report),
    ],
    middleware=[
        # Header identity is only safe behind a trusted gateway that authenticates the caller,
        # sets X-Customer-ID itself and strips any value the client sent; otherwise anyone
        # can bill anyone.
        Middleware(CommetMiddleware, customer=from_header("X-Customer-ID")),
    ],
)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
