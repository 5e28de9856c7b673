"""The LIMIT: the service's own decode + preprocess + batched forward in one process, no HTTP.

``python -m bench.limit SPEC.json`` prints one JSON object. The model is loaded exactly as the
service loads it (``service.registry.Registry`` on a store holding the archive: card + SHA-256
check, rebuild, device, precision, channels_last and warm-up decided by the service's own
``Settings``, read from the same environment variables), torch threads are set as the service
sets them, and images go through ``entry.preprocessor`` (``service.inference.Preprocessor``:
``service.imaging`` decoding + the card's ``EvalPreset``) in a thread pool of
``PREPROCESS_THREADS``, while this thread stacks and runs ``runner.forward`` on full batches,
as the service's batcher thread does. Decoding of the next batch overlaps the forward of the
current one, so this is the best the service's pipeline can do on this machine.

Measurements (each a warm-up, then ``repeats`` windows of ``duration_s``):
- ``pipelined`` at each batch size asked for: images/s, the forward time per batch;
  (``forward_threads`` in the spec restricts which forward-thread counts are measured,
  ``configs`` names exactly which configurations); where the service decodes on its forward
  threads (``DECODE_ON_FORWARD_THREAD``), also that way: each forward thread decodes its own
  batch, no pool (``16x2d``);
- ``single``: one image at a time on one thread (decode, preprocess, forward of a batch of 1
  with the service's ``LONE_IMAGE_THREADS``, as the service computes a lone image),
  the in-process single-image latency that the service's C=1 latency is compared with.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from service.allocator import active_allocator, exec_with_allocator


def load_entry(archive: Path, store_dir: Path) -> tuple[Any, Any, Any]:
    """(registry, entry, settings) with ``archive`` loaded the way the service loads it."""
    from service.main import _configure_torch
    from service.metrics import Metrics
    from service.registry import Registry
    from service.settings import Settings

    link = store_dir / archive.name
    link.symlink_to(archive.resolve())
    settings = Settings(model_store=store_dir, models=[archive.name])
    _configure_torch(settings)
    registry = Registry(settings, Metrics())
    entries = registry.scan()
    registry.load_all(entries)
    entry = entries[0]
    if entry.status != "ready":
        raise RuntimeError(f"{archive.name} did not load: {entry.error}")
    return registry, entry, settings


def _windows(step: Any, warmup_s: float, duration_s: float, repeats: int) -> list[dict[str, float]]:
    """Call ``step()`` (returns images done) for a warm-up, then ``repeats`` timed windows."""
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        step()
    windows = []
    for _ in range(repeats):
        images, start, cpu = 0, time.perf_counter(), time.process_time()
        end = start + duration_s
        while time.perf_counter() < end:
            images += step()
        elapsed = time.perf_counter() - start
        windows.append(
            {
                "elapsed_s": elapsed,
                "images": images,
                "img_s": images / elapsed,
                "cpu_s": time.process_time() - cpu,
            }
        )
    return windows


def pipelined(
    entry: Any, images: list[bytes], batch: int, pool: ThreadPoolExecutor, timing: dict
) -> Any:
    """A step function: one forward of ``batch`` images while the next ones decode.

    Thread-safe: with several forward threads (the batcher's helpers) each call takes its
    own ``batch`` decoded images from the shared pipeline.
    """
    preprocessor, runner = entry.preprocessor, entry.runner
    cursor = 0
    inflight: deque[Future[Any]] = deque()
    lock = threading.Lock()
    depth = 2 * batch
    forward_times: list[float] = timing.setdefault("forward_s", [])

    def refill() -> None:
        nonlocal cursor
        while len(inflight) < depth:
            inflight.append(pool.submit(preprocessor, images[cursor % len(images)]))
            cursor += 1

    def step() -> int:
        with lock:
            refill()
            futures = [inflight.popleft() for _ in range(batch)]
            refill()
        tensors = [future.result() for future in futures]
        _timed_forward(runner, tensors, forward_times)
        return batch

    return step


def _timed_forward(runner: Any, tensors: Any, forward_times: list[float]) -> None:
    """Stack (a list), forward and take the top-1 of one batch, as the batcher does; record
    its time."""
    start = time.perf_counter()
    probs = runner.forward(runner.stack(tensors) if isinstance(tensors, list) else tensors)
    probs.max(dim=1)
    forward_times.append(time.perf_counter() - start)


def decoding(entry: Any, images: list[bytes], batch: int, timing: dict) -> Any:
    """A step function: decode ``batch`` images on this thread (or, with ``DECODE_ON_GPU``,
    check their headers here and decode them on the device), then forward them.

    What the service's forward threads do when the version decodes on them
    (``DECODE_ON_FORWARD_THREAD``): no pool, each forward thread decodes its own batch and
    preprocesses it in one call (``Preprocessor.batch``), as the batcher does.
    Thread-safe: each call takes the next ``batch`` images of the shared sequence.
    """
    preprocessor, runner = entry.preprocessor, entry.runner
    # DECODE_ON_GPU: the thread only checks headers; the batch is decoded on the device
    gpu = entry.gpu_preprocessor
    prepare, finish = (
        (gpu.check, gpu.batch) if gpu else (preprocessor.decode_array, preprocessor.batch)
    )
    cursor = 0
    lock = threading.Lock()
    forward_times: list[float] = timing.setdefault("forward_s", [])

    def step() -> int:
        nonlocal cursor
        with lock:
            first, cursor = cursor, cursor + batch
        decoded = [prepare(images[(first + i) % len(images)]) for i in range(batch)]
        _timed_forward(runner, finish(decoded), forward_times)
        return batch

    return step


def config_key(batch: int, threads: int, decode_on_forward: bool) -> str:
    """``16``, ``16x2`` (a decode pool feeds 2 forward threads) or ``16x2d`` (each of the 2
    forward threads decodes its own batch)."""
    key = str(batch) if threads == 1 else f"{batch}x{threads}"
    return key + ("d" if decode_on_forward else "")


def parse_config_key(key: str) -> tuple[int, int, bool]:
    """(batch, forward threads, decode on the forward threads) of a ``config_key``."""
    decode_on_forward = key.endswith("d")
    batch, _, threads = key.removesuffix("d").partition("x")
    return int(batch), int(threads or 1), decode_on_forward


def _threaded_windows(
    step: Any, threads: int, warmup_s: float, duration_s: float, repeats: int
) -> list[dict[str, float]]:
    """``_windows`` with ``threads`` threads calling ``step`` at once (forward workers).

    Images complete a whole batch at a time, so counting the images done within a fixed
    window is off by up to one batch per thread (ResNet-18 at 16x2: 256 +- 16 images in 5 s,
    the same 51.2 img/s in most windows). ``img_s`` is measured between completions instead:
    the images completed after the window's first completion, over the time from it to the
    last one. ``images`` (all completed in the window) goes with ``cpu_s``.
    """
    if threads <= 1:
        return _windows(step, warmup_s, duration_s, repeats)
    completions: list[tuple[float, int]] = []  # (time.perf_counter(), images) per step
    lock = threading.Lock()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            count = step()
            with lock:
                completions.append((time.perf_counter(), count))

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(warmup_s)
        windows = []
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            time.sleep(duration_s)
            end = time.perf_counter()
            cpu_s = time.process_time() - cpu
            with lock:
                inside = [(t, n) for t, n in completions if start <= t <= end]
            windows.append(_completion_rate(inside, start, end) | {"cpu_s": cpu_s})
        return windows
    finally:
        stop.set()
        for worker in workers:
            worker.join(60)


def _completion_rate(inside: list[tuple[float, int]], start: float, end: float) -> dict:
    """Images/s from the completions ``(time, images)`` seen in the window ``[start, end]``."""
    images = sum(n for _, n in inside)
    window = {"elapsed_s": end - start, "images": images, "img_s": images / (end - start)}
    if len(inside) >= 2:
        span = inside[-1][0] - inside[0][0]
        counted = images - inside[0][1]  # the first completion opens the span
        if span > 0:
            window.update({"img_s": counted / span, "span_s": span, "span_images": counted})
    return window


def single(entry: Any, images: list[bytes], latencies: list[float]) -> Any:
    """A step function: one image, decode to answer, on this thread (decoded, then
    preprocessed by ``Preprocessor.batch``, as the service's forward thread does a lone image)."""
    preprocessor, runner = entry.preprocessor, entry.runner
    cursor = 0

    def step() -> int:
        nonlocal cursor
        data = images[cursor % len(images)]
        cursor += 1
        start = time.perf_counter()
        probs = runner.forward(preprocessor.batch([preprocessor.decode_array(data)]))
        probs.max(dim=1)
        latencies.append(time.perf_counter() - start)
        return 1

    return step


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_s": None, "p99_s": None, "mean_s": None}
    ordered = sorted(values)
    return {
        "p50_s": ordered[len(ordered) // 2],
        "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "mean_s": statistics.fmean(ordered),
    }


def run(spec: dict[str, Any]) -> dict[str, Any]:
    images = [Path(p).read_bytes() for p in spec["images"]]
    warmup_s, duration_s = float(spec["warmup_s"]), float(spec["duration_s"])
    repeats = int(spec.get("repeats", 3))
    with tempfile.TemporaryDirectory(prefix="bench-limit-") as tmp:
        registry, entry, settings = load_entry(Path(spec["archive"]), Path(tmp))
        try:
            import torch

            workers = entry.batcher.workers
            result: dict[str, Any] = {
                "torch_threads": torch.get_num_threads(),
                "allocator": active_allocator(),
                "preprocess_threads": settings.pool_threads,
                "lone_threads": entry.batcher.lone_threads,
                "forward_workers": workers,
                "device": str(entry.runner.device),
                "precision": entry.runner.precision_name,
                "channels_last": entry.runner.channels_last,
                "pipelined": {},
            }
            result["decode_on_forward_thread"] = entry.decode_on_forward_thread
            result["decode_on_gpu"] = entry.gpu_preprocessor is not None
            # one forward thread, and as many as the service's batcher has (the limit is the
            # better of the two: the service's helpers only run when they pay off); where the
            # service decodes on its forward threads, that way too (the best of all counts)
            if spec.get("configs"):  # the paired rounds: exactly these
                configs = [parse_config_key(key)[1:] for key in spec["configs"]]
            else:
                threads_asked = spec.get("forward_threads") or sorted({1, workers})
                configs = [(threads, False) for threads in threads_asked]
                if entry.gpu_preprocessor is not None:  # the service never uses the pool then
                    configs = [(threads, True) for threads in threads_asked]
                elif entry.decode_on_forward_thread and workers > 1:
                    configs.append((workers, True))
            pool = ThreadPoolExecutor(settings.pool_threads, thread_name_prefix="preprocess")
            try:
                for threads, decode_on_forward in configs:
                    for batch in spec.get("batch_sizes", [settings.max_batch_size]):
                        timing: dict[str, list[float]] = {}
                        if decode_on_forward:
                            step = decoding(entry, images, int(batch), timing)
                        else:
                            step = pipelined(entry, images, int(batch), pool, timing)
                        windows = _threaded_windows(step, threads, warmup_s, duration_s, repeats)
                        key = config_key(int(batch), threads, decode_on_forward)
                        result["pipelined"][key] = {
                            "windows": windows,
                            "forward_threads": threads,
                            "decode_on_forward_thread": decode_on_forward,
                            "forward_per_batch": _quantiles(timing.get("forward_s", [])[-200:]),
                        }
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            if spec.get("single", True):
                from service.batching import intra_op_threads

                latencies: list[float] = []
                # as the service computes a lone image (LONE_IMAGE_THREADS)
                with intra_op_threads(entry.batcher.lone_threads):
                    step = single(entry, images, latencies)
                    windows = _windows(step, warmup_s, duration_s, repeats)
                # the warm-up's latencies come first, then each window's in order
                offset = len(latencies) - int(sum(w["images"] for w in windows))
                measured = latencies[offset:]
                for window in windows:
                    count = int(window["images"])
                    window.update(_quantiles(latencies[offset : offset + count]))
                    offset += count
                result["single"] = {"windows": windows, **_quantiles(measured)}
            return result
        finally:
            registry.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m bench.limit SPEC.json\n")
        return 2
    # the service's allocator (MALLOC, default auto: tcmalloc when installed), like with like
    exec_with_allocator(os.environ.get("MALLOC", "auto").lower())
    spec = json.loads(Path(args[0]).read_text())
    sys.stdout.write(json.dumps(run(spec)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
