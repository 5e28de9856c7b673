"""The training hot path: one epoch of training, and evaluation under inference_mode."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .progress import Progress
from .runtime import Runtime


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class EvalOutput:
    loss: float
    accuracy: float
    logits: torch.Tensor  # [N, K] float32 on CPU, in dataset order
    targets: torch.Tensor  # [N]


def _to_device(images: torch.Tensor, targets: torch.Tensor, runtime: Runtime, channels_last: bool):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(runtime.device, non_blocking=True, memory_format=memory_format)
    return images, targets.to(runtime.device, non_blocking=True)


def train_one_epoch(
    *,
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loader: Iterable,
    runtime: Runtime,
    progress: Progress,
    grad_clip: float | None = None,
    channels_last: bool = False,
) -> EpochStats:
    """One pass over ``loader``; the scheduler steps once per batch."""
    model.train()
    total_loss = torch.zeros((), device=runtime.device)
    correct = torch.zeros((), device=runtime.device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    for images, targets in progress.wrap(loader):
        images, targets = _to_device(images, targets, runtime, channels_last)
        with runtime.autocast():
            logits = model(images)
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        batch = targets.shape[0]
        seen += batch
        total_loss += loss.detach() * batch
        correct += (logits.argmax(dim=1) == targets).sum()
        progress.update(loss=loss.item(), acc=correct.item() / seen, lr=scheduler.get_last_lr()[0])
    seconds = time.perf_counter() - start
    return EpochStats(
        loss=total_loss.item() / max(seen, 1),
        accuracy=correct.item() / max(seen, 1),
        images=seen,
        seconds=seconds,
    )


@torch.inference_mode()
def evaluate(
    *,
    model: nn.Module,
    loss_fn: nn.Module,
    loader: Iterable,
    runtime: Runtime,
    channels_last: bool = False,
) -> EvalOutput:
    """Loss, accuracy and the raw logits over ``loader`` (for reports and calibration)."""
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in loader:
        images, targets = _to_device(images, targets, runtime, channels_last)
        with runtime.autocast():
            logits = model(images)
        all_logits.append(logits.float().cpu())
        all_targets.append(targets.cpu())
    if not all_logits:
        empty = torch.empty(0)
        return EvalOutput(loss=float("nan"), accuracy=float("nan"), logits=empty, targets=empty)
    logits = torch.cat(all_logits)
    targets = torch.cat(all_targets)
    loss = nn.functional.cross_entropy(logits, targets).item()
    accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
    return EvalOutput(loss=loss, accuracy=accuracy, logits=logits, targets=targets)
