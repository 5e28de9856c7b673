"""GPU utilisation sampled during a load point (``--gpu`` runs): NVML if importable, else
``nvidia-smi --query-gpu ... -lms``; where neither exists the sampler records nothing."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from typing import Any

INTERVAL_S = 0.2


class GpuSampler:
    """Samples utilisation (%) and memory used (MiB) of GPU 0 in a background thread."""

    def __init__(self, interval_s: float = INTERVAL_S, index: int = 0) -> None:
        self.interval_s = interval_s
        self.index = index
        self.samples: list[tuple[float, float, float]] = []  # (t, util %, memory MiB)
        self.source: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        reader = self._nvml_reader()
        if reader is not None:
            self.source = "nvml"
            self._thread = threading.Thread(target=self._poll, args=(reader,), daemon=True)
        elif shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi", f"--id={self.index}",
                    "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                    f"-lms={int(self.interval_s * 1000)}",
                ],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            return
        self._thread.start()

    def _nvml_reader(self) -> Any:
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:  # noqa: BLE001 - no driver, no device
            return None

        def read() -> tuple[float, float]:
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return float(util.gpu), memory.used / 2**20

        return read

    def _poll(self, read: Any) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                util, memory = read()
                self.samples.append((time.monotonic(), util, memory))
            self._stop.wait(self.interval_s)

    def _read_smi(self) -> None:
        stdout = self._proc.stdout if self._proc is not None else None
        if stdout is None:
            return
        for line in stdout:
            parts = [p.strip() for p in line.split(",")]
            with contextlib.suppress(ValueError, IndexError):
                self.samples.append((time.monotonic(), float(parts[0]), float(parts[1])))
            if self._stop.is_set():
                break

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            if self._proc.poll() is None:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(5)

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return {"source": self.source, "samples": 0} if self.source else None
        utils = [s[1] for s in self.samples]
        return {
            "source": self.source,
            "samples": len(self.samples),
            "util_mean_pct": sum(utils) / len(utils),
            "util_max_pct": max(utils),
            "memory_max_mib": max(s[2] for s in self.samples),
        }
