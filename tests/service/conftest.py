"""Fixtures that run the real service: ``python -m service`` (uvicorn) in a subprocess on loopback.

- ``served_store``: a copy of the session's ``digits_store`` (the trainer's digits archive);
- ``service_url``: one shared server on that store (``ADMIN_API_KEY`` = ``ADMIN_KEY``), ready;
- ``start_service``: a factory for servers with custom settings (env), a custom store or a test
  launcher module (fault injection); every server it starts is stopped at teardown.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "test-admin-key-0123456789"
STARTUP_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServiceProcess:
    """A running service: its base URL, process and log file."""

    url: str
    proc: subprocess.Popen
    log_path: Path
    store: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60.0), **kw)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def wait_for(self, path: str, status: int = 200, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"service exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                response = httpx.get(f"{self.url}{path}", timeout=5)
                if response.status_code == status:
                    return
                last = f"{response.status_code} {response.text[:300]}"
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise TimeoutError(f"{path} never answered {status} (last: {last}):\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def launch(
    store: Path,
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    module: str = "service",
    wait: str | None = "/readyz",
) -> ServiceProcess:
    port = free_port()
    full_env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "MODEL_STORE": str(store),
        "TORCH_THREADS": "1",
        "PREPROCESS_THREADS": "2",
        "MAX_BATCH_SIZE": "16",
        "LOG_LEVEL": "info",
        **(env or {}),
    }
    log_path = log_dir / f"service-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", module], cwd=ROOT, env=full_env,
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    service = ServiceProcess(f"http://127.0.0.1:{port}", proc, log_path, store, env or {})
    if wait:
        try:
            service.wait_for(wait)
        except BaseException:
            service.stop()
            raise
    return service


@pytest.fixture(scope="session")
def served_store(digits_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the digits model store (servers may add archives to it)."""
    store = tmp_path_factory.mktemp("served") / "model_store"
    shutil.copytree(digits_store, store)
    return store


@pytest.fixture(scope="session")
def service(
    served_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """One shared, ready server on the digits store; management enabled with ``ADMIN_KEY``."""
    server = launch(served_store, tmp_path_factory.mktemp("logs"), env={"ADMIN_API_KEY": ADMIN_KEY})
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_url(service: ServiceProcess) -> str:
    return service.url


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """``start_service(store=None, env=None, module="service", wait="/readyz")``."""
    started: list[ServiceProcess] = []

    def start(
        store: Path | None = None,
        env: dict[str, str] | None = None,
        module: str = "service",
        wait: str | None = "/readyz",
    ) -> ServiceProcess:
        if store is None:
            store = tmp_path / "model_store"
            store.mkdir(exist_ok=True)
        server = launch(store, tmp_path, env=env, module=module, wait=wait)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# -- images ------------------------------------------------------------------------------------


def digit_png(digit: int, size: int = 32, *, mode: str = "L", nth: int = -1) -> bytes:
    """The ``nth`` sample of ``digit`` in scikit-learn's digits set as PNG bytes.

    At the native 8x8 the service resizes it exactly as the trainer did; other sizes are
    upscaled here first (bilinear).
    """
    import numpy as np
    from PIL import Image

    images, targets = _digits()
    index = int(np.flatnonzero(targets == digit)[nth])
    pixels = ((images[index].astype("int64") * 255 + 8) // 16).astype("uint8")
    image = Image.fromarray(pixels, mode="L")
    if size != 8:
        image = image.resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def jpeg_bytes(
    size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def rewrite_archive(
    source: Path, target: Path, *, card: dict | None = None, weights: bytes | None = None,
    fix_hash: bool = True,
) -> Path:  # fmt: skip
    """Copy an archive changing card fields and/or the weights bytes."""
    with zipfile.ZipFile(source) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    data = json.loads(members["model-card.json"])
    data.update(card or {})
    if weights is not None:
        members["weights.pt"] = weights
        if fix_hash:
            data["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    members["model-card.json"] = json.dumps(data).encode()
    with zipfile.ZipFile(target, "w") as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return target
