"""Datasets and imbalance tools: fixed stratified splits, folder indexing, clear errors."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_sample_images
from sklearn.utils.class_weight import compute_class_weight
from torch.utils.data import DataLoader

from trainer.data import datasets
from trainer.data.datasets import (
    DIGITS_MEAN,
    DIGITS_STD,
    decode_image,
    digits_statistics,
    imbalance_report,
    list_datasets,
    load_dataset,
    stratified_split,
    with_transform,
)
from trainer.data.presets import EvalPreset, TrainPreset
from trainer.data.samplers import FocalLoss, balanced_sampler, class_weights
from trainer.errors import TrainerError

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> datasets.DatasetBundle:
    return load_dataset("digits", data_root=tmp_path_factory.mktemp("data"), seed=0)


def test_digits_splits_are_fixed_stratified_and_complete(digits, tmp_path: Path) -> None:
    sizes = digits.split_sizes
    assert sum(sizes.values()) == 1797
    assert sizes == {"train": 1293, "val": 145, "test": 359}
    for split in ("train", "val", "test"):
        assert all(count > 0 for count in digits.class_counts[split]), split
        assert digits.class_counts[split] == np.bincount(digits.split(split).targets).tolist()
    other = load_dataset("digits", data_root=tmp_path, seed=12345)
    for split in ("train", "val", "test"):
        assert other.split(split).targets == digits.split(split).targets
        assert torch.equal(other.split(split).images, digits.split(split).images)
    assert digits.labels == [str(d) for d in range(10)]
    assert digits.hflip is False


def test_digits_images_are_uint8_and_feed_the_presets(digits) -> None:
    image, label = digits.train[0]
    assert image.dtype == torch.uint8
    assert image.shape == (1, 8, 8)
    assert isinstance(label, int)
    assert int(digits.train.images.max()) == 255  # value 16 -> 255: ink bright on black
    spec = digits.spec
    assert (spec.input_size, spec.color_mode, spec.resize_mode) == ((32, 32), "L", "squash")
    x = EvalPreset(spec)(image)
    assert x.dtype == torch.float32
    assert x.shape == (1, 32, 32)
    y = TrainPreset(spec, augment="strong", hflip=digits.hflip)(image)
    assert y.shape == (1, 32, 32)


def test_digits_normalisation_constants_match_the_train_split(digits) -> None:
    mean, std = digits_statistics(digits.train, size=32)
    assert mean == pytest.approx(DIGITS_MEAN[0], abs=5e-4)
    assert std == pytest.approx(DIGITS_STD[0], abs=5e-4)


def test_with_transform_keeps_targets_and_batches(digits) -> None:
    train = with_transform(digits.train, EvalPreset(digits.spec))
    assert train.targets == digits.train.targets
    assert len(train) == len(digits.train)
    images, labels = next(iter(DataLoader(train, batch_size=16)))
    assert images.shape == (16, 1, 32, 32)
    assert labels.tolist() == digits.train.targets[:16]
    assert abs(float(torch.stack([train[i][0] for i in range(200)]).mean())) < 0.3


# ---------------------------------------------------------------------------------------------
# registry and splitting
# ---------------------------------------------------------------------------------------------


def test_registry_lists_every_dataset_and_rejects_unknown_names(tmp_path: Path) -> None:
    assert list_datasets() == [
        "digits",
        "cifar10",
        "cifar100",
        "fashion-mnist",
        "mnist",
        "folder:PATH",
    ]
    for bad in ("imagenet", "digits:extra", "folder:", "folder"):
        with pytest.raises(TrainerError) as caught:
            load_dataset(bad, data_root=tmp_path, seed=0)
        assert "\n" not in str(caught.value)
    with pytest.raises(TrainerError, match="val_fraction"):
        load_dataset("digits", data_root=tmp_path, seed=0, val_fraction=1.5)


def test_stratified_split_is_deterministic_and_keeps_tiny_classes_in_train() -> None:
    targets = [0] * 50 + [1] * 10 + [2] * 2 + [3]
    train, val, test = stratified_split(targets, val_fraction=0.1, test_fraction=0.2)
    assert (train, val, test) == stratified_split(targets, val_fraction=0.1, test_fraction=0.2)
    assert sorted(train + val + test) == list(range(len(targets)))
    counts = {name: np.bincount([targets[i] for i in idx], minlength=4).tolist() for name, idx in
              (("train", train), ("val", val), ("test", test))}  # fmt: skip
    assert counts["test"] == [10, 2, 1, 0]
    assert counts["val"] == [4, 1, 0, 0]
    assert counts["train"] == [36, 7, 1, 1]


def test_imbalance_report() -> None:
    report = imbalance_report([30, 30, 6], ["a", "b", "c"])
    assert report["counts"] == {"a": 30, "b": 30, "c": 6}
    assert report["ratio"] == 5.0
    assert (report["largest"], report["smallest"], report["total"]) == ("a", "c", 66)
    empty = imbalance_report([4, 0], ["a", "b"])
    assert empty["ratio"] is None
    assert empty["empty_classes"] == ["b"]


# ---------------------------------------------------------------------------------------------
# folder:PATH
# ---------------------------------------------------------------------------------------------


def _photo_crops(count: int, which: int, size: tuple[int, int] = (40, 32)) -> list[Image.Image]:
    photo = load_sample_images().images[which]  # 427 x 640 real photos (china, flower)
    rng = np.random.default_rng(which)
    crops = []
    for _ in range(count):
        top = int(rng.integers(0, photo.shape[0] - size[1]))
        left = int(rng.integers(0, photo.shape[1] - size[0]))
        crops.append(Image.fromarray(photo[top : top + size[1], left : left + size[0]]))
    return crops


def _shapes(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    images = []
    for _ in range(count):
        array = np.zeros((30, 36, 3), np.uint8)
        array[:, :, int(rng.integers(0, 3))] = 200
        array[5:25, 10:20] = rng.integers(0, 255, size=3, dtype=np.uint8)
        images.append(Image.fromarray(array))
    return images


def _save_all(folder: Path, images: list[Image.Image]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        fmt = FORMATS[i % len(FORMATS)]
        image.save(folder / f"img{i:03d}.{fmt.lower()}", format=fmt)


def _make_imbalanced_folder(root: Path) -> Path:
    _save_all(root / "china", _photo_crops(30, 0))
    _save_all(root / "flower", _photo_crops(30, 1))
    _save_all(root / "shapes", _shapes(6))
    jpeg = io.BytesIO()
    _photo_crops(1, 0, size=(64, 64))[0].save(jpeg, format="JPEG")
    (root / "china" / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "flower" / "notes.jpg").write_text("not an image, just text with a .jpg name\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_imbalanced_folder(tmp_path_factory.mktemp("imbalanced"))


def test_folder_skips_unreadable_files_and_reports_imbalance(folder: Path, tmp_path: Path) -> None:
    bundle = load_dataset(f"folder:{folder}", data_root=tmp_path, seed=0)
    assert bundle.name == f"folder:{folder.resolve()}"
    assert bundle.labels == ["china", "flower", "shapes"]
    assert bundle.skipped_files == 2
    assert sorted(Path(line.split(":")[0]).name for line in bundle.skipped_details) == [
        "notes.jpg",
        "truncated.jpg",
    ]
    totals = np.sum([bundle.class_counts[s] for s in ("train", "val", "test")], axis=0).tolist()
    assert totals == [30, 30, 6]
    assert imbalance_report(totals, bundle.labels)["ratio"] == 5.0
    assert bundle.imbalance("train")["smallest"] == "shapes"
    for split in ("train", "val", "test"):
        assert all(count > 0 for count in bundle.class_counts[split]), split
    paths = [{p for p, _ in bundle.split(s).samples} for s in ("train", "val", "test")]
    assert sum(len(p) for p in paths) == len(set().union(*paths)) == 66  # disjoint
    assert bundle.hflip is True
    assert (bundle.spec.input_size, bundle.spec.resize_mode, bundle.spec.resize_size) == (
        (64, 64),
        "shorter_side",
        73,
    )


def test_folder_images_decode_lazily_and_feed_the_presets(folder: Path, tmp_path: Path) -> None:
    bundle = load_dataset(f"folder:{folder}", data_root=tmp_path, seed=0, image_size=48)
    suffixes = set()
    for split in ("train", "val", "test"):  # every kept file, in every format, decodes
        for index, (path, _) in enumerate(bundle.split(split).samples):
            image, _ = bundle.split(split)[index]
            assert image.dtype == torch.uint8
            assert image.shape[0] == 3
            suffixes.add(path.suffix)
    assert suffixes == {f".{fmt.lower()}" for fmt in FORMATS}
    train = with_transform(
        bundle.train, TrainPreset(bundle.spec, augment="standard", hflip=bundle.hflip)
    )
    images, labels = next(iter(DataLoader(train, batch_size=8, shuffle=True)))
    assert images.shape == (8, 3, 48, 48)
    assert images.dtype == torch.float32
    assert EvalPreset(bundle.spec)(bundle.test[0][0]).shape == (3, 48, 48)
    gray = load_dataset(f"folder:{folder}", data_root=tmp_path, seed=0, grayscale=True)
    assert gray.spec.color_mode == "L"
    assert gray.train[0][0].shape[0] == 1
    assert EvalPreset(gray.spec)(gray.train[0][0]).shape == (1, 64, 64)


def test_folder_with_split_subfolders_carves_only_what_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    _save_all(root / "train" / "cat", _photo_crops(10, 0))
    _save_all(root / "train" / "dog", _photo_crops(10, 1))
    _save_all(root / "test" / "cat", _photo_crops(3, 1))
    _save_all(root / "test" / "dog", _photo_crops(2, 0))
    bundle = load_dataset(f"folder:{root}", data_root=tmp_path, seed=0)
    assert bundle.class_counts == {"train": [9, 9], "val": [1, 1], "test": [3, 2]}
    assert all("/test/" in str(path) for path, _ in bundle.test.samples)
    _save_all(root / "test" / "bird", _photo_crops(1, 0))
    with pytest.raises(TrainerError, match="bird"):
        load_dataset(f"folder:{root}", data_root=tmp_path, seed=0)


def _one_line_error(name: str, data_root: Path) -> str:
    with pytest.raises(TrainerError) as caught:
        load_dataset(name, data_root=data_root, seed=0)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_folder_errors_are_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    assert f"dataset folder {missing} does not exist" in _one_line_error(
        f"folder:{missing}", tmp_path
    )

    single = tmp_path / "single"
    _save_all(single / "only", _shapes(3))
    assert "at least 2 class" in _one_line_error(f"folder:{single}", tmp_path)

    empty = tmp_path / "empty"
    _save_all(empty / "full", _shapes(3))
    (empty / "hollow").mkdir()
    assert "hollow" in _one_line_error(f"folder:{empty}", tmp_path)

    (empty / "hollow" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    message = _one_line_error(f"folder:{empty}", tmp_path)
    assert "hollow" in message
    assert "no readable images" in message


def test_decode_image_applies_exif_rotation_and_transparency() -> None:
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees for display
    Image.new("RGB", (40, 20), (10, 200, 30)).save(buffer, format="JPEG", exif=exif)
    assert decode_image(io.BytesIO(buffer.getvalue())).shape == (3, 40, 20)
    png = io.BytesIO()
    Image.new("RGBA", (5, 4), (0, 0, 0, 0)).save(png, format="PNG")
    assert decode_image(io.BytesIO(png.getvalue())).unique().tolist() == [255]  # white behind
    assert decode_image(io.BytesIO(png.getvalue()), "L").shape == (1, 4, 5)


def test_decode_image_scales_16_bit_gray_and_reads_premultiplied_alpha() -> None:
    # 16-bit PNG: Pillow's own convert("L") would clip every value above 255 to white
    wide = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    png = io.BytesIO()
    Image.fromarray(wide).save(png, format="PNG")  # mode I;16
    assert decode_image(io.BytesIO(png.getvalue()), "L").flatten().tolist() == [0, 1, 128, 255]
    assert decode_image(io.BytesIO(png.getvalue()), "RGB")[:, 0, 2].tolist() == [128] * 3
    # "La" (premultiplied alpha) has no direct converter to L or RGB in Pillow
    premultiplied = Image.new("La", (3, 2), (100, 0))  # fully transparent -> white
    tiff = io.BytesIO()
    premultiplied.convert("LA").save(tiff, format="TIFF")
    assert decode_image(io.BytesIO(tiff.getvalue()), "L").unique().tolist() == [255]
    assert datasets.to_color_mode(premultiplied, "RGB").getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# torchvision datasets offline
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "folder"),
    [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("mnist", "MNIST/raw")],
)
def test_torchvision_dataset_without_files_and_downloads_is_one_line(
    name, folder, tmp_path: Path
) -> None:
    started = time.monotonic()
    with pytest.raises(TrainerError) as caught:
        load_dataset(name, data_root=tmp_path, seed=0, download=False)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path.resolve() / folder) in message


def test_torchvision_dataset_offline_fails_fast_naming_the_directory(
    monkeypatch, tmp_path: Path
) -> None:
    probed: list[str] = []
    monkeypatch.setattr(datasets, "_can_connect", lambda url: probed.append(url) or False)
    started = time.monotonic()
    with pytest.raises(TrainerError) as caught:
        load_dataset("cifar10", data_root=tmp_path, seed=0, download=True)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cifar10 could not be downloaded")
    assert str(tmp_path.resolve() / "cifar-10-batches-py") in message
    assert probed == [torch_cifar_url()]


def torch_cifar_url() -> str:
    from torchvision.datasets import CIFAR10

    return CIFAR10.url


class _FakeTorchvision:
    """A stand-in torchvision dataset class: ``data`` is NHWC numpy, as CIFAR's is."""

    classes = ("ant", "bee", "cow")
    calls: list[tuple[bool, bool]] = []

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        self.calls.append((train, download))
        count = 90 if train else 30
        rng = np.random.default_rng(int(train))
        self.data = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 3 for i in range(count)]


