"""Bad input to the trainer gives one clear error line and exit status 2, never a traceback."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from tests.conftest import run_trainer


def _assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_unknown_arch(tmp_path: Path) -> None:
    proc = run_trainer("fit", "--arch", "resnet7", "--runs-dir", str(tmp_path))
    _assert_one_line_error(proc, "unknown architecture 'resnet7'", "resnet20")


def test_unknown_dataset(tmp_path: Path) -> None:
    proc = run_trainer("fit", "--dataset", "imagenet21k", "--runs-dir", str(tmp_path))
    _assert_one_line_error(proc, "unknown dataset 'imagenet21k'", "digits")


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    proc = run_trainer("fit", "--dataset", f"folder:{missing}", "--runs-dir", str(tmp_path))
    _assert_one_line_error(proc, "does not exist")


def test_empty_class_folder(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "images"
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(root / "cats" / f"{i}.png")
    proc = run_trainer("fit", "--dataset", f"folder:{root}", "--runs-dir", str(tmp_path / "runs"))
    _assert_one_line_error(proc, "dogs")


def test_dataset_not_downloadable_offline(tmp_path: Path) -> None:
    proc = run_trainer(
        "fit", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"), "--no-download",
        "--runs-dir", str(tmp_path / "runs"),
    )  # fmt: skip
    _assert_one_line_error(proc, "cifar10", str(tmp_path / "data"))


def test_corrupt_archive_given_to_evaluate(tmp_path: Path) -> None:
    bad = tmp_path / "digits-v1.mar"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip file")
    proc = run_trainer("evaluate", str(bad))
    _assert_one_line_error(proc, "digits-v1.mar")


def test_archive_with_tampered_weights_given_to_evaluate(tmp_path: Path) -> None:
    path = tmp_path / "x.mar"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model-card.json", "{not json")
    proc = run_trainer("evaluate", str(path))
    _assert_one_line_error(proc, "not valid JSON")


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--epochs", "-1", "--epochs"),
        ("--optimizer", "lion", "--optimizer"),
        ("--mode", "finetune", "--pretrained"),
    ],
)
def test_invalid_flag_values(tmp_path: Path, flag: str, value: str, needle: str) -> None:
    proc = run_trainer("fit", flag, value, "--runs-dir", str(tmp_path))
    _assert_one_line_error(proc, needle)


def test_dataset_download_fails_offline_with_one_line(tmp_path: Path) -> None:
    """The default path (downloads allowed) on a machine without network access."""
    from torchvision.datasets import CIFAR10

    from trainer.data.datasets import _can_connect

    if _can_connect(CIFAR10.url):
        pytest.skip("the CIFAR-10 host is reachable: this test covers the offline case")
    proc = run_trainer(
        "fit", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
        "--runs-dir", str(tmp_path / "runs"),
    )  # fmt: skip
    _assert_one_line_error(proc, "cifar10", str(tmp_path / "data"))
