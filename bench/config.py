"""What one benchmark run measures: models, targets, load points, durations (typed, validated)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .archives import MODELS

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"

# the HTTP targets, in the order they are measured for each model
# torchserve-<W>w: W workers (OMP_NUM_THREADS=1 when W > 1); -omp1: 1 worker with OMP 1 too
# http-floor: a FastAPI endpoint that only reads the body (bench/floor_app.py); it does not
# depend on the model, so it is measured with the first model's load only
HTTP_TARGETS = (
    "service", "service-mbs1", "naive", "torchserve-1w", "torchserve-1w-omp1", "torchserve-2w",
    "http-floor",
)  # fmt: skip
TARGETS = ("limit", *HTTP_TARGETS)
MODEL_FREE_TARGETS = ("http-floor",)
PEER_MODEL = "r18"  # T2/T3's model: its service and best TorchServe get paired rounds too


@dataclass(frozen=True, kw_only=True)
class Timing:
    """Warm-up and window length (seconds) for one model; each point is warm-up + repeats x D."""

    warmup_s: float
    duration_s: float


MAX_WARMUP_S = 20.0  # no point warms up longer

# An open-loop window's p99 is one of its slowest few answers: 12 s of ResNet-50 at 90% of
# 15.9 req/s held about 170, so its p99 was the second slowest, and one slow second of the
# host decided T8 (windows 6.46 / 7.44 / 3.34 on 2026-12-05). An open-loop window lasts long
# enough to hold this many answers at its rate (p99: about the fourth slowest), within a bound.
MIN_OPEN_LOOP_ANSWERS = 400
MAX_OPEN_LOOP_WINDOW_S = 40.0


def open_window(timing: Timing, rate: float) -> Timing:
    """``timing`` with a window of at least ``MIN_OPEN_LOOP_ANSWERS`` at ``rate`` req/s."""
    wanted = MIN_OPEN_LOOP_ANSWERS / rate if rate > 0 else timing.duration_s
    duration_s = max(timing.duration_s, min(MAX_OPEN_LOOP_WINDOW_S, wanted))
    return Timing(warmup_s=timing.warmup_s, duration_s=duration_s)


def settled(timing: Timing, windows: float) -> Timing:
    """``timing`` with a warm-up of at least ``windows`` of its windows: for a fresh process.

    The paired rounds start every side afresh; a process that has just started (its first
    batches of each size, its allocator's pools, for the service how its batches fall into
    step with the clients) is slower than the same process a few windows later, on every
    side but not by the same amount (see ``BenchConfig.paired_settle_windows``).
    """
    warmup_s = max(timing.warmup_s, min(MAX_WARMUP_S, windows * timing.duration_s))
    return Timing(warmup_s=warmup_s, duration_s=timing.duration_s)


@dataclass(kw_only=True)
class BenchConfig:
    models: tuple[str, ...] = ("r20", "r18", "r50")
    targets: tuple[str, ...] = TARGETS
    # targets measured per model when not all of them (the compute-bound sanity check needs
    # the service and the limit; its peers take minutes on 2 cores)
    model_targets: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"r50": ("limit", "service", "naive", "torchserve-1w-omp1")}
    )
    concurrency: tuple[int, ...] = (1, 8, 32, 64)
    open_loop: tuple[float, ...] = (0.5, 0.9)  # fractions of the measured capacity
    open_loop_targets: tuple[str, ...] = ("service",)
    # the open-loop capacity: one window at each of these fractions of the best closed-loop
    # req/s, highest first, until one is sustained (``report.overload_reason`` finds none);
    # the closed loop's best is an upper bound that the open loop, whose batches form from
    # arrivals, often cannot sustain (several T8 points at 90% of it were past capacity)
    capacity_probes: tuple[float, ...] = (1.0, 0.85, 0.7, 0.55)
    repeats: int = 3
    # a window must hold many batch cycles: images complete a whole batch at a time, so a
    # 5 s window of ResNet-50 (a batch of 16 takes ~2.5 s per forward thread on 2 cores) could
    # only count 3 or 4 batches: +-25% from where its edges fell (the first full run's T7)
    timing: dict[str, Timing] = field(
        default_factory=lambda: {
            "r20": Timing(warmup_s=1.5, duration_s=3.0),
            "r18": Timing(warmup_s=2.0, duration_s=5.0),
            "r50": Timing(warmup_s=4.0, duration_s=12.0),
        }
    )
    limit_batches: tuple[int, ...] = (8, 16)  # plus the service's MAX_BATCH_SIZE if different
    # rounds that measure the LIMIT (at its best configuration) and the service (C=1, C=32)
    # back to back, alternating which goes first: on a shared host the same code drifts by
    # 20-40% within minutes, so the service-vs-LIMIT ratios (T1, T4, T6, T7) are the median of
    # the per-round ratios instead of two figures measured minutes apart (0: no paired rounds)
    paired_rounds: int = 3
    # warm-up of each fresh process in those rounds, in windows of the model's duration (at
    # least its usual warm-up): a service or TorchServe started seconds before is not in steady
    # state yet. Fresh processes' first C=32 window after the usual 2 s (ResNet-18, reference
    # images, 2026-12-03): TorchServe 2 workers 48.0 img/s, p99 949 ms, then 56.0-62.4 img/s,
    # p99 655-695 ms in the next four; the service p99 875 ms, then 377-553 ms in the next five
    paired_settle_windows: float = 2.0
    body: str = "raw"  # raw image/jpeg bodies, or multipart/form-data ("file" parts)
    images_per_request: int = 1
    images_dir: Path | None = None
    service_env: dict[str, str] = field(default_factory=dict)  # extra settings for both services
    ts_batch_size: int = 8
    ts_max_batch_delay_ms: int = 10
    install_torchserve: bool = True
    rebuild_archives: bool = False
    gpu: bool = False
    loadgen_procs: int = 1
    cache: Path = CACHE
    results_dir: Path = ROOT / "bench" / "results"
    results_md: Path = ROOT / "bench" / "RESULTS.md"
    label: str = "full"

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise ValueError(f"unknown target(s) {bad}; choose from {list(TARGETS)}")
        if self.repeats < 1 or any(c < 1 for c in self.concurrency):
            raise ValueError("repeats and concurrency levels must be >= 1")
        if self.paired_rounds < 0:
            raise ValueError("paired_rounds must be >= 0")
        if self.paired_settle_windows < 0:
            raise ValueError("paired_settle_windows must be >= 0")
        if self.body not in ("raw", "multipart"):
            raise ValueError("body must be 'raw' or 'multipart'")
        if self.images_per_request > 1 and self.body != "multipart":
            raise ValueError("several images per request need --body multipart")

    def targets_for(self, model: str) -> tuple[str, ...]:
        wanted = self.model_targets.get(model)
        first = model == self.models[0]
        return tuple(
            t for t in self.targets
            if (wanted is None or t in wanted) and (first or t not in MODEL_FREE_TARGETS)
        )  # fmt: skip

    def timing_for(self, model: str) -> Timing:
        return self.timing.get(model, Timing(warmup_s=2.0, duration_s=4.0))

    def paired_timing_for(self, model: str) -> Timing:
        """``timing_for`` with the warm-up of a fresh process in the paired rounds."""
        return settled(self.timing_for(model), self.paired_settle_windows)

    def service_settings(self) -> dict[str, str]:
        """The environment of the 'service' target (defaults unless overridden)."""
        return dict(self.service_env)

    def max_batch_size(self) -> int:
        from service.settings import Settings

        value = self.service_env.get("MAX_BATCH_SIZE")
        return int(value) if value else Settings.model_fields["max_batch_size"].default

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("images_dir", "cache", "results_dir", "results_md"):
            data[key] = str(data[key]) if data[key] is not None else None
        return data


def quick(**overrides: Any) -> BenchConfig:
    """A few minutes: the two models of the targets T1-T6/T8, one repeat, short windows."""
    base: dict[str, Any] = {
        "models": ("r20", "r18"),
        "targets": (
            "limit",
            "service",
            "service-mbs1",
            "naive",
            "torchserve-1w",
            "torchserve-1w-omp1",
            "http-floor",
        ),  # fmt: skip
        "model_targets": {},
        "concurrency": (1, 32),
        "open_loop": (0.9,),
        "capacity_probes": (1.0, 0.8),
        "repeats": 1,
        "timing": {
            "r20": Timing(warmup_s=1.0, duration_s=2.0),
            "r18": Timing(warmup_s=1.5, duration_s=3.0),
            "r50": Timing(warmup_s=2.0, duration_s=3.0),
        },
        "limit_batches": (16,),
        "paired_rounds": 1,
        "label": "quick",
    }
    base.update(overrides)
    return BenchConfig(**base)


def gpu(**overrides: Any) -> BenchConfig:
    """CUDA: ResNet-50@224, mixed precision, large batches, GPU utilisation sampled."""
    cores = os.cpu_count() or 1
    base: dict[str, Any] = {
        "models": ("r50",),
        "targets": ("limit", "service", "naive", "torchserve-1w"),
        "model_targets": {},
        "concurrency": (1, 64, 256, 512),
        "open_loop": (0.5, 0.9),
        "timing": {"r50": Timing(warmup_s=5.0, duration_s=10.0)},
        "limit_batches": (64, 128),
        "service_env": {
            "DEVICE": "cuda",
            "PRECISION": "bf16",
            "MAX_BATCH_SIZE": "128",
            "MAX_QUEUE": "4096",
            "PREPROCESS_THREADS": str(cores),
        },
        "gpu": True,
        "loadgen_procs": max(1, min(4, cores // 4)),
        "label": "gpu",
    }
    base.update(overrides)
    return BenchConfig(**base)
