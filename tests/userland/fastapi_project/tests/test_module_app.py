"""The module-level app, driven by TestClient, billed to each test's emulator."""

from fastapi.testclient import TestClient
from myapp import app

client = TestClient(app)
HEADERS = {"X-Customer-ID": "user_123"}


def test_search_is_billed(commet_emulator):
    """One search is one api_calls event."""
    assert client.get("/search?q=a", headers=HEADERS).status_code == 200
    commet_emulator.settle()
    assert commet_emulator.usage_total("user_123", "api_calls") == 1


def test_next_test_starts_from_zero(commet_emulator):
    """A new test, a new emulator: the module-level app follows it."""
    for _ in range(2):
        assert client.get("/search?q=b", headers=HEADERS).status_code == 200
    commet_emulator.settle()
    assert commet_emulator.usage_total("user_123", "api_calls") == 2


def test_quota_is_fresh_in_every_test(commet_emulator):
    """user_free may add three numbers; the fourth is refused with 402."""
    headers = {"X-Customer-ID": "user_free"}
    for _ in range(3):
        assert client.post("/numbers", headers=headers).status_code == 200
    assert client.post("/numbers", headers=headers).status_code == 402


def test_quota_is_fresh_again(commet_emulator):
    """The same three numbers again: nothing carried over from the test before."""
    headers = {"X-Customer-ID": "user_free"}
    for _ in range(3):
        assert client.post("/numbers", headers=headers).status_code == 200
