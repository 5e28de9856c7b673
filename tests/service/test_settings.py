"""Settings: defaults, parsing, and invalid values stopping ``service`` with one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, describe_error

ROOT = Path(__file__).resolve().parents[2]


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    return {**env, **values}


def test_defaults(monkeypatch: pytest.MonkeyPatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    settings = Settings()
    assert settings.model_store == Path("model_store")
    assert settings.device == "auto" and settings.max_batch_delay_ms == 0.0
    assert settings.max_upload_bytes == 25 * 1024 * 1024
    assert settings.max_image_pixels == 50_000_000
    assert settings.max_images_per_request == 64
    assert settings.admin_api_key is None and settings.api_key is None
    assert settings.port == 8000 and settings.log_format == "text"
    assert settings.cors_origins == [] and settings.models == []


def test_environment_parsing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("models", "a-v1.mar, b")  # case-insensitive names
    monkeypatch.setenv("LOG_FORMAT", "JSON")
    monkeypatch.setenv("ADMIN_API_KEY", "s3cret-admin-key")
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("DEFAULT_MODEL", "")  # empty = unset
    settings = Settings()
    assert settings.max_batch_size == 8
    assert settings.models == ["a-v1.mar", "b"]
    assert settings.log_format == "json"
    assert settings.default_model is None
    assert settings.admin_api_key is not None
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("MAX_BATCH_SIZE", "0", "MAX_BATCH_SIZE"),
        ("MAX_BATCH_SIZE", "many", "MAX_BATCH_SIZE"),
        ("MAX_BATCH_DELAY_MS", "-1", "MAX_BATCH_DELAY_MS"),
        ("MAX_QUEUE", "0", "MAX_QUEUE"),
        ("REQUEST_TIMEOUT_S", "0", "REQUEST_TIMEOUT_S"),
        ("DEVICE", "gpu", "DEVICE"),
        ("DEVICE", "cuda:x", "DEVICE"),
        ("PRECISION", "int8", "PRECISION"),
        ("PORT", "99999", "PORT"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT"),
        ("ADMIN_API_KEY", "short", "ADMIN_API_KEY"),
        ("TORCH_THREADS", "0", "TORCH_THREADS"),
        ("MALLOC", "jemalloc", "MALLOC"),
    ],
)
def test_invalid_settings_stop_the_service_with_one_line(name: str, value: str, fragment: str):
    proc = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=clean_env(**{name: value}),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("service: invalid setting") and fragment in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cuda_device_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv("DEVICE", "cuda")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "CUDA is not available" in describe_error(info.value)


def test_fp16_needs_cuda_and_bf16_is_the_cpu_opt_in(monkeypatch: pytest.MonkeyPatch):
    import torch

    from service.inference import resolve_precision

    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("PRECISION", "fp16")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "PRECISION=fp16 needs a CUDA device; on a CPU use bf16" in describe_error(info.value)
    monkeypatch.setenv("PRECISION", "bf16")
    assert Settings().precision == "bf16"
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) is None  # fp32: the answers the trainer evaluated
    assert resolve_precision("fp32", cpu) is None
