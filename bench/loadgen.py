"""The load generator: a lean HTTP/1.1 client in its own process (``python -m bench.loadgen SPEC``).

On a 2-core machine every cycle the generator spends is taken from the server, so it is kept
small: asyncio (uvloop when installed) with raw streams, every request pre-built once as bytes
(headers + JPEG body, raw ``image/jpeg`` or ``multipart/form-data``), keep-alive connections,
a minimal response parser (status line, Content-Length or chunked), no HTTP library. Its own
CPU seconds and the server's (psutil over the given pids and their children) are measured per
window and reported, so the reader sees what the generator took.

Modes:
- ``closed``: C connections, each sending its next request as soon as the answer arrives;
  a request counts in the window in which it completes;
- ``open``: requests scheduled at a fixed rate (uniform spacing) whatever the answers do,
  each on an idle connection (new ones opened as needed, up to ``max_connections``); latency
  runs from the SCHEDULED time (no coordinated omission) and a request counts in the window in
  which it was scheduled; after the last window the stragglers are awaited (up to the timeout).

A run is a warm-up, then ``repeats`` back-to-back windows of ``duration_s``. At each window
boundary the server's CPU times and, if asked, its batch-size counters are read: Prometheus
``<metric>_sum``/``_count`` from ``/metrics`` (our service) or TorchServe's
``model_metrics.log`` (one line per handler call, listing the batch's request ids).
The result is one JSON object on stdout.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BOUNDARY = "bench-7d1f3c9a2b"
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
WARMUP, DONE = -1, -2  # window ids outside the measured windows


# ---------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------


def build_requests(
    *,
    host: str,
    port: int,
    path: str,
    images: list[bytes | tuple[str, bytes]],
    body: str = "raw",
    images_per_request: int = 1,
) -> list[bytes]:
    """One complete HTTP/1.1 request per image (cycling ``images_per_request`` at a time)."""
    named = [
        item if isinstance(item, tuple) else (f"img_{i}.jpg", item) for i, item in enumerate(images)
    ]
    requests = []
    for start in range(len(named)):
        group = [named[(start + j) % len(named)] for j in range(images_per_request)]
        if body == "raw":
            if images_per_request != 1:
                raise ValueError("a raw body carries exactly one image")
            name, data = group[0]
            content_type = CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
            payload = data
        elif body == "multipart":
            content_type = f"multipart/form-data; boundary={BOUNDARY}"
            chunks = []
            for name, data in group:
                part_type = CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
                chunks.append(
                    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
                    f'filename="{name}"\r\nContent-Type: {part_type}\r\n\r\n'.encode()
                )
                chunks.append(data)
                chunks.append(b"\r\n")
            chunks.append(f"--{BOUNDARY}--\r\n".encode())
            payload = b"".join(chunks)
        else:
            raise ValueError(f"body must be 'raw' or 'multipart', not {body!r}")
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        requests.append(head.encode("latin-1") + payload)
    return requests


class NothingAnswered(ConnectionError):
    """The server closed the connection before sending any byte of an answer.

    On a keep-alive connection that sat idle this is the server's idle timeout racing the next
    request (HTTP/1.1 allows it to close idle connections at any time); clients retry such a
    request once on a new connection, and so does the open-loop sender (counted as ``retried``).
    """


class Connection:
    """One keep-alive connection; ``roundtrip`` sends a request and reads its whole answer."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        return cls(reader, writer)

    async def roundtrip(self, request: bytes) -> tuple[int, bool, bytes]:
        """(status, server wants to close, body); ``NothingAnswered`` if the peer closed first."""
        try:
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            raise NothingAnswered("closed before any byte of an answer") from exc
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise NothingAnswered(f"{type(exc).__name__} before any byte of an answer") from exc
        status = int(head[9:12])
        lower = head.lower()
        close = b"\r\nconnection: close" in lower
        index = lower.find(b"\r\ncontent-length:")
        if index >= 0:
            end = lower.index(b"\r\n", index + 2)
            length = int(lower[index + 17 : end])
            body = await self.reader.readexactly(length) if length else b""
        elif b"\r\ntransfer-encoding: chunked" in lower:
            body = await self._chunked()
        else:  # no length: the body runs to the end of the connection
            body = await self.reader.read()
            close = True
        return status, close, body

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            line = await self.reader.readuntil(b"\r\n")
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # trailers are not used
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        self.writer.close()


