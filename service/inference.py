"""Preprocessing (the card's eval preset) and the batched forward pass of one model version.

``Preprocessor`` turns untrusted image bytes into the model's input tensor with the same
``EvalPreset`` the trainer evaluated with; it runs in a worker pool, never on the event loop.
``ModelRunner.forward`` runs one batch in ``torch.inference_mode()`` on the device and returns
temperature-scaled softmax probabilities on the CPU.

Why the served forward is a frozen TorchScript graph (``trace_for_serving``): an eager forward
gives the GIL back and takes it again around every layer, and in the service other threads
(event loop, decode pool) hold it for pure-Python work in between. Each re-take can wait out
the interpreter's switch interval. ResNet-20 at batch 8 with one pure-Python thread beside it:
eager 10.5 -> 456 ms, traced 8.9 -> 31 ms; ResNet-18: eager 276 -> 805 ms, traced 270 -> 287 ms
(bench/NOTES.md: what was changed). A traced graph releases the GIL once per batch. On a CPU
``TORCHSCRIPT=auto`` traces every input size: ResNet-20@32 C=1 p50 7.8 -> 6.6 ms, C=32 329 ->
363 img/s; ResNet-18@224 C=32 80.0 -> 89.8 img/s and 24.1 -> 21.4 CPU ms per request (5
alternating rounds, 2026-12-03; an earlier single comparison had it slower, 40.4 vs 45.9);
ResNet-50@224 C=32 35.5 -> 38.5 img/s, p99 1295 -> 951 ms, C=1 p50 64 -> 53 ms. On other
devices (not measured) ``auto`` traces inputs of at most 64x64 pixels only.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from trainer.archive import ModelCard
from trainer.data.presets import EvalPreset

from .imaging import UndecodedJpeg, array_to_tensor, check_or_decode, decode_to_array

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
        # what every decode of this version's uploads is called with
        self._decode_args = {"max_pixels": max_pixels, "color_mode": self.spec.color_mode,
                             "target_size": self.decode_size}  # fmt: skip

    def decode(self, data: bytes) -> torch.Tensor:
        """Untrusted bytes -> uint8 ``[C, H, W]`` in the card's colour mode (raises ImageRejected)."""
        return array_to_tensor(self.decode_array(data))

    def __call__(self, data: bytes) -> torch.Tensor:
        return self.preset(self.decode(data)).contiguous()

    def decode_array(self, data: bytes) -> np.ndarray:
        """Untrusted bytes -> a ``[H, W, C]`` uint8 array (``decode`` before the view), for
        ``batch``."""
        return decode_to_array(data, **self._decode_args)

    def check_or_decode(self, data: bytes, name: str = "the image") -> UndecodedJpeg | np.ndarray:
        """``decode_array``, except that a JPEG a GPU can decode is only checked and returned
        undecoded (``imaging.check_or_decode``), for ``service.gpu_preprocess``."""
        return check_or_decode(data, name=name, **self._decode_args)

    def batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Decoded images (``decode_array``) -> the model's float input batch ``[N, C, H, W]``:
        the same tensor as stacking ``self(data)`` of each, in one call (``EvalPreset.batch``)."""
        return self.preset.batch(images)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``PRECISION`` on ``device`` (None = plain fp32).

    On CUDA ``auto`` is bf16 where supported, else fp16. On a CPU ``auto`` stays fp32 (the
    answers the trainer evaluated) and ``bf16`` is the opt-in: oneDNN runs bf16 convolutions
    natively on CPUs with AVX512-BF16 or AMX, ResNet-18/50 at batch 16 on one thread of an
    AMD EPYC (Zen 4) 38 -> 20 and 97 -> 49-60 ms per image (bench/NOTES.md); elsewhere it
    is emulated and slower, which the registry logs. fp16 needs CUDA (``Settings`` refuses it).
    """
    if precision == "fp32" or (device.type != "cuda" and precision == "auto"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bf16 natively here (AVX512-BF16 or AMX), not by emulation."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: nothing native
        return False


def fold_batch_norm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of an eval-mode ``model`` with BatchNorm folded into the convolution before it.

    The same function (up to float rounding), one pass less over every activation: ResNet-18
    at batch 8 on one CPU thread 27.1 -> 30.9 img/s, ResNet-50 9.7 -> 9.8 (interleaved A/B,
    bench/NOTES.md). Pairs are found by structure, not by tracing (torch.fx patches
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


SMALL_INPUT_PIXELS = 64 * 64  # CIFAR, digits, MNIST: the per-layer overhead dominates


def is_small_input(input_size: Sequence[int]) -> bool:
    return int(input_size[0]) * int(input_size[1]) <= SMALL_INPUT_PIXELS


def use_torchscript(mode: str, input_size: Sequence[int], device_type: str = "cpu") -> bool:
    """``TORCHSCRIPT`` on/off, or auto: every input size on a CPU (measured faster at 32 and
    224 px), small inputs only elsewhere (not measured beyond ``SMALL_INPUT_PIXELS``)."""
    if mode == "auto":
        return device_type == "cpu" or is_small_input(input_size)
    return mode == "on"


def decode_on_forward_thread(
    mode: str, input_size: Sequence[int], device_type: str, forward_workers: int, cpus: int
) -> bool:
    """``DECODE_ON_FORWARD_THREAD`` on/off, or auto: on a CPU with two or more forward threads
    or with one CPU to the process (``WORKERS``), for inputs of at most ``SMALL_INPUT_PIXELS``.

    There a full-size JPEG's decode costs more than the image's share of the forward, and the
    hand-offs to and from the preprocessing pool (an executor future, a loop wake-up and two
    more threads wanting the GIL) cost about as much as the forward: ResNet-20@32 at C=32 went
    564 -> 739 img/s, 2.8 -> 2.1 CPU ms per request, mean batch 5.7 -> 10.7 (4 alternating
    ``bench compare`` rounds); with ``WORKERS=2`` on 2 cores (one forward thread and one CPU
    each) 639 -> 785 img/s and C=1 p50 4.9 -> 3.9 ms (3 rounds). At 224 px the forward
    dominates and the pool lets decoding overlap it (ResNet-18 C=32 83.2 vs 78.0 img/s). One
    forward thread with a spare CPU would decode while that CPU has nothing to compute, and on
    a GPU the pool keeps the device fed: off there.
    """
    if mode == "auto":
        several = forward_workers > 1 or cpus == 1
        return device_type == "cpu" and several and is_small_input(input_size)
    return mode == "on"


def lone_image_threads(
    configured: int | None, cores: int, threads: int, input_size: Sequence[int]
) -> int:
    """Torch threads for a forward of one image while the other cores are idle.

    ``configured`` (``LONE_IMAGE_THREADS``) if set, else ``cores`` for inputs over
    ``SMALL_INPUT_PIXELS`` and ``threads`` (no change) for smaller ones. Measured on 2 cores, in
    alternating ``bench compare`` rounds against the service without it: C=1 p50 53 -> 40 ms
    (ResNet-18) and 142 -> 105 ms (ResNet-50), but 6.2 -> 7.4 ms for ResNet-20 at 32x32, whose
    3 ms forward gains less from a second core than the core's OpenMP thread, spinning after
    the forward, costs the event loop and the client.
    """
    if configured is not None:
        return configured
    return threads if is_small_input(input_size) else cores


class _Probabilities(nn.Module):
    """network -> temperature-scaled softmax, so the traced graph includes the head ops too."""

    def __init__(self, network: nn.Module, temperature: float) -> None:
        super().__init__()
        self.network = network
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x).float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=1)


