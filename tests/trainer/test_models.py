"""Every registered architecture: shapes, input channels, Grad-CAM layer, keys, initialisation.

Models are built once per architecture (module-scoped fixtures, grouped by pytest) and the
heaviest ones only see 32 px inputs, so the file stays well under a minute on one core.
"""

from __future__ import annotations

import ast
import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from trainer.errors import TrainerError
from trainer.models import Classifier, build_model, list_models, register_model
from trainer.models.pretrained import freeze_backbone, load_pretrained

NUM_CLASSES = 7
HEAVY = {"resnet101", "resnet152", "wide_resnet50_2", "vgg16"}  # 32 px only
PACKAGE = Path(__file__).resolve().parents[2] / "trainer" / "models"
# Residual blocks per architecture = BN layers that zero_init_residual must zero.
RESIDUAL_BLOCKS = {
    "resnet18": 8,
    "resnet34": 16,
    "resnet50": 16,
    "resnet101": 33,
    "resnet152": 50,
    "wide_resnet50_2": 16,
    "resnext50_32x4d": 16,
    "resnet20": 9,
    "resnet32": 15,
    "resnet44": 21,
    "resnet56": 27,
    "resnet110": 54,
    "resnet9": 2,
    "efficientnet_b0": 9,
    "mobilenet_v3_large": 10,
    "vgg16": 0,
}


def images(size: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))


def zeroed_norms(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not m.weight.detach().any()
    ]


@pytest.fixture(scope="module", params=list_models())
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def small(arch: str) -> Classifier:
    """Built for 32 px inputs, RGB, in eval mode."""
    return build_model(arch, num_classes=NUM_CLASSES, small_input=True).eval()


@pytest.fixture(scope="module")
def outputs(small: Classifier) -> tuple[torch.Tensor, torch.Tensor]:
    """(what ``cam_layer`` gave, logits) for one 32 px batch: one forward per architecture."""
    seen: list[torch.Tensor] = []
    handle = small.cam_layer.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = small(images(32))
    finally:
        handle.remove()
    assert len(seen) == 1, "cam_layer must run exactly once per forward"
    return seen[0], logits


def fresh_build(arch: str, **kwargs: object) -> Classifier:
    return build_model(arch, num_classes=NUM_CLASSES, **kwargs)  # type: ignore[arg-type]


def test_every_family_is_registered() -> None:
    assert set(list_models()) == set(RESIDUAL_BLOCKS)


