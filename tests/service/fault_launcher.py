"""Test-only launcher: the real service, with faults injected into the forward pass.

Run as ``python -m tests.service.fault_launcher`` with the service's usual environment plus:
- ``FAULT_DELAY_S``: sleep this long in every forward (a slow model: fills the queue);
- ``FAULT_FAIL_FIRST``: the first N batches after warm-up raise an exception;
- ``FAULT_OOM_ABOVE``: batches larger than this raise a CUDA-style out-of-memory error.
It uses the service's explicit hook (``Registry.on_ready``) to wrap ``Batcher.forward_fn``;
production settings know nothing about faults.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch

from service.__main__ import configure_logging
from service.main import create_app
from service.registry import ModelEntry
from service.settings import Settings


class FaultyForward:
    def __init__(self, forward, *, delay: float, fail_first: int, oom_above: int) -> None:
        self.forward = forward
        self.delay = delay
        self.fail_left = fail_first
        self.oom_above = oom_above
        self.lock = threading.Lock()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            if self.fail_left > 0:
                self.fail_left -= 1
                raise ValueError("injected fault in the forward pass")
        if self.oom_above and batch.shape[0] > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return self.forward(batch)


def inject(entry: ModelEntry) -> None:
    assert entry.batcher is not None
    entry.batcher.forward_fn = FaultyForward(
        entry.batcher.forward_fn,
        delay=float(os.environ.get("FAULT_DELAY_S", "0")),
        fail_first=int(os.environ.get("FAULT_FAIL_FIRST", "0")),
        oom_above=int(os.environ.get("FAULT_OOM_ABOVE", "0")),
    )


def main() -> int:
    import uvicorn

    settings = Settings()
    configure_logging(settings)
    app = create_app(settings)
    app.state.registry.on_ready.append(inject)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None,
                timeout_graceful_shutdown=settings.graceful_timeout_s)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