def trace_for_serving(
    module: nn.Module, example: torch.Tensor, check: torch.Tensor
) -> torch.jit.ScriptModule | None:
    """``module`` traced on ``example`` and frozen, or None if the graph answers ``check``
    (another batch size, other values) differently from ``module``.

    Only tensors flow through these ResNets, so the trace holds for every batch size; a network
    whose forward branches on its input would trace one branch, which the check catches. The
    module is our own, rebuilt from verified weights (nothing scripted is ever loaded).
    """
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # torch.jit is deprecated in favour of torch.compile/export, which need a compiler
            # toolchain at run time; tracing still gives the measured gain with none
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(module.eval(), example, check_trace=False))
            want, got = module(check), traced(check)
    except Exception as exc:  # an untraceable network is served eagerly, never refused
        log.warning("tracing the network failed (%s); serving it eagerly", exc)
        return None
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        log.warning("the traced network answers differently; serving it eagerly")
        return None
    return traced


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
        torchscript: bool = True,
        max_batch_size: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.card = card
        self.temperature = float(card.temperature)
        self.autocast_dtype = resolve_precision(precision, self.device)
        # channels_last (NHWC) is faster on CUDA and on CPU (oneDNN) alike for these ResNets:
        # 1.1-1.5x less CPU per image at batch 8-16 (bench compare, commit da02b84)
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
            self.network = fold_batch_norm(model, self._example(2))
            if self.channels_last:  # the folded convolutions' new weights: NHWC as well
                self.network = self.network.to(memory_format=torch.channels_last)
        # the whole forward, head included, as one graph (fp32 only: autocast is not traced)
        self.probabilities: nn.Module | torch.jit.ScriptModule = _Probabilities(
            self.network, self.temperature
        )
        if torchscript and self.autocast_dtype is None:
            example, check = (self._example(size) for size in (2, 3))
            traced = trace_for_serving(self.probabilities, example, check)
            if traced is not None:
                self.probabilities = traced
        self.max_batch_size = max_batch_size
        # pinned host buffers for async H2D copies, one per inference thread (a batcher may
        # run several forwards at once; each thread reuses its own after its forward synced)
        self._pinned = self.device.type == "cuda"
        self._local = threading.local()
        # On CUDA a batch runs padded with zero rows to the next power of two (at most
        # max_batch_size): cuDNN's autotuner (benchmark mode) tunes each input shape on its
        # first forward, so the warm-up tunes 8 shapes instead of one per batch size (128 at
        # MAX_BATCH_SIZE=128) and no client meets an untuned size. The rows cost little there:
        # a GPU forward of 65 rows takes about what one of 128 does. On a CPU the cost grows
        # with the rows, so a batch runs as it is.
        self.pads_batches = self.device.type == "cuda"
        if self._pinned:
            torch.backends.cudnn.benchmark = True  # tuned per padded size during the warm-up

    def _example(self, size: int) -> torch.Tensor:
        example = torch.randn((size, *self.input_shape), device=self.device)
        if self.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        return example

    @property
    def traced(self) -> bool:
        """Whether the forward runs as a TorchScript graph (``trace_for_serving`` succeeded)."""
        return isinstance(self.probabilities, torch.jit.ScriptModule)

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

    def padded_size(self, rows: int) -> int:
        """The batch size a forward of ``rows`` images runs at (``pads_batches``)."""
        if not self.pads_batches or rows >= self.max_batch_size:
            return rows
        return min(1 << (rows - 1).bit_length(), self.max_batch_size)

    def warmup_sizes(self) -> list[int]:
        """Every batch size a forward can run at: one warm-up forward each."""
        return sorted({self.padded_size(rows) for rows in range(1, self.max_batch_size + 1)})

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` float batch -> ``[N, K]`` float32 probabilities on the CPU."""
        rows = batch.shape[0]
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            padded = self.padded_size(rows)
            if padded > rows:
                x = torch.cat((x, x.new_zeros((padded - rows, *x.shape[1:]))))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            autocast = (
                torch.autocast(self.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with autocast:
                probs = self.probabilities(x)
            # the padded rows' answers are dropped (no view made when there are none: on a
            # CPU every tensor made from Python lets the GIL go once more)
            return (probs[:rows] if padded > rows else probs).cpu()

    def warmup(self, batch_sizes: Iterable[int]) -> None:
        """One forward per batch size, so no client pays a cold start (kernels, allocator)."""
        for size in batch_sizes:
            example = torch.zeros((size, *self.input_shape), dtype=torch.float32)
            self.forward(self.stack(list(example)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
