"""ModelRunner: the served network computes what the archived one computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.inference import ModelRunner, fold_batch_norm
from trainer.archive import ModelCard
from trainer.data.presets import PreprocessSpec
from trainer.models import build_model


def _card(arch: str, size: int, in_chans: int) -> ModelCard:
    spec = PreprocessSpec(
        input_size=(size, size), color_mode="L" if in_chans == 1 else "RGB",
        mean=(0.5,) * in_chans, std=(0.25,) * in_chans,
    )  # fmt: skip
    return ModelCard(
        name="m", version="1", arch=arch, num_classes=10, labels=[str(i) for i in range(10)],
        in_chans=in_chans, small_input=True, grayscale_policy="native" if in_chans == 1 else "none",
        preprocess=spec.to_dict(), temperature=1.5,
    )  # fmt: skip


def _with_trained_statistics(model: nn.Module) -> nn.Module:
    """Random running statistics and affine terms, as a trained network has (not 0/1)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(count, generator=generator) * 0.2)
    return model.eval()


@pytest.mark.parametrize(("arch", "size", "in_chans"), [("resnet20", 32, 1), ("resnet18", 64, 3)])
def test_folded_network_answers_as_the_archived_one(arch: str, size: int, in_chans: int) -> None:
    model = _with_trained_statistics(
        build_model(arch, num_classes=10, in_chans=in_chans, small_input=True)
    )
    card = _card(arch, size, in_chans)
    folded = ModelRunner(model, card, device="cpu", fold_batchnorm=True, max_batch_size=4)
    plain = ModelRunner(model, card, device="cpu", fold_batchnorm=False, max_batch_size=4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.network.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())  # for Grad-CAM
    batch = torch.randn(4, in_chans, size, size, generator=torch.Generator().manual_seed(1))
    got, want = folded.forward(batch), plain.forward(batch)
    assert got.shape == (4, 10)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(1), want.argmax(1))


