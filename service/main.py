"""The application factory: ``create_app(settings)`` -> FastAPI app.

Start-up (lifespan): set torch threads, open the preprocessing pool, list the model store, then
load + warm up the archives in a background thread, so ``/healthz`` answers at once and
``/readyz`` turns 200 only when the default model is warm (one of ``WORKERS`` > 1 processes
instead waits for its store before uvicorn listens: ``service.workers``). Shutdown (after
uvicorn has finished the in-flight requests): drain every batcher, stop the workers, close the
pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trainer import __version__

from .allocator import active_allocator
from .api.deps import API_KEY_SCHEME, ExplainLimiter
from .api.errors import install_error_handlers
from .api.responses import JSONBytesResponse
from .api.routes import explain, health, models, predict, web
from .inference import cpu_has_native_bf16
from .metrics import Metrics, MetricsMiddleware
from .registry import Registry
from .settings import Settings, get_settings
from .workers import Peers

log = logging.getLogger("service")


def _configure_torch(settings: Settings) -> None:
    if torch.get_num_threads() != settings.threads:
        torch.set_num_threads(settings.threads)


def create_app(settings: Settings | None = None, peers: Peers | None = None) -> FastAPI:
    """The app; ``peers``: this process's role when it is one of ``WORKERS`` processes."""
    settings = settings or get_settings()
    metrics = Metrics(peers.pids if peers is not None else None)
    siblings = None
    if peers is not None:
        peers.record_pid()
        # mapped for the process's life: a forward thread that outlives a timed-out drain
        # still writes to it
        siblings = peers.forward_board()
    registry = Registry(settings, metrics, siblings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _configure_torch(settings)
        # each pool thread fixes its torch threads at start (see batching.intra_op_threads)
        app.state.pool = ThreadPoolExecutor(
            settings.pool_threads, thread_name_prefix="preprocess",
            initializer=torch.set_num_threads, initargs=(settings.threads,),
        )  # fmt: skip
        log.info(
            "model store %s, device %s, max batch %d, %d torch threads, %d preprocess threads, "
            "%s allocator",
            settings.model_store, settings.torch_device, settings.max_batch_size,
            settings.threads, settings.pool_threads, active_allocator(),
        )  # fmt: skip
        cpu_bf16 = settings.precision == "bf16" and settings.torch_device == "cpu"
        if cpu_bf16 and not cpu_has_native_bf16():
            log.warning("PRECISION=bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated "
                        "there and usually slower than fp32")  # fmt: skip
        loader = asyncio.create_task(_load_store(registry), name="load-model-store")
        app.state.loader = loader
        if peers is not None:  # listen once warm: a sibling takes the connections till then
            await loader
            if not registry.closing:  # else a signal came during the load: uvicorn stops now
                log.info("service process %d of %d ready to listen", peers.index, peers.count)
        try:
            yield
        finally:
            # uvicorn has answered every in-flight request by now (graceful shutdown)
            registry.closing = True  # a load in progress finishes; no further one starts
            await asyncio.gather(loader, return_exceptions=True)
            await asyncio.to_thread(registry.close)  # drain the queues, stop the workers
            app.state.pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="imgserve",
        version=__version__,
        description="Image classification with dynamic batching, Grad-CAM and a model registry.",
        lifespan=lifespan,
        default_response_class=DefaultJSONResponse,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.peers = peers
    app.state.explain_limiter = ExplainLimiter(settings.max_concurrent_explain)
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(CloseSlowBodyOnTimeout)
    for module in (health, models, predict, explain, web):
        app.include_router(module.router)
    _document_access(app, settings)
    return app


class DefaultJSONResponse(JSONResponse):
    """The default response class: rendered like ``JSONBytesResponse`` (orjson), and a
    ``JSONResponse`` so that ``/openapi.json`` documents each route's ``response_model``
    (FastAPI documents any other default class as ``{"type": "string"}``)."""

    def render(self, content: Any) -> bytes:
        return JSONBytesResponse.render(self, content)  # type: ignore[arg-type]


class CloseSlowBodyOnTimeout:
    """Close the connection after a 504 answered before the request body was complete.

    Reading the body is bounded by ``REQUEST_TIMEOUT_S`` (504); a client still trickling its
    body then would keep the connection for as long as it likes (uvicorn reads and discards
    the rest, and re-arms no idle timer while bytes keep coming). ``Connection: close`` makes
    uvicorn close it right after the 504, which the client has already been sent. Other early
    answers (a 413 for a big upload) keep the connection: see ``service.uploads``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        complete = headers.get(b"content-length", b"0") == b"0" and (
            b"transfer-encoding" not in headers
        )

        async def tracked_receive() -> Message:
            nonlocal complete
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                complete = True
            return message

        async def closing_send(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and message["status"] == 504
                and not complete
            ):
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"connection", b"close")],
                }
            await send(message)

        await self.app(scope, tracked_receive, closing_send)


def _document_access(app: FastAPI, settings: Settings) -> None:
    """Without ``API_KEY`` the inference routes are open: drop their key from the schema."""
    if settings.api_key is not None:
        return
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    if not isinstance(operation, dict) or "security" not in operation:
                        continue
                    kept = [r for r in operation["security"] if API_KEY_SCHEME not in r]
                    if kept:
                        operation["security"] = kept
                    else:
                        del operation["security"]
            schemes = schema.get("components", {}).get("securitySchemes", {})
            schemes.pop(API_KEY_SCHEME, None)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


async def _load_store(registry: Registry) -> None:
    try:
        entries = await asyncio.to_thread(registry.scan)
        await asyncio.to_thread(registry.load_all, entries)
    except Exception:  # the service stays up; /readyz and /models tell what is missing
        log.exception("loading the model store failed")
        registry.scan_error = registry.scan_error or "loading the model store failed; see the log"
