"""Datasets for the trainer: a registry of builders keyed by name, each giving a ``DatasetBundle``.

Every split yields ``(uint8 image tensor [C, H, W], int label)`` *before* any preset, with ``C``
matching ``bundle.spec.color_mode``; ``with_transform`` applies a ``TrainPreset``/``EvalPreset``.
Every split also has a ``targets`` list, so samplers, class weights and stratification never
decode an image.

Splits are fixed: they never depend on the training seed, so a test split stays held out across
runs, sweeps and ``trainer evaluate``. Stratified splits (``stratified_split``) shuffle each class
with ``SPLIT_SEED`` and take ``round(fraction * n_class)`` of it (at least one image when the
class has two or more, so every class appears in every split where it can):

- ``digits``: scikit-learn's 1,797 8x8 digits; test = 20% of all, val = 10% of the rest
  (1,293 / 144 / 360 with the default fractions). Kept in memory.
- ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist``: torchvision; test = the official test
  set, val = ``val_fraction`` of the official train set. Kept in memory.
- ``folder:PATH``: ImageFolder layout, decoded lazily with PIL. ``train/`` (and optional ``val/``,
  ``test/``) sub-folders are used as given, a missing val/test split is carved from train; a
  plain folder of class folders is split like digits. Unreadable files are skipped and counted
  once, at index time.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision.transforms.v2 import functional as TF

from ..errors import TrainerError
from .pixels import to_color_mode
from .presets import PreprocessSpec

SPLIT_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FOLDER_IMAGE_SIZE = 64
SPLITS = ("train", "val", "test")

Sample = tuple[Tensor, int]


# ---------------------------------------------------------------------------------------------
# Split datasets: (uint8 [C, H, W], label) plus a cheap ``targets`` list
# ---------------------------------------------------------------------------------------------


class TensorImages(Dataset[Sample]):
    """Images held in memory as one uint8 tensor [N, C, H, W] (a view is fine)."""

    def __init__(self, images: Tensor, targets: Sequence[int]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Sample:
        return self.images[index].contiguous(), self.targets[index]


class ImageFiles(Dataset[Sample]):
    """Image files decoded with PIL on access (EXIF-rotated, converted to ``color_mode``)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], color_mode: str) -> None:
        self.samples = [(Path(path), int(label)) for path, label in samples]
        self.targets = [label for _, label in self.samples]
        self.color_mode = color_mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        path, label = self.samples[index]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. corrupt EXIF: the pixels are still fine
            return decode_image(path, self.color_mode), label


