"""Slow clients cannot tie up the inference workers or starve other clients, and what ends
them is a timer, not the client's good will.

What ends a slow client (``bounded_server``: ``REQUEST_TIMEOUT_S`` = 4 s):
- a body sent a byte at a time (raw or multipart): the body is read on the event loop (no
  thread, no queue slot); ``REQUEST_TIMEOUT_S`` after the request arrived it gets a JSON 504
  and the connection is closed (``service.main.CloseSlowBodyOnTimeout``);
- a request head sent a byte at a time (slowloris): a JSON 408 ``REQUEST_TIMEOUT_S`` after
  its first byte, connection closed (``service.__main__.bounded_httptools_protocol``);
- a connection that sends nothing: closed after ``REQUEST_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.service import hostile
from tests.service.conftest import ServiceProcess, digit_png

from .conftest import forward_state, set_forward
from .helpers import median, process_stats, timed_post

pytestmark = pytest.mark.slow

TIMEOUT_S = 4.0  # bounded_server's REQUEST_TIMEOUT_S
TRICKLE_EVERY_S = 0.1
COUNTS = {"body": 24, "multipart": 8, "head": 8, "idle": 8}


@dataclass
class SlowClient:
    kind: str
    sock: socket.socket
    head: bytes  # sent at once (body clients) or trickled (head clients)
    trickle: bytes
    started: float = 0.0
    sent: int = 0
    answer: bytes = b""
    answered_at: float | None = None
    closed_at: float | None = None
    extra: dict = field(default_factory=dict)


def make_client(kind: str, port: int) -> SlowClient:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    png = digit_png(3, 8)
    if kind == "body":
        head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: %d\r\n\r\n" % (len(png) * 20))  # fmt: skip
        return SlowClient(kind, sock, head, png * 20)
    if kind == "multipart":
        body, ctype = hostile.multipart_body([("file", png)] * 5)
        head = (f"POST /topk HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        return SlowClient(kind, sock, head, body)
    if kind == "head":
        trickle = b"POST /predict HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: yes\r\n" * 1000
        return SlowClient(kind, sock, b"", trickle)
    return SlowClient(kind, sock, b"", b"")  # idle: connects, sends nothing


def run_slow_clients(clients: list[SlowClient], until: float) -> None:
    """One thread drives every slow client: a byte each TRICKLE_EVERY_S, reading answers."""
    selector = selectors.DefaultSelector()
    now = time.monotonic()
    for client in clients:
        client.started = now
        if client.head:
            client.sock.setblocking(True)
            client.sock.sendall(client.head)
            client.sock.setblocking(False)
        selector.register(client.sock, selectors.EVENT_READ, client)
    next_byte = now
    while time.monotonic() < until and any(c.closed_at is None for c in clients):
        for key, _ in selector.select(timeout=0.02):
            client = key.data
            try:
                data = client.sock.recv(65536)
            except OSError:
                data = b""
            if data:
                client.answer += data
                client.answered_at = client.answered_at or time.monotonic()
            else:
                client.closed_at = time.monotonic()
                selector.unregister(client.sock)
        if time.monotonic() >= next_byte:
            next_byte += TRICKLE_EVERY_S
            for client in clients:
                if client.closed_at is None and client.sent < len(client.trickle):
                    with contextlib.suppress(OSError):  # a reset shows on the next read
                        client.sent += client.sock.send(
                            client.trickle[client.sent : client.sent + 1]
                        )
    selector.close()
    for client in clients:
        client.sock.close()


def status_and_detail(answer: bytes) -> tuple[int | None, str | None]:
    if not answer.startswith(b"HTTP/1.1 "):
        return None, None
    head, _, body = answer.partition(b"\r\n\r\n")
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError):
        detail = None
    return int(head.split(b" ", 2)[1]), detail


def test_slow_clients_are_timed_out_and_starve_nobody(bounded_server: ServiceProcess):
    set_forward(bounded_server, delay_s=0.0)
    url, pid = bounded_server.url, bounded_server.proc.pid
    port = int(url.rsplit(":", 1)[1])
    png = digit_png(5, 8)

    async def normal(seconds: float) -> list:
        outcomes = []
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            outcomes.append(await timed_post(url, "/predict", png, "image/png"))
            await asyncio.sleep(0.02)
        return outcomes

    idle = asyncio.run(normal(1.5))
    before = process_stats(pid)
    clients = [make_client(kind, port) for kind, n in COUNTS.items() for _ in range(n)]
    driver = threading.Thread(target=run_slow_clients,
                              args=(clients, time.monotonic() + TIMEOUT_S + 6))  # fmt: skip
    driver.start()
    samples = []

    async def during() -> list:
        async def sample() -> None:
            while driver.is_alive():
                samples.append((process_stats(pid), forward_state(bounded_server)["pending"]))
                await asyncio.sleep(0.5)

        sampler = asyncio.ensure_future(asyncio.to_thread(lambda: asyncio.run(sample())))
        results = await asyncio.gather(normal(TIMEOUT_S - 0.5), normal(TIMEOUT_S - 0.5))
        await sampler
        return [o for group in results for o in group]

    loaded = asyncio.run(during())
    driver.join()
    time.sleep(0.5)
    after = process_stats(pid)

    idle_p50 = median([o.latency for o in idle])
    loaded_p50 = median([o.latency for o in loaded])
    ends: dict[str, list[float]] = {kind: [] for kind in COUNTS}
    problems = []
    for client in clients:
        status, detail = status_and_detail(client.answer)
        end = (client.answered_at or client.closed_at or float("inf")) - client.started
        ends[client.kind].append(end)
        want = {"body": 504, "multipart": 504, "head": 408, "idle": None}[client.kind]
        if status != want or client.closed_at is None:
            problems.append((client.kind, status, client.answer[:80], client.closed_at))
        elif want is not None and "REQUEST_TIMEOUT_S" not in (detail or "") and want == 504:
            problems.append((client.kind, "detail", detail))
    print(
        f"\nFIGURE slow clients: {len(clients)} slow ({COUNTS}); ended after "
        + ", ".join(f"{k} {min(v):.2f}-{max(v):.2f} s" for k, v in ends.items())
        + f"; normal requests {len(loaded)} all 200: {all(o.status == 200 for o in loaded)}, "
        f"p50 {idle_p50 * 1000:.0f} ms idle -> {loaded_p50 * 1000:.0f} ms with slow clients, "
        f"max {max(o.latency for o in loaded) * 1000:.0f} ms; server threads "
        f"{before['threads']} -> max {max(s[0]['threads'] for s in samples)}; fds "
        f"{before['fds']} -> max {max(s[0]['fds'] for s in samples)} -> {after['fds']}; "
        f"queued images max {max(s[1] for s in samples)}"
    )
    assert problems == []
    for kind, times in ends.items():
        assert all(TIMEOUT_S - 0.1 <= t <= TIMEOUT_S + 2.0 for t in times), (kind, times)
    failed = [(o.status, round(o.latency, 3), o.detail, o.error) for o in loaded if o.status != 200]
    assert failed == []
    assert loaded_p50 <= 2 * idle_p50 + 0.02
    assert max(o.latency for o in loaded) < 1.0
    assert max(s[0]["threads"] for s in samples) <= before["threads"] + 2  # no thread per client
    assert max(s[1] for s in samples) <= 2  # only the normal clients' images ever queue
    assert after["fds"] <= before["fds"] + 2  # every slow connection was closed
