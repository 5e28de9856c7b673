"""The servers under test, each a real process on 127.0.0.1 (free ports), started and stopped here.

Every process started is tracked (``Tracker``) and killed by pid at the end, also when the run
fails or is interrupted: servers, TorchServe's Java frontend and its Python workers.

- ``service``: ``python -m service`` with the archive's store, ``MODELS=<file>`` and any setting
  overrides (e.g. ``MAX_BATCH_SIZE=1``); ready when ``/readyz`` answers 200.
- ``naive``: ``uvicorn bench.naive_app:app`` (``BENCH_ARCHIVE``); ready on ``/ping``.
- ``torchserve``: TorchServe 0.12 on the SAME .mar, in a private work dir (``TMPDIR``/``TEMP``/
  ``LOG_LOCATION``, see ``.notes/TORCHSERVE.md``), the archive registered through the management
  API with ``batch_size=8&max_batch_delay=10`` and N workers (``OMP_NUM_THREADS=1`` with 2).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 300.0
TS_VENV = ROOT / "bench" / ".ts-venv"


class TargetUnavailable(RuntimeError):
    """A target that cannot run on this machine (e.g. no Java): skipped with this message."""


@dataclass
class Endpoint:
    """A started server: where to send requests and what to measure."""

    name: str
    port: int
    path: str
    pids: list[int]
    log: Path
    batch_probe: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    started_s: float = 0.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Tracker:
    """Every process this run started, so that each can be killed by pid whatever happens."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def add(self, pid: int) -> None:
        self.pids.add(pid)

    def add_tree(self, pid: int) -> None:
        import psutil

        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            self.pids.add(root.pid)
            self.pids.update(child.pid for child in root.children(recursive=True))

    def kill_all(self) -> list[int]:
        """SIGKILL every tracked process still alive (and its descendants); returns the pids."""
        import psutil

        killed = []
        procs = []
        for pid in sorted(self.pids):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                procs.extend([proc, *proc.children(recursive=True)])
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    proc.kill()
                    killed.append(proc.pid)
        psutil.wait_procs(procs, timeout=5)
        self.pids.clear()
        return killed


