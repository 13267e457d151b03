"""The testing story through the real pytest plugin: users' suites run in pytester."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]


FASTAPI_APP = """
from fastapi import FastAPI
from commet_middleware import CommetMiddleware, metered, quota_guard
from commet_middleware.customers import from_header

app = FastAPI()
app.add_middleware(CommetMiddleware, customer=from_header("X-Customer-ID"))


@app.get("/search")
@metered("api_calls")
async def search() -> dict:
    return {}


@app.post("/numbers")
@quota_guard("whatsapp_numbers")
def add_number() -> dict:
    return {}
"""

INI = "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"


def _write(pytester: pytest.Pytester, **files: str) -> None:
    pytester.makepyfile(**{name: textwrap.dedent(text) for name, text in files.items()})
    pytester.makeini(INI)


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # A subprocess: the plugin is loaded from its entry point, as in a user's project.
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args, timeout=120)


@pytest.mark.server
def test_module_level_app_follows_each_tests_emulator(pytester: pytest.Pytester) -> None:
    """One app built at import serves three tests; each test's emulator gets its own events."""
    _write(
        pytester,
        myapp=FASTAPI_APP,
        test_module_app="""
        from fastapi.testclient import TestClient
        from myapp import app

        client = TestClient(app)  # module level, never entered: no lifespan


        def _search(n):
            for _ in range(n):
                response = client.get("/search", headers={"X-Customer-ID": "user_123"})
                assert response.status_code == 200


        def test_one(commet_emulator):
            _search(1)
            commet_emulator.settle()
            assert commet_emulator.usage_total("user_123", "api_calls") == 1


        def test_two(commet_emulator):
            _search(2)
            commet_emulator.settle()
            assert commet_emulator.usage_total("user_123", "api_calls") == 2


        def test_three_over_http(commet_emulator, fake_commet_url):
            _search(3)
            commet_emulator.settle()
            assert commet_emulator.usage_total("user_123", "api_calls") == 3
            assert commet_emulator.requests  # it came over the served URL
        """,
    )
    result = _run(pytester)
    result.assert_outcomes(passed=3)


def test_async_client_then_settle_then_assert(pytester: pytest.Pytester) -> None:
    """AsyncClient + ASGITransport under pytest-asyncio: await asettle(), then assert usage."""
    _write(
        pytester,
        myapp=FASTAPI_APP,
        test_async="""
        import httpx
        import pytest
        from myapp import app


        @pytest.mark.asyncio
        async def test_usage_recorded(commet_emulator):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                for _ in range(4):
                    response = await client.get("/search", headers={"X-Customer-ID": "user_123"})
                    assert response.status_code == 200
            assert await commet_emulator.asettle()
            assert commet_emulator.usage_total("user_123", "api_calls") == 4
        """,
    )
    result = _run(pytester)
    result.assert_outcomes(passed=1)


def test_fresh_quota_each_test_with_a_session_app_and_reset(pytester: pytest.Pytester) -> None:
    """A session app and a session FakeCommet reset per test: the quota is fresh each test."""
    _write(
        pytester,
        myapp=FASTAPI_APP,
        conftest="""
        import pytest
        from fastapi.testclient import TestClient
        from commet_middleware.testing import FakeCommet
        from myapp import app


        @pytest.fixture(scope="session")
        def session_fake():
            fake = FakeCommet.from_catalogue()
            with fake.install():
                yield fake


        @pytest.fixture(scope="session")
        def client(session_fake):
            with TestClient(app) as client:
                yield client


        @pytest.fixture(autouse=True)
        def fresh(session_fake):
            session_fake.reset()
        """,
        test_quota="""
        import pytest

        HEADERS = {"X-Customer-ID": "user_free"}


        @pytest.mark.parametrize("round", [1, 2, 3])
        def test_three_numbers_then_refused(client, round):
            for _ in range(3):
                assert client.post("/numbers", headers=HEADERS).status_code == 200
            assert client.post("/numbers", headers=HEADERS).status_code == 402
        """,
    )
    result = _run(pytester)
    result.assert_outcomes(passed=3)


def test_strict_mode_fails_a_test_that_left_a_dead_letter(pytester: pytest.Pytester) -> None:
    """With commet_strict, usage Commet refuses for good fails the test; without, it passes."""
    _write(
        pytester,
        myapp=FASTAPI_APP,
        test_strict="""
        import pytest
        from fastapi.testclient import TestClient
        from myapp import app

        client = TestClient(app)


        def _bill_unknown_customer():
            headers = {"X-Customer-ID": "nobody_known"}
            assert client.get("/search", headers=headers).status_code == 200


        @pytest.mark.commet_strict
        def test_strict(commet_emulator):
            _bill_unknown_customer()


        def test_lenient(commet_emulator):
            _bill_unknown_customer()
        """,
    )
    result = _run(pytester)
    # The failing check runs at teardown: the test body passed, its teardown errs.
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*commet strict mode: dead letter*"])


def test_strict_ini_option_applies_to_every_test(pytester: pytest.Pytester) -> None:
    """commet_strict = true in the ini makes every commet_emulator test strict."""
    _write(
        pytester,
        myapp=FASTAPI_APP,
        test_strict_ini="""
        from fastapi.testclient import TestClient
        from myapp import app


        def test_dead_letter(commet_emulator):
            client = TestClient(app)
            assert client.get("/search", headers={"X-Customer-ID": "nobody"}).status_code == 200
        """,
    )
    pytester.makeini(INI + "commet_strict = true\n")
    result = _run(pytester)
    result.assert_outcomes(passed=1, errors=1)


def test_sync_settle_inside_an_event_loop_says_what_to_use() -> None:
    """settle() on an event loop is a RuntimeError pointing at asettle()."""
    import asyncio

    from commet_middleware.testing import FakeCommet

    async def main() -> None:
        FakeCommet().settle()

    with pytest.raises(RuntimeError, match="asettle"):
        asyncio.run(main())


def test_a_test_install_inside_a_session_install_hands_back_to_it() -> None:
    """After an inner install ends, apps deliver to the outer (session) emulator again."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from commet_middleware import CommetMiddleware, metered
    from commet_middleware.customers import from_header
    from commet_middleware.testing import FakeCommet

    app = FastAPI()
    app.add_middleware(CommetMiddleware, customer=from_header("X-Customer-ID"))

    @app.get("/search")
    @metered("api_calls")
    def search() -> dict[str, str]:
        return {}

    client = TestClient(app)
    headers = {"X-Customer-ID": "user_123"}
    outer, inner = FakeCommet.from_catalogue(), FakeCommet.from_catalogue()
    with outer.install(strict=True):
        assert client.get("/search", headers=headers).status_code == 200
        with inner.install(strict=True):
            assert client.get("/search", headers=headers).status_code == 200
        assert client.get("/search", headers=headers).status_code == 200
        assert outer.settle()
    assert inner.usage_total("user_123", "api_calls") == 1
    assert outer.usage_total("user_123", "api_calls") == 2
