"""End-to-end training runs through the CLI: archive round trip, resume, DDP, imbalance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, run_trainer
from trainer.archive import load_model, read_archive
from trainer.build import MatchChannels
from trainer.data.datasets import load_dataset
from trainer.data.presets import EvalPreset

pytestmark = pytest.mark.slow

# Small and quick: ResNet-20 on digits upscaled to 16 px instead of 32 (4x less compute).
QUICK = ("--dataset", "digits", "--arch", "resnet20", "--image-size", "16", "--batch-size", "128")


def _single_run(runs_dir: Path) -> Path:
    runs = [p for p in runs_dir.iterdir() if (p / "config.json").is_file()]
    assert len(runs) == 1, runs
    return runs[0]


def _test_logits(model: torch.nn.Module, preset: EvalPreset, channels: int) -> torch.Tensor:
    bundle = load_dataset("digits", data_root="data")
    transform = MatchChannels(channels, preset)
    images = torch.stack([transform(bundle.test[i][0]) for i in range(len(bundle.test))])
    with torch.inference_mode():
        return model.eval()(images)


def test_archive_round_trip_gives_identical_predictions(digits_store: Path) -> None:
    archive = read_archive(digits_store / "digits-v1.mar")
    card = archive.card
    assert card.name == "digits" and card.version == "1" and card.arch == "resnet20"
    assert card.labels == [str(i) for i in range(10)] and card.input_size == (32, 32)
    assert card.in_chans == 1 and card.grayscale_policy == "native" and card.small_input
    assert 0.05 <= card.temperature <= 20
    assert {"accuracy", "ece_before", "ece_after", "macro_f1"} <= set(card.metrics)
    assert card.dataset["split_sizes"] == {"train": 1293, "val": 145, "test": 359}
    assert card.training_config["model"]["arch"] == "resnet20"

    run = _single_run(digits_store.parent / "runs")
    from trainer.models import build_model

    trained = build_model("resnet20", num_classes=10, in_chans=1, small_input=True)
    trained.load_state_dict(torch.load(run / "best.pt", weights_only=True)["model"])
    preset = EvalPreset(card.preprocess_spec)
    expected = _test_logits(trained, preset, 1)
    restored = _test_logits(load_model(archive), preset, 1)
    assert torch.equal(expected, restored)
    report = json.loads((run / "report.json").read_text())
    accuracy = (
        (restored.argmax(1) == torch.tensor(load_dataset("digits", data_root="data").test.targets))
        .float()
        .mean()
    )
    assert abs(accuracy.item() - report["accuracy"]) < 1e-6


def test_archive_command_writes_the_next_version(digits_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "digits-v1.mar").write_bytes((digits_store / "digits-v1.mar").read_bytes())
    run = _single_run(digits_store.parent / "runs")
    proc = run_trainer("archive", str(run), "--name", "digits", "--model-store", str(store))
    assert proc.returncode == 0, proc.stderr
    assert read_archive(store / "digits-v2.mar").card.version == "2"
    assert not list(store.glob("*.tmp"))  # atomic writes leave no temporaries


def _without_timings(rows: list[str]) -> list[dict]:
    return [
        {k: v for k, v in json.loads(r).items() if k not in ("seconds", "images_per_s")}
        for r in rows
    ]


def _fit_command(runs_dir: Path, run_id: str, epochs: int) -> list[str]:
    return [
        sys.executable, "-m", "trainer", "fit", *QUICK, "--epochs", str(epochs), "--seed", "3",
        "--runs-dir", str(runs_dir), "--run-id", run_id, "--progress", "lines",
    ]  # fmt: skip


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    straight = subprocess.run(
        _fit_command(runs, "straight", 3), cwd=ROOT, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr

    # Interrupt a second, identical run (SIGKILL: no clean-up) once its first epoch is saved.
    proc = subprocess.Popen(_fit_command(runs, "interrupted", 3), cwd=ROOT, stderr=subprocess.PIPE)
    last = runs / "interrupted" / "last.pt"
    deadline = time.monotonic() + 300
    try:
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.exists(), "the first epoch never finished"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = len((runs / "interrupted" / "metrics.jsonl").read_text().splitlines())
    assert done < 3, "the run finished before it could be interrupted"

    resumed = run_trainer("fit", "--resume", str(runs / "interrupted"))
    assert resumed.returncode == 0, resumed.stderr
    for name in ("last.pt", "best.pt"):
        a = torch.load(runs / "straight" / name, weights_only=True)["model"]
        b = torch.load(runs / "interrupted" / name, weights_only=True)["model"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    history_a = (runs / "straight" / "metrics.jsonl").read_text().splitlines()
    history_b = (runs / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert _without_timings(history_a) == _without_timings(history_b)


def test_ddp_two_cpu_processes_on_gloo(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "trainer", "fit", *QUICK, "--epochs", "2", "--runs-dir", str(runs),
            "--archive", "ddp", "--model-store", str(tmp_path / "store"), "--progress", "lines",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = _single_run(runs)
    report = json.loads((run / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["accuracy"] > 0.25  # 2 short epochs (10 steps each) at 16 px: chance is 0.1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # only rank 0 writes
    assert read_archive(tmp_path / "store" / "ddp-v1.mar").card.num_classes == 10


def _imbalanced_folder(root: Path) -> Path:
    """Three classes of real photo crops (sklearn's sample images), 40/40/8 images."""
    import numpy as np
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for label, count in (("china", 40), ("flower", 40), ("mixed", 8)):
        folder = root / label
        folder.mkdir(parents=True)
        for i in range(count):
            photo = photos[i % 2] if label == "mixed" else photos[0 if label == "china" else 1]
            y, x = rng.integers(0, 300), rng.integers(0, 500)
            Image.fromarray(photo[y : y + 96, x : x + 96]).save(folder / f"{i}.jpg")
    (root / "china" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.mark.parametrize("balance", [("--class-weights", "auto"), ("--sampler", "balanced")])
def test_imbalanced_folder_trains(tmp_path: Path, balance: tuple[str, str]) -> None:
    data = _imbalanced_folder(tmp_path / "photos")
    proc = run_trainer(
        "fit", "--dataset", f"folder:{data}", "--arch", "resnet20", "--image-size", "32",
        "--epochs", "2", "--batch-size", "16", *balance, "--runs-dir", str(tmp_path / "runs"),
        "--progress", "lines",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 unreadable file" in proc.stderr
    assert "ratio 5" in proc.stderr  # 40 vs 8 images before the split
    run = _single_run(tmp_path / "runs")
    report = json.loads((run / "report.json").read_text())
    assert [c["label"] for c in report["per_class"]] == ["china", "flower", "mixed"]
    if balance[0] == "--class-weights":
        assert "class weights:" in proc.stderr
