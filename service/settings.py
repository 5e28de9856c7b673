"""Every setting of the service, read from environment variables (one place, validated).

Invalid values stop the start with one clear line (see ``service.__main__``).
"""

from __future__ import annotations

import math
import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MAX_AUTO_WORKERS = 2  # forward threads per model version when INFERENCE_WORKERS is not set

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Environment variables (case-insensitive). Defaults suit a CPU container."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", env_ignore_empty=True, frozen=True
    )

    model_store: Path = Field(Path("model_store"), description="folder holding the .mar archives")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated archive file names (or model names) to load; empty = all",
    )
    default_model: str | None = Field(None, description="default model name; else the newest")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]{1,2})?)$")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="autocast dtype: on CUDA auto = bf16 if supported, else fp16; on a CPU "
        "auto = fp32 and bf16 is the opt-in (fast on CPUs with AVX512-BF16 or AMX)",
    )
    channels_last: bool | None = Field(
        None, description="channels_last memory format (default: on; measured faster on CPU too)"
    )
    fold_batchnorm: bool = Field(
        True, description="fold BatchNorm into the convolutions for serving (same answers)"
    )
    torchscript: Literal["auto", "on", "off"] = Field(
        "auto", description="serve the fp32 forward as a frozen TorchScript graph (same answers; "
        "one GIL release per batch instead of one per layer); auto: on a CPU for every input "
        "size, on other devices for inputs of at most 64x64 pixels",
    )  # fmt: skip
    decode_on_gpu: Literal["auto", "on", "off"] = Field(
        "auto", description="decode JPEGs in one torchvision decode_jpeg call per batch on the "
        "model's device (nvjpeg on CUDA) and run the preset there; the CPU only checks headers. "
        "auto: on for a CUDA device (ResNet-50 on an H200: the CPU pool decoded 1,123 img/s at "
        "best, nvjpeg 10,594); on: on any device (on a CPU: libjpeg-turbo via torchvision)",
    )  # fmt: skip
    decode_on_forward_thread: Literal["auto", "on", "off"] = Field(
        "auto", description="decode each upload on the forward thread that computes its batch "
        "instead of in the preprocessing pool (one thread hand-off per request instead of "
        "two); auto: on a CPU with two or more forward threads or one CPU per process "
        "(WORKERS), for inputs of at most 64x64 pixels, where decoding costs more than the "
        "forward",
    )  # fmt: skip
    max_batch_size: int = Field(16, ge=1, le=4096)
    max_batch_delay_ms: float = Field(0.0, ge=0.0, le=10_000.0)
    max_queue: int = Field(256, ge=1, le=1_000_000, description="images waiting per model version")
    request_timeout_s: float = Field(30.0, gt=0.0, le=3600.0)
    max_upload_bytes: int = Field(25 * MiB, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_images_per_request: int = Field(64, ge=1, le=10_000)
    max_concurrent_explain: int = Field(2, ge=1, le=1024)
    inference_workers: int | None = Field(
        None, ge=1, le=64,
        description=f"forward threads per model version (default: usable CPUs // TORCH_THREADS, "
        f"at most {MAX_AUTO_WORKERS}); extra ones start when HELPER_BACKLOG images wait",
    )  # fmt: skip
    helper_backlog: int = Field(
        1, ge=1, le=4096,
        description="images waiting (while the first forward runs) before a helper forward starts",
    )  # fmt: skip
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="default: the process's CPUs - 1 (at least 1)"
    )
    preprocess_threads: int | None = Field(
        None, ge=1, le=1024, description="default: the process's CPUs (usable CPUs / WORKERS)"
    )
    lone_image_threads: int | None = Field(
        None, ge=1, le=1024,
        description="torch threads (CPU) for a forward of one image while nothing else is "
        "queued, decoding or computing, in this process or (WORKERS) another: the other cores "
        "are idle then (default: the usable CPUs for inputs over 64x64 pixels, otherwise "
        "TORCH_THREADS; 1 turns it off)",
    )  # fmt: skip
    malloc: Literal["auto", "tcmalloc", "system"] = Field(
        "auto",
        description="memory allocator: 'auto' preloads tcmalloc when installed (fewer page "
        "faults per forward; service/allocator.py), 'tcmalloc' requires it, 'system' never",
    )
    gc_freeze: bool = Field(
        True, description="after each model load or unload, collect once and freeze the "
        "surviving objects (gc.freeze) so that the collector no longer walks them; a full "
        "collection of them took ~300 ms with the GIL held, every ~6 s under load",
    )  # fmt: skip
    warmup: Literal["all", "none"] = Field(
        "all",
        description="'all': one forward per batch size (on CUDA per padded size: 1, 2, 4, ...) "
        "before ready; 'none' for tests",
    )
    admin_api_key: SecretStr | None = None
    api_key: SecretStr | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    graceful_timeout_s: float = Field(
        30.0, gt=0.0, le=3600.0, description="on SIGTERM: how long in-flight requests may finish"
    )
    access_log: bool = False
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    host: str = "0.0.0.0"  # noqa: S104 (a container listens on every interface)
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(
        1, ge=1, le=64,
        description="service processes sharing the port (Linux SO_REUSEPORT: the kernel spreads "
        "connections over them), each with its own event loop, batchers and copy of every "
        "model, and an equal share of the CPUs for its thread defaults; management calls are "
        "applied in every process before they are answered (service/workers.py)",
    )  # fmt: skip

    @field_validator("models", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("admin_api_key", "api_key")
    @classmethod
    def _key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 8:
            raise ValueError("must be at least 8 characters")
        return value

    @field_validator(
        "log_format", "log_level", "precision", "warmup", "malloc", "torchscript",
        "decode_on_forward_thread", mode="before",
    )  # fmt: skip
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_device(self) -> Settings:
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"DEVICE={self.device} but CUDA is not available")
            index = int(self.device.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise ValueError(f"DEVICE={self.device} but only {torch.cuda.device_count()} GPUs")
        return self

    @model_validator(mode="after")
    def _check_precision(self) -> Settings:
        if self.precision == "fp16" and not self.torch_device.startswith("cuda"):
            raise ValueError("PRECISION=fp16 needs a CUDA device; on a CPU use bf16")
        return self

    @model_validator(mode="after")
    def _check_workers(self) -> Settings:
        if self.workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("WORKERS > 1 needs SO_REUSEPORT (Linux), which this system lacks")
        if self.workers > 1 and self.port == 0:
            raise ValueError(
                "WORKERS > 1 needs a fixed PORT: with 0 each process would get its own"
            )
        return self

    @property
    def torch_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    @property
    def threads(self) -> int:
        """Torch intra-op threads: by default one core fewer than the process may use.

        The spare core runs the event loop, uploads and decoding of the next batch while the
        forward runs (measured on 2 cores: 1 torch thread instead of 2 gave 1.2x the images/s
        of ResNet-20/18 and 2x of ResNet-50 at C=32, because OpenMP threads that share their
        cores with the decoders spin-wait at every barrier; bench/RESULTS.md).
        """
        return self.torch_threads or max(1, self.process_cpus - 1)

    @property
    def forward_workers(self) -> int:
        """Forward threads per model version: as many as the torch threads leave cores for."""
        auto = min(MAX_AUTO_WORKERS, self.process_cpus // self.threads)
        return self.inference_workers or max(1, auto)

    @property
    def pool_threads(self) -> int:
        return self.preprocess_threads or self.process_cpus

    @property
    def process_cpus(self) -> int:
        """The CPUs one service process plans its threads for: its share of the usable ones."""
        return max(1, available_cpus() // self.workers)


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (containers).

    ``os.cpu_count()`` counts the host's CPUs, which inside a container limited to 2 CPUs on a
    64-core node would start 64 threads fighting over 2 CPUs' worth of time.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, count)


def describe_error(exc: ValidationError) -> str:
    """One line naming the first bad environment variable and why."""
    first = exc.errors()[0]
    name = ".".join(str(part) for part in first.get("loc", ())).upper()
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    extra = f" ({exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    where = f"invalid setting {name}" if name else "invalid settings"
    return f"{where}: {message}{extra}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
