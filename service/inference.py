"""Preprocessing (the card's eval preset) and the batched forward pass of one model version.

``Preprocessor`` turns untrusted image bytes into the model's input tensor with the same
``EvalPreset`` the trainer evaluated with; it runs in a worker pool, never on the event loop.
``ModelRunner.forward`` runs one batch in ``torch.inference_mode()`` on the device and returns
temperature-scaled softmax probabilities on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from trainer.archive import ModelCard
from trainer.data.presets import EvalPreset

from .imaging import decode_to_tensor

log = logging.getLogger("service.inference")


class Preprocessor:
    """bytes -> normalised float tensor ``[C, H, W]`` for one model version."""

    def __init__(self, card: ModelCard, *, max_pixels: int) -> None:
        self.spec = card.preprocess_spec
        self.preset = EvalPreset(self.spec)
        self.max_pixels = max_pixels
        height, width = self.spec.input_size
        if self.spec.resize_mode == "shorter_side":
            side = self.spec.resize_size or round(min(height, width) / 0.875)
            self.decode_size: tuple[int, int] = (side, side)
        else:
            self.decode_size = (height, width)

    def decode(self, data: bytes) -> torch.Tensor:
        """Untrusted bytes -> uint8 ``[C, H, W]`` in the card's colour mode (raises ImageRejected)."""
        return decode_to_tensor(
            data,
            max_pixels=self.max_pixels,
            color_mode=self.spec.color_mode,
            target_size=self.decode_size,
        )

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.preset(self.decode(data)).contiguous()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``PRECISION`` on ``device`` (None = plain fp32)."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def fold_batch_norm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of an eval-mode ``model`` with BatchNorm folded into the convolution before it.

    The same function (up to float rounding), one pass less over every activation: ResNet-18
    at batch 8 on one CPU thread 27.1 -> 30.9 img/s, ResNet-50 9.7 -> 9.8 (interleaved A/B,
    README, Benchmarks). Pairs are found by structure, not by tracing (torch.fx patches
    ``nn.Module.__call__`` process-wide while it traces, which broke requests running in other
    threads during a hot swap): consecutive Conv2d, BatchNorm2d children of a plain
    ``nn.Sequential``, and convN/bnN of torchvision's ResNet blocks, whose forward applies bnN
    straight to convN's output. The copy must answer ``example`` as the original does, else
    the original is served.
    """
    folded = copy.deepcopy(model)
    if _fold_in_place(folded) == 0:
        return model
    with torch.inference_mode():
        want, got = model(example).float(), folded(example).float()
    scale = max(1.0, float(want.abs().max()))
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-3 * scale):
        log.warning("folding BatchNorm changed the outputs; serving the network unchanged")
        return model
    return folded


def _fold_in_place(root: nn.Module) -> int:
    """Fold every (Conv2d -> BatchNorm2d) pair found by structure; returns how many."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval
    from torchvision.models.resnet import BasicBlock, Bottleneck

    count = 0
    for module in list(root.modules()):
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            pairs = list(zip(list(module._modules), list(module._modules)[1:], strict=False))
        elif type(module) in (BasicBlock, Bottleneck):
            pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(module, f"bn{i}")]
        else:
            continue
        for conv_name, bn_name in pairs:
            conv, bn = module._modules.get(conv_name), module._modules.get(bn_name)
            if (
                isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                and bn.running_mean is not None and bn.running_var is not None
                and conv.out_channels == bn.num_features and not bn.training
            ):  # fmt: skip
                module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                module._modules[bn_name] = nn.Identity()
                count += 1
    return count


class ModelRunner:
    """A model on its device plus everything one forward pass needs."""

    def __init__(
        self,
        model: nn.Module,
        card: ModelCard,
        *,
        device: str,
        precision: str = "auto",
        channels_last: bool | None = None,
        fold_batchnorm: bool = True,
        max_batch_size: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.card = card
        self.temperature = float(card.temperature)
        self.autocast_dtype = resolve_precision(precision, self.device)
        # channels_last (NHWC) is faster on CUDA and on CPU (oneDNN) alike for these ResNets:
        # 1.1-1.5x less CPU per image at batch 8-16 (README, Benchmarks: what changed)
        self.channels_last = True if channels_last is None else channels_last
        model = model.eval().requires_grad_(False).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the network as archived: Grad-CAM hooks its layers
        height, width = card.input_size
        self.input_shape = (card.in_chans, height, width)
        # what forward() runs: the same function with BatchNorm folded into the convolutions
        self.network = model
        if fold_batchnorm:
            example = torch.randn((2, *self.input_shape), device=self.device)
            if self.channels_last:
                example = example.contiguous(memory_format=torch.channels_last)
            self.network = fold_batch_norm(model, example)
            if self.channels_last:  # the folded convolutions' new weights: NHWC as well
                self.network = self.network.to(memory_format=torch.channels_last)
        self.max_batch_size = max_batch_size
        # pinned host buffers for async H2D copies, one per inference thread (a batcher may
        # run several forwards at once; each thread reuses its own after its forward synced)
        self._pinned = self.device.type == "cuda"
        self._local = threading.local()
        if self._pinned:
            torch.backends.cudnn.benchmark = True  # tuned per batch size during the warm-up

    @property
    def precision_name(self) -> str:
        return {torch.float16: "fp16", torch.bfloat16: "bf16", None: "fp32"}[self.autocast_dtype]

    def stack(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stack preprocessed images into one batch (into pinned memory on CUDA)."""
        if self._pinned and len(inputs) <= self.max_batch_size:
            staging = getattr(self._local, "staging", None)
            if staging is None:
                shape = (self.max_batch_size, *self.input_shape)
                staging = self._local.staging = torch.empty(
                    shape, dtype=torch.float32, pin_memory=True
                )
            return torch.stack(list(inputs), out=staging[: len(inputs)])
        return torch.stack(list(inputs))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` float batch -> ``[N, K]`` float32 probabilities on the CPU."""
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            autocast = (
                torch.autocast(self.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                logits = self.network(x)
            logits = logits.float()
            if self.temperature != 1.0:
                logits = logits / self.temperature
            return torch.softmax(logits, dim=1).cpu()

    def warmup(self, batch_sizes: Iterable[int]) -> None:
        """One forward per batch size, so no client pays a cold start (kernels, allocator)."""
        for size in batch_sizes:
            example = torch.zeros((size, *self.input_shape), dtype=torch.float32)
            self.forward(self.stack(list(example)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
