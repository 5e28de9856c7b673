"""ResNet-9: the fast CIFAR-10 network of the DAWNBench speed runs (David Page, myrtle.ai, 2018).

prep conv 64 -> layer1 conv 128 + pool + residual(128) -> layer2 conv 256 + pool
-> layer3 conv 512 + pool + residual(512) -> global max pool -> linear -> logits x 0.125.
Every conv is 3x3 + BN + ReLU; a residual is two of them added to their input.
Built for small inputs (``small_input`` is ignored): 32 px in, a 4x4 map out of layer3.
Two departures from the original, both so that reset_classifier() and the archived keys agree:
the linear layer has a bias, and the 0.125 scale is a fixed (parameter-free) head module.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .layers import he_init, pooled_head, zero_init
from .registry import Classifier, ModelSpec, register_model


def conv_bn(in_ch: int, out_ch: int, *, pool: bool = False) -> nn.Sequential:
    """3x3 conv -> BN -> ReLU (-> 2x2 max-pool): [N, in, H, W] -> [N, out, H or H/2, ...]."""
    layers = [
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """``x + branch(x)`` with ``branch`` two conv-BN-ReLU units of the same width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    @property
    def last_norm(self) -> nn.BatchNorm2d:
        return self.branch[-1][1]

    def forward(self, x: Tensor) -> Tensor:
        return x + self.branch(x)


class Scale(nn.Module):
    """Multiply by a fixed factor (no parameters, nothing in the state dict)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def _layer(in_ch: int, out_ch: int, residual: bool) -> nn.Sequential:
    parts: OrderedDict[str, nn.Module] = OrderedDict(conv=conv_bn(in_ch, out_ch, pool=True))
    if residual:
        parts["res"] = Residual(out_ch)
    return nn.Sequential(parts)


def page_resnet(
    spec: ModelSpec,
    *,
    prep: int = 64,
    widths: tuple[int, ...] = (128, 256, 512),
    residual: tuple[bool, ...] = (True, False, True),
    logit_scale: float = 0.125,
) -> Classifier:
    """The configurable network behind ``resnet9``: a prep conv, then one pooled layer per width."""
    parts: OrderedDict[str, nn.Module] = OrderedDict(prep=conv_bn(spec.in_chans, prep))
    in_ch = prep
    for i, (width, res) in enumerate(zip(widths, residual, strict=True)):
        parts[f"layer{i + 1}"] = _layer(in_ch, width, res)  # halves H and W
        in_ch = width
    backbone = nn.Sequential(parts)  # [N, 512, H/8, W/8]
    head = pooled_head(in_ch, spec.num_classes, pool=nn.AdaptiveMaxPool2d(1))
    head.add_module("scale", Scale(logit_scale))
    model = Classifier(backbone, head, cam_layer=backbone[-1])
    he_init(model)
    if spec.zero_init_residual:
        zero_init(m.last_norm for m in model.modules() if isinstance(m, Residual))
    return model


@register_model("resnet9")
def resnet9(spec: ModelSpec) -> Classifier:
    return page_resnet(spec)
