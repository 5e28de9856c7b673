"""One registry of architectures and one way to build them.

Every builder returns a ``Classifier``: the same named parts for every variant, so that
fine-tuning, Grad-CAM and the service never branch on the architecture.
This package imports only torch/torchvision (it is packed into archives for TorchServe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn


class Classifier(nn.Module):
    """``backbone`` (image -> feature map [N, C, h, w]) followed by ``head`` (-> logits [N, K]).

    ``cam_layer`` is the module whose output Grad-CAM explains: the last convolutional stage.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, cam_layer: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        # Kept out of the module tree (a plain attribute would register it twice).
        object.__setattr__(self, "_cam_layer", cam_layer)

    @property
    def cam_layer(self) -> nn.Module:
        return self._cam_layer

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def classifier(self) -> nn.Linear:
        """The final linear layer (the only part a linear probe trains)."""
        linears = [m for m in self.head.modules() if isinstance(m, nn.Linear)]
        return linears[-1]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the final linear layer with a fresh one for ``num_classes`` outputs."""
        old = self.classifier
        new = nn.Linear(old.in_features, num_classes)
        for parent in self.head.modules():
            for child_name, child in parent.named_children():
                if child is old:
                    setattr(parent, child_name, new)
                    return
        raise RuntimeError("classifier layer not found in head")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What the builders receive; every field is recorded in the model card."""

    num_classes: int
    in_chans: int = 3
    small_input: bool = False  # inputs of 32 px or less: 3x3 stride-1 stem, no max-pool
    zero_init_residual: bool = False


Builder = Callable[[ModelSpec], Classifier]
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder under ``name``; duplicate names are refused."""

    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    small_input: bool = False,
    zero_init_residual: bool = False,
) -> Classifier:
    """Build an untrained ``Classifier`` (He-initialised) by registered name."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown architecture {name!r}; available: {', '.join(list_models())}")
    spec = ModelSpec(
        num_classes=num_classes,
        in_chans=in_chans,
        small_input=small_input,
        zero_init_residual=zero_init_residual,
    )
    return _REGISTRY[name](spec)
