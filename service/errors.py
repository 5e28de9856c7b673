"""Errors that become an HTTP answer ``{"detail": "..."}`` (see ``service.api.errors``)."""

from __future__ import annotations


class ServiceError(Exception):
    """An error with an HTTP status, a human-readable detail and optional headers."""

    status_code = 500

    def __init__(
        self, detail: str, *, status_code: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    status_code = 422


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Unavailable(ServiceError):
    """503: the model exists but cannot answer now (loading, failed, unloading, busy)."""

    status_code = 503


class QueueFull(Unavailable):
    """503 with an integer ``Retry-After``: the batch queue has no room for the request."""

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, int(retry_after)))})
        self.retry_after = max(1, int(retry_after))


class RequestTimeout(ServiceError):
    """504: the request waited longer than ``REQUEST_TIMEOUT_S``."""

    status_code = 504


class InferenceFailed(ServiceError):
    """500: the server failed while computing a batch (never a client's fault)."""

    status_code = 500


class ModelDraining(Unavailable):
    """503: the version is being unloaded; a request without a pinned version may retry."""
