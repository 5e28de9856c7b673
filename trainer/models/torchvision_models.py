"""torchvision classification networks reshaped into a ``Classifier``.

Each is built by its torchvision builder with ``weights=None`` and then adapted to the spec:

- ImageNet ResNets (resnet18 ... resnet152, wide_resnet50_2, resnext50_32x4d): ``small_input``
  makes ``conv1`` a 3x3 stride-1 conv and drops the max-pool (32 px -> a 4x4 map at layer4
  instead of 1x1); ``in_chans`` gives ``conv1`` that many input channels.
- efficientnet_b0, mobilenet_v3_large, vgg16 (bonus): ``in_chans`` replaces the first conv;
  ``small_input`` removes the first stride-2 step (the stem conv's stride for EfficientNet and
  MobileNet, the first max-pool for VGG), so 32 px gives a 2x2 final map instead of 1x1.
  VGG keeps its 7x7 average pool and 3-layer classifier, so ImageNet weights still fit.
  ``zero_init_residual`` zeroes the last BN of each residual MBConv/inverted-residual block
  (VGG has none).

Our state-dict keys are torchvision's with a ``backbone.`` or ``head.`` prefix; pretrained.py
relies on it to load torchvision checkpoints.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

from .layers import he_init, zero_init
from .registry import Classifier, ModelSpec, register_model

Factory = Callable[..., nn.Module]
_RESNET_LAST_NORM = {BasicBlock: "bn2", Bottleneck: "bn3"}


def _conv_like(conv: nn.Conv2d, *, in_channels: int | None = None, **changes: object) -> nn.Conv2d:
    """A fresh conv shaped like ``conv`` except for ``in_channels``/``stride``/... ."""
    args = {
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
        "bias": conv.bias is not None,
    }
    args.update(changes)
    return nn.Conv2d(in_channels or conv.in_channels, conv.out_channels, **args)


def _resnet_norms(model: nn.Module) -> Iterator[nn.BatchNorm2d]:
    for m in model.modules():
        if type(m) in _RESNET_LAST_NORM:
            yield getattr(m, _RESNET_LAST_NORM[type(m)])


def torchvision_resnet(factory: Factory, spec: ModelSpec) -> Classifier:
    """A torchvision ResNet split into backbone (stem + layer1..4) and head (pool + fc)."""
    net = factory(weights=None, num_classes=spec.num_classes)
    if spec.small_input:
        net.conv1 = nn.Conv2d(spec.in_chans, net.conv1.out_channels, 3, 1, 1, bias=False)
    elif spec.in_chans != 3:
        net.conv1 = _conv_like(net.conv1, in_channels=spec.in_chans)
    stem = ("conv1", "bn1", "relu") if spec.small_input else ("conv1", "bn1", "relu", "maxpool")
    names = (*stem, "layer1", "layer2", "layer3", "layer4")
    backbone = nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names))
    head = nn.Sequential(OrderedDict(pool=net.avgpool, flatten=nn.Flatten(1), fc=net.fc))
    model = Classifier(backbone, head, cam_layer=net.layer4)
    he_init(model)  # what torchvision already does; also covers the replaced conv1
    if spec.zero_init_residual:
        zero_init(_resnet_norms(model))
    return model


def _first(module: nn.Module, predicate: Callable[[nn.Module], bool]) -> tuple[nn.Module, str]:
    """(parent, attribute name) of the first submodule (depth first) satisfying ``predicate``."""
    path = next(name for name, m in module.named_modules() if name and predicate(m))
    parent, _, name = path.rpartition(".")
    return module.get_submodule(parent), name


def _downsamples(m: nn.Module) -> bool:
    stride = getattr(m, "stride", 1)
    stride = stride[0] if isinstance(stride, tuple) else stride
    return isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and stride > 1


def _residual_norms(model: nn.Module) -> Iterator[nn.BatchNorm2d]:
    """The last BN of every MBConv / inverted-residual block that adds its input back."""
    for m in model.modules():
        if getattr(m, "use_res_connect", False):
            yield [n for n in m.block.modules() if isinstance(n, nn.BatchNorm2d)][-1]


def torchvision_features_net(factory: Factory, spec: ModelSpec) -> Classifier:
    """A torchvision net made of ``features``, ``avgpool`` and ``classifier`` (EfficientNet...)."""
    net = factory(weights=None, num_classes=spec.num_classes)
    features = net.features
    if spec.in_chans != 3:
        parent, name = _first(features, lambda m: isinstance(m, nn.Conv2d))
        setattr(parent, name, _conv_like(getattr(parent, name), in_channels=spec.in_chans))
    if spec.small_input:
        parent, name = _first(features, _downsamples)
        layer = getattr(parent, name)
        keep = _conv_like(layer, stride=1) if isinstance(layer, nn.Conv2d) else nn.Identity()
        setattr(parent, name, keep)
    backbone = nn.Sequential(OrderedDict(features=features))
    head = nn.Sequential(
        OrderedDict(pool=net.avgpool, flatten=nn.Flatten(1), classifier=net.classifier)
    )
    model = Classifier(backbone, head, cam_layer=features[-1])
    he_init(model.backbone)  # the head keeps torchvision's own linear-layer init
    if spec.zero_init_residual:
        zero_init(_residual_norms(model))
    return model


@register_model("resnet18")
def resnet18(spec: ModelSpec) -> Classifier:
    return torchvision_resnet(tvm.resnet18, spec)


@register_model("resnet34")
def resnet34(spec: ModelSpec) -> Classifier:
    return torchvision_resnet(tvm.resnet34, spec)


@register_model("resnet50")
def resnet50(spec: ModelSpec) -> Classifier:
    return torchvision_resnet(tvm.resnet50, spec)


@register_model("resnet101")
def resnet101(spec: ModelSpec) -> Classifier:
    return torchvision_resnet(tvm.resnet101, spec)


@register_model("resnet152")
def resnet152(spec: ModelSpec) -> Classifier:
    return torchvision_resnet(tvm.resnet152, spec)


@register_model("wide_resnet50_2")
def wide_resnet50_2(spec: ModelSpec) -> Classifier:
    return torchvision_resnet(tvm.wide_resnet50_2, spec)


@register_model("resnext50_32x4d")
def resnext50_32x4d(spec: ModelSpec) -> Classifier:
    return torchvision_resnet(tvm.resnext50_32x4d, spec)


@register_model("efficientnet_b0")
def efficientnet_b0(spec: ModelSpec) -> Classifier:
    return torchvision_features_net(tvm.efficientnet_b0, spec)


@register_model("mobilenet_v3_large")
def mobilenet_v3_large(spec: ModelSpec) -> Classifier:
    return torchvision_features_net(tvm.mobilenet_v3_large, spec)


@register_model("vgg16")
def vgg16(spec: ModelSpec) -> Classifier:
    return torchvision_features_net(tvm.vgg16, spec)
