"""A project's own Django test suite (django.test.TestCase) over metered and guarded views.

No ``wsgi.py`` is involved: the middleware is in ``MIDDLEWARE``, so Django's test client runs
it, and the emulator answers for Commet (``FakeCommet.install()`` in ``setUp``).
"""

from __future__ import annotations

import json

from django.test import TestCase, override_settings

from commet_middleware.testing import FakeCommet

from . import views

CUSTOMER = {"X-Customer-ID": "user_123"}
FREE = {"X-Customer-ID": "user_free"}


@override_settings(COMMET={"customer_header": "X-Customer-ID", "api_key": "ck_test_case"})
class MeteredViewsTests(TestCase):
    """Django's TestCase with its ``client`` and ``async_client``."""

    def setUp(self) -> None:
        self.commet = FakeCommet.from_catalogue()
        installation = self.commet.install()
        installation.__enter__()
        self.addCleanup(installation.__exit__, None, None, None)

    def test_decorated_views_bill_through_the_test_client(self) -> None:
        """@metered views bill their customer under Django's own test client."""
        assert self.client.get("/search/", headers=CUSTOMER).status_code == 200
        response = self.client.post(
            "/summarize/", data="a b c", content_type="text/plain", headers=CUSTOMER
        )
        assert json.loads(response.content)["tokens"] == 30
        assert self.commet.settle()
        assert self.commet.usage_total("user_123", "api_calls") == 1
        assert self.commet.usage_total("user_123", "ai_tokens") == 30

    def test_quota_refusal_is_a_response_not_an_error(self) -> None:
        """A refused @quota_guard view answers 402 to the test client instead of raising."""
        statuses = [self.client.post("/numbers/", headers=FREE).status_code for _ in range(4)]
        assert statuses == [201, 201, 201, 402]
        assert views.RAN == ["add_number"] * 3
        assert self.commet.settle()
        assert self.commet.quota("user_free", "whatsapp_numbers").current == 3

    async def test_async_client_and_async_views(self) -> None:
        """Django's async test client runs the middleware in its async mode."""
        response = await self.async_client.get("/asearch/", headers=CUSTOMER)
        assert json.loads(response.content)["customer"] == "user_123"
        statuses = [
            (await self.async_client.post("/anumbers/", headers=FREE)).status_code for _ in range(4)
        ]
        assert statuses == [201, 201, 201, 402]
        assert await self.commet.asettle()
        assert self.commet.usage_total("user_123", "api_calls") == 1
        assert self.commet.quota("user_free", "whatsapp_numbers").current == 3
