"""Guarded task-creation apps (Flask and FastAPI) for the multi-worker quota server tests.

Settings come from the environment the tests set: ``COMMET_API_KEY``, ``COMMET_BASE_URL``,
``COMMET_QUOTA_STORE``; ``QUOTA_LEASE`` (seconds a reservation holds if its worker dies) and
``QUOTA_PID_FILE`` (where ``/slow-tasks`` writes its worker's pid before it sleeps).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from fastapi import FastAPI
from flask import Flask, jsonify

from commet_middleware import (
    CommetMiddleware,
    CommetSettings,
    CommetWSGIMiddleware,
    quota_guard,
)
from commet_middleware.customers import from_header

SETTINGS = CommetSettings.from_env(quota_lease=float(os.environ.get("QUOTA_LEASE", "60")))
# Long enough that racers overlap in every worker; short enough to keep the tests quick.
WORK = 0.02


def _mark_pid() -> None:
    pid_file = os.environ.get("QUOTA_PID_FILE")
    if pid_file:
        Path(pid_file).write_text(str(os.getpid()))


flask_app = Flask(__name__)


@flask_app.get("/health")
def flask_health() -> str:
    return "ok"


@flask_app.post("/tasks")
@quota_guard("tasks")
def flask_create_task() -> tuple[object, int]:
    time.sleep(WORK)
    return jsonify(created=True), 201


@flask_app.post("/tasks-closed")
@quota_guard("tasks", on_unavailable="closed")
def flask_create_task_closed() -> tuple[object, int]:
    time.sleep(WORK)
    return jsonify(created=True), 201


@flask_app.post("/slow-tasks")
@quota_guard("tasks", 5)
def flask_slow_task() -> tuple[object, int]:
    _mark_pid()
    time.sleep(60)  # killed long before
    return jsonify(created=True), 201


flask_app.wsgi_app = CommetWSGIMiddleware(  # type: ignore[method-assign]
    flask_app.wsgi_app, customer=from_header("X-Customer-ID"), settings=SETTINGS
)


fastapi_app = FastAPI()


@fastapi_app.get("/health")
async def fastapi_health() -> str:
    return "ok"


@fastapi_app.post("/tasks", status_code=201)
@quota_guard("tasks")
async def fastapi_create_task() -> dict[str, bool]:
    await asyncio.sleep(WORK)
    return {"created": True}


@fastapi_app.post("/tasks-closed", status_code=201)
@quota_guard("tasks", on_unavailable="closed")
async def fastapi_create_task_closed() -> dict[str, bool]:
    await asyncio.sleep(WORK)
    return {"created": True}


@fastapi_app.post("/slow-tasks", status_code=201)
@quota_guard("tasks", 5)
async def fastapi_slow_task() -> dict[str, bool]:
    _mark_pid()
    await asyncio.sleep(60)  # killed long before
    return {"created": True}


fastapi_app.add_middleware(
    CommetMiddleware, customer=from_header("X-Customer-ID"), settings=SETTINGS
)
