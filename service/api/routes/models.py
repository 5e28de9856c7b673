"""Model listing (open) and management (``ADMIN_API_KEY``, ``Authorization: Bearer <key>``).

- ``GET /models``: every loaded, loading or failed version (``detail`` says why when not ready);
- ``GET /models/{name}``: ``{"name", "default_version", "versions": [...]}``;
- ``POST /models`` ``{"file": "<name>.mar"}``: register an archive already in MODEL_STORE
  (a bare file name: paths, traversal and URLs -> 422); answers once it is warmed up;
- ``DELETE /models/{name}/{version}``: stop routing to it, drain its queue, unload it;
- ``PUT /models/{name}/default`` ``{"version": "2"}``: the version answering by default.

Management bodies are parsed after the key check, so a request without the key learns nothing.
With ``WORKERS`` > 1 a management call is answered once every service process has applied it.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ValidationError
from starlette.convertors import Convertor, register_url_convertor
from starlette.responses import Response

from ...errors import Conflict, InvalidRequest, NotFound
from ...schemas import (
    DefaultVersionRequest,
    ErrorResponse,
    ModelInfo,
    ModelsResponse,
    ModelVersions,
    RegisterRequest,
    UnloadResponse,
)
from ...workers import Peers
from ..deps import AdminDep, PeersDep, RegistryDep
from ..errors import validation_detail
from ..responses import JSONBytesResponse

router = APIRouter(tags=["models"])


class _VersionConvertor(Convertor[str]):
    """A version in a path: digits only (as on model cards), so ``/models/{name}/default``
    is never read as version "default" of ``DELETE /models/{name}/{version}``."""

    regex = "[0-9]{1,9}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return str(value)


register_url_convertor("version", _VersionConvertor())
MAX_JSON_BYTES = 16 * 1024
B = TypeVar("B", bound=BaseModel)


def _errors(*pairs: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": why} for status, why in pairs}


ADMIN_ERRORS = _errors(
    (401, "no key sent"), (403, "wrong key, or management disabled (no ADMIN_API_KEY)"),
    (404, "unknown model, version or file"), (409, "conflicts with the registry's state"),
    (422, "invalid body"),
)  # fmt: skip


def _json_body(model: type[B]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


async def _parse(request: Request, model: type[B]) -> B:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise InvalidRequest(f"the JSON body is larger than {MAX_JSON_BYTES} bytes")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body must be a JSON object") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors()
        ]
        raise InvalidRequest(validation_detail(errors) if errors else "invalid body") from None


def _from_sibling(request: Request, peers: Peers | None) -> bool:
    """A call another service process applied and passes on (``WORKERS`` > 1)."""
    return peers is not None and peers.is_forwarded(request.headers)


async def _in_every_process(
    request: Request, peers: Peers | None, body: BaseModel | None = None
) -> None:
    """With ``WORKERS`` > 1: apply the call this process has just applied in its siblings too
    (``service.workers``), unless it came from one."""
    if peers is None or _from_sibling(request, peers):
        return
    data = body.model_dump_json().encode() if body is not None else None
    await peers.forward(
        request.method, request.url.path, data, request.headers.get("authorization")
    )


@router.get("/models", response_model=ModelsResponse, summary="Every model version")
async def list_models(registry: RegistryDep) -> Response:
    return JSONBytesResponse(registry.models_payload())


@router.get(
    "/models/{name}",
    response_model=ModelVersions,
    responses=_errors((404, "unknown model")),
    summary="The versions of one model",
)
async def get_model(name: str, registry: RegistryDep) -> Response:
    return JSONBytesResponse(registry.model_payload(name))


@router.post(
    "/models",
    status_code=201,
    response_model=ModelInfo,
    responses=ADMIN_ERRORS,
    dependencies=[AdminDep],
    openapi_extra=_json_body(RegisterRequest),
    summary="Register an archive already in MODEL_STORE (admin)",
)
async def register_model(request: Request, registry: RegistryDep, peers: PeersDep) -> Response:
    body = await _parse(request, RegisterRequest)
    try:
        entry = await registry.register(body.file)
    except Conflict:
        # Passed on by a sibling and already here: two clients registered the same file through
        # two processes at once. Each process has it, which is what both asked for.
        registered = registry.registered(body.file) if _from_sibling(request, peers) else None
        if registered is None:
            raise
        entry = registered
    if entry.status != "ready":
        raise InvalidRequest(f"{body.file} could not be loaded: {entry.error}")
    await _in_every_process(request, peers, body)
    return JSONBytesResponse(entry.info(default=registry.is_default(entry)), status_code=201)


@router.delete(
    "/models/{name}/{version:version}",
    response_model=UnloadResponse,
    responses=ADMIN_ERRORS,
    dependencies=[AdminDep],
    summary="Unload a version after its queued requests finish (admin)",
)
async def unload_model(
    request: Request,
    name: str,
    version: Annotated[str, PathParam(pattern=r"^[0-9]{1,9}$", description="a version number")],
    registry: RegistryDep,
    peers: PeersDep,
) -> Response:
    try:
        await registry.unregister(name, version)
    except NotFound:
        if not _from_sibling(request, peers):
            raise  # passed on by a sibling and gone already: another client unloaded it here
    await _in_every_process(request, peers)
    return JSONBytesResponse({"name": name, "version": version, "status": "unloaded"})


@router.put(
    "/models/{name}/default",
    response_model=ModelVersions,
    responses=ADMIN_ERRORS,
    dependencies=[AdminDep],
    openapi_extra=_json_body(DefaultVersionRequest),
    summary="Set the version that answers by default (admin)",
)
async def set_default_version(
    name: str, request: Request, registry: RegistryDep, peers: PeersDep
) -> Response:
    body = await _parse(request, DefaultVersionRequest)
    registry.set_default_version(name, body.version)
    await _in_every_process(request, peers, body)
    return JSONBytesResponse(registry.model_payload(name))
