"""Test-only launcher: the real service (``service.__main__.main``) with a controllable forward.

Run as ``python -m tests.reliability.launcher`` with the service's usual environment. Every
model version's ``Batcher.forward_fn`` is wrapped through the service's explicit hook
(``Registry.on_ready``), and a test-only route steers the wrapper at run time:

- ``POST /_test/forward`` ``{"delay_s": 0.1, "fail_next": 1, "oom_min_size": 2}``: sleep this
  long in every forward (a slower model), raise in the next N forwards, raise a CUDA-style
  out-of-memory error for batches of at least this many images (0: never); fields left out
  keep their value;
- ``GET /_test/forward``: the settings plus ``busy`` (forwards running now), ``running``
  (images in them), ``pending`` (images queued on every batcher) and ``events`` (one ``[size, outcome]`` per forward call
  since the last ``POST``, outcome ``ok``/``fail``/``oom``).

Production settings know nothing about this; only this module adds the route.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import torch
from fastapi import FastAPI, Request

import service.main
from service.registry import ModelEntry

INJECTED_FAULT = "injected fault in the forward pass"
INJECTED_OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (injected)"


class ForwardControl:
    """Shared, lock-protected fault settings and a log of forward calls."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.delay_s = 0.0
        self.fail_next = 0
        self.oom_min_size = 0
        self.busy = 0
        self.running = 0  # images in the forwards running now
        self.events: list[tuple[int, str]] = []

    def update(self, changes: dict[str, Any]) -> None:
        with self.lock:
            self.delay_s = float(changes.get("delay_s", self.delay_s))
            self.fail_next = int(changes.get("fail_next", self.fail_next))
            self.oom_min_size = int(changes.get("oom_min_size", self.oom_min_size))
            self.events = []

    def wrap(self, forward: Any) -> Any:
        def controlled(batch: torch.Tensor) -> torch.Tensor:
            size = int(batch.shape[0])
            with self.lock:
                delay, oom_min = self.delay_s, self.oom_min_size
                fail = self.fail_next > 0
                self.fail_next -= int(fail)
                self.busy += 1
                self.running += size
            outcome = "ok"
            try:
                if delay:
                    time.sleep(delay)
                if fail:
                    outcome = "fail"
                    raise ValueError(INJECTED_FAULT)
                if oom_min and size >= oom_min:
                    outcome = "oom"
                    raise RuntimeError(INJECTED_OOM)
                return forward(batch)
            finally:
                with self.lock:
                    self.busy -= 1
                    self.running -= size
                    self.events.append((size, outcome))

        return controlled


def instrument(app: FastAPI) -> FastAPI:
    control = ForwardControl()
    registry = app.state.registry

    def hook(entry: ModelEntry) -> None:
        assert entry.batcher is not None
        entry.batcher.forward_fn = control.wrap(entry.batcher.forward_fn)

    registry.on_ready.append(hook)

    @app.get("/_test/forward", include_in_schema=False)
    async def forward_state() -> dict[str, Any]:
        pending = sum(e.batcher.pending for e in registry.entries() if e.batcher is not None)
        with control.lock:
            return {
                "delay_s": control.delay_s, "fail_next": control.fail_next,
                "oom_min_size": control.oom_min_size, "busy": control.busy,
                "running": control.running, "pending": pending, "events": list(control.events),
            }  # fmt: skip

    @app.post("/_test/forward", include_in_schema=False)
    async def set_forward(request: Request) -> dict[str, Any]:
        control.update(await request.json())
        return {"ok": True}

    return app


def main() -> int:
    create_app = service.main.create_app
    service.main.create_app = lambda settings=None, peers=None: instrument(
        create_app(settings, peers=peers)
    )
    from service.__main__ import main as service_main

    return service_main()


if __name__ == "__main__":
    sys.exit(main())
