"""``EvalPreset`` calls its transforms' kernels directly: the answer must be the Compose's."""

from __future__ import annotations

import pytest
import torch

from trainer.data.presets import EvalPreset, PreprocessSpec

SPECS = [
    PreprocessSpec(input_size=(32, 32), color_mode="L", mean=(0.3,), std=(0.4,)),
    PreprocessSpec(
        input_size=(224, 224),
        color_mode="RGB",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        resize_mode="shorter_side",
    ),  # fmt: skip
    PreprocessSpec(
        input_size=(48, 64),
        color_mode="RGB",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.5, 1.0),
        resize_mode="shorter_side",
        resize_size=80,
        interpolation="bicubic",
    ),  # fmt: skip
    PreprocessSpec(
        input_size=(40, 24), color_mode="L", mean=(0.1,), std=(2.0,), interpolation="nearest"
    ),  # fmt: skip
]


def images(channels: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(channels)
    shapes = [(8, 8), (480, 640), (333, 211), (32, 32), (1, 97)]
    out = []
    for height, width in shapes:
        image = torch.randint(0, 256, (channels, height, width), dtype=torch.uint8,
                              generator=generator)  # fmt: skip
        out.append(image)
        # the service's decoder hands over channels-last views (HWC memory)
        out.append(image.permute(1, 2, 0).contiguous().permute(2, 0, 1))
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.resize_mode}-{s.interpolation}")
def test_the_direct_kernels_give_the_composes_tensor(spec: PreprocessSpec) -> None:
    preset = EvalPreset(spec)
    for image in images(spec.channels):
        want = preset.transforms(image)
        got = preset(image)
        assert got.dtype == want.dtype == torch.float32
        assert got.shape == want.shape == (spec.channels, *spec.input_size)
        assert torch.equal(got, want)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.resize_mode}-{s.interpolation}")
def test_a_batch_gets_the_tensors_of_its_images_one_by_one(spec: PreprocessSpec) -> None:
    preset = EvalPreset(spec)
    tensors = images(spec.channels)
    want = torch.stack([preset(image) for image in tensors])
    batch = [image.permute(1, 2, 0).numpy() for image in tensors]  # [H, W, C], as decoded
    for got in (preset.batch(batch), preset.batch(batch[3:])):  # the second: other shapes
        assert got.dtype == torch.float32
        assert got.shape == (len(got), spec.channels, *spec.input_size)
        assert torch.equal(got, want[len(want) - len(got) :])
    assert torch.equal(preset.batch(batch[:1]), want[:1])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.resize_mode}-{s.interpolation}")
def test_a_batch_of_tensors_gets_the_tensors_of_its_images_one_by_one(
    spec: PreprocessSpec,
) -> None:
    """``batch_tensors`` (the GPU path: normalised once per batch) changes no number."""
    preset = EvalPreset(spec)
    tensors = images(spec.channels)
    want = torch.stack([preset(image) for image in tensors])
    got = preset.batch_tensors(tensors)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(preset.batch_tensors(tensors[:1]), want[:1])
