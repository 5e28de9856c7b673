"""The naive baseline: a FastAPI endpoint that runs the model once per request, as tutorials do.

``BENCH_ARCHIVE=path.mar uvicorn bench.naive_app:app``. One ``async def`` endpoint reads the
upload (a raw image body or a multipart ``file`` part), decodes it with PIL, converts it to the
card's colour mode, applies the card's ``EvalPreset`` and calls the model on a batch of one
under ``torch.no_grad()``, all inside the endpoint, on the event loop: no batching, no worker
pool, no queue. The model comes from the same archive through the trainer's own loader, so
the only difference from the service is how requests reach the model.
"""

from __future__ import annotations

import io
import os

import torch
from fastapi import FastAPI, Request
from PIL import Image, ImageOps
from torchvision.transforms.functional import pil_to_tensor

from trainer.archive import load_model, read_archive
from trainer.data.presets import EvalPreset

archive = read_archive(os.environ["BENCH_ARCHIVE"])
card = archive.card
device = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
model = load_model(archive).to(device).eval()
preset = EvalPreset(card.preprocess_spec)
color_mode = card.preprocess_spec.color_mode
del archive

app = FastAPI()


@app.get("/ping")
async def ping() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/predict")
async def predict(request: Request) -> dict[str, object]:
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        data = await form["file"].read()  # type: ignore[union-attr]
    else:
        data = await request.body()
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert(color_mode)
    tensor = preset(pil_to_tensor(image)).unsqueeze(0).to(device)
    with torch.no_grad():
        probs = torch.softmax(model(tensor) / card.temperature, dim=1)[0]
    confidence, class_id = probs.max(dim=0)
    return {
        "label": card.labels[int(class_id)],
        "class_id": int(class_id),
        "confidence": float(confidence),
    }
