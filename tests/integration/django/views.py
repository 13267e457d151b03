"""The views of the Django test project: sync and async twins, DRF views, streams, a file."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from typing import ClassVar

from django.contrib.auth.models import User
from django.http import (
    FileResponse,
    HttpRequest,
    HttpResponse,
    JsonResponse,
    StreamingHttpResponse,
)
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from commet_middleware import (
    current_customer,
    metered,
    quota_guard,
    quota_release,
    set_customer,
    track,
)
from commet_middleware.django import response_data

# What each view did, for the tests that check a refused view never ran.
RAN: list[str] = []


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def item(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse({"id": pk})


async def aitem(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse({"id": pk})


@metered("api_calls")
def search(request: HttpRequest) -> JsonResponse:
    RAN.append("search")
    return JsonResponse({"q": request.GET.get("q", ""), "customer": current_customer()})


@metered("api_calls")
async def asearch(request: HttpRequest) -> JsonResponse:
    RAN.append("asearch")
    return JsonResponse({"q": request.GET.get("q", ""), "customer": current_customer()})


def _summary(request: HttpRequest) -> JsonResponse:
    words = request.body.decode().split()
    return JsonResponse({"summary": " ".join(words[:3]), "tokens": len(words) * 10})


@metered("ai_tokens", value=lambda r: response_data(r)["tokens"])
def summarize(request: HttpRequest) -> JsonResponse:
    return _summary(request)


@metered("ai_tokens", value=lambda r: response_data(r)["tokens"])
async def asummarize(request: HttpRequest) -> JsonResponse:
    return _summary(request)


@metered("ai_tokens", value=lambda r: r["tokens"])
def summarize_by_index(request: HttpRequest) -> JsonResponse:
    """The issue's mistake: indexing a JsonResponse reads a header (KeyError)."""
    return _summary(request)


@metered("api_calls")
def status(request: HttpRequest, code: int) -> HttpResponse:
    return HttpResponse(str(code), status=code)


@metered("api_calls")
async def astatus(request: HttpRequest, code: int) -> HttpResponse:
    return HttpResponse(str(code), status=code)


@metered("api_calls")
def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("view bug")


@metered("api_calls")
async def aboom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("view bug")


def login_as(request: HttpRequest, customer: str) -> HttpResponse:
    """Unmetered; names the customer with set_customer (what an auth helper does)."""
    set_customer(customer)
    track("api_calls", 2)
    return HttpResponse("ok")


@quota_guard("tasks")
def create_task(request: HttpRequest) -> JsonResponse:
    RAN.append("create_task")
    return JsonResponse({"id": 1}, status=201)


@quota_guard("tasks")
async def acreate_task(request: HttpRequest) -> JsonResponse:
    RAN.append("acreate_task")
    return JsonResponse({"id": 1}, status=201)


@quota_guard("whatsapp_numbers")
def add_number(request: HttpRequest) -> JsonResponse:
    RAN.append("add_number")
    return JsonResponse({"ok": True}, status=201)


@quota_guard("whatsapp_numbers")
async def aadd_number(request: HttpRequest) -> JsonResponse:
    RAN.append("aadd_number")
    return JsonResponse({"ok": True}, status=201)


@quota_release("tasks")
def delete_task(request: HttpRequest, pk: int) -> JsonResponse:
    return JsonResponse({"deleted": pk})


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def rows() -> Iterator[str]:
        for i in range(3):
            yield f"{i}\n"
        # Recorded as the stream ends: billed only when the client got it all.
        track("api_calls", 3)

    return StreamingHttpResponse(rows(), content_type="text/plain")


def astream(request: HttpRequest) -> StreamingHttpResponse:
    async def rows() -> AsyncIterator[str]:
        for i in range(3):
            await asyncio.sleep(0)
            yield f"{i}\n"
        track("api_calls", 3)

    return StreamingHttpResponse(rows(), content_type="text/plain")


@metered("api_calls")
def slow_stream(request: HttpRequest) -> StreamingHttpResponse:
    async def rows() -> AsyncIterator[str]:
        for i in range(50):
            await asyncio.sleep(0.01)
            yield f"{i}\n"

    return StreamingHttpResponse(rows(), content_type="text/plain")


@metered("downloads")
def download(request: HttpRequest) -> FileResponse:
    return FileResponse(io.BytesIO(b"x" * 10_000), filename="report.bin")


# -- DRF ------------------------------------------------------------------------------------

API_TOKENS = {"tok_acme": 7, "tok_free": 8}


class HeaderTokenAuthentication(BaseAuthentication):
    """``Authorization: Token <tok>`` names a user; no database needed (an unsaved User)."""

    def authenticate(self, request: Request) -> tuple[User, None] | None:
        scheme, _, token = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
        pk = API_TOKENS.get(token) if scheme == "Token" else None
        if pk is None:
            return None
        return User(pk=pk, username=f"user{pk}"), None


class SummaryView(APIView):
    authentication_classes: ClassVar[list[type[BaseAuthentication]]] = [HeaderTokenAuthentication]

    @metered("ai_tokens", value=lambda r: r.data["tokens"])
    def post(self, request: Request) -> Response:
        words = str(request.data.get("text", "")).split()
        return Response({"summary": " ".join(words[:3]), "tokens": len(words) * 10})


class TaskView(APIView):
    authentication_classes: ClassVar[list[type[BaseAuthentication]]] = [HeaderTokenAuthentication]

    @quota_guard("whatsapp_numbers")
    def post(self, request: Request) -> Response:
        RAN.append("drf_task")
        return Response({"ok": True}, status=201)
