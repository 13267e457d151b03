"""A serverless handler (AWS Lambda through Mangum) billed through Commet.

A function's process is frozen between invocations, so a background sender would stall with
events in it: the handler flushes after each invocation, before it returns. A few
milliseconds per call with Commet nearby; ``COMMET_SHUTDOWN_TIMEOUT`` caps nothing here, the
flush's own timeout does. Settings come from the function's environment
(``COMMET_API_KEY``; no spool: the function's disk does not outlive it).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from mangum import Mangum

import commet_middleware
from commet_middleware import CommetMiddleware, metered
from commet_middleware.customers import from_header

app = FastAPI()
app.add_middleware(CommetMiddleware, customer=from_header("X-Customer-ID"))


@app.get("/search")
@metered("api_calls")
def search(q: str) -> dict[str, str]:
    """One billed API call."""
    return {"q": q}


_asgi = Mangum(app, lifespan="off")


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The Lambda entry point: serve the event, then deliver its usage before returning."""
    try:
        response: dict[str, Any] = _asgi(event, context)
        return response
    finally:
        commet_middleware.flush(5.0)
