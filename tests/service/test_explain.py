"""Grad-CAM: sanity on the digits model, the overlay PNG, leak-freedom, and POST /explain."""

from __future__ import annotations

import asyncio
import gc
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.api.routes.explain import resolve_target, wants_json
from service.errors import InvalidRequest
from service.explain import GradCamExplainer, crop_box, normalise_heatmap, overlay_png
from trainer.archive import ModelCard, list_archives, load_model, read_archive
from trainer.data.presets import EvalPreset, PreprocessSpec
from trainer.models import build_model

from .conftest import ServiceProcess
from .conftest import digit_png as served_digit_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as the trainer stores them: uint8 [N, 8, 8], ink bright on black."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return ((digits.images.astype(np.int64) * 255 + 8) // 16).astype(np.uint8), digits.target


def digit_png(index: int, scale: int = 1) -> bytes:
    """One digit as PNG bytes (optionally enlarged with nearest-neighbour)."""
    image = Image.fromarray(digit_images()[0][index])
    if scale > 1:
        image = image.resize((8 * scale, 8 * scale), Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def hook_count(model: torch.nn.Module) -> int:
    dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(m, name)) for m in model.modules() for name in dicts)


@pytest.fixture(scope="module")
def digits_model(digits_store: Path) -> tuple[torch.nn.Module, ModelCard]:
    """The digits ResNet-20 the trainer CLI archived, rebuilt as the service does."""
    archive = read_archive(list_archives(digits_store)[0])
    return load_model(archive), archive.card


@pytest.fixture(scope="module")
def explainer(digits_model: tuple[torch.nn.Module, ModelCard]) -> GradCamExplainer:
    model, card = digits_model
    return GradCamExplainer(model, temperature=card.temperature)


def preprocess(card: ModelCard, image: np.ndarray) -> torch.Tensor:
    return EvalPreset(card.preprocess_spec)(torch.from_numpy(image).unsqueeze(0))


def test_heatmap_is_a_meaningful_map(digits_model, explainer) -> None:
    model, card = digits_model
    images, _ = digit_images()
    x = preprocess(card, images[1700])  # a "5" the model gets right
    result = explainer.explain(x)
    assert result.heatmap.shape == (32, 32)
    assert result.heatmap.dtype == np.float32
    assert np.isfinite(result.heatmap).all()
    assert result.heatmap.min() >= 0.0
    assert result.heatmap.max() <= 1.0
    assert result.heatmap.std() > 0.01
    with torch.inference_mode():
        logits = model(x.unsqueeze(0))[0]
    assert result.class_id == int(logits.argmax())
    expected = torch.softmax(logits / card.temperature, dim=0)[result.class_id]
    assert result.confidence == pytest.approx(float(expected), abs=1e-5)


def test_heatmap_changes_with_the_target(digits_model, explainer) -> None:
    _, card = digits_model
    images, _ = digit_images()
    x = preprocess(card, images[1700])
    top = explainer.explain(x)
    differences = []
    for target in range(card.num_classes):
        if target == top.class_id:
            continue
        other = explainer.explain(x, target)
        assert other.class_id == target
        assert 0.0 <= other.confidence <= top.confidence
        differences.append(float(np.abs(other.heatmap - top.heatmap).mean()))
    assert max(differences) > 0.1, differences
    assert np.median(differences) > 0.05, differences


def test_explainer_leaves_the_served_model_alone(digits_model, explainer) -> None:
    model, card = digits_model
    images, _ = digit_images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explainer.explain(preprocess(card, images[5]))
    assert explainer.model is not model
    assert not model.training
    assert hook_count(model) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(m is explainer.model.cam_layer for m in explainer.model.modules())


def test_explain_refuses_bad_input(explainer) -> None:
    with pytest.raises(ValueError, match="one image"):
        explainer.explain(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not a class id"):
        explainer.explain(torch.zeros(1, 32, 32), target=10)


def test_explain_works_from_inference_mode_tensors(digits_model, explainer) -> None:
    _, card = digits_model
    images, _ = digit_images()
    with torch.inference_mode():
        x = preprocess(card, images[7])
        result = explainer.explain(x)  # a caller inside inference_mode still gets gradients
    assert result.heatmap.std() > 0.01


def test_normalise_heatmap_handles_constant_and_nan() -> None:
    assert not normalise_heatmap(np.full((4, 4), 3.0)).any()
    assert not normalise_heatmap(np.zeros((4, 4))).any()
    nan = normalise_heatmap(np.array([[np.nan, 1.0], [0.0, np.inf]]))
    assert np.isfinite(nan).all()
    assert nan.max() == 1.0
    ramp = normalise_heatmap(np.arange(16, dtype=np.float64).reshape(4, 4) + 5)
    assert ramp.dtype == np.float32
    assert ramp.min() == 0.0
    assert ramp.max() == 1.0


def _png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        return image.size


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [
        ("L", (8, 8), (8, 8)),
        ("RGB", (640, 480), (640, 480)),
        ("RGB", (3000, 1000), (1024, 341)),
        ("RGBA", (500, 2048), (250, 1024)),
        ("P", (100, 60), (100, 60)),
        ("I;16", (1500, 1500), (1024, 1024)),
        ("CMYK", (64, 32), (64, 32)),
    ],
)
def test_overlay_png_keeps_the_image_size(mode, size, expected) -> None:
    image = Image.new(mode, size)
    heatmap = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    assert _png_size(overlay_png(image, heatmap)) == expected


