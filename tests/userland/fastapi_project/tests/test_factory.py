"""An app factory per test, with its lifespan (startup, then a flush at shutdown)."""

import pytest
from fastapi.testclient import TestClient
from myapp import create_app


@pytest.fixture
def client(commet_emulator):
    with TestClient(create_app()) as client:
        yield client


def test_factory_app_is_billed(client, commet_emulator):
    """The app built inside the test delivers to this test's emulator."""
    for _ in range(3):
        assert client.get("/search?q=c", headers={"X-Customer-ID": "user_123"}).status_code == 200
    commet_emulator.settle()
    assert commet_emulator.usage_total("user_123", "api_calls") == 3
