"""Train and eval preprocessing presets, built from one ``PreprocessSpec``.

The spec is stored in every model card, and the service builds its eval preset from the card
with this same module, so training, evaluation and serving preprocess images identically.
This module imports only torch/torchvision: it is also packed into archives for TorchServe.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

ResizeMode = Literal["squash", "shorter_side"]
Augment = Literal["none", "standard", "strong"]
AUGMENTS: tuple[str, ...] = ("none", "standard", "strong")

_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


@dataclass(frozen=True, kw_only=True)
class PreprocessSpec:
    """How a decoded image becomes the model's input tensor.

    - ``color_mode``: "L" (1 channel) or "RGB" (3 channels): images are converted to it first.
    - ``resize_mode``: "squash" resizes straight to ``input_size`` (small datasets whose images
      are already the right shape); "shorter_side" resizes the shorter side to ``resize_size``
      and centre-crops ``input_size`` (ImageNet style: 256 -> 224).
    """

    input_size: tuple[int, int]
    color_mode: Literal["L", "RGB"]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: ResizeMode = "squash"
    resize_size: int | None = None
    interpolation: str = "bilinear"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        channels = 1 if self.color_mode == "L" else 3
        if self.color_mode not in ("L", "RGB"):
            raise ValueError(f"color_mode must be 'L' or 'RGB', not {self.color_mode!r}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} values for color_mode {self.color_mode}")
        if self.resize_mode not in ("squash", "shorter_side"):
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be [H, W], not {self.input_size!r}")

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "L" else 3

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        return cls(
            input_size=(int(data["input_size"][0]), int(data["input_size"][1])),
            color_mode=data["color_mode"],
            mean=tuple(float(x) for x in data["mean"]),
            std=tuple(float(x) for x in data["std"]),
            resize_mode=data.get("resize_mode", "squash"),
            resize_size=data.get("resize_size"),
            interpolation=data.get("interpolation", "bilinear"),
            extra=dict(data.get("extra", {})),
        )


def _resize_size(spec: PreprocessSpec) -> list[int]:
    """``Resize``'s size: both sides (squash) or the shorter side (then a centre crop)."""
    if spec.resize_mode == "squash":
        return list(spec.input_size)
    return [spec.resize_size or int(round(min(spec.input_size) / 0.875))]


def _resize_steps(spec: PreprocessSpec) -> list[v2.Transform]:
    resize = v2.Resize(_resize_size(spec), interpolation=_INTERPOLATIONS[spec.interpolation],
                       antialias=True)  # fmt: skip
    if spec.resize_mode == "squash":
        return [resize]
    return [resize, v2.CenterCrop(list(spec.input_size))]


