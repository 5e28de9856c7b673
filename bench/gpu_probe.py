"""``python -m bench.gpu_probe ARCHIVE IMAGES_DIR``: where an image's time goes on a CUDA machine.

The service's end-to-end rate on a GPU is the slowest of its stages, so each is measured alone,
in one process, on the model loaded the way the service loads it (``bench.limit.load_entry``,
settings from the environment: ``DEVICE=cuda PRECISION=bf16 MAX_BATCH_SIZE=128``):

- ``forward_gpu_resident``: the network alone on a batch already on the GPU (the compute roof;
  what Triton's 6,127 inf/s for ResNet-50 on an A100 measures);
- ``forward_from_host``: ``ModelRunner.forward`` on a float batch in pinned host memory, as the
  batcher calls it (H2D copy of float32 pixels + forward + probabilities back);
- ``h2d_float32`` / ``h2d_uint8``: the copy alone, float32 (what the service sends) against the
  uint8 pixels it could send and normalise on the GPU;
- ``cpu_decode_preprocess``: ``Preprocessor`` (PIL decode with draft mode + the card's preset)
  on the image set with 1, 4, 8 and all-core threads, as the service's pool runs it;
- ``nvjpeg_decode_resize``: ``torchvision.io.decode_jpeg(..., device="cuda")`` on batches of
  the same JPEGs, then a resize on the GPU;
- ``header_checks_cpu`` / ``decode_on_gpu_path``: the service's ``DECODE_ON_GPU`` path on one
  thread (``GpuPreprocessor``): the CPU's header checks alone, and checks + batch decode +
  preset on the device.

Prints one JSON object (also written to ``--out``). Not part of ``bench run``: the numbers say
which stage an end-to-end GPU run is bound by.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def _rate(step: Callable[[], int], seconds: float, sync: Callable[[], None]) -> dict[str, float]:
    """Items per second of ``step`` (returns items done) over ``seconds`` after one warm-up call."""
    step()
    sync()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += step()
    sync()
    elapsed = time.perf_counter() - start
    return {"items_per_s": done / elapsed, "items": done, "seconds": elapsed}


def probe(archive: Path, images_dir: Path, batch: int, seconds: float) -> dict[str, Any]:
    import torch
    from torchvision.io import decode_jpeg
    from torchvision.transforms.v2 import functional as F

    from service.gpu_preprocess import GpuPreprocessor

    from .limit import load_entry

    bodies = [p.read_bytes() for p in sorted(images_dir.glob("*.jp*g"))]
    sync = torch.cuda.synchronize
    out: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "images": len(bodies),
        "batch": batch,
        "cpu_cores": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="gpu-probe-") as tmp:
        registry, entry, settings = load_entry(archive, Path(tmp))
        try:
            runner, preprocessor = entry.runner, entry.preprocessor
            out["precision"] = runner.precision_name
            shape = (batch, *runner.input_shape)
            resident = torch.randn(shape, device="cuda").contiguous(
                memory_format=torch.channels_last
            )

            def gpu_only() -> int:
                with torch.inference_mode(), torch.autocast("cuda", dtype=runner.autocast_dtype):
                    runner.probabilities(resident)
                return batch

            out["forward_gpu_resident"] = _rate(gpu_only, seconds, sync)
            host = torch.randn(shape).pin_memory()
            out["forward_from_host"] = _rate(lambda: runner.forward(host).shape[0], seconds, sync)
            as_bytes = torch.randint(0, 255, shape, dtype=torch.uint8).pin_memory()
            for name, source in (("h2d_float32", host), ("h2d_uint8", as_bytes)):
                out[name] = _rate(lambda s=source: s.to("cuda", non_blocking=True).shape[0],
                                  seconds, sync)  # fmt: skip
                out[name]["gb_per_s"] = (
                    out[name]["items_per_s"] * source[0].numel() * source.element_size() / 1e9
                )
            out["cpu_decode_preprocess"] = {}
            for threads in sorted({1, 4, 8, os.cpu_count() or 1}):
                with ThreadPoolExecutor(threads) as pool:

                    def decode_all(pool: ThreadPoolExecutor = pool) -> int:
                        return len(list(pool.map(preprocessor, bodies)))

                    out["cpu_decode_preprocess"][str(threads)] = _rate(
                        decode_all, seconds, lambda: None
                    )
            datas = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in bodies]
            size = list(runner.input_shape[1:])
            chunks = [(datas * (batch // len(datas) + 1))[:batch]]

            def nvjpeg() -> int:
                decoded = decode_jpeg(chunks[0], device="cuda")
                resized = [F.resize(img, size, antialias=True) for img in decoded]
                torch.stack(resized)
                return len(decoded)

            try:
                out["nvjpeg_decode_resize"] = _rate(nvjpeg, seconds, sync)
            except Exception as exc:  # noqa: BLE001 (a build without nvjpeg: say so, go on)
                out["nvjpeg_decode_resize"] = {"error": f"{type(exc).__name__}: {exc}"}
            # the service's DECODE_ON_GPU path, on one thread: header checks on the CPU, then
            # one batch decode + preset on the device; and the CPU's share alone
            device_path = entry.gpu_preprocessor or GpuPreprocessor(preprocessor, runner.device)
            batch_bodies = (bodies * (batch // len(bodies) + 1))[:batch]

            def checks() -> list[Any]:
                return [device_path.check(body) for body in batch_bodies]

            out["header_checks_cpu"] = _rate(lambda: len(checks()), seconds, lambda: None)
            out["decode_on_gpu_path"] = _rate(
                lambda: device_path.batch(checks()).shape[0], seconds, sync
            )
        finally:
            registry.close()
    return out


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=__doc__)
    cli.add_argument("archive", type=Path)
    cli.add_argument("images", type=Path)
    cli.add_argument("--batch", type=int, default=128)
    cli.add_argument("--seconds", type=float, default=3.0)
    cli.add_argument("--out", type=Path)
    args = cli.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.stderr.write("gpu_probe: needs CUDA (torch.cuda.is_available() is False)\n")
        return 2
    result = probe(args.archive, args.images, args.batch, args.seconds)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
