"""A Celery worker whose jobs are billed through Commet: ``@metered`` with the job's customer.

Outside a web request there is no middleware to find the customer, so the job names it:
``customer=`` is a function of the task's arguments. Usage goes to the process's background
queue as each job returns; each worker process flushes that queue when it shuts down (a
prefork child ends without running ``atexit``, so without this its last events would wait for
the next start). Settings come from the environment (``COMMET_API_KEY``, ``COMMET_BASE_URL``,
``COMMET_SPOOL`` for a durable spool per host)::

    celery -A examples.celery_worker worker --loglevel=INFO
    python -c "from examples.celery_worker import summarize; summarize.delay('user_123', 'hi')"
"""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_process_shutdown

import commet_middleware
from commet_middleware import metered

app = Celery("reports", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"))


@app.task
@metered(
    "ai_tokens",
    value=lambda summary: summary["tokens"],
    customer=lambda customer_id, text: customer_id,
)
def summarize(customer_id: str, text: str) -> dict[str, object]:
    """Summarise ``text`` for ``customer_id``; bills the tokens it used."""
    words = text.split()
    return {"summary": " ".join(words[:12]), "tokens": 20 + 5 * len(words)}


@worker_process_shutdown.connect
def flush_usage(**_: object) -> None:
    """Deliver what this worker process queued before it exits (bounded by the timeout)."""
    commet_middleware.flush(10.0)
