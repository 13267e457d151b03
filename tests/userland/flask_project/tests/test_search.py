"""Flask's test client against the module-level app and a factory app."""

from myflaskapp import app, create_app

HEADERS = {"X-Customer-ID": "user_123"}


def test_search_is_billed(commet_emulator):
    """One search is one api_calls event."""
    client = app.test_client()
    assert client.get("/search", headers=HEADERS).status_code == 200
    commet_emulator.settle()
    assert commet_emulator.usage_total("user_123", "api_calls") == 1


def test_each_test_has_its_own_emulator(commet_emulator):
    """The module-level app follows the new test's emulator."""
    client = app.test_client()
    for _ in range(2):
        assert client.get("/search", headers=HEADERS).status_code == 200
    commet_emulator.settle()
    assert commet_emulator.usage_total("user_123", "api_calls") == 2


def test_factory_app(commet_emulator):
    """An app built inside the test is pointed at the emulator too."""
    client = create_app().test_client()
    assert client.get("/search", headers=HEADERS).status_code == 200
    commet_emulator.settle()
    assert commet_emulator.usage_total("user_123", "api_calls") == 1
