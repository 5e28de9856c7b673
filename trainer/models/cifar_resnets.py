"""The CIFAR ResNets of He et al. 2016 (sec. 4.2): resnet20/32/44/56/110.

A 3x3 conv stem of 16 channels, then 3 stages of ``n`` basic blocks at 16/32/64 channels
(strides 1/2/2), global average pool and a linear layer: 6n + 2 weighted layers.
Where a block changes shape the shortcut is a projection (option B: 1x1 conv + BN).
Built for small inputs: ``small_input`` is ignored (the stem never downsamples).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1, conv3x3

from .layers import he_init, pooled_head, zero_init
from .registry import Classifier, ModelSpec, register_model


def _stage(in_ch: int, out_ch: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
    first = BasicBlock(in_ch, out_ch, stride, downsample)
    return nn.Sequential(first, *(BasicBlock(out_ch, out_ch) for _ in range(blocks - 1)))


def cifar_resnet(
    spec: ModelSpec, *, depth: int, widths: tuple[int, ...] = (16, 32, 64)
) -> Classifier:
    """A ``depth``-layer CIFAR ResNet (``depth = 6n + 2``); keys follow torchvision's ResNet."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2, not {depth}")
    blocks = (depth - 2) // 6
    parts: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=conv3x3(spec.in_chans, widths[0]),  # [N, 16, H, W]
        bn1=nn.BatchNorm2d(widths[0]),
        relu=nn.ReLU(inplace=True),
    )
    in_ch = widths[0]
    for i, width in enumerate(widths):  # H, W halve at every stage after the first
        parts[f"layer{i + 1}"] = _stage(in_ch, width, blocks, stride=1 if i == 0 else 2)
        in_ch = width
    backbone = nn.Sequential(parts)  # [N, 64, H/4, W/4]
    model = Classifier(backbone, pooled_head(in_ch, spec.num_classes), cam_layer=backbone[-1])
    he_init(model)
    if spec.zero_init_residual:
        zero_init(m.bn2 for m in model.modules() if isinstance(m, BasicBlock))
    return model


@register_model("resnet20")
def resnet20(spec: ModelSpec) -> Classifier:
    return cifar_resnet(spec, depth=20)


@register_model("resnet32")
def resnet32(spec: ModelSpec) -> Classifier:
    return cifar_resnet(spec, depth=32)


@register_model("resnet44")
def resnet44(spec: ModelSpec) -> Classifier:
    return cifar_resnet(spec, depth=44)


@register_model("resnet56")
def resnet56(spec: ModelSpec) -> Classifier:
    return cifar_resnet(spec, depth=56)


@register_model("resnet110")
def resnet110(spec: ModelSpec) -> Classifier:
    return cifar_resnet(spec, depth=110)
