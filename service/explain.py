"""Grad-CAM explanations and the overlay PNG that /explain returns.

Grad-CAM comes from captum's ``LayerGradCam`` on ``Classifier.cam_layer`` (the last convolutional
stage of every architecture the trainer builds). It needs gradients, so it runs outside the
inference-mode batch path, on the explainer's own frozen fp32 copy of the model, one call at a
time per copy (captum hooks the layer for the length of a call and removes the hook in a
``finally``; a lock keeps two calls from seeing each other's hook).
"""

from __future__ import annotations

import copy
import functools
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib
import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from PIL import Image

from trainer.data.presets import PreprocessSpec
from trainer.models import Classifier

from .imaging import convert_mode

Box = tuple[float, float, float, float]  # left, top, right, bottom in image pixels


@dataclass(frozen=True)
class Explanation:
    class_id: int
    confidence: float  # softmax(logits / temperature)[class_id]
    heatmap: np.ndarray  # [H, W] float32 in [0, 1] at the model's input size


class GradCamExplainer:
    """Grad-CAM for one model version, on a private fp32 copy made once (eval mode, frozen)."""

    def __init__(self, model: Classifier, *, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, not {temperature}")
        # Frozen parameters: backward runs only from the logits down to the CAM layer.
        self._model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._layer = self._model.cam_layer
        self._device = next(self._model.parameters()).device
        self._num_classes = self._model.classifier.out_features
        self._lock = threading.Lock()
        self.temperature = float(temperature)

    @property
    def model(self) -> Classifier:
        """The private copy that is explained (read-only use: tests check it holds no hooks)."""
        return self._model

    def explain(self, input: torch.Tensor, target: int | None = None) -> Explanation:
        """Explain one preprocessed input ``[C, H, W]`` for ``target`` (default: top-1 class)."""
        if input.ndim != 3:
            raise ValueError(f"expected one image [C, H, W], got shape {tuple(input.shape)}")
        if target is not None and not 0 <= target < self._num_classes:
            raise ValueError(f"target {target} is not a class id (0..{self._num_classes - 1})")
        with self._lock, torch.inference_mode(False), torch.enable_grad():
            batch = input.detach().to(self._device, torch.float32).clone().unsqueeze(0)
            logits: list[torch.Tensor] = []
            cam = LayerGradCam(_score_of(self._model, target, logits), self._layer).attribute(
                batch, relu_attributions=True
            )  # [1, 1, h, w] at the CAM layer's resolution
            cam = LayerAttribution.interpolate(cam, tuple(batch.shape[-2:]), "bilinear")
            heatmap = normalise_heatmap(cam[0, 0].detach().float().cpu().numpy())
        scores = logits[0][0].float().cpu()
        class_id = int(scores.argmax()) if target is None else target
        confidence = float(torch.softmax(scores / self.temperature, dim=0)[class_id])
        return Explanation(class_id=class_id, confidence=confidence, heatmap=heatmap)


def _score_of(
    model: Classifier, target: int | None, sink: list[torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function captum differentiates: the target logit (the top-1 when ``target`` is None).

    One forward gives both the gradient and the logits (kept in ``sink``) that pick the top-1
    class and its confidence.
    """

    def score(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch)  # [N, K]
        sink.append(logits.detach())
        chosen = logits.argmax(dim=1) if target is None else torch.full_like(logits[:, 0], target)
        return logits.gather(1, chosen.long().unsqueeze(1)).squeeze(1)  # [N]

    return score


def normalise_heatmap(cam: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1] as float32; a constant (or non-finite) map becomes zeros."""
    cam = np.nan_to_num(cam.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(cam.min()), float(cam.max())
    if not high - low > 1e-12 * max(1.0, abs(high)):
        return np.zeros_like(cam)
    return np.clip((cam - low) / (high - low), 0.0, 1.0)


def crop_box(spec: PreprocessSpec, image_size: tuple[int, int]) -> Box:
    """The part of an image ``(width, height)`` that the preset shows the model.

    "squash" shows all of it; "shorter_side" resizes then centre-crops, so the heatmap covers only
    the central crop (mirrors torchvision's Resize(int) + CenterCrop arithmetic).
    """
    width, height = image_size
    if spec.resize_mode == "squash":
        return (0.0, 0.0, float(width), float(height))
    shorter = spec.resize_size or int(round(min(spec.input_size) / 0.875))
    if width <= height:
        resized_w, resized_h = shorter, int(shorter * height / width)
    else:
        resized_w, resized_h = int(shorter * width / height), shorter
    crop_h, crop_w = min(spec.input_size[0], resized_h), min(spec.input_size[1], resized_w)
    top = int(round((resized_h - crop_h) / 2.0))
    left = int(round((resized_w - crop_w) / 2.0))
    sx, sy = width / resized_w, height / resized_h
    return (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)


@functools.cache
def _colormap_lut(name: str) -> np.ndarray:
    """256 RGB uint8 entries of a matplotlib colormap (no pyplot)."""
    return matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]


def _rgb_display(image: Image.Image, max_side: int) -> Image.Image:
    """The image as RGB (converted as the model's input is) with its long side <= ``max_side``."""
    factor = max(image.size) // max_side
    if factor >= 2 and image.mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        image = image.reduce(factor)  # a cheap box downscale first (large photos)
    image = convert_mode(image, "RGB")
    scale = max_side / max(image.size)
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return image


def overlay_png(
    image: Image.Image,
    heatmap: np.ndarray,
    *,
    max_side: int = 1024,
    box: Box | None = None,
    alpha: float = 0.45,
    colormap: str = "jet",
) -> bytes:
    """PNG bytes: ``image`` (long side capped at ``max_side``) with ``heatmap`` blended over it.

    ``box`` is the region of the original image that the heatmap covers (see ``crop_box``);
    by default the whole image. Outside it the image is shown as is.
    """
    original_size = image.size
    base = _rgb_display(image, max_side)
    scale_x, scale_y = base.width / original_size[0], base.height / original_size[1]
    left, top, right, bottom = box or (0.0, 0.0, *map(float, original_size))
    region = (
        max(0, round(left * scale_x)),
        max(0, round(top * scale_y)),
        min(base.width, max(round(right * scale_x), round(left * scale_x) + 1)),
        min(base.height, max(round(bottom * scale_y), round(top * scale_y) + 1)),
    )
    size = (region[2] - region[0], region[3] - region[1])
    heat = Image.fromarray(np.asarray(heatmap, dtype=np.float32))
    heat = np.clip(np.asarray(heat.resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)
    colours = _colormap_lut(colormap)[np.rint(heat * 255).astype(np.uint8)].astype(np.float32)
    pixels = np.array(base, dtype=np.float32)
    window = pixels[region[1] : region[3], region[0] : region[2]]
    window[...] = (1.0 - alpha) * window + alpha * colours
    out = io.BytesIO()
    Image.fromarray(np.rint(pixels).astype(np.uint8)).save(out, "PNG", compress_level=1)
    return out.getvalue()
