"""Dependencies shared by the routers (``Annotated`` aliases) and the access checks.

- ``SettingsDep``, ``RegistryDep``, ``MetricsDep``, ``PoolDep``: the app's singletons;
  ``PeersDep``: the sibling processes (``WORKERS`` > 1), or None;
- ``ModelEntryDep``: the ready model version chosen by ``?model=&version=`` (404 unknown,
  503 loading/failed/unloading);
- ``ExplainLimiterDep``: ``async with limiter.slot():`` admits at most
  ``MAX_CONCURRENT_EXPLAIN`` explanations at once (excess -> 503 with ``Retry-After``);
- ``ApiKeyDep`` (inference, only when ``API_KEY`` is set) and ``AdminDep`` (management):
  ``Authorization: Bearer <key>``, constant-time comparison, 401 without, 403 wrong key;
  management is refused (403) when no ``ADMIN_API_KEY`` is configured.

Every dependency is ``async def``: FastAPI runs plain ``def`` dependencies in its thread pool,
which would cost each request several thread hops (and bursts of requests up to 40 threads)
for what are attribute reads.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from ..errors import ServiceError, Unavailable
from ..metrics import Metrics
from ..registry import ModelEntry, Registry
from ..settings import Settings
from ..workers import Peers

T = TypeVar("T")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_pool(request: Request) -> ThreadPoolExecutor:
    return request.app.state.pool


async def get_peers(request: Request) -> Peers | None:
    return request.app.state.peers


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PoolDep = Annotated[ThreadPoolExecutor, Depends(get_pool)]
PeersDep = Annotated[Peers | None, Depends(get_peers)]

ModelQuery = Annotated[
    str | None, Query(max_length=200, description="model name (default: the default model)")
]
VersionQuery = Annotated[
    str | None,
    Query(max_length=200, description="model version (default: the model's default version)"),
]


async def get_model_entry(
    registry: RegistryDep, model: ModelQuery = None, version: VersionQuery = None
):
    """The ready entry for ``?model=&version=`` (``version`` alone: the default model's)."""
    return registry.resolve(model, version)


ModelEntryDep = Annotated[ModelEntry, Depends(get_model_entry)]


async def run_in_pool(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    """Run blocking work (decoding, Grad-CAM) off the event loop."""
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


class ExplainLimiter:
    """At most ``limit`` explanations at once; the excess is refused at once (503)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.active >= self.limit:
            raise Unavailable(
                f"too many explanations in progress (MAX_CONCURRENT_EXPLAIN={self.limit}); "
                "retry shortly",
                headers={"Retry-After": "1"},
            )
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


async def get_explain_limiter(request: Request) -> ExplainLimiter:
    return request.app.state.explain_limiter


ExplainLimiterDep = Annotated[ExplainLimiter, Depends(get_explain_limiter)]

# Two schemes, so the OpenAPI schema can tell them apart: ``ApiKey`` (inference, only when
# API_KEY is set; ``service.main`` drops it from the schema otherwise) and ``AdminKey``.
API_KEY_SCHEME, ADMIN_KEY_SCHEME = "ApiKey", "AdminKey"
_api_bearer = HTTPBearer(
    auto_error=False, scheme_name=API_KEY_SCHEME,
    description="Authorization: Bearer <API_KEY> (only when API_KEY is set)",
)  # fmt: skip
_admin_bearer = HTTPBearer(
    auto_error=False,
    scheme_name=ADMIN_KEY_SCHEME,
    description="Authorization: Bearer <ADMIN_API_KEY>",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_api_bearer)]
AdminBearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_bearer)]


def _check_key(credentials: HTTPAuthorizationCredentials | None, key: SecretStr, what: str) -> None:
    if credentials is None or not credentials.credentials:
        raise ServiceError(
            f"{what} needs an 'Authorization: Bearer <key>' header",
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    given = credentials.credentials.encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, key.get_secret_value().encode("utf-8")):
        raise ServiceError(f"the key is not valid for {what}", status_code=403)


async def require_api_key(settings: SettingsDep, credentials: BearerDep) -> None:
    """Inference access: open unless ``API_KEY`` is set."""
    if settings.api_key is not None:
        _check_key(credentials, settings.api_key, "inference")


async def authorize_inference(request: Request) -> None:
    """``require_api_key`` for a ``DirectRoute``, which solves no dependencies."""
    await require_api_key(request.app.state.settings, await _api_bearer(request))


async def require_admin(settings: SettingsDep, credentials: AdminBearerDep) -> None:
    """Management access: ``ADMIN_API_KEY`` required; refused when none is configured."""
    if settings.admin_api_key is None:
        raise ServiceError(
            "model management is disabled: no ADMIN_API_KEY is configured", status_code=403
        )
    _check_key(credentials, settings.admin_api_key, "model management")


ApiKeyDep = Depends(require_api_key)
AdminDep = Depends(require_admin)
