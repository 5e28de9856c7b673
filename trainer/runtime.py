"""Runtime facts derived once from the config and the machine: device, precision, ranks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import TrainerError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # A scaler is only needed for fp16; with bf16 or fp32 it is a disabled pass-through.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainerError(
            f"--device {name!r} is not a valid device (auto, cpu, cuda, cuda:N)"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainerError(f"--device {name} asked for CUDA but no CUDA device is available")
    return device


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def init_runtime(device_name: str, amp_mode: str) -> Runtime:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else single."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Runtime(
        device=device,
        amp_dtype=resolve_amp(amp_mode, device),
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
    )


@contextlib.contextmanager
def runtime_scope(device_name: str, amp_mode: str) -> Iterator[Runtime]:
    runtime = init_runtime(device_name, amp_mode)
    try:
        yield runtime
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()
