"""TorchServe 0.12 handler packed into every archive as ``handler.py``.

It runs only inside TorchServe's Python worker, never in our service, and imports nothing from
the ``trainer`` package: the archive carries ``mar_code/`` (copies of ``trainer/models/*.py``
and ``trainer/data/presets.py``), and TorchServe puts the extracted archive on ``sys.path``.

What it does, from ``model-card.json`` alone:

- initialise: verify the weights' SHA-256 against the card, rebuild the network with
  ``build_model(arch, num_classes, in_chans, small_input)``, load the state dict with
  ``torch.load(weights_only=True)`` (strict), move it to the worker's GPU when there is one,
  and run one warm-up forward;
- handle a batch (TorchServe's server-side batching hands over a list of requests): decode each
  request's image bytes with PIL (EXIF orientation, first frame, the card's colour mode),
  preprocess with the card's ``EvalPreset``, run ONE forward for the whole batch, divide the
  logits by the card's temperature, softmax, and answer each request with
  ``{"label", "class_id", "confidence", "topk": [{"label", "class_id", "confidence"}, ...]}``
  (the field names of our service's ``/predict`` and ``/topk``).

The image is the raw request body (``curl --data-binary @x.png -H 'Content-Type: image/png'``)
or a multipart form field (``-F data=@x.png``; any field name). A request whose body is not a
decodable image gets its own 400 answer (``{"detail": "..."}``); the other requests of the same
batch are still answered. ``topk`` holds ``min(5, num_classes)`` entries; a multipart form field
``k`` changes that (TorchServe 0.12 does not forward query strings of ``/predictions`` calls to
the handler, so ``?k=3`` has no effect).

TorchServe's model loader calls the module-level ``handle(data, context)``: first with
``data=None`` to initialise, then with each batch.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import time
from typing import Any

logger = logging.getLogger(__name__)

CARD_NAME = "model-card.json"
DEFAULT_TOPK = 5
_IMAGE_KEYS = ("data", "body", "file", "image")


class RequestError(ValueError):
    """A problem with one request's input (answered with 400 for that request only)."""


def _read_card(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, CARD_NAME)
    try:
        with open(path, encoding="utf-8") as fh:
            card = json.load(fh)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot read {CARD_NAME} from the archive: {exc}") from exc
    if not isinstance(card, dict):
        raise RuntimeError(f"{CARD_NAME} is not a JSON object")
    missing = [
        k for k in ("arch", "num_classes", "labels", "in_chans", "preprocess") if k not in card
    ]
    if missing:
        raise RuntimeError(f"{CARD_NAME} lacks {', '.join(missing)}")
    if len(card["labels"]) != int(card["num_classes"]):
        raise RuntimeError(
            f"{CARD_NAME} has {len(card['labels'])} labels for {card['num_classes']} classes"
        )
    return card


def _read_weights(model_dir: str, card: dict[str, Any]) -> bytes:
    name = os.path.basename(str(card.get("weights_file") or "weights.pt"))
    path = os.path.join(model_dir, name)
    try:
        with open(path, "rb") as fh:
            weights = fh.read()
    except OSError as exc:
        raise RuntimeError(f"cannot read the weights {name}: {exc}") from exc
    digest = hashlib.sha256(weights).hexdigest()
    expected = str(card.get("weights_sha256") or "")
    if digest != expected:
        raise RuntimeError(
            f"weights SHA-256 {digest[:12]}... does not match the card's {expected[:12]}..."
        )
    return weights


def _image_bytes(row: Any) -> bytes:
    """The image payload of one TorchServe request (raw body, form field or base64 string)."""
    value: Any = None
    if isinstance(row, dict):
        for key in _IMAGE_KEYS:
            if row.get(key) is not None:
                value = row[key]
                break
        else:  # a form upload under another field name
            value = next(
                (v for k, v in row.items() if k != "k" and isinstance(v, (bytes, bytearray))),
                None,
            )
    else:
        value = row
    if isinstance(value, str):  # text/* bodies arrive decoded: accept base64
        try:
            value = base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise RequestError("text body is not base64-encoded image data") from exc
    if not isinstance(value, (bytes, bytearray)) or not value:
        raise RequestError("request has no image bytes (send the image as the request body)")
    return bytes(value)


def _topk_param(row: Any, num_classes: int) -> int:
    default = min(DEFAULT_TOPK, num_classes)
    raw = row.get("k") if isinstance(row, dict) else None
    if raw is None:
        return default
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8", "replace")
    try:
        k = int(raw)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"k must be an integer, not {raw!r}") from exc
    if not 1 <= k <= num_classes:
        raise RequestError(f"k must be between 1 and {num_classes}, not {k}")
    return k


