"""The HTTP floor: what a FastAPI app costs per request here before any image work.

``uvicorn bench.floor_app:app --loop uvloop --http httptools`` (the server stack the service
runs on). ``POST /predict`` reads the whole body and answers a small JSON of the service's
shape, with no decode, no model, no thread hop. Its CPU per request, added to the LIMIT's CPU
per image, bounds how close any Python/FastAPI service can come to the LIMIT on the same cores
(the report's T4 ceiling).
"""

from __future__ import annotations

from fastapi import FastAPI, Request

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/predict")
async def predict(request: Request) -> dict[str, object]:
    body = await request.body()
    return {"label": "0", "class_id": 0, "confidence": 1.0, "bytes": len(body)}
