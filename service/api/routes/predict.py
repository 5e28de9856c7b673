"""POST /predict and POST /topk: images in, class probabilities out, through the batcher.

The path of one request: resolve the model version -> stream the body into image parts (byte
cap) -> decode + preprocess every image in the worker pool (errors name the image's index) ->
queue the tensors on the version's batcher and await their rows -> JSON. Small-input models on
a CPU, and a lone image that finds the batcher idle, skip the pool: the forward thread decodes
the images it computes (``_predict``).
Everything has one deadline, ``REQUEST_TIMEOUT_S`` after the request arrived (504 past it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from ...batching import Prediction
from ...deadline import before
from ...errors import ModelDraining, RequestTimeout, ServiceError, Unavailable
from ...gpu_preprocess import GpuPreprocessor
from ...imaging import ImageRejected, UndecodedJpeg
from ...inference import Preprocessor
from ...registry import ModelEntry, Registry
from ...schemas import ErrorResponse, PredictResponse, TopKResponse, ValidationErrorResponse
from ...settings import Settings
from ...uploads import UploadRejected, read_image_parts
from ..deps import ApiKeyDep, ModelQuery, VersionQuery
from ..direct import DirectRoute
from ..responses import JSONBytesResponse

log = logging.getLogger("service.api")
# DirectRoute: documented as declared, called without FastAPI's dependency solving (hot path)
router = APIRouter(tags=["inference"], dependencies=[ApiKeyDep], route_class=DirectRoute)

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in {
        400: "an image that cannot be decoded",
        401: "API_KEY is set and no key was sent",
        403: "wrong API key",
        404: "unknown model or version",
        413: "upload, image count or pixel count over the limits",
        415: "not a supported image",
        500: "the server failed while computing the batch",
        503: "model not ready, or queue full (Retry-After)",
        504: "the request waited longer than REQUEST_TIMEOUT_S",
    }.items()
}
ERRORS[422] = {"model": ValidationErrorResponse, "description": "invalid parameters or no image"}
RETRIES_ON_UNLOAD = 3


def _timed_preprocess(preprocessor: Preprocessor, histogram: Any, data: bytes) -> torch.Tensor:
    start = time.perf_counter()
    tensor = preprocessor(data)
    histogram.observe(time.perf_counter() - start)
    return tensor


def _decode_numbered(
    preprocessor: Preprocessor, count: int, numbered: tuple[int, bytes]
) -> np.ndarray:
    """``preprocessor.decode_array`` on a forward thread: a failure names the image's index.

    The batcher preprocesses the batch's decoded images together (``Preprocessor.batch``) and
    observes the preprocessing histogram."""
    index, data = numbered
    try:
        return preprocessor.decode_array(data)
    except Exception as exc:
        raise _image_error(index, count, exc) from None


def _check_numbered(
    gpu_preprocessor: GpuPreprocessor, count: int, numbered: tuple[int, bytes]
) -> UndecodedJpeg | np.ndarray:
    """``gpu_preprocessor.check`` on a forward thread: a failure names the image's index, and
    so does a decoding failure found later in the batch (``GpuPreprocessor.batch``)."""
    index, data = numbered
    try:
        return gpu_preprocessor.check(data, name=_where(index, count))
    except Exception as exc:
        raise _image_error(index, count, exc) from None


async def _preprocess_all(
    entry: ModelEntry, parts: Sequence[bytes], pool: ThreadPoolExecutor
) -> list[torch.Tensor]:
    """Decode + preprocess every image in the pool; the first bad image fails the request."""
    loop = asyncio.get_running_loop()
    preprocessor, histogram = entry.preprocessor, entry.preprocess_histogram
    if preprocessor is None:
        raise Unavailable(f"{entry.label} is not loaded; retry")
    jobs = [
        loop.run_in_executor(pool, _timed_preprocess, preprocessor, histogram, data)
        for data in parts
    ]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    tensors = []
    for index, result in enumerate(results):
        if isinstance(result, BaseException):
            raise _image_error(index, len(results), result)
        tensors.append(result)
    return tensors


def _where(index: int, count: int) -> str:
    return f"image {index}" if count > 1 else "the image"


def _image_error(index: int, count: int, exc: BaseException) -> ServiceError:
    where = _where(index, count)
    if isinstance(exc, ImageRejected):
        return ServiceError(f"{where}: {exc.detail}", status_code=exc.status_code)
    if isinstance(exc, MemoryError):
        return ServiceError(f"{where} is too large to decode", status_code=413)
    log.error("preprocessing failed unexpectedly on %s", where, exc_info=exc)
    return ServiceError(f"{where} could not be processed as an image", status_code=400)


async def _infer(
    request: Request, model: str | None, version: str | None, *, k: int | None = None
) -> tuple[ModelEntry, list[Prediction], int | None]:
    state = request.app.state
    settings: Settings = state.settings
    registry: Registry = state.registry
    arrived = time.monotonic()
    deadline = arrived + settings.request_timeout_s
    entry = registry.resolve(model, version)
    k = _check_k(entry, k)
    try:
        try:
            parts = await before(
                deadline,
                read_image_parts(request, max_bytes=settings.max_upload_bytes,
                                 max_images=settings.max_images_per_request),
            )  # fmt: skip
        except asyncio.TimeoutError:
            raise RequestTimeout("reading the request took longer than REQUEST_TIMEOUT_S") from None
        for attempt in range(RETRIES_ON_UNLOAD):
            try:
                predictions = await _predict(entry, parts, state.pool, deadline)
                break
            except ModelDraining:
                # the version was unloaded meanwhile (hot swap): go to the one now chosen
                if attempt == RETRIES_ON_UNLOAD - 1:
                    raise
                entry = registry.resolve(model, version)
                k = _check_k(entry, k)
    except (ServiceError, ImageRejected, UploadRejected) as exc:
        _count_rejection(entry, exc)
        raise
    metrics = state.metrics
    mv = (entry.name, entry.version)
    metrics.images.labels(*mv).inc(len(predictions))
    metrics.request_duration.labels(*mv).observe(time.monotonic() - arrived)
    return entry, predictions, k


async def _predict(
    entry: ModelEntry, parts: Sequence[bytes], pool: ThreadPoolExecutor, deadline: float
) -> list[Prediction]:
    """Decode the images and get their predictions from the version's batcher.

    The images go to the batcher undecoded, and the forward thread that takes them decodes
    them just before its forward (one thread hand-off each way), when the version decodes on
    its forward threads (``DECODE_ON_FORWARD_THREAD``: small inputs on a CPU) or when a lone
    image finds the batcher idle. Otherwise they are decoded in the pool, announced to the
    batcher meanwhile, so that a forward about to start with a partial batch waits briefly
    for them.
    """
    batcher, preprocessor = entry.batcher, entry.preprocessor
    if batcher is None or preprocessor is None:
        raise Unavailable(f"{entry.label} is not loaded; retry")
    if entry.gpu_preprocessor is not None:  # DECODE_ON_GPU: headers on the forward thread
        prepare = functools.partial(_check_numbered, entry.gpu_preprocessor, len(parts))
        return await batcher.infer(list(enumerate(parts)), deadline, prepare=prepare)
    if entry.decode_on_forward_thread or (len(parts) == 1 and batcher.idle()):
        prepare = functools.partial(_decode_numbered, preprocessor, len(parts))
        return await batcher.infer(list(enumerate(parts)), deadline, prepare=prepare)
    announced = batcher.announce(len(parts))
    try:
        try:
            tensors = await before(deadline, _preprocess_all(entry, parts, pool))
        except asyncio.TimeoutError:
            raise RequestTimeout(
                "decoding the request took longer than REQUEST_TIMEOUT_S"
            ) from None
        return await batcher.infer(tensors, deadline, announced)
    finally:
        batcher.withdraw(announced)  # a no-op once they were submitted


def _check_k(entry: ModelEntry, k: int | None) -> int | None:
    if k is None or entry.card is None:
        return k
    classes = entry.card.num_classes
    if not 1 <= k <= classes:
        raise ServiceError(f"k must be between 1 and {classes} (the number of classes), not {k}",
                           status_code=422)  # fmt: skip
    return k


def _count_rejection(entry: ModelEntry, exc: Exception) -> None:
    status = int(getattr(exc, "status_code", 500))
    if status in (503, 504, 500):  # counted where they happen (batcher) or not client input
        return
    reason = {413: "too_large", 415: "unsupported_media_type", 422: "invalid"}.get(
        status, "bad_image"
    )
    metrics = entry.metrics
    if metrics is not None and entry.name and entry.version:
        metrics.rejected.labels(entry.name, entry.version, reason).inc()


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="Top-1 class of each image",
)
async def predict(request: Request, model: ModelQuery = None, version: VersionQuery = None):
    entry, predictions, _ = await _infer(request, model, version)
    labels = entry.card.labels if entry.card else []
    body = {
        "model": entry.name,
        "version": entry.version,
        "predictions": [
            {"label": labels[p.class_id], "class_id": p.class_id, "confidence": p.confidence}
            for p in predictions
        ],
    }
    return JSONBytesResponse(body)


@router.post(
    "/topk",
    response_model=TopKResponse,
    responses=ERRORS,
    openapi_extra=IMAGE_BODY,
    summary="The k most likely classes of each image",
)
async def topk(
    request: Request,
    model: ModelQuery = None,
    version: VersionQuery = None,
    k: Annotated[
        int | None, Query(description="1 to the number of classes; default min(5, classes)")
    ] = None,
) -> Response:
    entry, predictions, k = await _infer(request, model, version, k=k)
    labels = entry.card.labels if entry.card else []
    count = k if k is not None else min(5, len(labels))
    answers = []
    for prediction in predictions:
        probs = prediction.probs
        order = np.argsort(-probs, kind="stable")[:count]
        answers.append(
            {
                "topk": [
                    {"label": labels[i], "class_id": int(i), "confidence": float(probs[i])}
                    for i in order
                ]
            }
        )
    return JSONBytesResponse(
        {"model": entry.name, "version": entry.version, "predictions": answers}
    )
