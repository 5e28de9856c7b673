"""DECODE_ON_GPU: the batch decode + device preset, run here on the CPU device (torchvision's
libjpeg-turbo decoder in place of nvjpeg; tests/service/test_cuda.py runs it on a GPU)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from service.batching import ItemsRejected
from service.gpu_preprocess import GpuPreprocessor
from service.imaging import ImageRejected, UndecodedJpeg, check_or_decode
from service.inference import Preprocessor
from trainer.archive import ModelCard
from trainer.data.presets import PreprocessSpec

from .conftest import ServiceProcess, digit_png, launch
from .test_api import files


def _card(size: int, color_mode: str, resize_mode: str) -> ModelCard:
    channels = 1 if color_mode == "L" else 3
    spec = PreprocessSpec(
        input_size=(size, size), color_mode=color_mode, mean=(0.5,) * channels,
        std=(0.25,) * channels, resize_mode=resize_mode,
    )  # fmt: skip
    return ModelCard(
        name="m", version="1", arch="resnet18", num_classes=10,
        labels=[str(i) for i in range(10)], in_chans=channels, small_input=size <= 64,
        grayscale_policy="none" if channels == 3 else "native", preprocess=spec.to_dict(),
    )  # fmt: skip


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photos() -> dict[str, bytes]:
    """Real photos as a client sends them: JPEGs large and small, EXIF-rotated, grayscale,
    CMYK and progressive, and a PNG with alpha (427x640 sample photos, scaled)."""
    china, flower = (Image.fromarray(p) for p in load_sample_images().images)
    small = flower.resize((192, 128))
    rotated = Image.Exif()
    rotated[0x0112] = 6  # stored sideways: the decoder turns it
    return {
        "large": _encoded(china, "JPEG", quality=90),
        "small": _encoded(small, "JPEG"),
        "rotated": _encoded(small, "JPEG", exif=rotated),
        "gray": _encoded(small.convert("L"), "JPEG"),
        "progressive": _encoded(small, "JPEG", progressive=True),
        "cmyk": _encoded(small.convert("CMYK"), "JPEG"),
        "png_alpha": _encoded(small.convert("RGBA"), "PNG"),
    }


def bogus_huffman_table(jpeg: bytes) -> bytes:
    """``jpeg`` with 200 codes of length 1 in its first Huffman table (at most 2 fit): the
    headers and lengths are whole, libjpeg refuses it ("Bogus Huffman table definition")."""
    corrupt = bytearray(jpeg)
    corrupt[jpeg.index(b"\xff\xc4") + 5] = 200
    return bytes(corrupt)


def _patched(jpeg: bytes, marker: bytes, offset: int, value: int) -> bytes:
    corrupt = bytearray(jpeg)
    corrupt[jpeg.index(marker) + offset] = value
    return bytes(corrupt)


@pytest.mark.parametrize(("size", "color_mode", "resize_mode"),
                         [(224, "RGB", "shorter_side"), (32, "L", "squash")])  # fmt: skip
def test_a_batch_decoded_on_the_device_matches_the_cpu_path(
    size: int, color_mode: str, resize_mode: str
) -> None:
    preprocessor = Preprocessor(_card(size, color_mode, resize_mode), max_pixels=10_000_000)
    device_path = GpuPreprocessor(preprocessor, "cpu")
    bodies = photos()
    items = [device_path.check(body) for body in bodies.values()]
    kinds = dict(zip(bodies, (type(i).__name__ for i in items), strict=True))
    # JPEGs in L or RGB wait for the device's decoder; CMYK and PNG are decoded on the CPU
    assert {k for k, v in kinds.items() if v == "UndecodedJpeg"} == {
        "large", "small", "rotated", "gray", "progressive",
    }  # fmt: skip
    got = device_path.batch(items)
    want = torch.stack([preprocessor(body) for body in bodies.values()])
    assert got.shape == want.shape == (len(bodies), len(color_mode), size, size)
    for name, row, expected in zip(bodies, got, want, strict=True):
        difference = (row - expected).abs().mean().item()
        if size == 32:
            # the CPU decodes these at 1/2 or 1/8 scale first (Image.draft: at least twice the
            # 32 px target), libjpeg straight to gray; the device at full scale
            assert difference < 0.05, (name, difference)
        else:
            assert difference < 1e-6, (name, difference)  # same decoder, same kernels


def test_a_corrupt_jpeg_fails_alone_naming_its_image_and_the_others_get_their_rows() -> None:
    preprocessor = Preprocessor(_card(64, "RGB", "shorter_side"), max_pixels=10_000_000)
    device_path = GpuPreprocessor(preprocessor, "cpu")
    bodies = photos()
    good = bodies["small"]
    corrupt = bogus_huffman_table(good)  # only decoding finds it out
    items = [device_path.check(good), device_path.check(corrupt, name="image 1")]
    items.append(device_path.check(bodies["rotated"]))
    assert isinstance(items[1], UndecodedJpeg) and items[1].name == "image 1"
    with pytest.raises(ItemsRejected) as caught:
        device_path.batch(items)
    error = caught.value.errors[1]
    assert list(caught.value.errors) == [1] and isinstance(error, ImageRejected)
    assert error.status_code == 400 and error.detail.startswith("image 1: corrupt JPEG")
    want = torch.stack([preprocessor(good), preprocessor(bodies["rotated"])])
    assert torch.allclose(caught.value.batch, want, atol=1e-6)


def test_the_header_checks_of_a_cpu_decode_still_apply() -> None:
    """Only decoding moves to the device: the signature, emptiness and pixel cap are judged
    on the CPU before, with the same status codes."""
    preprocessor = Preprocessor(_card(64, "RGB", "shorter_side"), max_pixels=1000)
    device_path = GpuPreprocessor(preprocessor, "cpu")
    big = _encoded(Image.new("RGB", (40, 30)), "JPEG")  # 1,200 pixels over a 1,000 cap
    for body, status in ((big, 413), (b"", 422), (b"%PDF-1.4 not an image", 415)):
        with pytest.raises(ImageRejected) as caught:
            device_path.check(body)
        assert caught.value.status_code == status
    as_array = check_or_decode(
        _encoded(Image.new("RGB", (20, 10), (9, 8, 7)), "PNG"), max_pixels=1000, color_mode="RGB"
    )
    assert isinstance(as_array, np.ndarray) and as_array.shape == (10, 20, 3)


@pytest.mark.parametrize(
    ("marker", "offset", "value"),
    [(b"\xff\xdb", 4, 0x03), (b"\xff\xc0", 11, 0x00), (b"\xff\xc0", 11, 0x55)],
    ids=["quantisation-table-undefined", "sampling-factor-0", "sampling-factor-5"],
)
def test_a_jpeg_with_a_broken_frame_is_judged_by_the_cpu_decoder(
    marker: bytes, offset: int, value: int
) -> None:
    """Files whose headers libjpeg refuses, and which nvjpeg decoded anyway (a quantisation
    table never defined: seen on an H200) or may: decoded on the CPU, which answers 400."""
    preprocessor = Preprocessor(_card(64, "RGB", "shorter_side"), max_pixels=10_000_000)
    device_path = GpuPreprocessor(preprocessor, "cpu")
    with pytest.raises(ImageRejected) as caught:
        device_path.check(_patched(photos()["small"], marker, offset, value))
    assert caught.value.status_code == 400 and caught.value.detail.startswith("corrupt JPEG")


@pytest.mark.parametrize("cut", [300, 0.5, -10], ids=["header", "half", "no-end-marker"])
def test_a_truncated_jpeg_is_judged_by_the_cpu_decoder(cut: float) -> None:
    """nvjpeg may decode a truncated JPEG without complaint: a file with no end-of-image
    marker after its scan is decoded on the CPU instead, which answers 400 as it always has."""
    body = photos()["rotated"]  # with an EXIF block, whose thumbnail area comes first
    cut_at = int(len(body) * cut) if isinstance(cut, float) else cut
    preprocessor = Preprocessor(_card(64, "RGB", "shorter_side"), max_pixels=10_000_000)
    device_path = GpuPreprocessor(preprocessor, "cpu")
    with pytest.raises(ImageRejected) as caught:
        device_path.check(body[:cut_at])
    assert caught.value.status_code == 400
    assert isinstance(device_path.check(body), UndecodedJpeg)


def _digit_jpeg(digit: int) -> bytes:
    """A digit as a 64x64 RGB JPEG (under 4x the 32 px input: no reduced-scale decode)."""
    image = Image.open(io.BytesIO(digit_png(digit, 64)))
    return _encoded(image.convert("RGB"), "JPEG", quality=95)


@pytest.mark.slow
def test_the_served_model_answers_alike_when_it_decodes_on_its_device(
    service: ServiceProcess, served_store: Path, tmp_path: Path
) -> None:
    """``DECODE_ON_GPU=on`` on a CPU device (the same code path as nvjpeg on CUDA, with
    torchvision's CPU decoder): the answers equal the default server's, a PNG still goes
    through the CPU's decoder, and a corrupt image in a request is a 400 that names it."""
    server = launch(served_store, tmp_path, env={"DECODE_ON_GPU": "on"})
    try:
        assert "DECODE_ON_GPU" not in service.env
        bodies = [_digit_jpeg(d) for d in range(10)] + [digit_png(3)]
        with server.client() as on_device, service.client() as default:
            for body in bodies:
                raw = {"content": body, "headers": {"content-type": "application/octet-stream"}}
                got = on_device.post("/topk?k=3", **raw)
                want = default.post("/topk?k=3", **raw)
                assert got.status_code == want.status_code == 200, got.text
                for ours, theirs in zip(
                    got.json()["predictions"][0]["topk"], want.json()["predictions"][0]["topk"],
                    strict=True,
                ):  # fmt: skip
                    assert ours["label"] == theirs["label"]
                    assert ours["confidence"] == pytest.approx(theirs["confidence"], abs=1e-4)
            corrupt = bogus_huffman_table(bodies[0])  # found by the batch decode
            answer = on_device.post("/predict", files=files(bodies[1], corrupt, bodies[2]))
            assert answer.status_code == 400, answer.text
            assert answer.json()["detail"].startswith("image 1: corrupt JPEG"), answer.text
            assert on_device.post("/predict", files=files(*bodies[:3])).status_code == 200
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def _device_path_status(device_path: GpuPreprocessor, body: bytes) -> int:
    try:
        rows = device_path.batch([device_path.check(body)])
    except ImageRejected as exc:
        return exc.status_code
    except ItemsRejected as exc:
        (error,) = exc.errors.values()
        assert isinstance(error, ImageRejected) and error.detail
        return error.status_code
    assert rows.shape[0] == 1 and torch.isfinite(rows).all()
    return 200


@pytest.mark.parametrize("color_mode", ["L", "RGB"])
def test_the_hostile_corpus_gets_the_contracts_status_on_the_device_path(color_mode: str) -> None:
    """Every file of the hostile corpus (tests/service/hostile.py: real images of every
    format and mode, truncated, corrupt, bombs, not images) gets the status the CPU path
    gives it, through header checks + batch decode + device preset."""
    from tests.service import hostile

    size = 32 if color_mode == "L" else 64
    preprocessor = Preprocessor(
        _card(size, color_mode, "squash"), max_pixels=hostile.DEFAULT_MAX_PIXELS
    )
    device_path = GpuPreprocessor(preprocessor, "cpu")
    wrong = {
        case.name: status
        for case in [*hostile.image_cases(), *hostile.broken_cases()]
        if (status := _device_path_status(device_path, case.body)) != case.status
    }
    assert not wrong, wrong