def test_small_input_forward(outputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, logits = outputs
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()


def test_default_stem_with_one_channel(arch: str) -> None:
    if arch in HEAVY:
        pytest.skip("heavy: tested at 32 px only (same code path as resnet50 / efficientnet_b0)")
    model = fresh_build(arch, in_chans=1).eval()
    with torch.no_grad():
        assert model(images(64, channels=1)).shape == (2, NUM_CLASSES)


def test_cam_layer_is_the_last_feature_map(
    small: Classifier, outputs: tuple[torch.Tensor, torch.Tensor]
) -> None:
    cam_out, logits = outputs
    assert any(m is small.cam_layer for m in small.modules())
    assert cam_out.dim() == 4
    assert cam_out.shape[0] == 2
    assert min(cam_out.shape[2:]) >= 2, "32 px input must keep a spatial map for Grad-CAM"
    with torch.no_grad():  # the head reads exactly the cam_layer's map
        torch.testing.assert_close(small.forward_head(cam_out), logits)


def test_reset_classifier_keeps_the_key_layout(
    small: Classifier, outputs: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model = Classifier(small.backbone, copy.deepcopy(small.head), cam_layer=small.cam_layer)
    model.reset_classifier(3)
    assert model.classifier.out_features == 3
    assert model.classifier is not small.classifier
    with torch.no_grad():
        assert model.forward_head(outputs[0]).shape == (2, 3)
    assert list(model.state_dict()) == list(small.state_dict())


def test_zero_init_residual_and_strict_round_trip(
    arch: str, small: Classifier, outputs: tuple[torch.Tensor, torch.Tensor]
) -> None:
    fresh = fresh_build(arch, small_input=True, zero_init_residual=True).eval()
    assert zeroed_norms(small) == []
    assert len(zeroed_norms(fresh)) == RESIDUAL_BLOCKS[arch]
    # The service rebuilds from the card (without training-only flags) and loads strictly.
    fresh.load_state_dict(small.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images(32)), outputs[1], rtol=0, atol=0)


def test_he_initialisation(small: Classifier) -> None:
    convs = [m for m in small.backbone.modules() if isinstance(m, nn.Conv2d)]
    checked = 0
    for conv in convs:
        if conv.weight.numel() < 2000:
            continue  # too few samples for a tight std estimate
        fan_out = conv.out_channels * math.prod(conv.kernel_size)
        expected = math.sqrt(2.0 / fan_out)
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
        checked += 1
    assert checked >= 1
    for m in small.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert not m.bias.any()


def test_imagenet_resnet_small_stem_keeps_resolution() -> None:
    model = build_model("resnet18", num_classes=NUM_CLASSES, small_input=True).eval()
    conv1 = model.backbone.conv1
    assert (conv1.kernel_size, conv1.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.backbone.children())
    with torch.no_grad():
        assert model.forward_features(images(32)).shape[2:] == (4, 4)


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnet_depth(depth: int) -> None:
    model = build_model(f"resnet{depth}", num_classes=10)
    layers = [
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and ".downsample." not in name
    ]
    assert len(layers) == depth
    projections = [m for n, m in model.named_modules() if n.endswith("downsample.0")]
    assert [p.kernel_size for p in projections] == [(1, 1), (1, 1)]


def test_cifar_resnet20_size_and_small_input_ignored() -> None:
    model = build_model("resnet20", num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    assert 0.26e6 < params < 0.28e6  # 0.27M in He et al. 2016
    other = build_model("resnet20", num_classes=10, small_input=True)
    assert list(other.state_dict()) == list(model.state_dict())
    assert model.cam_layer is model.backbone.layer3


def test_resnet9_scales_logits() -> None:
    model = build_model("resnet9", num_classes=10).eval()
    x = images(32)
    with torch.no_grad():
        pooled = model.forward_features(x).amax(dim=(2, 3))
        torch.testing.assert_close(model(x), 0.125 * model.classifier(pooled))


def test_duplicate_registration_is_refused() -> None:
    before = list_models()
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(lambda spec: None)  # type: ignore[arg-type,return-value]
    assert list_models() == before


def test_package_imports_only_torch_and_torchvision() -> None:
    allowed = set(sys.stdlib_module_names) | {"torch", "torchvision"}
    for source in PACKAGE.glob("*.py"):
        if source.name == "pretrained.py":
            continue  # the one module outside the archive's import set (not in __init__)
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{source.name} imports {roots - allowed}"


# --- pretrained weights -----------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).state_dict()


def test_load_local_file_small_stem(torchvision_resnet18_state: dict, tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet18_state, path)
    model = build_model("resnet18", num_classes=10, small_input=True)
    report = load_pretrained(model, "resnet18", str(path), in_chans=3)
    total = len(torchvision_resnet18_state)
    assert report.loaded == total - 3  # fc.weight, fc.bias, the 7x7 conv1
    assert set(report.skipped) == {"fc.weight", "fc.bias", "conv1.weight"}
    assert report.missing == ["backbone.conv1.weight"]
    ours = model.state_dict()
    for key in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "bn1.bias"):
        assert torch.equal(ours[f"backbone.{key}"], torchvision_resnet18_state[key])


def test_load_wrapped_checkpoint_into_one_channel_stem(
    torchvision_resnet18_state: dict, tmp_path: Path
) -> None:
    path = tmp_path / "ckpt.pt"
    wrapped = {f"module.{k}": v for k, v in torchvision_resnet18_state.items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, path)
    model = build_model("resnet18", num_classes=10, in_chans=1)
    report = load_pretrained(model, "resnet18", str(path), in_chans=1)
    assert report.adapted == ["backbone.conv1.weight"]
    assert report.loaded == len(torchvision_resnet18_state) - 2
    rgb = torchvision_resnet18_state["conv1.weight"]
    torch.testing.assert_close(model.backbone.conv1.weight, rgb.sum(dim=1, keepdim=True))


def test_load_torchvision_tag_from_hub_cache(
    torchvision_resnet18_state: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(torchvision_resnet18_state, cache / "resnet18-f37072fd.pth")
    model = build_model("resnet18", num_classes=10)
    for tag in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        report = load_pretrained(model, "resnet18", tag, in_chans=3, allow_download=False)
        assert report.loaded == len(torchvision_resnet18_state) - 2


def test_offline_hub_error_names_file_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = build_model("resnet18", num_classes=10)
    with pytest.raises(TrainerError) as info:
        load_pretrained(model, "resnet18", "IMAGENET1K_V1", in_chans=3, allow_download=False)
    message = str(info.value)
    assert "\n" not in message
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message


def test_unreachable_network_fails_fast_without_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("Network is unreachable")

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("download attempted")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("socket.create_connection", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    model = build_model("resnet18", num_classes=10)
    with pytest.raises(TrainerError, match="Network is unreachable") as info:
        load_pretrained(model, "resnet18", "IMAGENET1K_V1", in_chans=3)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("arch_name", "source", "match"),
    [
        ("resnet18", "IMAGENET9K_V9", "unknown weights"),
        ("resnet18", "VGG16_Weights.IMAGENET1K_V1", "unknown weights"),
        ("resnet20", "DEFAULT", "no pretrained weights"),
        ("resnet18", "missing/weights.pth", "not found"),
    ],
)
def test_bad_sources_give_one_line(arch_name: str, source: str, match: str) -> None:
    model = build_model(arch_name, num_classes=10)
    with pytest.raises(TrainerError, match=match) as info:
        load_pretrained(model, arch_name, source, in_chans=3, allow_download=False)
    assert "\n" not in str(info.value)


def test_corrupt_or_unrelated_files_give_one_line(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, unrelated)
    model = build_model("resnet20", num_classes=10)
    for path, match in ((corrupt, "cannot read"), (unrelated, "none of their 1 tensors")):
        with pytest.raises(TrainerError, match=match) as info:
            load_pretrained(model, "resnet20", str(path), in_chans=3)
        assert "\n" not in str(info.value)


def test_freeze_backbone_trains_only_the_head() -> None:
    model = build_model("resnet20", num_classes=10)
    freeze_backbone(model)
    freeze_backbone(model)  # idempotent
    model.train()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model(images(32)).sum().backward()
    assert not model.backbone.training
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "BN statistics moved"
