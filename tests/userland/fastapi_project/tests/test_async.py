"""Async tests: httpx AsyncClient + ASGITransport under pytest-asyncio."""

import httpx
import pytest
from myapp import app


@pytest.mark.asyncio
async def test_search_is_billed(commet_emulator):
    """Await asettle() before asserting: the sender runs on the test's loop."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/search?q=a", headers={"X-Customer-ID": "user_123"})
    assert response.status_code == 200
    await commet_emulator.asettle()
    assert commet_emulator.usage_total("user_123", "api_calls") == 1
