"""Shared fixtures: a model store holding a digits archive produced by the trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_trainer(
    *args: str, cwd: Path | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run ``python -m trainer ARGS`` as a user would, returning the completed process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store with ``digits-v1.mar``: a ResNet-20 trained briefly (4 epochs) on digits by the CLI."""
    root = tmp_path_factory.mktemp("digits_store")
    store = root / "model_store"
    proc = run_trainer(
        "fit", "--dataset", "digits", "--arch", "resnet20", "--epochs", "4",
        "--archive", "digits", "--model-store", str(store), "--runs-dir", str(root / "runs"),
        "--seed", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (store / "digits-v1.mar").is_file()
    return store