class Subset(Dataset[Sample]):
    """A split made of some indices of another dataset, keeping ``targets``."""

    def __init__(self, base: Dataset[Sample], indices: Sequence[int]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.targets = [base.targets[i] for i in self.indices]  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        return self.base[self.indices[index]]


class Transformed(Dataset[tuple[Any, int]]):
    """A split with a preset applied to each image; labels and ``targets`` unchanged."""

    def __init__(self, base: Dataset[Sample], transform: Callable[[Tensor], Any]) -> None:
        self.base = base
        self.transform = transform
        self.targets = base.targets  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[index]
        return self.transform(image), label


def with_transform(dataset: Dataset[Sample], transform: Callable[[Tensor], Any]) -> Transformed:
    """Wrap a raw split with a ``TrainPreset``/``EvalPreset`` (or any image -> tensor callable)."""
    return Transformed(dataset, transform)


def decode_image(source: str | Path | BinaryIO, color_mode: str = "RGB") -> Tensor:
    """Decode one image file to uint8 [C, H, W]: first frame, EXIF orientation applied, then
    converted to ``color_mode`` ("L" or "RGB") by ``pixels.to_color_mode`` (transparency on
    white, 16-bit grayscale scaled), the rule the service applies to uploads."""
    return TF.pil_to_tensor(_open_image(source, color_mode))


def _open_image(
    source: str | Path | BinaryIO, color_mode: str, draft: int | None = None
) -> Image.Image:
    with Image.open(source) as opened:
        if draft and opened.format == "JPEG":
            opened.draft(color_mode, (draft, draft))  # decode at a reduced scale: a cheap check
        image = ImageOps.exif_transpose(opened)  # a loaded copy, also when nothing to rotate
    return to_color_mode(image, color_mode)  # the service converts uploads with the same rule


# ---------------------------------------------------------------------------------------------
# Stratified splitting
# ---------------------------------------------------------------------------------------------


def _carve(
    targets: Sequence[int], indices: Sequence[int], fraction: float, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Split ``indices`` into (rest, taken), taking ``round(fraction * n)`` of each class."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for index in indices:
        by_class[targets[index]].append(index)
    rest: list[int] = []
    taken: list[int] = []
    for label in sorted(by_class):
        members = np.array(by_class[label])
        rng.shuffle(members)
        count = math.floor(len(members) * fraction + 0.5)
        if fraction > 0 and len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        taken.extend(members[:count].tolist())
        rest.extend(members[count:].tolist())
    return sorted(rest), sorted(taken)


def stratified_split(
    targets: Sequence[int], *, val_fraction: float, test_fraction: float, seed: int = SPLIT_SEED
) -> tuple[list[int], list[int], list[int]]:
    """Indices of (train, val, test): test = ``test_fraction`` of all, val = ``val_fraction``
    of the rest, per class. Deterministic for a seed; the trainer always uses ``SPLIT_SEED``."""
    rng = np.random.default_rng(seed)
    rest, test = _carve(targets, range(len(targets)), test_fraction, rng)
    train, val = _carve(targets, rest, val_fraction, rng)
    return train, val, test


# ---------------------------------------------------------------------------------------------
# Bundle and registry
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DatasetBundle:
    """Three raw splits plus what the trainer and the model card need to know about them."""

    name: str  # "digits", "cifar10", "folder:/abs/path", ...
    labels: list[str]  # class names; index = class id
    train: Dataset[Sample]
    val: Dataset[Sample]
    test: Dataset[Sample]
    spec: PreprocessSpec  # input size, colour mode, per-dataset mean/std, resize policy
    hflip: bool  # whether mirroring keeps the class (False for digits/mnist)
    class_counts: dict[str, list[int]]  # split -> count per class
    skipped_files: int = 0  # folder datasets: unreadable files left out
    skipped_details: list[str] = field(default_factory=list)  # "path: reason", for the log
    source: str = ""  # where the data came from (a directory, or the sklearn loader)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def split_sizes(self) -> dict[str, int]:
        return {split: sum(counts) for split, counts in self.class_counts.items()}

    def split(self, name: str) -> Dataset[Sample]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; one of {SPLITS}")
        return getattr(self, name)

    def imbalance(self, split: str = "train") -> dict[str, Any]:
        return imbalance_report(self.class_counts[split], self.labels)


@dataclass(frozen=True, kw_only=True)
class DatasetRequest:
    """What a builder gets: ``arg`` is the text after ``name:`` (the PATH of ``folder:PATH``)."""

    arg: str
    data_root: Path
    image_size: int | None
    val_fraction: float
    test_fraction: float
    download: bool
    grayscale: bool


Builder = Callable[[DatasetRequest], DatasetBundle]


@dataclass(frozen=True)
class _Entry:
    builder: Builder
    usage: str  # as listed for the CLI: "digits", "folder:PATH"
    takes_arg: bool


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(name: str, *, arg: str | None = None) -> Callable[[Builder], Builder]:
    """Register a builder as ``name`` (or ``name:ARG`` when ``arg`` names its argument)."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered")
        usage = f"{name}:{arg}" if arg else name
        _REGISTRY[name] = _Entry(builder, usage, arg is not None)
        return builder

    return decorate


def list_datasets() -> list[str]:
    """Dataset names for the CLI help, in registration order."""
    return [entry.usage for entry in _REGISTRY.values()]


def load_dataset(
    name: str,
    *,
    data_root: Path | str,
    seed: int = 0,
    image_size: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    download: bool = True,
    grayscale: bool = False,
) -> DatasetBundle:
    """Build the named dataset's raw splits; bad input raises a one-line ``TrainerError``.

    ``seed`` (the training seed) deliberately does not change the splits: they are fixed by
    ``SPLIT_SEED`` so the test split stays held out whatever seed a run uses.
    ``test_fraction`` applies where there is no official test split; ``grayscale`` to folders.
    """
    del seed  # see the docstring
    key, sep, arg = name.partition(":")
    entry = _REGISTRY.get(key.strip().lower())
    if entry is None:
        raise TrainerError(f"unknown dataset {name!r}; choose from: {', '.join(list_datasets())}")
    if entry.takes_arg and not arg.strip():
        raise TrainerError(f"dataset {key!r} needs an argument: --dataset {entry.usage}")
    if sep and not entry.takes_arg:
        raise TrainerError(f"dataset {key!r} takes no argument (got {name!r})")
    for label, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise TrainerError(f"{label} must be in [0, 1), not {value}")
    if image_size is not None and image_size < 1:
        raise TrainerError(f"image size must be a positive number of pixels, not {image_size}")
    request = DatasetRequest(
        arg=arg.strip(),
        data_root=Path(data_root).expanduser().resolve(),
        image_size=image_size,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        download=download,
        grayscale=grayscale,
    )
    return entry.builder(request)


def _counts(targets: Sequence[int], num_classes: int) -> list[int]:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).tolist()


def _bundle_counts(splits: dict[str, Dataset[Sample]], num_classes: int) -> dict[str, list[int]]:
    return {name: _counts(split.targets, num_classes) for name, split in splits.items()}  # type: ignore[attr-defined]


def imbalance_report(counts: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Counts per class and the largest/smallest class ratio (None when a class is empty)."""
    if len(counts) != len(labels):
        raise ValueError(f"{len(counts)} counts for {len(labels)} labels")
    largest = max(range(len(counts)), key=lambda i: counts[i])
    smallest = min(range(len(counts)), key=lambda i: counts[i])
    low = counts[smallest]
    return {
        "counts": {label: int(count) for label, count in zip(labels, counts, strict=True)},
        "total": int(sum(counts)),
        "largest": labels[largest],
        "smallest": labels[smallest],
        "ratio": round(counts[largest] / low, 4) if low else None,
        "empty_classes": [label for label, count in zip(labels, counts, strict=True) if count == 0],
    }


# ---------------------------------------------------------------------------------------------
# digits: scikit-learn's 8x8 handwritten digits, the offline default
# ---------------------------------------------------------------------------------------------

# Train-split statistics at 32x32: the default split's train images through EvalPreset's resize
# (bilinear, antialias) scaled to [0, 1]; `digits_statistics()` recomputes them (a test checks).
DIGITS_MEAN = (0.3057,)
DIGITS_STD = (0.3233,)


def _digits_arrays() -> tuple[Tensor, list[int]]:
    from sklearn.datasets import load_digits  # a few hundred ms: only when asked for

    digits = load_digits()
    values = digits.images.astype(np.int64)  # 0..16, ink bright on black
    images = torch.from_numpy((values * 255 + 8) // 16).to(torch.uint8)  # round(v * 255 / 16)
    return images.unsqueeze(1), digits.target.tolist()


def digits_statistics(train: TensorImages, size: int = 32) -> tuple[float, float]:
    """Mean and std of the train images resized like ``EvalPreset`` does, in [0, 1]."""
    resized = TF.resize(train.images, [size, size], antialias=True).float() / 255.0
    return float(resized.mean()), float(resized.std())


@register_dataset("digits")
def _load_digits(request: DatasetRequest) -> DatasetBundle:
    images, targets = _digits_arrays()
    parts = stratified_split(
        targets, val_fraction=request.val_fraction, test_fraction=request.test_fraction
    )
    splits = {
        name: TensorImages(images[idx], [targets[i] for i in idx])
        for name, idx in zip(SPLITS, parts, strict=True)
    }
    size = request.image_size or 32
    spec = PreprocessSpec(
        input_size=(size, size),
        color_mode="L",
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        resize_mode="squash",
    )
    return DatasetBundle(
        name="digits",
        labels=[str(digit) for digit in range(10)],
        **splits,
        spec=spec,
        hflip=False,
        class_counts=_bundle_counts(splits, 10),
        source="sklearn.datasets.load_digits",
    )


# ---------------------------------------------------------------------------------------------
# torchvision datasets: read from data_root, downloaded when the network allows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class TorchvisionSource:
    """One torchvision dataset: variants are data, one builder (``_load_torchvision``) for all."""

    name: str
    factory: Callable[..., Any]  # torchvision.datasets class
    folder: str  # where its files live under data_root
    files: str  # what to put there, for the error message
    urls: tuple[str, ...]
    archives: tuple[str, ...]  # downloads (under data_root): all present -> no network needed
    color_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool
    labels: tuple[str, ...] | None = None  # None: the dataset's own ``classes``


_MNIST_FILES = (
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,"
    " t10k-labels-idx1-ubyte (or their .gz)"
)


def _raw_archives(factory: Any) -> tuple[str, ...]:
    """MNIST-style datasets: the .gz files torchvision would download into <Name>/raw."""
    return tuple(f"{factory.__name__}/raw/{filename}" for filename, _ in factory.resources)


TORCHVISION_SOURCES = (
    TorchvisionSource(
        name="cifar10", factory=tv_datasets.CIFAR10, folder="cifar-10-batches-py",
        files="the folder extracted from cifar-10-python.tar.gz", urls=(tv_datasets.CIFAR10.url,),
        archives=("cifar-10-python.tar.gz",), color_mode="RGB",
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), hflip=True,
    ),
    TorchvisionSource(
        name="cifar100", factory=tv_datasets.CIFAR100, folder="cifar-100-python",
        files="the folder extracted from cifar-100-python.tar.gz", urls=(tv_datasets.CIFAR100.url,),
        archives=("cifar-100-python.tar.gz",), color_mode="RGB",
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), hflip=True,
    ),
    TorchvisionSource(
        name="fashion-mnist", factory=tv_datasets.FashionMNIST, folder="FashionMNIST/raw",
        files=_MNIST_FILES, urls=tuple(tv_datasets.FashionMNIST.mirrors),
        archives=_raw_archives(tv_datasets.FashionMNIST),
        color_mode="L", mean=(0.2860,), std=(0.3530,), hflip=True,  # a mirrored shoe is a shoe
    ),
    TorchvisionSource(
        name="mnist", factory=tv_datasets.MNIST, folder="MNIST/raw",
        files=_MNIST_FILES, urls=tuple(tv_datasets.MNIST.mirrors),
        archives=_raw_archives(tv_datasets.MNIST),
        color_mode="L", mean=(0.1307,), std=(0.3081,), hflip=False,
        labels=tuple(str(digit) for digit in range(10)),
    ),
)  # fmt: skip

PROBE_TIMEOUT_S = 3.0
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0


def _can_connect(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout`` (DNS included)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    opened: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)  # getaddrinfo ignores timeouts
    thread.start()
    thread.join(timeout)
    return bool(opened)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torchvision's downloads set no timeout: a stalled connection must not hang the run."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download(source: TorchvisionSource, root: Path) -> None:
    where = root / source.folder
    hint = f"put {source.files} in {where}"
    local = bool(source.archives) and all((root / name).is_file() for name in source.archives)
    if not local and not any(_can_connect(url) for url in source.urls):
        hosts = ", ".join(sorted({urlparse(url).hostname or url for url in source.urls}))
        raise TrainerError(
            f"{source.name} could not be downloaded (no connection to {hosts}); {hint}"
        )
    try:
        with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
            source.factory(root=str(root), train=True, download=True)
            source.factory(root=str(root), train=False, download=True)
    except Exception as error:  # network, disk or checksum: all end the same way for the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrainerError(f"{source.name} could not be downloaded ({reason}); {hint}") from None


def _open_torchvision(source: TorchvisionSource, root: Path, *, download: bool) -> tuple[Any, Any]:
    try:
        return source.factory(root=str(root), train=True), source.factory(
            root=str(root), train=False
        )
    except (RuntimeError, OSError, EOFError):
        if not download:
            where = root / source.folder
            raise TrainerError(
                f"{source.name} files not found in {where} and downloading is off;"
                f" put {source.files} there"
            ) from None
    _download(source, root)
    return source.factory(root=str(root), train=True), source.factory(root=str(root), train=False)


def _as_tensor_images(raw: Any) -> TensorImages:
    data = raw.data if isinstance(raw.data, Tensor) else torch.from_numpy(raw.data)
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # -> [N, C, H, W]
    targets = raw.targets.tolist() if isinstance(raw.targets, Tensor) else list(raw.targets)
    return TensorImages(images, targets)


def _load_torchvision(source: TorchvisionSource, request: DatasetRequest) -> DatasetBundle:
    raw_train, raw_test = _open_torchvision(source, request.data_root, download=request.download)
    labels = list(source.labels or raw_train.classes)
    train_all, test = _as_tensor_images(raw_train), _as_tensor_images(raw_test)
    rest, val_idx = _carve(
        train_all.targets,
        range(len(train_all)),
        request.val_fraction,
        np.random.default_rng(SPLIT_SEED),
    )
    splits = {"train": Subset(train_all, rest), "val": Subset(train_all, val_idx), "test": test}
    size = request.image_size or 32  # MNIST's 28 px are squashed to 32 so the CIFAR nets apply
    spec = PreprocessSpec(
        input_size=(size, size),
        color_mode=source.color_mode,
        mean=source.mean,
        std=source.std,
        resize_mode="squash",
    )
    return DatasetBundle(
        name=source.name,
        labels=labels,
        **splits,
        spec=spec,
        hflip=source.hflip,
        class_counts=_bundle_counts(splits, len(labels)),
        source=str(request.data_root / source.folder),
    )


def _register_torchvision(source: TorchvisionSource) -> None:
    def build(request: DatasetRequest) -> DatasetBundle:
        return _load_torchvision(source, request)

    register_dataset(source.name)(build)


for _source in TORCHVISION_SOURCES:
    _register_torchvision(_source)


# ---------------------------------------------------------------------------------------------
# folder:PATH: the user's own images
# ---------------------------------------------------------------------------------------------

_VERIFY_DRAFT_PX = 64  # JPEGs are checked by decoding at a reduced scale: catches truncation, fast


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _class_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _check_file(path: Path, color_mode: str) -> str | None:
    """None if the file decodes, else a one-line reason."""
    try:
        _open_image(path, color_mode, draft=_VERIFY_DRAFT_PX)
    except Exception as error:  # PIL raises many types for bad files; all mean "skip it"
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(
            ": "
        )
    return None


@dataclass
class _Index:
    samples: list[tuple[Path, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _index_split(split_dir: Path, class_ids: dict[str, int], color_mode: str) -> _Index:
    """Every readable image under ``split_dir/<class>/``; every class folder must have one."""
    files: list[tuple[Path, int]] = []
    for folder in _visible_dirs(split_dir):
        if folder.name not in class_ids:
            raise TrainerError(f"class folder {folder} is not a class of the train split")
        files.extend((path, class_ids[folder.name]) for path in _class_files(folder))
    workers = min(8, os.cpu_count() or 1)
    with warnings.catch_warnings(), ThreadPoolExecutor(workers) as pool:
        warnings.simplefilter("ignore")  # set once here: catch_warnings is not thread-safe
        reasons = list(pool.map(lambda item: _check_file(item[0], color_mode), files))
    index = _Index()
    for (path, label), reason in zip(files, reasons, strict=True):
        if reason is None:
            index.samples.append((path, label))
        else:
            index.skipped.append(f"{path}: {reason}")
    found = {label for _, label in index.samples}
    for folder in _visible_dirs(split_dir):
        if class_ids[folder.name] not in found:
            raise TrainerError(f"class folder {folder} has no readable images")
    return index


def _folder_layout(root: Path) -> dict[str, Path | None]:
    """train/val/test directories: ``train/`` sub-folders when present, else ``root`` alone."""
    if not (root / "train").is_dir():
        return {"train": root, "val": None, "test": None}
    layout: dict[str, Path | None] = {"train": root / "train"}
    for split in ("val", "test"):
        path = root / split
        layout[split] = path if path.is_dir() and _visible_dirs(path) else None
    return layout


def _class_names(train_dir: Path) -> list[str]:
    names = [folder.name for folder in _visible_dirs(train_dir)]
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "none"
        raise TrainerError(
            f"dataset folder {train_dir} needs at least 2 class sub-folders (found {found})"
        )
    return names


def _folder_splits(
    layout: dict[str, Path | None], labels: list[str], request: DatasetRequest, color_mode: str
) -> tuple[dict[str, list[tuple[Path, int]]], list[str]]:
    """Samples per split, carving val/test stratified from train where no folder gives them."""
    class_ids = {name: i for i, name in enumerate(labels)}
    indexed = {
        split: _index_split(path, class_ids, color_mode) for split, path in layout.items() if path
    }
    skipped = [line for index in indexed.values() for line in index.skipped]
    train = indexed["train"].samples
    targets = [label for _, label in train]
    rng = np.random.default_rng(SPLIT_SEED)
    keep: Sequence[int] = range(len(train))
    carved: dict[str, list[int]] = {}
    for split, fraction in (("test", request.test_fraction), ("val", request.val_fraction)):
        if split not in indexed:
            keep, carved[split] = _carve(targets, keep, fraction, rng)
    samples = {"train": [train[i] for i in keep]}
    for split in ("val", "test"):
        samples[split] = (
            indexed[split].samples if split in indexed else [train[i] for i in carved[split]]
        )
    return samples, skipped


@register_dataset("folder", arg="PATH")
def _load_folder(request: DatasetRequest) -> DatasetBundle:
    root = Path(request.arg).expanduser().resolve()
    if not root.is_dir():
        raise TrainerError(f"dataset folder {root} does not exist")
    layout = _folder_layout(root)
    labels = _class_names(layout["train"])  # type: ignore[arg-type]
    color_mode = "L" if request.grayscale else "RGB"
    samples, skipped = _folder_splits(layout, labels, request, color_mode)
    splits = {split: ImageFiles(items, color_mode) for split, items in samples.items()}
    size = request.image_size or FOLDER_IMAGE_SIZE
    channels = 1 if color_mode == "L" else 3
    spec = PreprocessSpec(
        input_size=(size, size),
        color_mode=color_mode,  # type: ignore[arg-type]
        mean=IMAGENET_MEAN if channels == 3 else (0.449,),
        std=IMAGENET_STD if channels == 3 else (0.226,),
        resize_mode="shorter_side",  # keep the aspect ratio: shorter side to size*8/7, centre crop
        resize_size=round(size * 8 / 7),
    )
    return DatasetBundle(
        name=f"folder:{root}",
        labels=labels,
        **splits,
        spec=spec,
        hflip=True,
        class_counts=_bundle_counts(splits, len(labels)),
        skipped_files=len(skipped),
        skipped_details=skipped,
        source=str(root),
    )
