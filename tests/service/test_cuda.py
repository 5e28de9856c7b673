"""The CUDA paths: padded batches, mixed precision, pinned staging, the served model on a GPU.

The padding logic runs everywhere (a CPU runner told to pad); everything else needs a GPU and
skips with its reason where ``torch.cuda.is_available()`` is False, as on the CI machines.
``bench/gpu_check.sh`` runs this file on a machine with CUDA.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
import torch

from service.batching import ItemsRejected
from service.gpu_preprocess import GpuPreprocessor
from service.imaging import ImageRejected
from service.inference import ModelRunner, Preprocessor
from trainer.archive import load_model, read_archive
from trainer.models import build_model

from .conftest import digit_png, launch
from .test_api import files
from .test_gpu_preprocess import _card as _photo_card
from .test_gpu_preprocess import _digit_jpeg, bogus_huffman_table, photos
from .test_inference import _card, _with_trained_statistics

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _digit_pngs(count: int) -> tuple[list[bytes], list[int]]:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    bodies = []
    for image in digits.images[:count]:
        pixels = ((image.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    return bodies, [int(t) for t in digits.target[:count]]


def test_padded_sizes_are_powers_of_two_up_to_the_largest_batch() -> None:
    model = build_model("resnet20", num_classes=10, in_chans=1)
    runner = ModelRunner(model, _card("resnet20", 32, 1), device="cpu", max_batch_size=100)
    assert not runner.pads_batches and runner.padded_size(3) == 3  # a CPU runs batches as they are
    assert runner.warmup_sizes() == list(range(1, 101))
    runner.pads_batches = True
    assert [runner.padded_size(n) for n in (1, 2, 3, 5, 64, 65, 99, 100)] == [
        1, 2, 4, 8, 64, 100, 100, 100,
    ]  # fmt: skip
    assert runner.warmup_sizes() == [1, 2, 4, 8, 16, 32, 64, 100]


def test_a_padded_batch_answers_each_image_as_an_unpadded_one() -> None:
    model = _with_trained_statistics(build_model("resnet20", num_classes=10, in_chans=1))
    card = _card("resnet20", 32, 1)
    plain = ModelRunner(model, card, device="cpu", max_batch_size=16, torchscript=False)
    padded = ModelRunner(model, card, device="cpu", max_batch_size=16, torchscript=False)
    padded.pads_batches = True
    batch = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    got = padded.forward(batch)
    assert got.shape == (5, 10)  # the three zero rows never reach the caller
    assert torch.allclose(got, plain.forward(batch), atol=1e-5, rtol=0)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_gpu_runner_answers_as_the_cpu_does(precision: str) -> None:
    model = _with_trained_statistics(build_model("resnet18", num_classes=10, in_chans=3))
    card = _card("resnet18", 64, 3)
    cpu = ModelRunner(model, card, device="cpu", precision="fp32", max_batch_size=16)
    gpu = ModelRunner(model, card, device="cuda", precision=precision, max_batch_size=16)
    assert gpu.pads_batches and gpu.precision_name == precision
    gpu.warmup(gpu.warmup_sizes())
    batch = torch.randn(11, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    want = cpu.forward(batch)
    for _ in range(2):  # the second through the same pinned staging buffer, reused
        got = gpu.forward(gpu.stack(list(batch)))
        assert got.device.type == "cpu" and got.dtype == torch.float32 and got.shape == (11, 10)
        tolerance = 1e-3 if precision == "fp32" else 0.05
        assert (got - want).abs().max().item() < tolerance


@needs_cuda
def test_nvjpeg_decodes_a_batch_as_the_cpu_path_does_and_rejects_a_corrupt_file() -> None:
    preprocessor = Preprocessor(_photo_card(224, "RGB", "shorter_side"), max_pixels=10_000_000)
    gpu = GpuPreprocessor(preprocessor, "cuda")
    bodies = photos()
    got = gpu.batch([gpu.check(body) for body in bodies.values()])
    assert got.device.type == "cuda" and got.shape == (len(bodies), 3, 224, 224)
    want = torch.stack([preprocessor(body) for body in bodies.values()])
    for name, row, expected in zip(bodies, got.cpu(), want, strict=True):
        # nvjpeg's IDCT and colour conversion are not libjpeg-turbo's: a grey level or two
        difference = (row - expected).abs().mean().item()
        assert difference < 0.03, (name, difference)
    good = bodies["small"]
    items = [gpu.check(good), gpu.check(bogus_huffman_table(good), name="image 1")]
    with pytest.raises(ItemsRejected) as caught:  # nvjpeg refuses the batch, then the file
        gpu.batch([*items, gpu.check(good)])
    error = caught.value.errors[1]
    assert list(caught.value.errors) == [1] and isinstance(error, ImageRejected)
    assert error.status_code == 400 and error.detail.startswith("image 1: corrupt JPEG")
    assert caught.value.batch.shape == (2, 3, 224, 224)


@needs_cuda
@pytest.mark.slow
def test_the_trained_digits_network_answers_alike_on_the_gpu_in_bf16(digits_store: Path) -> None:
    archive = read_archive(digits_store / "digits-v1.mar")
    model, card = load_model(archive), archive.card
    preprocessor = Preprocessor(card, max_pixels=10_000_000)
    bodies, _ = _digit_pngs(512)
    batch = torch.stack([preprocessor(body) for body in bodies])
    cpu = ModelRunner(model, card, device="cpu", precision="fp32", max_batch_size=128)
    gpu = ModelRunner(model, card, device="cuda", precision="bf16", max_batch_size=128)
    want = torch.cat([cpu.forward(batch[i : i + 100]) for i in range(0, 512, 100)])
    got = torch.cat([gpu.forward(batch[i : i + 100]) for i in range(0, 512, 100)])
    agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
    assert agree >= 0.99, agree


@needs_cuda
@pytest.mark.slow
def test_the_service_on_a_gpu_predicts_explains_and_reports_gpu_memory(
    digits_store: Path, tmp_path: Path
) -> None:
    server = launch(
        digits_store, tmp_path,
        env={"DEVICE": "cuda", "PRECISION": "bf16", "MAX_BATCH_SIZE": "32"},
    )  # fmt: skip
    try:
        bodies, targets = _digit_pngs(64)
        with server.client() as client:
            models = client.get("/models").json()
            assert models["models"][0]["device"].startswith("cuda"), models
            right = 0
            for body, target in zip(bodies, targets, strict=True):
                answer = client.post(
                    "/predict", content=body, headers={"content-type": "image/png"}
                )
                assert answer.status_code == 200, answer.text
                right += int(answer.json()["predictions"][0]["label"]) == target
            assert right >= 48, right  # the 4-epoch network: ~0.9 on the CPU
            # JPEGs: decoded by nvjpeg, labelled as their PNGs are
            same = 0
            for digit in range(10):
                labels = [
                    client.post("/predict", content=body, headers={"content-type": kind})
                    .json()["predictions"][0]["label"]
                    for body, kind in ((_digit_jpeg(digit), "image/jpeg"),
                                       (digit_png(digit, 64), "image/png"))
                ]  # fmt: skip
                same += labels[0] == labels[1]
            assert same >= 9, same
            corrupt = bogus_huffman_table(_digit_jpeg(1))
            answer = client.post("/predict", files=files(bodies[0], corrupt))
            assert answer.status_code == 400, answer.text
            assert answer.json()["detail"].startswith("image 1: corrupt JPEG"), answer.text
            explained = client.post(
                "/explain", content=bodies[0], headers={"content-type": "image/png"}
            )
            assert explained.status_code == 200, explained.text
        assert "imgserve_gpu_memory_allocated_bytes" in httpx.get(f"{server.url}/metrics").text
        assert "Traceback" not in server.log(), server.log()[-3000:]
    finally:
        server.stop()
