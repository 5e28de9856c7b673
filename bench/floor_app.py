"""The HTTP floor: what a FastAPI app costs per request here before any image work.

``uvicorn bench.floor_app:app --loop uvloop --http httptools`` (the server stack the service
runs on).

- ``POST /predict`` reads the whole body and answers a small JSON of the service's shape,
  with no decode, no model, no thread hop. Its CPU per request, added to the LIMIT's CPU per
  image, bounds how close any Python/FastAPI service can come to the LIMIT on the same cores
  (the report's T4 ceiling).
- ``POST /predict-job?ms=X`` does the same around X ms of CPU work handed to a worker thread,
  as the service hands an image to a forward thread. With X the in-process single-image
  latency, its C=1 p50 is the least a FastAPI service that computes off the event loop can
  answer in (the report's T6 bound). The work releases the GIL, as decode and forward do:
  the thread hashes a 64 KiB buffer until X ms have passed. A request that stays quiet for
  a few milliseconds costs more than back-to-back ones (idle cores, cold caches), which the
  plain ``/predict`` floor at C=1 does not show.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Query, Request

BUFFER = bytes(64 * 1024)  # hashlib releases the GIL for buffers over 2 KiB


def cpu_job(seconds: float) -> int:
    """Hash ``BUFFER`` until ``seconds`` of wall time have passed; returns the rounds done."""
    end = time.perf_counter() + seconds
    rounds = 0
    while time.perf_counter() < end:
        hashlib.sha256(BUFFER)
        rounds += 1
    return rounds


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    with ThreadPoolExecutor(1, thread_name_prefix="job") as pool:
        app.state.pool = pool
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/ping")
async def ping() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/predict")
async def predict(request: Request) -> dict[str, object]:
    body = await request.body()
    return {"label": "0", "class_id": 0, "confidence": 1.0, "bytes": len(body)}


@app.post("/predict-job")
async def predict_job(request: Request, ms: float = Query(ge=0, le=10_000)) -> dict[str, object]:
    body = await request.body()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(request.app.state.pool, cpu_job, ms / 1000)
    return {"label": "0", "class_id": 0, "confidence": 1.0, "bytes": len(body)}