class _FakeMnist(_FakeTorchvision):
    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        super().__init__(root, train, download)
        self.data = torch.from_numpy(self.data[..., 0].copy())
        self.targets = torch.tensor(self.targets)


@pytest.mark.parametrize(("factory", "color_mode"), [(_FakeTorchvision, "RGB"), (_FakeMnist, "L")])
def test_torchvision_builder_converts_splits(factory, color_mode, tmp_path: Path) -> None:
    source = datasets.TorchvisionSource(
        name="fake", factory=factory, folder="fake", files="x", urls=("http://127.0.0.1:9/",),
        archives=(), color_mode=color_mode, mean=(0.5,) * (3 if color_mode == "RGB" else 1),
        std=(0.25,) * (3 if color_mode == "RGB" else 1), hflip=True,
    )  # fmt: skip
    request = datasets.DatasetRequest(
        arg="", data_root=tmp_path, image_size=None, val_fraction=0.1, test_fraction=0.2,
        download=False, grayscale=False,
    )  # fmt: skip
    factory.calls.clear()
    bundle = datasets._load_torchvision(source, request)
    assert factory.calls == [(True, False), (False, False)]  # files present: no download asked
    assert bundle.labels == ["ant", "bee", "cow"]
    assert bundle.class_counts == {"train": [27, 27, 27], "val": [3, 3, 3], "test": [10, 10, 10]}
    image, label = bundle.val[0]
    channels = 3 if color_mode == "RGB" else 1
    assert image.shape == (channels, 32, 32)
    assert image.dtype == torch.uint8
    assert image.is_contiguous()
    assert label == bundle.val.targets[0]
    assert set(bundle.train.indices).isdisjoint(bundle.val.indices)
    assert EvalPreset(bundle.spec)(bundle.test[0][0]).shape == (channels, 32, 32)


