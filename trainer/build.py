"""``build_*`` steps that turn a ``TrainConfig`` into the objects the training loop needs."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from .config import TrainConfig
from .data.datasets import DatasetBundle, load_dataset, with_transform
from .data.presets import EvalPreset, PreprocessSpec, TrainPreset
from .data.samplers import FocalLoss, balanced_sampler, class_weights
from .errors import TrainerError
from .models import Classifier, build_model, list_models
from .runtime import Runtime

log = logging.getLogger("trainer")


@dataclass
class DataPlan:
    """The dataset plus how its images reach the model (spec and channel policy)."""

    bundle: DatasetBundle
    spec: PreprocessSpec  # what the model sees (may be RGB for a grayscale dataset)
    grayscale_policy: str  # "native", "replicate" or "none"

    @property
    def in_chans(self) -> int:
        return self.spec.channels


class MatchChannels:
    """Replicates a 1-channel uint8 image to 3 channels when the model takes RGB."""

    def __init__(self, channels: int, then: Any) -> None:
        self.channels = channels
        self.then = then

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] != self.channels:
            image = image.expand(self.channels, -1, -1) if image.shape[0] == 1 else image[:1]
        return self.then(image)


def build_data(cfg: TrainConfig, seed: int) -> DataPlan:
    bundle = load_dataset(
        cfg.data.dataset,
        data_root=Path(cfg.data.data_root),
        seed=seed,
        image_size=cfg.data.image_size,
        download=cfg.data.download,
    )
    spec = bundle.spec
    if spec.color_mode == "RGB":
        return DataPlan(bundle=bundle, spec=spec, grayscale_policy="none")
    # Pretrained ImageNet weights expect RGB: replicate the grey channel instead of a new stem.
    if cfg.data.grayscale == "replicate" or cfg.model.pretrained is not None:
        rgb = dataclasses.replace(spec, color_mode="RGB", mean=spec.mean * 3, std=spec.std * 3)
        return DataPlan(bundle=bundle, spec=rgb, grayscale_policy="replicate")
    return DataPlan(bundle=bundle, spec=spec, grayscale_policy="native")


def is_small_input(cfg: TrainConfig, spec: PreprocessSpec) -> bool:
    if cfg.model.small_input is not None:
        return cfg.model.small_input
    return max(spec.input_size) <= 32


def build_network(cfg: TrainConfig, plan: DataPlan) -> Classifier:
    if cfg.model.arch not in list_models():
        raise TrainerError(
            f"unknown architecture {cfg.model.arch!r}; choose from: {', '.join(list_models())}"
        )
    model = build_model(
        cfg.model.arch,
        num_classes=len(plan.bundle.labels),
        in_chans=plan.in_chans,
        small_input=is_small_input(cfg, plan.spec),
        zero_init_residual=cfg.model.zero_init_residual,
    )
    if cfg.model.pretrained is not None:
        from .models.pretrained import freeze_backbone, load_pretrained

        load_pretrained(model, cfg.model.arch, cfg.model.pretrained, in_chans=plan.in_chans)
        if cfg.model.mode == "linear-probe":
            freeze_backbone(model)
    return model


def _train_sampler(
    cfg: TrainConfig, plan: DataPlan, runtime: Runtime, generator: torch.Generator
) -> Sampler:
    train = plan.bundle.train
    if cfg.data.sampler == "balanced":
        if runtime.distributed:
            raise TrainerError(
                "--sampler balanced is not supported with torchrun (use --class-weights auto)"
            )
        return balanced_sampler(train.targets, generator=generator)
    if runtime.distributed:
        return DistributedSampler(
            train, num_replicas=runtime.world_size, rank=runtime.rank, seed=cfg.run.seed
        )
    return RandomSampler(train, generator=generator)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    generator: torch.Generator  # reseeded every epoch, so shuffling is a function of (seed, epoch)

    def set_epoch(self, epoch: int, seed: int) -> None:
        self.generator.manual_seed(seed * 1000 + epoch)
        sampler = self.train.sampler
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)


def build_loaders(cfg: TrainConfig, plan: DataPlan, runtime: Runtime) -> Loaders:
    channels = plan.in_chans
    train_tf = MatchChannels(
        channels, TrainPreset(plan.spec, augment=cfg.data.augment, hflip=plan.bundle.hflip)
    )
    eval_tf = MatchChannels(channels, EvalPreset(plan.spec))
    generator = torch.Generator()
    generator.manual_seed(cfg.run.seed)
    train_set = with_transform(plan.bundle.train, train_tf)
    common: dict[str, Any] = {
        "num_workers": cfg.data.workers,
        "pin_memory": runtime.device.type == "cuda",
        "persistent_workers": cfg.data.workers > 0,
    }
    per_rank_batch = max(1, cfg.data.batch_size // runtime.world_size)
    train = DataLoader(
        train_set,
        batch_size=per_rank_batch,
        sampler=_train_sampler(cfg, plan, runtime, generator),
        drop_last=len(train_set) > per_rank_batch,  # a batch of 1 breaks BatchNorm
        generator=generator,
        **common,
    )
    eval_batch = max(cfg.data.batch_size, 128)
    val = DataLoader(with_transform(plan.bundle.val, eval_tf), batch_size=eval_batch, **common)
    test = DataLoader(with_transform(plan.bundle.test, eval_tf), batch_size=eval_batch, **common)
    return Loaders(train=train, val=val, test=test, generator=generator)


def build_loss(cfg: TrainConfig, plan: DataPlan, device: torch.device) -> nn.Module:
    weight = None
    if cfg.optim.class_weights == "auto":
        weight = class_weights(plan.bundle.train.targets, len(plan.bundle.labels)).to(device)
        log.info("class weights: %s", [round(w, 3) for w in weight.tolist()])
    if cfg.optim.loss == "focal":
        return FocalLoss(
            gamma=cfg.optim.focal_gamma, weight=weight, label_smoothing=cfg.optim.label_smoothing
        )
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.optim.label_smoothing)
