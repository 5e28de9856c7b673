"""Optimisers and learning-rate schedules, picked from tables by name."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .config import OptimConfig, ScheduleConfig


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # No weight decay on BatchNorm parameters and biases (standard for ResNets).
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


OPTIMIZER_BUILDERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": lambda groups, cfg: torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0
    ),
    "adamw": lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr),
}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZER_BUILDERS[cfg.optimizer](_param_groups(model, cfg.weight_decay), cfg)


def _with_warmup(factor: Callable[[int], float], warmup_steps: int) -> Callable[[int], float]:
    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return factor(step - warmup_steps)

    return schedule


def _cosine(total: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _step(milestones: list[int], gamma: float) -> Callable[[int], float]:
    return lambda step: gamma ** sum(step >= m for m in milestones)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, max_lr: float, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A scheduler stepped once per batch; warm-up (linear) precedes cosine/step/constant."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.schedule == "onecycle":
        pct_start = warmup / total if warmup else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, total_steps=total + 1, pct_start=pct_start
        )
    milestones = cfg.milestones or [cfg.epochs // 2, cfg.epochs * 3 // 4]
    factors: dict[str, Callable[[int], float]] = {
        "cosine": _cosine(total - warmup),
        "step": _step([m * steps_per_epoch - warmup for m in milestones], cfg.gamma),
        "constant": lambda step: 1.0,
    }
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _with_warmup(factors[cfg.schedule], warmup))