def test_connect_probe_gives_up_quickly() -> None:
    started = time.monotonic()
    assert datasets._can_connect("http://127.0.0.1:9/", timeout=2.0) is False  # discard port
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------------------------------------
# imbalance tools
# ---------------------------------------------------------------------------------------------


def test_class_weights_follow_sklearn_balanced() -> None:
    targets = [0] * 30 + [1] * 30 + [2] * 6
    expected = compute_class_weight("balanced", classes=np.arange(3), y=np.array(targets))
    weights = class_weights(targets, 3)
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor(expected, dtype=torch.float32))
    assert float((weights[torch.tensor(targets)]).mean()) == pytest.approx(1.0)
    assert class_weights([0, 0, 1], 3)[2] == 1.0  # an absent class gets a neutral weight


def test_balanced_sampler_draws_classes_uniformly() -> None:
    targets = [0] * 300 + [1] * 60 + [2] * 12
    generator = torch.Generator().manual_seed(0)
    sampler = balanced_sampler(targets, num_samples=3000, generator=generator)
    drawn = np.bincount([targets[i] for i in sampler], minlength=3)
    assert drawn.sum() == 3000
    chi_square = float((((drawn - 1000) ** 2) / 1000).sum())
    assert chi_square < 13.8  # 2 degrees of freedom, p = 0.001
    assert len(balanced_sampler(targets)) == len(targets)


def test_focal_loss_reduces_to_cross_entropy_at_gamma_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=generator) * 3
    target = torch.randint(0, 5, (64,), generator=generator)
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0])
    for kwargs in (
        {},
        {"weight": weight},
        {"label_smoothing": 0.1},
        {"weight": weight, "label_smoothing": 0.2},
    ):
        for reduction in ("mean", "sum", "none"):
            expected = F.cross_entropy(logits, target, reduction=reduction, **kwargs)
            actual = FocalLoss(gamma=0.0, reduction=reduction, **kwargs)(logits, target)
            assert torch.allclose(actual, expected, atol=1e-5), (kwargs, reduction)
    focal = FocalLoss(gamma=2.0)(logits, target)
    assert 0 < float(focal) < float(F.cross_entropy(logits, target))
    logits.requires_grad_(True)
    FocalLoss(gamma=2.0, weight=weight)(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