def _eval_kernels(spec: PreprocessSpec) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The kernels ``_resize_steps`` + ``_normalize_steps`` run on a plain image tensor."""
    kernels: list[Callable[[torch.Tensor], torch.Tensor]] = [
        functools.partial(F.resize_image, size=_resize_size(spec),
                          interpolation=_INTERPOLATIONS[spec.interpolation], antialias=True)
    ]  # fmt: skip
    if spec.resize_mode != "squash":
        kernels.append(functools.partial(F.center_crop_image, output_size=list(spec.input_size)))
    kernels.append(functools.partial(F.to_dtype_image, dtype=torch.float32, scale=True))
    kernels.append(functools.partial(F.normalize_image, mean=list(spec.mean), std=list(spec.std)))
    return kernels


def _normalize_steps(spec: PreprocessSpec) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]


class EvalPreset:
    """uint8 image tensor [C, H, W] (C matching ``spec.color_mode``) -> normalised float input."""

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.transforms = v2.Compose([*_resize_steps(spec), *_normalize_steps(spec)])
        self._kernels = _eval_kernels(spec)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``self.transforms(image)``, computed by calling its steps' kernels directly.

        For a plain tensor each v2 transform dispatches to one kernel of
        ``torchvision.transforms.v2.functional``; that dispatch (flattening the input, type
        checks) cost as much Python as the kernels, all of it with the GIL held, on the
        thread that decodes every image the service receives: 93.7 -> 58.8 us of CPU per
        image for ResNet-20's preset (medians of 5 runs, each the best of 5 x 640 calls on the
        64 reference JPEGs, one thread). The tensor is the same (tests/trainer/test_presets.py).
        """
        for kernel in self._kernels:
            image = kernel(image)
        return image

    def batch_tensors(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """``torch.stack([self(image) for image in images])`` for uint8 ``[C, H, W]`` tensors
        on any device: each image is resized (and cropped), then the batch is converted and
        normalised at once (element-wise: the same numbers). On a GPU that is two kernels a
        batch instead of two an image, and one copy of the mean and std to the device."""
        *resize, to_float, normalize = self._kernels
        rows = []
        for image in images:
            for kernel in resize:
                image = kernel(image)
            rows.append(image)
        return normalize(to_float(torch.stack(rows)))

    def batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``torch.stack([self(image) for image in images])`` for decoded ``[H, W, C]`` uint8
        arrays, in one TorchScript call on one tensor holding all their pixels.

        Same kernels, same tensor (tests/trainer/test_presets.py), channels-last memory. Why:
        every kernel called from Python, and every tensor made or freed there, lets go of the
        GIL and must take it back; where the service decodes on its forward threads, the event
        loop and the other forward thread take it meanwhile and the thread waits. Counted with
        a perf probe on ``PyEval_SaveThread``: 30 hand-offs an image for ``self(image)``, 5 a
        batch here. ResNet-20@32 at C=32, ``bench compare``, 6 alternating rounds on the 64
        reference JPEGs: 721 -> 788 img/s (medians), 2.05 -> 1.87 CPU ms a request (with
        tensors as input; arrays then took the LIMIT's 16x2d from 1109 to 1235 img/s).
        """
        arrays = [np.ascontiguousarray(image, dtype=np.uint8) for image in images]
        # one copy into one buffer (np.concatenate let go of the GIL once per array)
        pixels = torch.frombuffer(bytearray().join(arrays), dtype=torch.uint8)
        size = _resize_size(self.spec)
        crop = None if self.spec.resize_mode == "squash" else list(self.spec.input_size)
        return _scripted_batch()(
            pixels, [list(array.shape) for array in arrays], size,
            _INTERPOLATIONS[self.spec.interpolation], crop,
            list(self.spec.mean), list(self.spec.std),
        )  # fmt: skip


def _eval_batch(
    pixels: torch.Tensor,
    shapes: list[list[int]],
    size: list[int],
    interpolation: InterpolationMode,
    crop: list[int] | None,
    mean: list[float],
    std: list[float],
) -> torch.Tensor:
    """``EvalPreset``'s kernels over a batch: resize (and crop) each image, then convert and
    normalise the stacked batch (element-wise, so the same numbers as image by image).

    ``pixels`` holds the ``[H, W, C]`` images (``shapes``) one after the other."""
    rows = []
    offset = 0
    for shape in shapes:
        count = shape[0] * shape[1] * shape[2]
        image = pixels[offset : offset + count].view(shape).permute(2, 0, 1)
        offset += count
        image = F.resize_image(image, size=size, interpolation=interpolation, antialias=True)
        if crop is not None:
            image = F.center_crop_image(image, output_size=crop)
        rows.append(image.permute(1, 2, 0))  # back to HWC: a view, the memory is channels-last
    batch = torch.stack(rows).permute(0, 3, 1, 2)  # [N, C, H, W] in channels-last memory
    batch = F.to_dtype_image(batch, dtype=torch.float32, scale=True)
    return F.normalize_image(batch, mean=mean, std=std)


@functools.cache
def _scripted_batch() -> Callable[..., torch.Tensor]:
    """``_eval_batch`` compiled by TorchScript once per process, on first use."""
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.compile, which needs a compiler toolchain
        # at run time; scripting these kernels needs none and gives the measured gain
        warnings.simplefilter("ignore")
        return torch.jit.script(_eval_batch)


class TrainPreset:
    """Eval preprocessing plus augmentation: none, standard (crop + flip) or strong.

    ``hflip`` is off for datasets where mirroring changes the class (digits).
    """

    def __init__(self, spec: PreprocessSpec, *, augment: Augment = "standard", hflip: bool = True):
        if augment not in AUGMENTS:
            raise ValueError(f"unknown augmentation preset {augment!r}; choose from {AUGMENTS}")
        self.spec = spec
        height, width = spec.input_size
        steps: list[v2.Transform] = [*_resize_steps(spec)]
        if augment in ("standard", "strong"):
            pad = max(2, round(min(height, width) / 8))
            steps.append(v2.RandomCrop([height, width], padding=pad, padding_mode="reflect"))
            if hflip:
                steps.append(v2.RandomHorizontalFlip())
        if augment == "strong":
            steps.append(v2.RandomRotation(15))
            steps.append(v2.ColorJitter(brightness=0.3, contrast=0.3))
        steps.extend(_normalize_steps(spec))
        if augment == "strong":
            steps.append(v2.RandomErasing(p=0.25))
        self.transforms = v2.Compose(steps)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.transforms(image)
