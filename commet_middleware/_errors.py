"""The errors this toolkit raises: what Commet answered, or why it could not be reached."""

from __future__ import annotations

from typing import Any

__all__ = ["CommetAPIError", "CommetError", "CommetTransportError", "CustomerRequiredError"]


class CommetError(Exception):
    """Base class of every error this toolkit raises about talking to Commet."""

    retryable: bool = False


class CommetAPIError(CommetError):
    """Commet answered with an error status, or a 2xx that is not its answer (``status`` 2xx,
    ``code`` ``invalid_response``). Carries what it said, never the API key.

    ``retryable`` says whether a direct client call retries it (see ``_retry.is_retryable``);
    ``method``, ``path`` and ``base_url`` say where the request went, when the toolkit's client
    raised it (for ``_retry.configuration_hint``).
    """

    def __init__(
        self,
        status: int,
        *,
        type: str | None = None,
        code: str | None = None,
        message: str | None = None,
        param: str | None = None,
        details: Any = None,
        request_id: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        method: str | None = None,
        path: str | None = None,
        base_url: str | None = None,
    ) -> None:
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        self.param = param
        self.details = details
        self.request_id = request_id
        self.retryable = retryable
        self.retry_after = retry_after
        self.method = method
        self.path = path
        self.base_url = base_url
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = [f"Commet answered {self.status}"]
        if self.code:
            parts.append(f"{self.type or 'error'}/{self.code}")
        if self.param:
            parts.append(f"param={self.param}")
        text = " ".join(parts)
        if self.message:
            text += f": {self.message}"
        if self.request_id:
            text += f" (x-request-id {self.request_id})"
        return text

    def __repr__(self) -> str:
        return (
            f"CommetAPIError(status={self.status}, type={self.type!r}, code={self.code!r}, "
            f"param={self.param!r}, request_id={self.request_id!r}, retryable={self.retryable})"
        )


class CommetTransportError(CommetError):
    """Commet could not be reached or did not answer in time; always safe to retry."""

    retryable = True


class CustomerRequiredError(Exception):
    """A billable operation was about to happen and nobody said which customer pays for it."""