class CardHandler:
    """Rebuilds the model from the archive's card and serves batches of images."""

    def __init__(self) -> None:
        self.initialized = False
        self.card: dict[str, Any] = {}
        self.labels: list[str] = []
        self.model: Any = None
        self.preset: Any = None
        self.device: Any = None
        self.color_mode = "RGB"
        self.temperature = 1.0

    # -- lifecycle -------------------------------------------------------------------------
    def initialize(self, context: Any) -> None:
        import torch
        from mar_code.models import build_model  # registers every architecture
        from mar_code.presets import EvalPreset, PreprocessSpec

        started = time.perf_counter()
        props = context.system_properties
        model_dir = props.get("model_dir") or os.getcwd()
        if props.get("limit_max_image_pixels") is False:  # TorchServe's opt-out of PIL's cap
            from PIL import Image

            Image.MAX_IMAGE_PIXELS = None
        card = _read_card(model_dir)
        weights = _read_weights(model_dir, card)
        spec = PreprocessSpec.from_dict(card["preprocess"])

        gpu_id = props.get("gpu_id")
        if torch.cuda.is_available() and gpu_id is not None:
            self.device = torch.device(f"cuda:{int(gpu_id)}")
        else:
            self.device = torch.device("cpu")

        model = build_model(
            card["arch"],
            num_classes=int(card["num_classes"]),
            in_chans=int(card["in_chans"]),
            small_input=bool(card.get("small_input", False)),
        )
        state_dict = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict, strict=True)
        self.model = model.to(self.device).eval()

        self.card = card
        self.labels = [str(label) for label in card["labels"]]
        self.preset = EvalPreset(spec)
        self.color_mode = spec.color_mode
        self.temperature = float(card.get("temperature") or 1.0)

        with torch.inference_mode():  # warm-up: the first request should not pay for it
            self.model(torch.zeros(1, spec.channels, *spec.input_size, device=self.device))
        self.initialized = True
        logger.info(
            "loaded %s v%s (%s, %d classes) on %s in %.2fs",
            card.get("name"), card.get("version"), card["arch"], len(self.labels),
            self.device, time.perf_counter() - started,
        )  # fmt: skip

    # -- per request -----------------------------------------------------------------------
    def decode(self, payload: bytes) -> Any:
        """Image bytes -> uint8 tensor [C, H, W] in the card's colour mode."""
        from PIL import Image, ImageOps, UnidentifiedImageError
        from torchvision.transforms.functional import pil_to_tensor

        try:
            with Image.open(io.BytesIO(payload)) as image:
                image.seek(0)  # first frame of animations / multi-page files
                image.load()
                image = ImageOps.exif_transpose(image)
                image = image.convert(self.color_mode)
        except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise RequestError(f"not a decodable image: {exc}") from exc
        except MemoryError:
            raise
        except Exception as exc:  # truncated/corrupt files raise many types inside PIL
            raise RequestError(f"image could not be decoded: {type(exc).__name__}: {exc}") from exc
        return pil_to_tensor(image)

    def handle(self, data: Any, context: Any) -> list[dict[str, Any]] | None:
        if not self.initialized:
            self.initialize(context)
        if data is None:
            return None
        import torch

        answers: list[dict[str, Any] | None] = [None] * len(data)
        inputs, ks, slots = [], [], []
        for idx, row in enumerate(data):
            try:
                k = _topk_param(row, len(self.labels))
                inputs.append(self.preset(self.decode(_image_bytes(row))))
            except RequestError as exc:
                answers[idx] = {"detail": str(exc)}
                context.set_response_status(400, str(exc), idx)
                continue
            ks.append(k)
            slots.append(idx)

        if inputs:
            batch = torch.stack(inputs).to(self.device, non_blocking=True)
            with torch.inference_mode():
                logits = self.model(batch).float()
                probs = torch.softmax(logits / self.temperature, dim=1).cpu()
            top_probs, top_ids = probs.topk(max(ks), dim=1)
            for row_probs, row_ids, k, idx in zip(
                top_probs.tolist(), top_ids.tolist(), ks, slots, strict=True
            ):
                topk = [
                    {"label": self.labels[c], "class_id": int(c), "confidence": float(p)}
                    for p, c in zip(row_probs[:k], row_ids[:k], strict=True)
                ]
                answers[idx] = {**topk[0], "topk": topk}
        return answers  # type: ignore[return-value]


_service = CardHandler()


def handle(data: Any, context: Any) -> list[dict[str, Any]] | None:
    """TorchServe's entry point: ``handle(None, ctx)`` initialises, then one call per batch."""
    return _service.handle(data, context)
