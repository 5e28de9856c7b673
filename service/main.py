"""The application factory: ``create_app(settings)`` -> FastAPI app.

Start-up (lifespan): set torch threads, open the preprocessing pool, list the model store, then
load + warm up the archives in a background thread, so ``/healthz`` answers at once and
``/readyz`` turns 200 only when the default model is warm. Shutdown (after uvicorn has finished
the in-flight requests): drain every batcher, stop the workers, close the pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from trainer import __version__

from .api.deps import ExplainLimiter
from .api.errors import install_error_handlers
from .api.responses import JSONBytesResponse
from .api.routes import explain, health, models, predict, web
from .metrics import Metrics, MetricsMiddleware
from .registry import Registry
from .settings import Settings, get_settings

log = logging.getLogger("service")


def _configure_torch(settings: Settings) -> None:
    if torch.get_num_threads() != settings.threads:
        torch.set_num_threads(settings.threads)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()
    registry = Registry(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _configure_torch(settings)
        app.state.pool = ThreadPoolExecutor(settings.pool_threads, thread_name_prefix="preprocess")
        log.info(
            "model store %s, device %s, max batch %d, %d torch threads, %d preprocess threads",
            settings.model_store, settings.torch_device, settings.max_batch_size,
            settings.threads, settings.pool_threads,
        )  # fmt: skip
        loader = asyncio.create_task(_load_store(registry), name="load-model-store")
        app.state.loader = loader
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
        default_response_class=JSONBytesResponse,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.explain_limiter = ExplainLimiter(settings.max_concurrent_explain)
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )  # fmt: skip
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    for module in (health, models, predict, explain, web):
        app.include_router(module.router)
    return app


async def _load_store(registry: Registry) -> None:
    try:
        entries = await asyncio.to_thread(registry.scan)
        await asyncio.to_thread(registry.load_all, entries)
    except Exception:  # the service stays up; /readyz and /models tell what is missing
        log.exception("loading the model store failed")
        registry.scan_error = registry.scan_error or "loading the model store failed; see the log"
