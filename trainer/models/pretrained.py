"""Start from pretrained weights (``--pretrained``), and freeze a backbone for linear probing.

Not imported by the package ``__init__`` (it uses ``trainer.errors``, which archives lack).

A source is a torchvision weights tag of the architecture ("IMAGENET1K_V1", "DEFAULT", or
"ResNet50_Weights.IMAGENET1K_V2") or a local file holding a state dict (bare, or under a
``state_dict`` / ``model`` key). torchvision keys map onto ours by a ``backbone.`` or
``head.`` prefix (see torchvision_models.py); the final classifier is never loaded, and tensors
whose shape differs (a 3x3 small-input stem against a 7x7 one) are skipped and counted. An RGB
stem loaded into a 1-channel model is summed over its input channels, which is exactly the
RGB network applied to the grey image replicated three times.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from trainer.errors import TrainerError

from .registry import Classifier

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar"}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_PROBE_TIMEOUT_S = 3.0


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: counts of tensors loaded and skipped, with reasons."""

    source: str
    loaded: int = 0
    adapted: list[str] = field(default_factory=list)  # loaded after summing RGB -> 1 channel
    skipped: dict[str, str] = field(default_factory=dict)  # source key -> why
    missing: list[str] = field(default_factory=list)  # our keys left as initialised

    def summary(self) -> str:
        return (
            f"pretrained {self.source}: loaded {self.loaded} tensors"
            f" ({len(self.adapted)} adapted to the input channels),"
            f" skipped {len(self.skipped)}, left initialised {len(self.missing)}"
        )


def load_pretrained(
    model: Classifier,
    arch: str,
    source: str,
    *,
    in_chans: int,
    allow_download: bool = True,
) -> LoadReport:
    """Copy the weights named by ``source`` into ``model`` (in place) and report what was used."""
    if _looks_like_path(source):
        state, label = _read_file(Path(source)), source
    else:
        state, label = _read_torchvision(arch, source, allow_download=allow_download)
    report = _transplant(model, state, in_chans=in_chans, label=label)
    if not report.loaded:
        raise TrainerError(
            f"weights {label} do not fit {arch}: none of their {len(state)} tensors matched"
        )
    log.info(report.summary())
    return report


def freeze_backbone(model: Classifier) -> None:
    """Linear probe: no gradients into the backbone, which also stays in eval mode.

    Eval mode (BN running statistics frozen, no dropout or stochastic depth) survives later
    ``model.train()`` calls: a forward pre-hook puts the backbone back before every forward.
    """
    model.backbone.requires_grad_(False)
    model.backbone.eval()
    if not getattr(model.backbone, "_kept_in_eval", False):
        model.backbone.register_forward_pre_hook(_back_to_eval)
        model.backbone._kept_in_eval = True


def _back_to_eval(module: nn.Module, args: object) -> None:
    if module.training:
        module.eval()


def _looks_like_path(source: str) -> bool:
    path = Path(source)
    return path.exists() or os.sep in source or "/" in source or path.suffix in _WEIGHT_SUFFIXES


def _read_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise TrainerError(f"pretrained weights file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling, zip and format errors all mean "not a weights file"
        raise TrainerError(f"cannot read pretrained weights {path}: {_first_line(exc)}") from exc
    if isinstance(data, dict):
        for key in ("state_dict", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise TrainerError(f"{path} holds no state dict (tensors by name)")
    return data


def _resolve_tag(arch: str, tag: str) -> torchvision.models.WeightsEnum:
    try:
        weights_enum = torchvision.models.get_model_weights(arch)
    except ValueError as exc:
        raise TrainerError(
            f"torchvision has no pretrained weights for {arch!r}; give a local weights file"
        ) from exc
    prefix, _, name = tag.rpartition(".")  # "ResNet50_Weights.IMAGENET1K_V2" or "IMAGENET1K_V2"
    if prefix not in ("", weights_enum.__name__) or name not in weights_enum.__members__:
        choices = ", ".join(weights_enum.__members__)
        raise TrainerError(f"unknown weights {tag!r} for {arch}; choose one of: {choices}")
    return weights_enum[name]


def _read_torchvision(
    arch: str, tag: str, *, allow_download: bool
) -> tuple[dict[str, Tensor], str]:
    weights = _resolve_tag(arch, tag)
    label = f"{type(weights).__name__}.{weights.name}"
    file_name = Path(urlparse(weights.url).path).name
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cached = cache / file_name
    if cached.is_file():
        return _read_file(cached), label
    hint = f"download {weights.url} and put {file_name} in {cache}/"
    if not allow_download:
        raise TrainerError(f"{label} is not in the torch hub cache and downloads are off: {hint}")
    host = urlparse(weights.url).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=_PROBE_TIMEOUT_S).close()
        state = torch.hub.load_state_dict_from_url(
            weights.url, model_dir=str(cache), map_location="cpu", progress=False,
            check_hash=True, weights_only=True,
        )  # fmt: skip
    except (OSError, RuntimeError) as exc:  # no network, HTTP error, hash mismatch
        reason = _first_line(exc)
        message = f"{label} is not cached and cannot be downloaded ({reason}): {hint}"
        raise TrainerError(message) from exc
    return state, label


def _transplant(
    model: Classifier, state: dict[str, Tensor], *, in_chans: int, label: str
) -> LoadReport:
    ours = model.state_dict()
    classifier = next(name for name, m in model.named_modules() if m is model.classifier)
    skip_prefix = f"{classifier}."
    report = LoadReport(source=label)
    filled: dict[str, Tensor] = {}
    for raw_key, tensor in state.items():
        key = _strip_wrappers(raw_key)
        target = next((k for k in (key, f"backbone.{key}", f"head.{key}") if k in ours), None)
        if target is None:
            report.skipped[raw_key] = "no such tensor in this architecture"
        elif target.startswith(skip_prefix):
            report.skipped[raw_key] = "final classifier (trained from scratch)"
        elif tensor.shape == ours[target].shape:
            filled[target] = tensor
        elif _is_rgb_to_channels(tensor, ours[target], in_chans):
            filled[target] = tensor.sum(dim=1, keepdim=True)
            report.adapted.append(target)
        else:
            report.skipped[raw_key] = f"shape {tuple(tensor.shape)} != {tuple(ours[target].shape)}"
    model.load_state_dict({**ours, **filled}, strict=True)
    report.loaded = len(filled)
    report.missing = [k for k in ours if k not in filled and not k.startswith(skip_prefix)]
    return report


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _is_rgb_to_channels(source: Tensor, target: Tensor, in_chans: int) -> bool:
    """An RGB conv kernel [O, 3, k, k] going into a 1-channel stem [O, 1, k, k]."""
    return (
        in_chans == 1
        and source.dim() == 4
        and source.shape[1] == 3
        and target.shape == (source.shape[0], 1, *source.shape[2:])
    )