async def fetch(host: str, port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """A one-off GET on its own connection (probes, /metrics)."""
    conn = await asyncio.wait_for(Connection.open(host, port), timeout)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
        status, _, body = await asyncio.wait_for(conn.roundtrip(request.encode()), timeout)
        return status, body
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# measurements at window boundaries
# ---------------------------------------------------------------------------------------------


class CpuProbe:
    """CPU seconds (user + system) of some processes and all their descendants."""

    def __init__(self, pids: list[int]) -> None:
        import psutil

        self._psutil = psutil
        self.roots = []
        for pid in pids:
            try:
                self.roots.append(psutil.Process(pid))
            except psutil.Error:
                continue
        self.known: dict[int, Any] = {}

    def read(self) -> dict[int, float]:
        psutil = self._psutil
        times = {}
        for root in self.roots:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in procs:
                proc = self.known.setdefault(proc.pid, proc)
                try:
                    cpu = proc.cpu_times()
                except psutil.Error:
                    continue
                times[proc.pid] = cpu.user + cpu.system
        return times

    @staticmethod
    def delta(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(value - before.get(pid, 0.0) for pid, value in after.items())


_PROM_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(?P<value>\S+)$")


def parse_prometheus_sums(text: str, metric: str) -> tuple[float, float]:
    """(sum of ``<metric>_sum``, sum of ``<metric>_count``) over all label sets."""
    total = count = 0.0
    for line in text.splitlines():
        if not line.startswith(metric):
            continue
        match = _PROM_LINE.match(line)
        if match is None:
            continue
        if match["name"] == f"{metric}_sum":
            total += float(match["value"])
        elif match["name"] == f"{metric}_count":
            count += float(match["value"])
    return total, count


_TS_IDS = re.compile(r"requestID:([^|]*?)(?:,timestamp:|\||$)")


def parse_ts_metrics(text: str, model: str) -> tuple[float, float]:
    """(requests, handler calls) from TorchServe ``model_metrics.log`` lines of ``model``."""
    requests = calls = 0.0
    for line in text.splitlines():
        if "PredictionTime" not in line or f"ModelName:{model}," not in line:
            continue
        match = _TS_IDS.search(line)
        ids = match[1] if match else line.rpartition("requestID:")[2].split("|", 1)[0]
        calls += 1
        requests += max(1, len([part for part in ids.split(",") if part.strip()]))
    return requests, calls


class BatchProbe:
    """Cumulative (images, batches) of the server, for the mean batch size of a window."""

    def __init__(self, spec: dict[str, Any] | None, host: str, port: int) -> None:
        self.spec = spec or {}
        self.host, self.port = host, port
        self._offset = 0
        self._totals = (0.0, 0.0)

    async def read(self) -> tuple[float, float] | None:
        kind = self.spec.get("kind")
        try:
            if kind == "prometheus":
                status, body = await fetch(self.host, self.port, self.spec.get("path", "/metrics"))
                if status != 200:
                    return None
                metric = self.spec.get("metric", "imgserve_batch_size")
                return parse_prometheus_sums(body.decode("utf-8", "replace"), metric)
            if kind == "ts_log":
                return self._read_ts_log()
        except (OSError, asyncio.TimeoutError, ValueError):
            return None
        return None

    def _read_ts_log(self) -> tuple[float, float]:
        path = Path(self.spec["path"])
        if not path.exists():
            return self._totals
        with path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        cut = data.rfind(b"\n") + 1  # only whole lines
        self._offset += cut
        requests, calls = parse_ts_metrics(
            data[:cut].decode("utf-8", "replace"), self.spec["model"]
        )
        self._totals = (self._totals[0] + requests, self._totals[1] + calls)
        return self._totals


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


@dataclass
class Window:
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    late: int = 0
    dropped: int = 0
    retried: int = 0  # requests re-sent on a new connection after an idle one was closed


@dataclass
class State:
    requests: list[bytes]
    windows: dict[int, Window]
    window: int = WARMUP
    cursor: int = 0
    stop: bool = False
    first_error: str | None = None

    def next_request(self) -> bytes:
        request = self.requests[self.cursor % len(self.requests)]
        self.cursor += 1
        return request

    def record(self, window: int, latency: float, status: int, body: bytes) -> None:
        slot = self.windows.get(window)
        if slot is None:
            return
        if 200 <= status < 300:
            slot.latencies.append(latency)
        else:
            slot.errors[str(status)] += 1
            if self.first_error is None:
                self.first_error = f"{status}: {body[:300].decode('utf-8', 'replace')}"

    def record_failure(self, window: int, kind: str, exc: BaseException | None = None) -> None:
        slot = self.windows.get(window)
        if slot is not None:
            slot.errors[kind] += 1
        if self.first_error is None and exc is not None:
            self.first_error = f"{kind}: {type(exc).__name__}: {exc}"


CONNECTION_ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


async def closed_worker(state: State, host: str, port: int) -> None:
    conn: Connection | None = None
    clock = time.perf_counter
    try:
        while not state.stop:
            if conn is None:
                try:
                    conn = await Connection.open(host, port)
                except OSError as exc:
                    state.record_failure(state.window, "connect", exc)
                    await asyncio.sleep(0.05)
                    continue
            request = state.next_request()
            start = clock()
            try:
                status, close, body = await conn.roundtrip(request)
            except CONNECTION_ERRORS as exc:
                state.record_failure(state.window, "connection", exc)
                conn.close()
                conn = None
                continue
            state.record(state.window, clock() - start, status, body)
            if close:
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()


class OpenLoop:
    """Fixed-rate sender: a request every ``1/rate`` s on an idle (or new) connection."""

    def __init__(self, state: State, host: str, port: int, rate: float, max_connections: int):
        self.state, self.host, self.port = state, host, port
        self.interval = 1.0 / rate
        self.max_connections = max_connections
        self.idle: list[Connection] = []
        self.open_count = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def prepare(self, count: int) -> None:
        for _ in range(count):
            self.idle.append(await Connection.open(self.host, self.port))
            self.open_count += 1

    async def run(self) -> None:
        state, clock = self.state, time.perf_counter
        scheduled = clock()
        while not state.stop:
            delay = scheduled - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            window = state.window
            slot = state.windows.get(window)
            if slot is not None and clock() - scheduled > 0.010:
                slot.late += 1
            if self.idle:
                conn: Connection | None = self.idle.pop()
            elif self.open_count < self.max_connections:
                conn, self.open_count = None, self.open_count + 1
            else:
                if slot is not None:
                    slot.dropped += 1
                scheduled += self.interval
                continue
            task = asyncio.create_task(self._send(conn, state.next_request(), scheduled, window))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            scheduled += self.interval

    async def _send(
        self, conn: Connection | None, request: bytes, scheduled: float, window: int
    ) -> None:
        state = self.state
        try:
            if conn is None:
                conn = await Connection.open(self.host, self.port)
                status, close, body = await conn.roundtrip(request)
            else:
                try:
                    status, close, body = await conn.roundtrip(request)
                except NothingAnswered:  # an idle connection the server had closed: once more
                    conn.close()
                    conn = None
                    slot = state.windows.get(window)
                    if slot is not None:
                        slot.retried += 1
                    conn = await Connection.open(self.host, self.port)
                    status, close, body = await conn.roundtrip(request)
        except CONNECTION_ERRORS as exc:
            state.record_failure(window, "connection", exc)
            if conn is not None:
                conn.close()
            self.open_count -= 1
            return
        state.record(window, time.perf_counter() - scheduled, status, body)
        if close:
            conn.close()
            self.open_count -= 1
        else:
            self.idle.append(conn)

    async def drain(self, timeout: float) -> int:
        """Wait for requests still in flight; returns how many did not finish in time."""
        if not self.tasks:
            return 0
        _, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        return len(pending)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(slot: Window, elapsed: float, images_per_request: int) -> dict[str, Any]:
    lat = sorted(slot.latencies)
    ok = len(lat)
    return {
        "elapsed_s": round(elapsed, 4),
        "ok": ok,
        "errors": dict(slot.errors),
        "error_count": sum(slot.errors.values()),
        "req_s": ok / elapsed if elapsed > 0 else 0.0,
        "img_s": ok * images_per_request / elapsed if elapsed > 0 else 0.0,
        "p50_s": percentile(lat, 0.50),
        "p95_s": percentile(lat, 0.95),
        "p99_s": percentile(lat, 0.99),
        "max_s": lat[-1] if lat else None,
        "mean_s": sum(lat) / ok if ok else None,
        "late": slot.late,
        "dropped": slot.dropped,
        "retried": slot.retried,
    }


async def _boundary(cpu: CpuProbe, batches: BatchProbe) -> dict[str, Any]:
    return {
        "t": time.perf_counter(),
        "server_cpu": cpu.read(),
        "own_cpu": time.process_time(),
        "batch": await batches.read(),
    }


def _window_extras(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "server_cpu_s": CpuProbe.delta(before["server_cpu"], after["server_cpu"]),
        "loadgen_cpu_s": after["own_cpu"] - before["own_cpu"],
        "batch_images": None,
        "batch_count": None,
        "mean_batch": None,
    }
    if before["batch"] is not None and after["batch"] is not None:
        images = after["batch"][0] - before["batch"][0]
        count = after["batch"][1] - before["batch"][1]
        extra.update(
            batch_images=images, batch_count=count, mean_batch=images / count if count else None
        )
    return extra


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    host, port = spec.get("host", "127.0.0.1"), int(spec["port"])
    images = [(Path(p).name, Path(p).read_bytes()) for p in spec["images"]]
    per_request = int(spec.get("images_per_request", 1))
    requests = build_requests(
        host=host, port=port, path=spec["path"], images=images,
        body=spec.get("body", "raw"), images_per_request=per_request,
    )  # fmt: skip
    repeats, duration = int(spec.get("repeats", 3)), float(spec["duration_s"])
    state = State(requests, {w: Window() for w in (WARMUP, *range(repeats))})
    cpu = CpuProbe(list(spec.get("pids", [])))
    batches = BatchProbe(spec.get("batch_probe"), host, port)
    mode = spec.get("mode", "closed")
    opener: OpenLoop | None = None
    if mode == "closed":
        tasks = [
            asyncio.create_task(closed_worker(state, host, port))
            for _ in range(int(spec["concurrency"]))
        ]
    elif mode == "open":
        opener = OpenLoop(
            state, host, port, float(spec["rate"]), int(spec.get("max_connections", 512))
        )
        await opener.prepare(min(opener.max_connections, int(spec.get("initial_connections", 8))))
        tasks = [asyncio.create_task(opener.run())]
    else:
        raise ValueError(f"mode must be 'closed' or 'open', not {mode!r}")
    started = time.perf_counter()
    cpu_at_start = time.process_time()
    await asyncio.sleep(float(spec.get("warmup_s", 1.0)))
    marks = [await _boundary(cpu, batches)]
    for window in range(repeats):
        state.window = window
        marks[-1]["t"] = time.perf_counter()  # the window starts now, after the probe
        await asyncio.sleep(duration)
        state.window = DONE if window == repeats - 1 else window + 1
        marks.append(await _boundary(cpu, batches))
    state.stop = True
    unfinished = 0
    if opener is not None:
        unfinished = await opener.drain(float(spec.get("timeout_s", 60.0)))
        opener.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    results = []
    for window in range(repeats):
        before, after = marks[window], marks[window + 1]
        summary = summarize(state.windows[window], after["t"] - before["t"], per_request)
        summary.update(_window_extras(before, after))
        if spec.get("raw_latencies"):  # several generator processes: merged by the caller
            summary["latencies"] = state.windows[window].latencies
        results.append(summary)
    if unfinished:
        results[-1]["errors"]["unfinished"] = unfinished
        results[-1]["error_count"] += unfinished
    warm = state.windows[WARMUP]
    return {
        "mode": mode,
        "concurrency": spec.get("concurrency"),
        "rate": spec.get("rate"),
        "images_per_request": per_request,
        "warmup": {"ok": len(warm.latencies), "errors": dict(warm.errors)},
        "windows": results,
        "loadgen_cpu_total_s": time.process_time() - cpu_at_start,
        "wall_s": time.perf_counter() - started,
        "first_error": state.first_error,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m bench.loadgen SPEC.json\n")
        return 2
    spec = json.loads(Path(args[0]).read_text())
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(spec))
    else:
        result = uvloop.run(run(spec))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