@pytest.mark.parametrize("arch", ["resnet50", "resnet9"])
def test_every_batch_norm_of_bottleneck_and_sequential_networks_is_folded(arch: str) -> None:
    model = _with_trained_statistics(
        build_model(arch, num_classes=10, in_chans=3, small_input=True)
    )
    folded = fold_batch_norm(model, torch.randn(2, 3, 32, 32))
    assert folded is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        got, want = folded(x), model(x)
    # fp32 rounding grows with the logits' size (up to ~800 here through 50 layers): an absolute
    # 1e-4 failed 2 of 30 random networks by 3e-4-6e-4, where a wrong fold is off by O(scale)
    assert torch.allclose(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


def test_a_batch_norm_that_does_not_follow_its_conv_is_left_alone() -> None:
    class NormFirst(nn.Module):  # bn1 and conv1 by name, but the norm comes first
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv1(self.bn1(x))

    model = _with_trained_statistics(NormFirst())
    assert fold_batch_norm(model, torch.randn(2, 4, 8, 8)) is model


def test_a_fold_that_changes_the_answers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import service.inference as inference

    def wrong_fold(root: nn.Module) -> int:  # stands in for a structure misread
        for module in root.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.add_(1.0)
        return 1

    monkeypatch.setattr(inference, "_fold_in_place", wrong_fold)
    model = _with_trained_statistics(build_model("resnet20", num_classes=10, in_chans=1))
    assert fold_batch_norm(model, torch.randn(2, 1, 32, 32)) is model


@pytest.mark.parametrize(("arch", "size", "in_chans"), [("resnet20", 32, 1), ("resnet18", 64, 3)])
def test_traced_forward_answers_as_the_eager_one_at_every_batch_size(
    arch: str, size: int, in_chans: int
) -> None:
    model = _with_trained_statistics(
        build_model(arch, num_classes=10, in_chans=in_chans, small_input=True)
    )
    card = _card(arch, size, in_chans)
    traced = ModelRunner(model, card, device="cpu", torchscript=True, max_batch_size=5)
    eager = ModelRunner(model, card, device="cpu", torchscript=False, max_batch_size=5)
    assert traced.traced and isinstance(traced.probabilities, torch.jit.ScriptModule)
    assert not eager.traced
    generator = torch.Generator().manual_seed(2)
    for size_of_batch in (1, 2, 5):  # traced at 2: the graph must not fix the batch size
        batch = torch.randn(size_of_batch, in_chans, size, size, generator=generator)
        got, want = traced.forward(batch), eager.forward(batch)
        assert got.shape == (size_of_batch, 10)
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        assert torch.allclose(got.sum(1), torch.ones(size_of_batch), atol=1e-5)  # temperature 1.5


def test_a_network_whose_trace_would_differ_is_served_eagerly() -> None:
    class BranchesOnBatchSize(nn.Module):  # tracing at batch 2 records only one branch
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 10, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pooled = self.conv(x).mean((2, 3))
            return pooled * 3 if x.shape[0] > 2 else pooled

    card = _card("resnet20", 8, 1)
    runner = ModelRunner(BranchesOnBatchSize(), card, device="cpu", max_batch_size=4)
    assert not runner.traced
    batch = torch.randn(3, 1, 8, 8)
    with torch.inference_mode():
        want = torch.softmax(runner.network(batch) / 1.5, dim=1)
    assert torch.allclose(runner.forward(batch), want, atol=1e-6)


def test_torchscript_auto_traces_every_size_on_cpu_and_small_inputs_elsewhere() -> None:
    from service.inference import use_torchscript

    assert use_torchscript("auto", (32, 32)) and use_torchscript("auto", (224, 224))
    assert use_torchscript("auto", (64, 64), "cuda")
    assert not use_torchscript("auto", (224, 224), "cuda")
    assert not use_torchscript("auto", (65, 64), "cuda")
    assert use_torchscript("on", (224, 224), "cuda") and not use_torchscript("off", (28, 28))


def test_auto_decodes_on_the_forward_threads_only_for_small_inputs_on_a_cpu_with_two() -> None:
    from service.inference import decode_on_forward_thread as decide

    assert decide("auto", (32, 32), "cpu", 2, 2) and decide("auto", (64, 64), "cpu", 4, 8)
    assert not decide("auto", (224, 224), "cpu", 2, 2)  # the pool overlaps decoding, forwards
    assert not decide("auto", (32, 32), "cpu", 1, 2)  # one thread: a slow decode would stall all
    assert decide("auto", (32, 32), "cpu", 1, 1)  # no spare CPU for the pool to decode on
    assert not decide("auto", (224, 224), "cpu", 1, 1)
    assert not decide("auto", (32, 32), "cuda", 2, 2)  # the pool keeps the device fed
    assert decide("on", (224, 224), "cuda", 1, 1) and not decide("off", (28, 28), "cpu", 2, 2)


@pytest.mark.slow
def test_bf16_on_the_cpu_answers_the_digits_as_fp32_does(digits_store) -> None:
    """PRECISION=bf16 on a CPU (the opt-in; ~1.9x faster ResNet-18 where oneDNN has native
    bf16): the trained digits network gives the same top-1 on all 1,797 digits."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from service.inference import Preprocessor
    from trainer.archive import load_model, read_archive

    archive = read_archive(digits_store / "digits-v1.mar")
    model, card = load_model(archive), archive.card
    preprocessor = Preprocessor(card, max_pixels=10_000_000)
    digits = load_digits()
    inputs = []
    for image in digits.images:
        pixels = ((image.astype("int64") * 255 + 8) // 16).astype("uint8")
        buffer = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
        inputs.append(preprocessor(buffer.getvalue()))
    batch = torch.stack(inputs)
    fp32 = ModelRunner(model, card, device="cpu", precision="fp32", max_batch_size=64)
    bf16 = ModelRunner(model, card, device="cpu", precision="bf16", max_batch_size=64)
    assert bf16.precision_name == "bf16" and not bf16.traced  # autocast is not traced
    want = torch.cat([fp32.forward(batch[i : i + 64]) for i in range(0, len(batch), 64)])
    got = torch.cat([bf16.forward(batch[i : i + 64]) for i in range(0, len(batch), 64)])
    assert got.dtype == torch.float32 and torch.allclose(got.sum(1), torch.ones(len(got)))
    agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
    assert agree >= 0.995, agree  # measured here: 1.0 (1,797 of 1,797)
    assert (got - want).abs().max().item() < 0.1  # measured: 0.027
    accuracy = [float(np.mean(p.argmax(1).numpy() == digits.target)) for p in (want, got)]
    assert abs(accuracy[0] - accuracy[1]) <= 0.005


def test_a_lone_image_computed_with_more_threads_gets_the_same_answer() -> None:
    import threading

    from service.batching import intra_op_threads

    model = _with_trained_statistics(build_model("resnet18", num_classes=10, in_chans=3))
    runner = ModelRunner(model, _card("resnet18", 96, 3), device="cpu", max_batch_size=4)
    image = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    answers: dict[int, torch.Tensor] = {}

    def compute(threads: int) -> None:  # on a worker thread of its own, as the batcher does
        torch.set_num_threads(1)
        with intra_op_threads(threads):
            answers[threads] = runner.forward(image)
        answers[-threads] = torch.tensor(torch.get_num_threads())

    for threads in (1, 2):
        worker = threading.Thread(target=compute, args=(threads,))
        worker.start()
        worker.join()
    assert torch.allclose(answers[1], answers[2], atol=1e-5, rtol=0)
    assert int(answers[-2]) == 1  # restored after the block


@pytest.mark.parametrize(("size", "color_mode"), [(32, "L"), (96, "RGB")])
def test_a_decoded_batch_gets_each_images_own_input(size: int, color_mode: str) -> None:
    """The forward threads' path (``decode_array`` then ``batch``) gives every image the tensor
    that decoding and preprocessing it alone gives: real photos as JPEGs (full scale and
    reduced-scale decodes, an EXIF rotation) and PNGs with and without alpha."""
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_images

    from service.inference import Preprocessor

    bodies = []
    for photo in load_sample_images().images:  # 427x640 RGB
        image = Image.fromarray(photo)
        for scale, fmt in ((1.0, "JPEG"), (0.3, "JPEG"), (0.12, "PNG")):
            small = image.resize((int(640 * scale), int(427 * scale)))
            buffer = io.BytesIO()
            exif = Image.Exif()
            if fmt == "JPEG" and scale == 0.3:
                exif[0x0112] = 6  # stored sideways: the decoder turns it
            small.save(buffer, format=fmt, exif=exif)
            bodies.append(buffer.getvalue())
    rgba = Image.new("RGBA", (50, 70), (200, 10, 10, 90))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    bodies.append(buffer.getvalue())

    card = _card(
        "resnet20" if color_mode == "L" else "resnet18", size, 1 if color_mode == "L" else 3
    )
    preprocessor = Preprocessor(card, max_pixels=10_000_000)
    want = torch.stack([preprocessor(body) for body in bodies])
    got = preprocessor.batch([preprocessor.decode_array(body) for body in bodies])
    assert got.shape == (len(bodies), card.in_chans, size, size)
    assert torch.equal(got, want)
    assert torch.equal(preprocessor.batch([preprocessor.decode_array(bodies[4])]), want[4:5])
