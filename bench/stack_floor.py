"""Where the C=1 floor is: the same off-loop job behind servers of decreasing weight.

``python -m bench.stack_floor --job-ms 4.2 --rounds 3 --requests 500 [--images DIR]``

T6 compares the service's C=1 p50 with the in-process single-image latency. Its bound in the
report is ``bench/floor_app.py``'s ``/predict-job``: a bare FastAPI app around a GIL-free job
of that length on a worker thread. This tool asks how much of that bound is the host and how
much the server stack: it sends one connection's worth of requests (raw JPEG bodies, one at a
time, keep-alive) to the same job behind

- ``socket-inline``: a blocking-socket HTTP/1.1 server, the job on the serving thread;
- ``socket-thread``: the same, the job handed to a worker thread (one hand-off, as the
  service hands a lone image to a forward thread);
- ``asgi``: a bare ASGI function under uvicorn with uvloop and httptools (the service's
  server), the job on a thread through ``run_in_executor``;
- ``fastapi``: the floor app's ``/predict-job`` (FastAPI ``APIRoute``, one query parameter);

in alternating rounds, and prints each server's median p50 and its excess over the job.
The client is a plain blocking socket, so its own cost is the same for every server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import CACHE, ROOT
from .floor_app import cpu_job
from .targets import free_port, stop

ANSWER = json.dumps({"label": "0", "class_id": 0, "confidence": 1.0}).encode()
SERVERS = ("socket-inline", "socket-thread", "asgi", "fastapi")
PATH = "/predict-job"  # the floor app's job route; the other servers answer any path


# -- the servers -----------------------------------------------------------------------------


def _job_ms(target: bytes) -> float:
    """``ms`` from ``/path?ms=X`` (0 without it)."""
    _, _, query = target.partition(b"?")
    for pair in query.split(b"&"):
        key, _, value = pair.partition(b"=")
        if key == b"ms":
            return float(value)
    return 0.0


def _read_request(conn: socket.socket, buffer: bytes) -> tuple[bytes, bytes] | None:
    """(request target, bytes after the body) of the next request; None once the client left."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(1 << 18)
        if not data:
            return None
        buffer += data
    head, _, buffer = buffer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < length:
        buffer += conn.recv(1 << 18)
    return lines[0].split(b" ")[1], buffer[length:]


def serve_socket(port: int, threaded: bool) -> None:
    """A blocking HTTP/1.1 keep-alive server, one connection at a time (run in a subprocess)."""
    jobs: queue.Queue[float] = queue.Queue()
    done: queue.Queue[None] = queue.Queue()

    def worker() -> None:
        while True:
            cpu_job(jobs.get())
            done.put(None)

    threading.Thread(target=worker, daemon=True).start()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    answer = head % len(ANSWER) + ANSWER
    with socket.create_server(("127.0.0.1", port)) as listener:
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rest = b""
                while (request := _read_request(conn, rest)) is not None:
                    target, rest = request
                    if threaded:
                        jobs.put(_job_ms(target) / 1000)
                        done.get()
                    else:
                        cpu_job(_job_ms(target) / 1000)
                    conn.sendall(answer)


async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A bare ASGI app: any POST reads its body, runs ``?ms=`` of job on a thread, answers.

    The job thread lives in the lifespan state (uvicorn copies it into each request's scope).
    """
    if scope["type"] == "lifespan":
        await receive()  # startup
        scope["state"]["pool"] = pool = ThreadPoolExecutor(1, thread_name_prefix="job")
        await send({"type": "lifespan.startup.complete"})
        await receive()  # shutdown
        pool.shutdown()
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    seconds = _job_ms(b"/?" + scope["query_string"]) / 1000
    if seconds:
        pool = scope["state"]["pool"]
        await asyncio.get_running_loop().run_in_executor(pool, cpu_job, seconds)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


# -- measuring -------------------------------------------------------------------------------


@contextmanager
def running(server: str) -> Iterator[int]:
    """Start ``server`` in a subprocess; yields its port once it accepts connections."""
    port = free_port()
    if server.startswith("socket-"):
        command = [sys.executable, "-m", "bench.stack_floor", "--serve-socket", str(port)]
        if server == "socket-thread":
            command.append("--threaded")
    else:
        app = "bench.stack_floor:bare_app" if server == "asgi" else "bench.floor_app:app"
        command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port",
                   str(port), "--loop", "uvloop", "--http", "httptools", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{server} did not start") from None
                time.sleep(0.1)
        yield port
    finally:
        stop(proc, timeout=10)


def one_connection_p50(port: int, bodies: list[bytes], requests: int, job_ms: float) -> float:
    """Seconds: the p50 of ``requests`` sequential POSTs on one keep-alive connection."""
    latencies = []
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(requests + requests // 10):  # the first tenth warms up
            body = bodies[index % len(bodies)]
            head = (f"POST {PATH}?ms={job_ms} HTTP/1.1\r\nhost: bench\r\ncontent-type: "
                    f"image/jpeg\r\ncontent-length: {len(body)}\r\n\r\n")  # fmt: skip
            start = time.perf_counter()
            conn.sendall(head.encode() + body)
            answer = b""
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    raise RuntimeError("the server closed the connection")
                answer += data
                answer_head, sep, rest = answer.partition(b"\r\n\r\n")
                if sep:
                    length = next(int(line.split(b":")[1]) for line in answer_head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length"))  # fmt: skip
                    if len(rest) >= length:
                        break
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"answer {answer[:40]!r}")
            if index >= requests // 10:
                latencies.append(time.perf_counter() - start)
    return statistics.median(latencies)


def measure(
    bodies: list[bytes], *, job_ms: float, rounds: int, requests: int,
    servers: tuple[str, ...] = SERVERS,
) -> dict[str, list[float]]:  # fmt: skip
    """p50 seconds per server and round; the order alternates between rounds."""
    p50s: dict[str, list[float]] = {server: [] for server in servers}
    for round_index in range(rounds):
        order = servers if round_index % 2 == 0 else tuple(reversed(servers))
        for server in order:
            with running(server) as port:
                p50s[server].append(one_connection_p50(port, bodies, requests, job_ms))
    return p50s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stack_floor", description=__doc__)
    parser.add_argument("--job-ms", type=float, default=4.2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--images", type=Path, help="a folder of images (default: generated)")
    parser.add_argument("--serve-socket", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threaded", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_socket:
        serve_socket(args.serve_socket, args.threaded)
        return 0
    from . import images

    bodies = [path.read_bytes() for path in images.ensure(args.images, CACHE).files]
    p50s = measure(bodies, job_ms=args.job_ms, rounds=args.rounds, requests=args.requests)
    print(f"one connection, {args.requests} requests a round, a {args.job_ms} ms job, "
          f"{args.rounds} alternating rounds (p50 ms per round; median; excess over the job)")  # fmt: skip
    for server, values in p50s.items():
        median = statistics.median(values) * 1000
        rounds_text = " / ".join(f"{v * 1000:.2f}" for v in values)
        print(f"  {server:14s} {rounds_text:28s} {median:6.2f} ms  +{median - args.job_ms:.2f} ms"
              f"  ({median / args.job_ms:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