def http_status(url: str, *, method: str = "GET", timeout: float = 5.0) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback)
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def wait_ready(
    url: str, proc: subprocess.Popen[bytes] | None, log: Path, timeout: float = READY_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before ready:\n{_tail(log)}")
        try:
            status, body = http_status(url)
            if status == 200:
                return
            last = f"{status} {body[:200]}"
        except (OSError, urllib.error.URLError) as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s (last: {last}):\n{_tail(log)}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _spawn(
    argv: list[str], env: dict[str, str], log: Path, tracker: Tracker, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    tracker.add(proc.pid)
    return proc


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@contextlib.contextmanager
def service(
    name: str,
    archive: Path,
    logs: Path,
    tracker: Tracker,
    settings: dict[str, str],
    *,
    tree: Path | None = None,
) -> Iterator[Endpoint]:
    """``python -m service`` serving only ``archive`` (its store is the archive's folder).

    ``tree``: a folder holding another copy of the ``service`` package (e.g. a snapshot from
    before a change) to run instead of this checkout's; ``trainer`` still comes from here.
    """
    port = free_port()
    env = base_env(
        {
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "MODEL_STORE": str(archive.parent),
            "MODELS": archive.name,
            **settings,
        }
    )
    if tree is not None:
        env["PYTHONPATH"] = str(ROOT)
    log = logs / f"{name}.log"
    start = time.perf_counter()
    proc = _spawn([sys.executable, "-m", "service"], env, log, tracker, cwd=tree or ROOT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc, log)
        yield Endpoint(
            name, port, "/predict", [proc.pid], log,
            batch_probe={"kind": "prometheus", "path": "/metrics", "metric": "imgserve_batch_size"},
            settings=settings, started_s=time.perf_counter() - start,
        )  # fmt: skip
    finally:
        stop(proc)


@contextlib.contextmanager
def naive(archive: Path, logs: Path, tracker: Tracker, device: str = "cpu") -> Iterator[Endpoint]:
    """The tutorial-style FastAPI app (bench/naive_app.py) under plain uvicorn."""
    env = base_env({"BENCH_ARCHIVE": str(archive), "BENCH_DEVICE": device})
    with _uvicorn_app(
        "naive", "bench.naive_app:app", [], env, logs, tracker,
        "1 process, default loop/http, access log off",
    ) as endpoint:  # fmt: skip
        yield endpoint


@contextlib.contextmanager
def http_floor(logs: Path, tracker: Tracker) -> Iterator[Endpoint]:
    """bench/floor_app.py on the service's server stack (uvloop + httptools when installed)."""
    with _uvicorn_app(
        "http-floor", "bench.floor_app:app", ["--loop", "auto", "--http", "auto"], base_env(),
        logs, tracker, "1 process, uvloop/httptools if installed, access log off",
    ) as endpoint:  # fmt: skip
        yield endpoint


@contextlib.contextmanager
def _uvicorn_app(
    name: str,
    app: str,
    options: list[str],
    env: dict[str, str],
    logs: Path,
    tracker: Tracker,
    described: str,
) -> Iterator[Endpoint]:
    """A one-process uvicorn app of bench/ with GET /ping and POST /predict, on a free port."""
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--log-level", "warning", *options,
    ]  # fmt: skip
    log = logs / f"{name}.log"
    start = time.perf_counter()
    proc = _spawn(argv, env, log, tracker)
    try:
        wait_ready(f"http://127.0.0.1:{port}/ping", proc, log)
        yield Endpoint(
            name, port, "/predict", [proc.pid], log, settings={"uvicorn": described},
            started_s=time.perf_counter() - start,
        )  # fmt: skip
    finally:
        stop(proc)


# ---------------------------------------------------------------------------------------------
# TorchServe
# ---------------------------------------------------------------------------------------------


def java_major() -> int | None:
    java = shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        return None
    major = int(match[1])
    return int(match[2] or 0) if major == 1 else major


def _torchserve_works(binary: Path) -> bool:
    python = binary.parent / "python"
    if not binary.is_file() or not python.is_file():
        return False
    check = "import ts.version, sys; sys.exit(ts.version.__version__ != '0.12.0')"
    try:
        return subprocess.run([python, "-c", check], timeout=60, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_torchserve(*, install: bool = True) -> tuple[Path, str]:
    """(torchserve command, where it came from); raises TargetUnavailable with the reason.

    Prefers TorchServe 0.12 in its own virtual environment ``bench/.ts-venv`` (made with
    ``scripts/torchserve_env.sh --venv``, layered over the project's .venv), installing it there
    when ``install``; falls back to the one next to this Python.
    """
    major = java_major()
    if major is None or major < 11:
        found = "no java on PATH" if major is None else f"Java {major}"
        raise TargetUnavailable(f"TorchServe skipped: it needs Java >= 11 ({found})")
    venv_bin = TS_VENV / "bin" / "torchserve"
    if _torchserve_works(venv_bin):
        return venv_bin, f"{TS_VENV.relative_to(ROOT)} (own virtual environment)"
    problem = ""
    if install:
        script = ROOT / "scripts" / "torchserve_env.sh"
        try:
            done = subprocess.run(
                ["bash", str(script), "--venv", str(TS_VENV)], cwd=ROOT, capture_output=True,
                text=True, timeout=900, check=False,
            )  # fmt: skip
            if done.returncode == 0 and _torchserve_works(venv_bin):
                return venv_bin, f"{TS_VENV.relative_to(ROOT)} (own virtual environment)"
            problem = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]
            problem = f"; installing into {TS_VENV.name} failed: {problem[0][:200]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            problem = f"; installing into {TS_VENV.name} failed: {exc}"
    local = Path(sys.executable).parent / "torchserve"
    if _torchserve_works(local):
        return local, f"{local.parent.parent.name} (project venv{problem})"
    raise TargetUnavailable(f"TorchServe skipped: torchserve 0.12.0 is not installed{problem}")


TS_CONFIG = """\
inference_address=http://127.0.0.1:{inference}
management_address=http://127.0.0.1:{management}
metrics_address=http://127.0.0.1:{metrics}
grpc_inference_address=127.0.0.1
grpc_management_address=127.0.0.1
grpc_inference_port={grpc_inference}
grpc_management_port={grpc_management}
default_workers_per_model=1
disable_token_authorization=true
enable_model_api=true
disable_system_metrics=true
"""


@contextlib.contextmanager
def torchserve(
    binary: Path,
    archive: Path,
    model_name: str,
    logs: Path,
    tracker: Tracker,
    *,
    workers: int,
    omp_threads: int | None,
    batch_size: int = 8,
    max_batch_delay_ms: int = 10,
) -> Iterator[Endpoint]:
    """TorchServe 0.12 serving ``archive`` with batching, in a private work dir under /tmp."""
    work = Path(tempfile.mkdtemp(prefix="ts-"))  # short: the worker socket path has 108 bytes
    (work / "tmp").mkdir()
    (work / "logs").mkdir()
    ports = {
        key: free_port()
        for key in ("inference", "management", "metrics", "grpc_inference", "grpc_management")
    }
    config = work / "config.properties"
    config.write_text(TS_CONFIG.format(**ports))
    extra = {
        "TEMP": str(work / "tmp"),
        "TMPDIR": str(work / "tmp"),
        "LOG_LOCATION": str(work / "logs"),
        "METRICS_LOCATION": str(work / "logs"),
    }
    if omp_threads is not None:
        extra["OMP_NUM_THREADS"] = str(omp_threads)
    env = base_env(extra)
    name = f"torchserve-{workers}w" + (f"-omp{omp_threads}" if omp_threads and workers == 1 else "")
    log = logs / f"{name}.log"
    argv = [
        str(binary), "--start", "--ncs", "--disable-token-auth", "--model-store",
        str(archive.parent), "--ts-config", str(config),
    ]  # fmt: skip
    start = time.perf_counter()
    frontend: int | None = None
    try:
        launcher = _spawn(argv, env, log, tracker, cwd=work)
        launcher.wait(60)
        wait_ready(f"http://127.0.0.1:{ports['inference']}/ping", None, log, timeout=180)
        frontend = _frontend_pid(work)
        if frontend is not None:
            tracker.add(frontend)
        query = (
            f"url={archive.name}&model_name={model_name}&batch_size={batch_size}"
            f"&max_batch_delay={max_batch_delay_ms}&initial_workers={workers}&synchronous=true"
        )
        status, body = http_status(
            f"http://127.0.0.1:{ports['management']}/models?{query}", method="POST",
            timeout=READY_TIMEOUT_S,
        )  # fmt: skip
        if status != 200:
            raise RuntimeError(f"registering {archive.name} answered {status}: {body[:500]}")
        _, described = http_status(f"http://127.0.0.1:{ports['management']}/models/{model_name}")
        if frontend is not None:
            tracker.add_tree(frontend)
        yield Endpoint(
            name, ports["inference"], f"/predictions/{model_name}",
            [frontend] if frontend is not None else [], log,
            batch_probe={"kind": "ts_log", "path": str(work / "logs" / "model_metrics.log"),
                         "model": model_name},
            settings={
                "workers": workers, "batch_size": batch_size,
                "max_batch_delay_ms": max_batch_delay_ms,
                "OMP_NUM_THREADS": omp_threads if omp_threads is not None else "unset",
                "describe": _describe_ts(described),
            },
            started_s=time.perf_counter() - start,
        )  # fmt: skip
    finally:
        _stop_torchserve(binary, env, work, frontend, logs, name)


def _frontend_pid(work: Path) -> int | None:
    pid_file = work / "tmp" / ".model_server.pid"
    for _ in range(50):
        if pid_file.exists():
            text = pid_file.read_text().strip()
            if text.isdigit():
                return int(text)
        time.sleep(0.1)
    return None


def _describe_ts(text: str) -> dict[str, Any]:
    try:
        info = json.loads(text)[0]
    except (ValueError, IndexError, KeyError, TypeError):
        return {}
    return {
        "batchSize": info.get("batchSize"),
        "maxBatchDelay": info.get("maxBatchDelay"),
        "workers": len(info.get("workers", [])),
    }


def _stop_torchserve(
    binary: Path, env: dict[str, str], work: Path, frontend: int | None, logs: Path, name: str
) -> None:
    import psutil

    family: list[Any] = []
    if frontend is not None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(frontend)
            family = [root, *root.children(recursive=True)]
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            [str(binary), "--stop"], cwd=work, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False,
        )  # fmt: skip
    _, alive = psutil.wait_procs(family, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    ts_log = work / "logs" / "ts_log.log"
    # keep the end of TorchServe's own log next to ours
    with contextlib.suppress(OSError), ts_log.open("rb") as handle:
        handle.seek(max(0, ts_log.stat().st_size - 200_000))
        (logs / f"{name}-ts_log.tail.log").write_bytes(handle.read())
    shutil.rmtree(work, ignore_errors=True)
