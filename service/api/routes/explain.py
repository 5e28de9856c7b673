"""POST /explain: the Grad-CAM of one image, as a PNG overlay or (Accept: application/json) a map.

The path: resolve the model version and ``target`` -> stream the body (one image) -> take an
explanation slot (``MAX_CONCURRENT_EXPLAIN``; none free -> 503 at once) -> decode, preprocess and
explain in a thread, never on the event loop and never in the /predict preprocessing pool.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from starlette.responses import Response

from ...deadline import before
from ...errors import InvalidRequest, RequestTimeout, ServiceError, Unavailable
from ...explain import crop_box, overlay_png
from ...imaging import ImageRejected, decode_image
from ...registry import ModelEntry
from ...schemas import ExplainResponse
from ...uploads import read_image_parts
from ..deps import ApiKeyDep, ExplainLimiterDep, ModelEntryDep, SettingsDep
from ..responses import JSONBytesResponse
from .predict import ERRORS, IMAGE_BODY

router = APIRouter(tags=["explain"], dependencies=[ApiKeyDep])

TargetQuery = Annotated[
    str | None,
    Query(max_length=200, description="class to explain: a label, else a class id (default top-1)"),
]
RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {
        "description": "PNG overlay by default; JSON with `Accept: application/json`",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/ExplainResponse"}},
        },
    },
}


def wants_json(accept: str | None) -> bool:
    """``Accept: application/json`` alone or first in the list selects JSON."""
    if not accept:
        return False
    first = accept.split(",", 1)[0].split(";", 1)[0].strip().lower()
    return first == "application/json"


def resolve_target(labels: list[str], target: str | None) -> int | None:
    """A label first, else a class id; anything else is a 422."""
    if target is None:
        return None
    if target in labels:
        return labels.index(target)
    text = target.strip()
    if text.isascii() and text.isdigit() and int(text) < len(labels):
        return int(text)
    shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
    raise InvalidRequest(
        f"unknown target {target!r}: not a label ({shown}) nor a class id (0..{len(labels) - 1})"
    )


def _explain(entry: ModelEntry, data: bytes, target: int | None, as_json: bool) -> Response:
    """Blocking work, in a thread: decode, preprocess (as /predict does), Grad-CAM, encode."""
    card, preprocessor = entry.card, entry.preprocessor
    if card is None or preprocessor is None:  # unloaded since the request was admitted
        raise Unavailable(f"{entry.label} is not loaded; retry")
    try:
        tensor = preprocessor(data)  # exactly what /predict feeds the model
        image = None if as_json else decode_image(data, max_pixels=preprocessor.max_pixels)
    except ImageRejected as exc:
        raise ServiceError(f"the image: {exc.detail}", status_code=exc.status_code) from None
    except MemoryError:
        raise ServiceError("the image is too large to decode", status_code=413) from None
    result = entry.explainer().explain(tensor, target)
    label = card.labels[result.class_id]
    if image is None:
        body = {
            "model": entry.name,
            "version": entry.version,
            "label": label,
            "class_id": result.class_id,
            "confidence": result.confidence,
            "heatmap": result.heatmap,  # float32 [H, W]: orjson writes nested lists
        }
        return JSONBytesResponse(body)
    box = crop_box(preprocessor.spec, image.size)
    png = overlay_png(image, result.heatmap, box=box)
    headers = {
        "X-Model": f"{entry.name}",
        "X-Model-Version": f"{entry.version}",
        "X-Explained-Label": json.dumps(label)[1:-1],  # ASCII-only, no control characters
        "X-Explained-Class-Id": str(result.class_id),
        "X-Confidence": repr(result.confidence),
    }
    return Response(png, media_type="image/png", headers=headers)


@router.post(
    "/explain",
    responses=RESPONSES,
    openapi_extra=IMAGE_BODY,
    response_model=ExplainResponse,  # documents the JSON answer (handlers return a Response)
    response_class=Response,
    summary="Grad-CAM of one image (PNG overlay, or JSON heatmap with Accept: application/json)",
)
async def explain(
    request: Request,
    entry: ModelEntryDep,
    settings: SettingsDep,
    limiter: ExplainLimiterDep,
    target: TargetQuery = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    class_id = resolve_target(entry.card.labels if entry.card else [], target)
    try:
        parts = await before(
            time.monotonic() + settings.request_timeout_s,
            read_image_parts(
                request,
                max_bytes=settings.max_upload_bytes,
                max_images=settings.max_images_per_request,
            ),
        )
    except asyncio.TimeoutError:
        raise RequestTimeout("reading the request took longer than REQUEST_TIMEOUT_S") from None
    if len(parts) != 1:
        raise InvalidRequest(f"/explain takes exactly one image, got {len(parts)}")
    async with limiter.slot():
        return await asyncio.to_thread(_explain, entry, parts[0], class_id, wants_json(accept))
