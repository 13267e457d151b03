"""Client Idempotency-Keys bound to the whole request, on FastAPI and Flask with the emulator."""

# No "from __future__ import annotations": FastAPI reads these endpoints' annotations at runtime.

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from flask import Flask, jsonify
from flask import request as flask_request

from commet_middleware import (
    CommetMiddleware,
    CommetSettings,
    CommetWSGIMiddleware,
    metered,
    quota_guard,
)
from commet_middleware.customers import from_header
from commet_middleware.testing import FakeCommet

KEY = "Idempotency-Key"


@pytest.fixture
def fake(fake: FakeCommet) -> FakeCommet:
    """The guard tests' emulator plus a metered ``ai_tokens`` and a customer with everything."""
    fake.add_feature("ai_tokens")
    fake.add_customer("writer")
    return fake


class Runs:
    """How many times each endpoint ran (a refused repeat must not run it)."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}

    def ran(self, name: str) -> int:
        self.count[name] = self.count.get(name, 0) + 1
        return self.count[name]


def fastapi_app(settings: CommetSettings, runs: Runs, **options: Any) -> FastAPI:
    """Guarded task creation, token-metered generation and a create that fails once."""
    app = FastAPI()
    app.add_middleware(
        CommetMiddleware,
        customer=from_header("X-Customer-ID"),
        settings=settings,
        idempotency_header=KEY,
        **options,
    )
    entered = asyncio.Event()
    release = asyncio.Event()
    app.state.entered, app.state.release = entered, release

    @app.post("/tasks", status_code=201)
    @quota_guard("tasks")
    async def create(request: Request) -> dict[str, Any]:
        runs.ran("tasks")
        return {"title": (await request.json())["title"]}

    @app.post("/generate")
    @metered("ai_tokens", value=lambda answer: answer["tokens"])
    async def generate(request: Request) -> dict[str, Any]:
        runs.ran("generate")
        return {"tokens": (await request.json())["tokens"]}

    @app.post("/flaky", status_code=201)
    @quota_guard("tasks")
    async def flaky(request: Request) -> Any:
        if runs.ran("flaky") == 1:
            raise RuntimeError("the first attempt fails")
        return {"ok": True}

    @app.post("/slow", status_code=201)
    @quota_guard("tasks")
    async def slow() -> dict[str, bool]:
        runs.ran("slow")
        entered.set()
        await release.wait()
        return {"ok": True}

    return app


@pytest.fixture
def runs() -> Runs:
    """A fresh run counter."""
    return Runs()


@pytest.fixture
def client(settings: CommetSettings, runs: Runs) -> Iterator[TestClient]:
    """FastAPI under the middleware; its lifespan shutdown flushes the queue to the emulator."""
    with TestClient(fastapi_app(settings, runs), raise_server_exceptions=False) as c:
        yield c


def headers(key: str, customer: str = "user_1") -> dict[str, str]:
    """A customer's request carrying the client key ``key``."""
    return {"X-Customer-ID": customer, KEY: key}


def code(response: httpx.Response) -> str:
    """The error code of a refusal."""
    return str(response.json()["error"]["code"])


def test_one_key_for_ten_different_creates_runs_one(
    settings: CommetSettings, runs: Runs, fake: FakeCommet
) -> None:
    """Ten creates with different titles under one key: one 201 then nine 422
    idempotency_key_reused; the endpoint ran once and Commet's balance is 1."""
    with TestClient(fastapi_app(settings, runs)) as client:
        answers = [
            client.post("/tasks", json={"title": f"task {i}"}, headers=headers("k-1"))
            for i in range(10)
        ]
    assert [a.status_code for a in answers] == [201] + [422] * 9
    assert {code(a) for a in answers[1:]} == {"idempotency_key_reused"}
    assert runs.count["tasks"] == 1
    assert fake.quota("user_1", "tasks").current == 1


def test_generations_under_one_key_bill_only_the_first(
    settings: CommetSettings, runs: Runs, fake: FakeCommet
) -> None:
    """Generations of 10, 5,000 and 90,000 tokens under one key: the second and third are
    refused (422, not run); 10 tokens billed for the one that ran."""
    with TestClient(fastapi_app(settings, runs)) as client:
        statuses = [
            client.post(
                "/generate", json={"tokens": n}, headers=headers("g-1", "writer")
            ).status_code
            for n in (10, 5_000, 90_000)
        ]
    assert statuses == [200, 422, 422]
    assert runs.count["generate"] == 1
    assert fake.usage_total("writer", "ai_tokens") == 10


def test_a_repeat_after_success_is_409_and_not_run(
    settings: CommetSettings, runs: Runs, fake: FakeCommet
) -> None:
    """The same request again after it succeeded: 409 idempotency_key_already_used."""
    with TestClient(fastapi_app(settings, runs)) as client:
        first = client.post("/tasks", json={"title": "a"}, headers=headers("k-2"))
        again = client.post("/tasks", json={"title": "a"}, headers=headers("k-2"))
    assert (first.status_code, again.status_code) == (201, 409)
    assert code(again) == "idempotency_key_already_used"
    assert runs.count["tasks"] == 1
    assert fake.quota("user_1", "tasks").current == 1


