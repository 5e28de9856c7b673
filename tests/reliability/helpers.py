"""Measuring a running server from the outside: memory, threads, fds, latencies, metrics."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

MIB = 1 << 20


class RssSampler:
    """Samples a process's RSS in a thread (psutil, every ``interval`` s) while in the block.

    Also reads the kernel's exact high-water mark (``VmHWM``, reset on entry through
    ``/proc/PID/clear_refs``) where Linux allows it, so a spike between two samples counts.
    ``baseline`` is the RSS on entry; ``peak`` the highest of both, in bytes.
    """

    def __init__(self, pid: int, interval: float = 0.002) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples: list[int] = []
        self.baseline = 0
        self.hwm: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(self.interval)

    def _status(self, key: str) -> int | None:
        try:
            text = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        return int(match[1]) * 1024 if match else None

    def __enter__(self) -> RssSampler:
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # reset VmHWM
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self.baseline = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        if self._hwm_reset:
            self.hwm = self._status("VmHWM")

    @property
    def peak(self) -> int:
        return max([self.baseline, *self.samples, self.hwm or 0])

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / MIB


def process_stats(pid: int) -> dict[str, float]:
    """RSS (MiB), open fds and threads of a process (and its children: there are none)."""
    process = psutil.Process(pid)
    return {
        "rss_mib": process.memory_info().rss / MIB,
        "fds": process.num_fds(),
        "threads": process.num_threads(),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def metric_sum(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels`` (a regex per value)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if all(k in found and re.fullmatch(v, found[k]) for k, v in labels.items()):
            total += float(value)
    return total


def server_errors(metrics_text: str) -> float:
    """5xx answers the app counted, except /readyz's 503s while the server was starting."""
    return metric_sum(
        metrics_text, "imgserve_http_requests_total", status="5..", route="(?!/readyz$).*"
    )


def connection_refused(host: str, port: int, timeout: float = 2.0) -> bool:
    """True if nothing accepts a TCP connection on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return True


# -- load generation ------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request: when it started and ended (monotonic s), its status (0: no HTTP answer)."""

    start: float
    end: float
    status: int
    retry_after: str | None = None
    detail: str | None = None
    version: str | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start


async def raw_request(
    url: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a fresh connection (``Connection: close``): status, headers
    (lower-case names), body. Raw asyncio streams: a load generator on a small machine must
    cost far less than the server it loads (httpx's pool gets slow at high concurrency)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        writer.write(head.encode() + body)
        data = await reader.read()
    finally:
        writer.close()
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        raise ConnectionError(f"no HTTP answer: {data[:100]!r}")
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    return int(lines[0].split()[1]), {k.lower(): v.strip() for k, v in fields.items()}, payload


async def timed_post(url: str, path: str, body: bytes, ctype: str) -> Outcome:
    """POST ``body`` on a fresh connection, timed; transport errors become status 0."""
    start = time.monotonic()
    try:
        status, headers, payload = await raw_request(url, "POST", path, body,
                                                     {"Content-Type": ctype})  # fmt: skip
    except (OSError, ValueError) as exc:
        return Outcome(start, time.monotonic(), 0, error=f"{type(exc).__name__}: {exc}")
    end = time.monotonic()
    detail = version = None
    if headers.get("content-type", "").startswith("application/json"):
        data = json.loads(payload)
        detail, version = data.get("detail"), data.get("version")
    return Outcome(start, end, status, headers.get("retry-after"), detail, version)


async def closed_loop(url: str, path: str, body: bytes, ctype: str, *, clients: int,
                      duration: float) -> list[Outcome]:  # fmt: skip
    """``clients`` loops each sending the next request when the previous one is answered."""
    outcomes: list[Outcome] = []
    stop = time.monotonic() + duration

    async def loop() -> None:
        while time.monotonic() < stop:
            outcomes.append(await timed_post(url, path, body, ctype))

    await asyncio.gather(*(loop() for _ in range(clients)))
    return outcomes


async def open_loop(url: str, path: str, body: bytes, ctype: str, *, rate: float,
                    duration: float) -> tuple[list[Outcome], float]:  # fmt: skip
    """Requests sent at a fixed rate whatever the answers (open loop), for ``duration`` s.

    Returns the outcomes and the monotonic time the last request was sent.
    """
    tasks: list[asyncio.Task[Outcome]] = []
    start = time.monotonic()
    for i in range(int(rate * duration)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(timed_post(url, path, body, ctype)))
    last_sent = time.monotonic()
    return list(await asyncio.gather(*tasks)), last_sent
