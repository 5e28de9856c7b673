"""The JSON response class of the service: orjson, numpy-aware, no re-validation."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class JSONBytesResponse(Response):
    """``application/json`` rendered with orjson (fast; numpy arrays and scalars allowed)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def error_response(
    status_code: int, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONBytesResponse:
    """The contract's error body: ``{"detail": "<string>"}`` (plus optional extra keys)."""
    return JSONBytesResponse({"detail": detail, **extra}, status_code=status_code, headers=headers)
