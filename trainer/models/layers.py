"""Pieces every family shares: He initialisation and the pooled classification head.

Imports only torch (this package is packed into archives for TorchServe).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from torch import nn


def he_init(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) for every conv; norm layers start as identity (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def zero_init(norms: Iterable[nn.BatchNorm2d]) -> None:
    """Zero ``norms``, the last BN of each residual branch: blocks start as identity."""
    for norm in norms:
        nn.init.zeros_(norm.weight)


def pooled_head(
    in_features: int, num_classes: int, *, pool: nn.Module | None = None, dropout: float = 0.0
) -> nn.Sequential:
    """Global pool (average by default) -> flatten -> (dropout) -> ``fc``: [N, C, h, w] -> [N, K].

    The linear layer is named ``fc`` as in torchvision's ResNet, so its keys are ``head.fc.*``.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        pool=pool if pool is not None else nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1)
    )
    if dropout:
        layers["dropout"] = nn.Dropout(dropout)
    layers["fc"] = nn.Linear(in_features, num_classes)
    return nn.Sequential(layers)
