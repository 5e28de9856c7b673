"""Exception handlers: every error answer is ``{"detail": "<human-readable string>"}``.

- ``ServiceError`` (ours), S1's ``ImageRejected``/``UploadRejected``: their status and detail;
- FastAPI's request validation errors: 422 with a string ``detail`` (the list goes in ``errors``);
- Starlette's HTTP errors (404 unknown route, 405 wrong method, ...): their status, string detail;
- anything else is a server fault: 500 with a generic detail (the traceback goes to the log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from ..errors import ServiceError
from ..imaging import ImageRejected
from ..uploads import UploadRejected
from .responses import error_response

log = logging.getLogger("service.api")


def _field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    errors = []
    for error in exc.errors():
        errors.append(
            {
                "loc": [str(part) for part in error.get("loc", ())],
                "msg": str(error.get("msg", "")),
                "type": str(error.get("type", "")),
            }
        )
    return errors


def validation_detail(errors: list[dict[str, Any]]) -> str:
    parts = []
    for error in errors[:3]:
        where = ".".join(part for part in error["loc"] if part != "body") or "request"
        parts.append(f"{where}: {error['msg']}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more if parts else "invalid request"


class ThrottledWarnings:
    """Log a server-side error answer at most once per ``interval_s`` for each status.

    Why: under overload the service answers hundreds of 503s (queue full) or 504s a second;
    a log line each would flood the operator's logs and spend the event loop's time on
    logging just when it has none to spare. The first answer of a status is logged at once,
    the next one after ``interval_s`` says how many were left out meanwhile; the exact counts
    are in ``/metrics`` (``rejected_total``). Event-loop only: no lock.
    """

    def __init__(
        self, logger: logging.Logger, interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.logger, self.interval_s, self.clock = logger, interval_s, clock
        self._last: dict[int, float] = {}  # status -> when it was last logged
        self._left_out: dict[int, int] = {}  # status -> answers not logged since

    def warn(self, status: int, detail: str) -> None:
        now = self.clock()
        last = self._last.get(status)
        if last is not None and now - last < self.interval_s:
            self._left_out[status] = self._left_out.get(status, 0) + 1
            return
        left_out = self._left_out.pop(status, 0)
        self._last[status] = now
        if left_out and last is not None:  # answers were left out only after one was logged
            self.logger.warning(
                "%d: %s (and %d more %d answers in the last %.0f s)",
                status, detail, left_out, status, now - last,
            )  # fmt: skip
        else:
            self.logger.warning("%d: %s", status, detail)


def service_error_handler(warnings: ThrottledWarnings) -> Callable[..., Any]:
    async def service_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServiceError)
        if exc.status_code >= 500:
            warnings.warn(exc.status_code, exc.detail)
        return error_response(exc.status_code, exc.detail, exc.headers or None)

    return service_error


async def client_input_error(_request: Request, exc: Exception) -> Response:
    status = int(getattr(exc, "status_code", 400))
    detail = str(getattr(exc, "detail", "") or exc) or "bad request"
    return error_response(status, detail)


async def request_validation_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = _field_errors(exc)
    return error_response(422, validation_detail(errors), errors=errors)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        detail = f"method {request.method} is not allowed on {request.url.path}"
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": allowed_methods(request)}
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=headers)
    return error_response(exc.status_code, str(detail), headers)


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> str:
    """Every method some route accepts on this path (Starlette names only the first route's)."""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in METHODS
        if any(r.matches({**request.scope, "method": method})[0] == Match.FULL for r in routes)
    )


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, service_error_handler(ThrottledWarnings(log)))
    app.add_exception_handler(ImageRejected, client_input_error)
    app.add_exception_handler(UploadRejected, client_input_error)
    app.add_exception_handler(RequestValidationError, request_validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
