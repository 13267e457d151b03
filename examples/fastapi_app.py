"""A FastAPI document-search service whose API calls and AI tokens are billed through Commet.

Settings come from the environment: ``COMMET_API_KEY`` and ``COMMET_BASE_URL`` (default
https://commet.co). To try it against the local emulator (demo customers ``user_123`` and
``user_free``)::

    commet-middleware emulator &                   # http://127.0.0.1:8787
    export COMMET_API_KEY=ck_test_demo COMMET_BASE_URL=http://127.0.0.1:8787
    python examples/fastapi_app.py                  # serves on http://127.0.0.1:8000
    uvicorn examples.fastapi_app:app --port 8000    # the same, with your own server options

    curl -H 'X-Customer-ID: user_123' 'http://127.0.0.1:8000/search?q=invoice'
    curl -H 'Authorization: Bearer sk_demo_acme' -H 'Content-Type: application/json' \\
         -d '{"text": "Invoices are due in thirty days"}' http://127.0.0.1:8000/summarize
    curl -X POST -H 'X-Customer-ID: user_123' -H 'Content-Type: application/json' \\
         -d '{"title": "Call the bank"}' http://127.0.0.1:8000/tasks     # 402 at the quota
    curl -X DELETE -H 'X-Customer-ID: user_123' http://127.0.0.1:8000/tasks/1

Usage is sent in the background and flushed when uvicorn shuts down (lifespan shutdown). With
``COMMET_SPOOL=/path/to/spool.sqlite`` set, every billable operation is first written to that
SQLite file and survives a crash or an outage of Commet until it is delivered.
"""

from __future__ import annotations

import itertools
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel, Field

from commet_middleware import CommetMiddleware, metered, quota_guard, quota_release, set_customer
from commet_middleware.customers import from_header

DOCUMENTS: dict[str, str] = {
    "doc-1": "Invoice policy: invoices are due thirty days after issue.",
    "doc-2": "Refund policy: refunds are paid to the original payment method.",
    "doc-3": "Shipping policy: orders ship within two business days.",
}

# Demo API keys. A real app looks these up in its own store.
API_KEYS: dict[str, str] = {"sk_demo_acme": "user_123", "sk_demo_free": "user_free"}

app = FastAPI(title="Commet FastAPI example")
# The customer comes from the X-Customer-ID header. Header identity is only safe behind a
# trusted gateway that authenticates the caller, sets this header itself and strips any value
# the client sent; otherwise anyone can bill anyone. /summarize shows the alternative: an
# auth dependency that calls set_customer().
# The other settings come from the environment: COMMET_API_KEY, COMMET_BASE_URL, and
# COMMET_SPOOL, which (when set) turns on the durable SQLite spool.
app.add_middleware(CommetMiddleware, customer=from_header("X-Customer-ID"))

# The tasks store: one process's memory, enough for a demo (run one worker).
TASKS: dict[int, str] = {}
_task_ids = itertools.count(1)


class SummaryRequest(BaseModel):
    """The text to summarise."""

    text: str = Field(min_length=1)


class NewTask(BaseModel):
    """A task to create."""

    title: str = Field(min_length=1, max_length=200)


class Task(BaseModel):
    """A stored task."""

    id: int
    title: str


class Summary(BaseModel):
    """A summary and the model tokens it cost."""

    summary: str
    tokens: int


def account_from_api_key(authorization: Annotated[str, Header()]) -> str:
    """Authenticate ``Authorization: Bearer <key>`` and bill the request to its customer."""
    scheme, _, key = authorization.partition(" ")
    customer_id = API_KEYS.get(key) if scheme.lower() == "bearer" else None
    if customer_id is None:
        raise HTTPException(status_code=401, detail="invalid API key")
    set_customer(customer_id)  # wins over the X-Customer-ID header
    return customer_id


@app.get("/health")
async def health() -> dict[str, str]:
    """Liveness probe: never metered."""
    return {"status": "ok"}


@app.get("/search")
@metered("api_calls")
async def search(q: str) -> dict[str, list[str]]:
    """Full-text search over the documents; one api_calls unit per successful search."""
    needle = q.lower()
    return {"results": [doc_id for doc_id, text in DOCUMENTS.items() if needle in text.lower()]}


@app.get("/search/titles")
@metered("api_calls")
def search_titles(q: str) -> dict[str, list[str]]:
    """The same search as a sync endpoint (FastAPI runs it in its threadpool)."""
    needle = q.lower()
    return {"titles": [text.split(":")[0] for text in DOCUMENTS.values() if needle in text.lower()]}


@app.get("/documents/{doc_id}")
@metered("api_calls")
async def get_document(doc_id: str) -> dict[str, str]:
    """Return one document; a 404 raised inside the endpoint is not billed."""
    if doc_id not in DOCUMENTS:
        raise HTTPException(status_code=404, detail="no such document")
    return {"id": doc_id, "text": DOCUMENTS[doc_id]}


@app.post("/summarize")
@metered("ai_tokens", value=lambda summary: summary.tokens)
async def summarize(
    body: SummaryRequest, account: Annotated[str, Depends(account_from_api_key)]
) -> Summary:
    """Summarise text for an API-key holder; billed by the tokens the summary reports."""
    words = body.text.split()
    return Summary(summary=" ".join(words[:5]), tokens=len(words) * 10)


@app.post("/tasks", status_code=201)
@quota_guard("tasks")
async def create_task(body: NewTask) -> Task:
    """Create a task; refused with 402 ``quota_exceeded`` once the plan's tasks are used up."""
    task_id = next(_task_ids)
    TASKS[task_id] = body.title
    return Task(id=task_id, title=body.title)


@app.delete("/tasks/{task_id}")
@quota_release("tasks")
def delete_task(task_id: int) -> dict[str, int]:
    """Delete a task and give its quota unit back; a 404 releases nothing."""
    if TASKS.pop(task_id, None) is None:
        raise HTTPException(status_code=404, detail="no such task")
    return {"deleted": task_id}


@app.get("/reports/usage")
@metered("api_calls")
def usage_report() -> dict[str, str]:
    """Needs a reporting backend this demo lacks: it always fails, and a failure is not billed."""
    raise RuntimeError("reporting backend unavailable")


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
