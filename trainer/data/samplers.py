"""Tools against class imbalance: class weights, balanced oversampling and focal loss.

All three take the integer targets of a split (``DatasetBundle.train.targets``), never images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import WeightedRandomSampler

Reduction = Literal["mean", "sum", "none"]


def class_counts(targets: Sequence[int] | Tensor, num_classes: int) -> Tensor:
    """How many samples each class has: int64 [num_classes]."""
    targets = torch.as_tensor(targets, dtype=torch.long)
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(
            f"targets must lie in [0, {num_classes}), got {targets.min()}..{targets.max()}"
        )
    return torch.bincount(targets, minlength=num_classes)


def class_weights(targets: Sequence[int] | Tensor, num_classes: int) -> Tensor:
    """``auto`` loss weights: inverse class frequency, scikit-learn's "balanced" formula.

    ``w_c = n_samples / (num_classes * n_c)``, so the average weight over the *samples* is 1
    and the loss keeps its scale. A class with no samples gets weight 1 (it is never a target).
    """
    counts = class_counts(targets, num_classes).double()
    total = counts.sum()
    weights = torch.where(counts > 0, total / (num_classes * counts.clamp(min=1)), 1.0)
    return weights.float()


def balanced_sampler(
    targets: Sequence[int] | Tensor,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> WeightedRandomSampler:
    """Oversample rare classes: every class is drawn equally often in expectation.

    Each sample weighs ``1 / count(its class)``; draws are with replacement, ``num_samples``
    per epoch (default: the split's size, so an epoch keeps its length).
    """
    targets = torch.as_tensor(targets, dtype=torch.long)
    if targets.numel() == 0:
        raise ValueError("balanced_sampler needs at least one target")
    counts = torch.bincount(targets).double()
    weights = 1.0 / counts[targets]
    return WeightedRandomSampler(
        weights,
        num_samples=num_samples or len(targets),
        replacement=True,
        generator=generator,
    )


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy with each term scaled by ``(1 - p)^gamma``.

    ``weight`` and ``label_smoothing`` follow ``nn.CrossEntropyLoss`` exactly (per-class weights
    on every smoothed term, the mean divided by the summed target weights), so ``gamma=0``
    gives the same value as cross-entropy with the same arguments.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        weight: Tensor | None = None,
        label_smoothing: float = 0.0,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, not {gamma}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), not {label_smoothing}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"unknown reduction {reduction!r}")
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight).float())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:  # logits [N, K], target [N]
        log_p = F.log_softmax(logits.float(), dim=1)
        terms = -log_p  # [N, K]: per-class cross-entropy terms
        if self.gamma:
            terms = terms * (1.0 - log_p.exp()).clamp(min=0.0).pow(self.gamma)
        weight = self.weight if self.weight is not None else torch.ones_like(log_p[0])
        target_weight = weight[target]  # [N]
        loss = (1.0 - self.label_smoothing) * target_weight * terms.gather(1, target[:, None])[:, 0]
        if self.label_smoothing:
            smooth = (terms * weight[None, :]).sum(dim=1) / logits.shape[1]
            loss = loss + self.label_smoothing * smooth
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        return loss.sum() / target_weight.sum()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, label_smoothing={self.label_smoothing}"
