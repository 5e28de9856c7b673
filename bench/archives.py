"""The archives the benchmark serves, built through the trainer's own path and cached.

Each is ``python -m trainer fit ... --epochs 0 --archive NAME``: random initial weights (speed
does not depend on them), the trainer's real card, preprocessing spec and ``.mar`` writer. With
0 epochs the trainer still evaluates the initial weights on the digits validation and test
splits (~500 images; a minute or three for ResNet-50 at 224 on 2 cores), so archives are built
once into ``bench/.cache/store`` and reused while the command that made them is unchanged.

Models:
- ``r20``: the digits ResNet-20 at 32x32, 1 channel ("L"): overhead-bound (HTTP, upload,
  JPEG decode and batching dominate);
- ``r18``/``r50``: ResNet-18/50 at 224x224 with ``--grayscale replicate``, so the card says
  RGB, 3 channels (what the peers and ImageNet models take). The digits dataset "squashes"
  (resizes straight to 224x224, no crop); the service decodes each photo to RGB and resizes it
  to 224x224 exactly as the card says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    key: str
    arch: str
    label: str
    fit_args: tuple[str, ...] = ()

    @property
    def archive_name(self) -> str:
        return f"bench-{self.key}"

    @property
    def file_name(self) -> str:
        return f"{self.archive_name}-v1.mar"

    def command(self, store: Path, runs: Path) -> list[str]:
        return [
            sys.executable, "-m", "trainer", "fit", "--dataset", "digits", "--arch", self.arch,
            *self.fit_args, "--epochs", "0", "--batch-size", "32", "--seed", "0",
            "--archive", self.archive_name, "--version", "1", "--model-store", str(store),
            "--runs-dir", str(runs), "--progress", "lines",
        ]  # fmt: skip


MODELS: dict[str, ModelSpec] = {
    "r20": ModelSpec("r20", "resnet20", "ResNet-20@32 (digits, 1 ch)"),
    "r18": ModelSpec(
        "r18",
        "resnet18",
        "ResNet-18@224 (RGB)",
        ("--image-size", "224", "--grayscale", "replicate"),
    ),  # fmt: skip
    "r50": ModelSpec(
        "r50",
        "resnet50",
        "ResNet-50@224 (RGB)",
        ("--image-size", "224", "--grayscale", "replicate"),
    ),  # fmt: skip
}


def _stamp(spec: ModelSpec) -> dict[str, object]:
    """What must not change for a cached archive to be reused."""
    import torch

    return {
        "args": spec.command(Path("STORE"), Path("RUNS"))[1:],
        "torch": torch.__version__,
    }


def ensure(spec: ModelSpec, cache: Path, *, rebuild: bool = False, log=print) -> Path:
    """The archive of ``spec`` under ``cache/store``, built with the trainer CLI if needed."""
    from trainer.archive import ArchiveError, read_card

    store, runs = cache / "store", cache / "runs"
    target = store / spec.file_name
    stamp_path = store / f"{spec.archive_name}.json"
    stamp = _stamp(spec)
    if target.is_file() and not rebuild:
        try:
            read_card(target)
            if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
                return target
        except (ArchiveError, ValueError, OSError):
            pass
    target.unlink(missing_ok=True)
    store.mkdir(parents=True, exist_ok=True)
    log(f"building {spec.file_name} with the trainer (0 epochs; it evaluates the test split)")
    command = spec.command(store, runs)
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0 or not target.is_file():
        raise RuntimeError(
            f"`{' '.join(command)}` failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    stamp_path.write_text(json.dumps(stamp, indent=1))
    return target
