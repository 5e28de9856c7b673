"""``DirectRoute`` (the route class of /predict and /topk) answers as FastAPI's own APIRoute does.

Each test builds one app with the same endpoint declared twice, once per route class, and
sends both the same requests: statuses, error bodies and the values the endpoint receives
must be equal. In-process (no model is needed: the endpoint echoes what it was given).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from service.api.deps import ApiKeyDep, ModelQuery, VersionQuery
from service.api.direct import DirectRoute
from service.api.errors import install_error_handlers
from service.api.responses import JSONBytesResponse
from service.settings import Settings

KEY = "inference-key-0123456789"


async def echo(
    request: Request,
    model: ModelQuery = None,
    version: VersionQuery = None,
    k: Annotated[int | None, Query()] = None,
) -> Response:
    return JSONBytesResponse({"model": model, "version": version, "k": k})


def twin_app(api_key: str | None) -> FastAPI:
    app = FastAPI()
    app.state.settings = Settings(api_key=api_key, model_store="/nonexistent")
    install_error_handlers(app)
    for prefix, route_class in (("/fastapi", APIRoute), ("/direct", DirectRoute)):
        router = APIRouter(dependencies=[ApiKeyDep], route_class=route_class)
        router.post(f"{prefix}/echo")(echo)
        app.include_router(router)
    return app


QUERIES = [
    {},
    {"k": "3", "model": "digits", "version": "2"},
    {"k": "abc"},
    {"k": "2.5", "model": "m" * 201},
    {"version": "v" * 201, "unknown": "ignored"},
    {"k": ["1", "2"]},
]


def twins(app: FastAPI, params: dict, headers: dict) -> tuple:
    """The same request to both routes: (status, JSON body, WWW-Authenticate) of each."""

    async def both() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post(f"/{kind}/echo", params=params, headers=headers)
                    for kind in ("fastapi", "direct")]  # fmt: skip

    answers = asyncio.run(both())
    return tuple((a.status_code, a.json(), a.headers.get("www-authenticate")) for a in answers)


@pytest.mark.parametrize("params", QUERIES)
def test_query_values_and_422s_are_fastapis(params: dict):
    solved, direct = twins(twin_app(None), params, {})
    assert direct == solved
    if "abc" in params.values() or "2.5" in params.values():
        assert direct[0] == 422 and isinstance(direct[1]["detail"], str)


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": f"Bearer {KEY}"}, {"authorization": "Bearer wrong-key"},
     {"authorization": f"Basic {KEY}"}, {"authorization": "Bearer"}],
)  # fmt: skip
@pytest.mark.parametrize("params", [{}, {"k": "abc"}])
def test_the_inference_key_is_checked_as_fastapi_does_and_before_the_parameters(
    headers: dict, params: dict
):
    solved, direct = twins(twin_app(KEY), params, headers)
    assert direct == solved
    if headers.get("authorization") != f"Bearer {KEY}":
        assert direct[0] in (401, 403)  # even with a bad k: the key comes first


def test_a_dependency_it_would_not_run_is_refused_when_the_route_is_built():
    async def other() -> None:
        return None

    router = APIRouter(route_class=DirectRoute)
    with pytest.raises(TypeError, match="other"):
        router.post("/x", dependencies=[Depends(other)])(echo)

    async def with_header(request: Request, x_thing: Annotated[str, Header()]) -> Response:
        return Response()

    with pytest.raises(TypeError, match="x_thing"):
        router.post("/y")(with_header)


def test_it_is_documented_as_declared():
    schema = twin_app(KEY).openapi()["paths"]
    solved, direct = schema["/fastapi/echo"]["post"], schema["/direct/echo"]["post"]
    assert direct["parameters"] == solved["parameters"]
    assert [p["name"] for p in direct["parameters"]] == ["model", "version", "k"]
    assert direct["security"] == solved["security"] == [{"ApiKey": []}]