def test_overlay_png_blends_the_heatmap() -> None:
    image = Image.new("L", (64, 64), 128)
    heatmap = np.zeros((32, 32), np.float32)
    heatmap[:, 16:] = 1.0  # hot right half
    with Image.open(io.BytesIO(overlay_png(image, heatmap, colormap="jet"))) as out:
        pixels = np.asarray(out.convert("RGB"), dtype=np.int32)
    left, right = pixels[:, :24].mean(axis=(0, 1)), pixels[:, 40:].mean(axis=(0, 1))
    assert left[2] > left[0]  # jet's cold end is blue
    assert right[0] > right[2]  # and its hot end red
    assert _png_size(overlay_png(image, heatmap, max_side=16)) == (16, 16)


def test_overlay_png_covers_only_the_crop_box() -> None:
    image = Image.new("RGB", (400, 200), (128, 128, 128))
    box = (100.0, 0.0, 300.0, 200.0)
    data = overlay_png(image, np.ones((8, 8), np.float32), box=box)
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int32)
    assert (pixels[:, :95] == 128).all()  # outside the crop: untouched
    assert (pixels[:, 305:] == 128).all()
    assert (pixels[:, 110:290] != 128).any(axis=-1).all()  # inside: coloured


def test_crop_box_follows_the_preset() -> None:
    squash = PreprocessSpec(input_size=(32, 32), color_mode="L", mean=(0.5,), std=(0.5,))
    assert crop_box(squash, (640, 480)) == (0.0, 0.0, 640.0, 480.0)
    imagenet = PreprocessSpec(
        input_size=(224, 224), color_mode="RGB", mean=(0.5,) * 3, std=(0.5,) * 3,
        resize_mode="shorter_side", resize_size=256,
    )  # fmt: skip
    left, top, right, bottom = crop_box(imagenet, (640, 480))  # resized to 341x256
    assert top == pytest.approx(16 * 480 / 256)
    assert bottom - top == pytest.approx(224 * 480 / 256)
    assert left == pytest.approx(58 * 640 / 341)
    assert right - left == pytest.approx(224 * 640 / 341)


@pytest.mark.slow
def test_thousand_explanations_do_not_leak() -> None:
    """1,000 calls on a small model: RSS stays flat and no hook is left on any module."""
    psutil = pytest.importorskip("psutil")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model("resnet20", num_classes=10, in_chans=1, small_input=True).eval()
        explainer = GradCamExplainer(model)
        inputs = torch.randn(8, 1, 32, 32)
        process = psutil.Process()
        for i in range(50):
            explainer.explain(inputs[i % 8], target=i % 10)
        gc.collect()
        baseline = process.memory_info().rss
        for i in range(950):
            explainer.explain(inputs[i % 8], target=None if i % 3 else i % 10)
        gc.collect()
        growth = process.memory_info().rss - baseline
    finally:
        torch.set_num_threads(threads)
    assert growth < 20 * 1024**2, f"RSS grew by {growth / 1024**2:.1f} MiB over 950 calls"
    assert hook_count(explainer.model) == 0
    assert hook_count(model) == 0
    assert not any(p.grad is not None for p in explainer.model.parameters())


# -- request parsing ---------------------------------------------------------------------------


def test_target_matches_a_label_first_then_a_class_id() -> None:
    labels = ["cat", "dog", "0"]
    assert resolve_target(labels, None) is None
    assert resolve_target(labels, "dog") == 1
    assert resolve_target(labels, "0") == 2  # the label "0", not class id 0
    assert resolve_target(labels, "1") == 1
    for bad in ("3", "-1", "bird", "", "1.0", "\u0661"):  # \u0661: an Arabic-Indic digit one
        with pytest.raises(InvalidRequest, match="unknown target"):
            resolve_target(labels, bad)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("image/png", False),
        ("application/json", True),
        ("Application/JSON; q=0.9", True),
        ("application/json, image/png", True),
        ("image/png, application/json", False),
        ("text/html,application/xhtml+xml,*/*;q=0.8", False),
    ],
)
def test_accept_selects_json_only_when_first(accept, expected) -> None:
    assert wants_json(accept) is expected


# -- through the real server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(service: ServiceProcess):
    with service.client() as c:
        yield c


def image_files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]


def assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert fragment in detail, detail


