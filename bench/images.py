"""The benchmark's test images: real photos of mixed sizes as JPEG, the same set for every target.

By default 64 JPEGs (quality 90) are cut from the two photos scikit-learn ships (``china.jpg``,
``flower.jpg``, 427x640) at fixed random offsets and resized to eight sizes, eight of each:
the recipe of the reference set in ``../shared/bench-images`` (whose README describes it), so
figures from either set are comparable. They are written once into ``bench/.cache/images``.
``--images DIR`` uses the JPEG/PNG files of DIR instead (e.g. that reference set).
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path

SIZES: tuple[tuple[int, int], ...] = (  # (width, height), as in the reference set
    (640, 480),
    (500, 375),
    (1024, 768),
    (320, 240),
    (800, 600),
    (375, 500),
    (224, 224),
    (480, 640),
)
COUNT = 64
QUALITY = 90
SEED = 0
SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageSet:
    """The files a run sends, in the order every target gets them."""

    directory: Path
    files: tuple[Path, ...]

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def digest(self) -> str:
        """A short hash of the contents, so results name the exact set they were measured on."""
        sha = hashlib.sha256()
        for path in self.files:
            sha.update(path.name.encode())
            sha.update(path.read_bytes())
        return sha.hexdigest()[:12]

    def describe(self) -> dict[str, object]:
        from PIL import Image

        sizes: dict[str, int] = {}
        for path in self.files:
            with Image.open(path) as image:
                key = f"{image.width}x{image.height}"
            sizes[key] = sizes.get(key, 0) + 1
        return {
            "directory": str(self.directory),
            "count": len(self.files),
            "total_bytes": self.total_bytes,
            "mean_bytes": round(self.total_bytes / max(1, len(self.files))),
            "sizes": sizes,
            "sha256_12": self.digest(),
        }


def _crop_box(
    rng: random.Random, source: tuple[int, int], size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A random box of the target's aspect ratio, 60-100% of the largest that fits."""
    src_w, src_h = source
    aspect = size[0] / size[1]
    max_w = min(src_w, int(src_h * aspect))
    scale = rng.uniform(0.6, 1.0)
    box_w = max(16, int(max_w * scale))
    box_h = max(16, int(box_w / aspect))
    left = rng.randint(0, src_w - box_w)
    top = rng.randint(0, src_h - box_h)
    return left, top, left + box_w, top + box_h


def generate(directory: Path, *, count: int = COUNT, seed: int = SEED) -> ImageSet:
    """Write ``count`` JPEGs cut from scikit-learn's sample photos into ``directory``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        photo = photos[index % len(photos)]
        crop = photo.crop(_crop_box(rng, photo.size, (width, height)))
        image = crop.resize((width, height), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=QUALITY)
        path = directory / f"img_{index:02d}_{width}x{height}.jpg"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(path)
        files.append(path)
    return ImageSet(directory, tuple(files))


def load(directory: Path) -> ImageSet:
    """The image files of ``directory`` (sorted by name); raises if there are none."""
    files = tuple(
        sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    )
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(SUFFIXES)}) in {directory}")
    return ImageSet(directory, files)


def ensure(directory: Path | None, cache: Path) -> ImageSet:
    """``directory``'s images, or the generated set (made once under ``cache``)."""
    if directory is not None:
        return load(directory)
    target = cache / "images"
    existing = sorted(target.glob("img_*.jpg")) if target.is_dir() else []
    if len(existing) == COUNT:
        return ImageSet(target, tuple(existing))
    return generate(target)