def test_a_repeat_with_replay_gets_the_stored_answer(
    settings: CommetSettings, runs: Runs, fake: FakeCommet
) -> None:
    """idempotency_replay=True: the repeat gets the first answer, marked as a replay."""
    app = fastapi_app(settings, runs, idempotency_replay=True)
    with TestClient(app) as client:
        first = client.post("/tasks", json={"title": "a"}, headers=headers("k-3"))
        again = client.post("/tasks", json={"title": "a"}, headers=headers("k-3"))
    assert (again.status_code, again.json()) == (first.status_code, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert runs.count["tasks"] == 1
    assert fake.quota("user_1", "tasks").current == 1


def test_a_retry_of_a_failed_request_runs_and_bills_once(
    client: TestClient, runs: Runs, fake: FakeCommet
) -> None:
    """The first attempt fails (500, released); the same request again runs and is billed."""
    failed = client.post("/flaky", json={}, headers=headers("k-4"))
    retried = client.post("/flaky", json={}, headers=headers("k-4"))
    repeat = client.post("/flaky", json={}, headers=headers("k-4"))
    client.__exit__(None, None, None)  # lifespan shutdown: flush
    assert [failed.status_code, retried.status_code, repeat.status_code] == [500, 201, 409]
    assert runs.count["flaky"] == 2
    assert fake.quota("user_1", "tasks").current == 1


def test_the_query_and_the_customer_are_bound(client: TestClient, runs: Runs) -> None:
    """Another query under the key is another request (422); another customer's same key is
    their own key (201)."""
    assert client.post("/tasks?x=1", json={"title": "a"}, headers=headers("k-5")).status_code == 201
    assert client.post("/tasks?x=2", json={"title": "a"}, headers=headers("k-5")).status_code == 422
    assert (
        client.post("/tasks", json={"title": "a"}, headers=headers("k-5", "writer")).status_code
        == 201
    )
    assert runs.count["tasks"] == 2


@pytest.mark.anyio
async def test_a_repeat_while_the_first_runs_is_409_in_progress(
    settings: CommetSettings, runs: Runs
) -> None:
    """The same request while the first is still running: 409 idempotency_in_progress."""
    app = fastapi_app(settings, runs)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        first = asyncio.create_task(client.post("/slow", headers=headers("k-6")))
        await asyncio.wait_for(app.state.entered.wait(), 10)
        during = await client.post("/slow", headers=headers("k-6"))
        app.state.release.set()
        done = await asyncio.wait_for(first, 10)
    assert (done.status_code, during.status_code) == (201, 409)
    assert code(during) == "idempotency_in_progress"
    assert during.headers["Retry-After"] == "1"
    assert runs.count["slow"] == 1


def flask_app(settings: CommetSettings, runs: Runs, **options: Any) -> Flask:
    """The Flask twin of the FastAPI app's tasks and flaky endpoints."""
    app = Flask(__name__)

    @app.post("/tasks")
    @quota_guard("tasks")
    def create() -> Any:
        runs.ran("tasks")
        return jsonify(title=flask_request.get_json()["title"]), 201

    @app.post("/flaky")
    @quota_guard("tasks")
    def flaky() -> Any:
        if runs.ran("flaky") == 1:
            return jsonify(error="try again"), 503
        return jsonify(ok=True), 201

    app.wsgi_app = CommetWSGIMiddleware(  # type: ignore[method-assign]
        app.wsgi_app,
        customer=from_header("X-Customer-ID"),
        settings=settings,
        idempotency_header=KEY,
        **options,
    )
    return app


def flush(app: Flask) -> None:
    """Deliver what the app's middleware queued (WSGI has no lifespan)."""
    app.wsgi_app.close()  # type: ignore[attr-defined]


def test_flask_reused_key_and_replay(
    settings: CommetSettings, runs: Runs, fake: FakeCommet
) -> None:
    """Flask: another body under the key is 422; the same one replays the stored 201."""
    app = flask_app(settings, runs, idempotency_replay=True)
    client = app.test_client()
    first = client.post("/tasks", json={"title": "a"}, headers=headers("f-1"))
    other = client.post("/tasks", json={"title": "b"}, headers=headers("f-1"))
    again = client.post("/tasks", json={"title": "a"}, headers=headers("f-1"))
    flush(app)
    assert [first.status_code, other.status_code, again.status_code] == [201, 422, 201]
    assert other.get_json()["error"]["code"] == "idempotency_key_reused"
    assert again.get_json() == first.get_json() == {"title": "a"}
    assert again.headers["Idempotent-Replayed"] == "true"
    assert runs.count["tasks"] == 1
    assert fake.quota("user_1", "tasks").current == 1


def test_flask_retry_of_a_failed_request_runs_and_bills_once(
    settings: CommetSettings, runs: Runs, fake: FakeCommet
) -> None:
    """Flask: a 503 releases the key; the retry runs (201) and the next repeat is 409."""
    app = flask_app(settings, runs)
    client = app.test_client()
    # Each answer read whole before the next request, as a client does (the key settles then).
    statuses = [
        client.post("/flaky", headers=headers("f-2"), buffered=True).status_code for _ in range(3)
    ]
    flush(app)
    assert statuses == [503, 201, 409]
    assert runs.count["flaky"] == 2
    assert fake.quota("user_1", "tasks").current == 1


def test_workers_sharing_a_store_share_the_keys(
    settings: CommetSettings, runs: Runs, fake: FakeCommet, tmp_path: Path
) -> None:
    """Two apps (two workers) on one SQLite store: a key used on one is used on the other."""
    shared = settings.replace(quota_store=f"sqlite://{tmp_path}/quota.db")
    first_app, second_app = flask_app(shared, runs), flask_app(shared, runs)
    first = first_app.test_client().post("/tasks", json={"title": "a"}, headers=headers("s-1"))
    again = second_app.test_client().post("/tasks", json={"title": "a"}, headers=headers("s-1"))
    flush(first_app)
    flush(second_app)
    assert (first.status_code, again.status_code) == (201, 409)
    assert runs.count["tasks"] == 1
    assert fake.quota("user_1", "tasks").current == 1