@pytest.mark.slow
def test_explain_answers_a_png_overlay_by_default(client: httpx.Client) -> None:
    image = served_digit_png(3, size=48)
    response = client.post("/explain", files=image_files(image))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert _png_size(response.content) == (48, 48)
    assert response.headers["x-explained-class-id"] == "3"
    raw = client.post("/explain", content=image, headers={"Content-Type": "image/png"})
    assert raw.status_code == 200, raw.text
    assert raw.headers["content-type"] == "image/png"


@pytest.mark.slow
@pytest.mark.parametrize("accept", ["application/json", "application/json, image/png;q=0.5"])
def test_explain_answers_json_with_accept(client: httpx.Client, accept: str) -> None:
    image = served_digit_png(7)
    response = client.post("/explain", files=image_files(image), headers={"Accept": accept})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"model", "version", "label", "class_id", "confidence", "heatmap"}
    predicted = client.post("/predict", files=image_files(image)).json()
    top = predicted["predictions"][0]
    assert (body["model"], body["version"]) == (predicted["model"], predicted["version"])
    assert (body["label"], body["class_id"]) == (top["label"], top["class_id"])
    assert body["confidence"] == pytest.approx(top["confidence"], abs=1e-4)
    heatmap = np.array(body["heatmap"], dtype=np.float64)
    assert heatmap.shape == (32, 32)  # the model's input size, whatever the image's size
    assert heatmap.min() >= 0.0
    assert heatmap.max() <= 1.0
    assert heatmap.std() > 0.01


@pytest.mark.slow
def test_explain_target_by_label_and_by_class_id(client: httpx.Client) -> None:
    image = served_digit_png(4)
    json_accept = {"Accept": "application/json"}
    default = client.post("/explain", files=image_files(image), headers=json_accept).json()
    labels = client.get("/models").json()["models"][0]["labels"]
    other = next(i for i in range(len(labels)) if i != default["class_id"])
    by_label = client.post(
        "/explain", params={"target": labels[other]}, files=image_files(image), headers=json_accept
    )
    by_id = client.post(
        "/explain", params={"target": str(other)}, files=image_files(image), headers=json_accept
    )
    for response in (by_label, by_id):
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["class_id"], body["label"]) == (other, labels[other])
        assert body["confidence"] < default["confidence"]
        difference = np.abs(np.array(body["heatmap"]) - np.array(default["heatmap"])).mean()
        assert difference > 0.02
    png = client.post("/explain", params={"target": labels[other]}, files=image_files(image))
    assert png.status_code == 200, png.text
    assert png.headers["x-explained-class-id"] == str(other)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["cat", "10", "-1", "3.0"])
def test_explain_unknown_target_is_422(client: httpx.Client, target: str) -> None:
    response = client.post(
        "/explain", params={"target": target}, files=image_files(served_digit_png(1))
    )
    assert_error(response, 422, "unknown target")


@pytest.mark.slow
def test_explain_takes_exactly_one_image(client: httpx.Client) -> None:
    two = image_files(served_digit_png(1), served_digit_png(2))
    assert_error(client.post("/explain", files=two), 422, "exactly one image")


@pytest.mark.slow
def test_explain_client_errors_follow_the_contract(client: httpx.Client) -> None:
    image = image_files(served_digit_png(1))
    assert_error(client.post("/explain", params={"model": "nope"}, files=image), 404, "nope")
    text = client.post("/explain", content=b"hello", headers={"Content-Type": "image/png"})
    assert text.status_code == 415, text.text
    truncated = served_digit_png(1)[:40]
    assert client.post("/explain", files=image_files(truncated)).status_code == 400
    assert client.post("/explain", files=[("file", ("e.png", b"", "image/png"))]).status_code == 422


@pytest.mark.slow
def test_explanations_over_the_limit_get_503_and_predict_still_answers(start_service, served_store):
    """MAX_CONCURRENT_EXPLAIN=1: a burst of slow explanations -> some 503 with Retry-After."""
    server = start_service(store=served_store, env={"MAX_CONCURRENT_EXPLAIN": "1"})
    big = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (2000, 2000), dtype=np.uint8)
    Image.fromarray(noise).save(big, "PNG", compress_level=0)  # slow to decode and to overlay
    digit = served_digit_png(5)

    async def burst() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            explains = [
                client.post("/explain", files=image_files(big.getvalue())) for _ in range(8)
            ]
            predict = client.post("/predict", files=image_files(digit))
            *answers, predicted = await asyncio.gather(*explains, predict)
            return answers, predicted

    answers, predicted = asyncio.run(burst())
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 503}, [r.text for r in answers]
    assert statuses.count(200) >= 1
    assert statuses.count(503) >= 1, statuses
    for response in answers:
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 1
            assert "MAX_CONCURRENT_EXPLAIN" in response.json()["detail"]
    assert predicted.status_code == 200, predicted.text
