"""GET /healthz (alive), GET /readyz (the default model is warmed up; with ``WORKERS`` > 1 in
every process), GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from ...metrics import CONTENT_TYPE_LATEST
from ...schemas import ErrorResponse, HealthResponse, ReadyResponse
from ..deps import MetricsDep, PeersDep, RegistryDep
from ..responses import JSONBytesResponse, error_response

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="200 while the process is alive")
async def healthz() -> Response:
    return JSONBytesResponse({"status": "ok"})


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ErrorResponse, "description": "not ready; detail says why"}},
    summary="200 once the default model is loaded and warmed up",
)
async def readyz(registry: RegistryDep, peers: PeersDep) -> Response:
    ready, why = registry.readiness()
    if not ready:
        return error_response(503, why)
    waiting = peers.not_listening() if peers is not None else []
    if waiting:  # WORKERS > 1: ready when every process takes its share of the connections
        which = ", ".join(str(index) for index in waiting)
        return error_response(503, f"service process {which} of {peers.count}: still loading")
    entry = registry.resolve()
    return JSONBytesResponse(
        {"status": "ready", "model": entry.name, "version": entry.version, "detail": why}
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    summary="Prometheus metrics",
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
