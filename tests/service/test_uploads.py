"""Tests of service.uploads: in-process through httpx's ASGITransport (which streams the
request body lazily, so how much of it was read can be counted), and against a real uvicorn
process on loopback for the 200 MB uploads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from service.uploads import UploadRejected, read_image_parts
from tests.service import hostile
from tests.service.hostile import Case, Part

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
MAX_BYTES = 25 * MIB  # the service's default MAX_UPLOAD_BYTES
MAX_IMAGES = 64
BIG = 200 * 1000 * 1000  # the 200 MB upload of issue 6


# ---------------------------------------------------------------------------------------------
# a minimal app: read the parts, optionally decode them as the service does
# ---------------------------------------------------------------------------------------------


async def upload(request: Request) -> Response:
    query = request.query_params
    parts = await read_image_parts(
        request,
        max_bytes=int(query.get("max_bytes", MAX_BYTES)),
        max_images=int(query.get("max_images", MAX_IMAGES)),
    )
    if query.get("decode"):
        from service.imaging import ImageRejected, decode_image  # torch: not in the server

        for index, data in enumerate(parts):
            try:
                await run_in_threadpool(decode_image, data, max_pixels=hostile.DEFAULT_MAX_PIXELS)
            except ImageRejected as exc:
                detail = f"image {index}: {exc.detail}"
                return JSONResponse({"detail": detail}, status_code=exc.status_code)
    return JSONResponse({"sizes": [len(data) for data in parts]})


async def ping(request: Request) -> Response:
    return PlainTextResponse("ok")


async def rejected(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, UploadRejected)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


def make_app() -> Starlette:
    routes = [Route("/upload", upload, methods=["POST"]), Route("/ping", ping)]
    return Starlette(routes=routes, exception_handlers={UploadRejected: rejected})


class CountingBody:
    """An async request body of ``total`` bytes in ``chunk``-sized pieces, counting reads."""

    def __init__(self, total: int, chunk: int = MIB) -> None:
        self.total = total
        self.chunk = chunk
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        block = b"\xab" * self.chunk
        while self.sent < self.total:
            piece = block[: min(self.chunk, self.total - self.sent)]
            self.sent += len(piece)
            yield piece


def post(body: bytes | CountingBody, content_type: str | None, query: str = "",
         headers: dict[str, str] | None = None) -> httpx.Response:  # fmt: skip
    """POST to the in-process app through ASGITransport."""
    sent_headers = dict(headers or {})
    if content_type is not None:
        sent_headers["content-type"] = content_type

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=make_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            content = body if isinstance(body, bytes) else body.__aiter__()
            return await client.post(f"/upload?{query}", content=content, headers=sent_headers)

    return asyncio.run(run())


def assert_detail(response: httpx.Response) -> str:
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail
    return detail


# ---------------------------------------------------------------------------------------------
# the hostile corpus, end to end (upload reading + decoding), in-process
# ---------------------------------------------------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Corpus parametrisation at collection time only: importing this module (as the uvicorn
    subprocess does for ``make_app``) stays light."""
    corpora = {
        "raw_case": hostile.raw_body_cases,
        "multipart_case": lambda: hostile.multipart_cases(MAX_IMAGES),
    }
    for name, build in corpora.items():
        if name in metafunc.fixturenames:
            cases = build()
            metafunc.parametrize(name, cases, ids=[case.name for case in cases])


def test_raw_body_corpus(raw_case: Case) -> None:
    response = post(raw_case.body, raw_case.content_type, "decode=1")
    assert response.status_code == raw_case.status, response.text
    if raw_case.status != 200:
        assert_detail(response)


def test_multipart_corpus(multipart_case: Case) -> None:
    response = post(multipart_case.body, multipart_case.content_type, "decode=1")
    assert response.status_code == multipart_case.status, response.text
    if multipart_case.status != 200:
        assert_detail(response)


def test_every_image_case_also_passes_as_a_multipart_part() -> None:
    parts = [Part("file", case.body, f"{case.name}.bin") for case in hostile.image_cases()]
    body, ctype = hostile.multipart_body(parts)
    response = post(body, ctype, "decode=1")
    assert response.status_code == 200, response.text
    assert response.json()["sizes"] == [len(case.body) for case in hostile.image_cases()]


# ---------------------------------------------------------------------------------------------
# multipart details
# ---------------------------------------------------------------------------------------------


def test_parts_come_back_in_order_and_other_fields_are_ignored() -> None:
    images = [b"first", b"second image", b"3"]
    parts = [Part("note", b"x" * 10, None, None), ("file", images[0]), Part("file2", b"zz"),
             ("file", images[1]), Part("meta", b"{}", None, "application/json"), ("file", images[2])]  # fmt: skip
    body, ctype = hostile.multipart_body(parts)
    response = post(body, ctype)
    assert response.status_code == 200
    assert response.json()["sizes"] == [len(image) for image in images]


def test_parts_survive_any_chunking() -> None:
    images = [bytes(range(256)) * 40, b"\r\n--not-the-boundary\r\n" * 50, b"-" * 999]
    body, ctype = hostile.multipart_body([("file", image) for image in images])
    for chunk in (1, 7, 64, 4096):
        pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)]

        async def chunks(pieces: list[bytes] = pieces) -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        async def run() -> list[bytes]:
            scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                     "headers": [(b"content-type", ctype.encode())]}  # fmt: skip
            stream = chunks()

            async def receive() -> dict:
                try:
                    return {"type": "http.request", "body": await anext(stream), "more_body": True}
                except StopAsyncIteration:
                    return {"type": "http.request", "body": b"", "more_body": False}

            request = Request(scope, receive)
            return await read_image_parts(request, max_bytes=MAX_BYTES, max_images=MAX_IMAGES)

        assert asyncio.run(run()) == images


def test_zero_length_part_is_named_by_its_index() -> None:
    body, ctype = hostile.multipart_body([("file", b"a"), Part("x", b""), ("file", b"")])
    response = post(body, ctype)
    assert response.status_code == 422
    assert "image 1" in assert_detail(response)


def test_no_file_part_says_so() -> None:
    body, ctype = hostile.multipart_body([Part("image", b"abc")])
    response = post(body, ctype)
    assert response.status_code == 422
    assert "no image part named 'file'" in assert_detail(response)


def test_too_many_images_stops_parsing_early() -> None:
    one, _ = hostile.multipart_body([("file", b"x" * 1000)])
    body, ctype = hostile.multipart_body([("file", b"x" * 1000)] * 5000)
    counted = CountingBody(0)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 4096):
            counted.sent += 4096
            yield body[start : start + 4096]

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=make_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/upload?max_images=3", content=chunks(),
                                     headers={"content-type": ctype})  # fmt: skip

    response = asyncio.run(run())
    assert response.status_code == 413
    assert "more than 3 images" in assert_detail(response)
    assert counted.sent < 4 * len(one) + 8192  # stopped at the 4th part, not after 5000


def test_malformed_multipart_is_400() -> None:
    body, _ = hostile.multipart_body([("file", b"abc")])
    garbled = body.replace(b"Content-Disposition", b"Content-Disposition\x00\x01", 1)
    response = post(garbled, f"multipart/form-data; boundary={hostile.BOUNDARY}")
    assert response.status_code == 400
    assert "multipart" in assert_detail(response)


# ---------------------------------------------------------------------------------------------
# Content-Type and empty bodies
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/json", "multipart/mixed",
                                   "application/x-www-form-urlencoded", "video/mp4"])  # fmt: skip
def test_unsupported_content_type_says_what_is_accepted(ctype: str | None) -> None:
    response = post(b"\xff\xd8\xff", ctype)
    assert response.status_code == 415
    detail = assert_detail(response)
    assert "multipart/form-data" in detail
    assert "image/*" in detail
    assert "application/octet-stream" in detail


@pytest.mark.parametrize("ctype", ["image/jpeg", "IMAGE/PNG", "image/anything; q=1",
                                   "application/octet-stream"])  # fmt: skip
def test_raw_body_content_types(ctype: str) -> None:
    response = post(b"raw bytes", ctype)
    assert response.status_code == 200
    assert response.json()["sizes"] == [9]


@pytest.mark.parametrize("ctype", ["image/png", "application/octet-stream",
                                   f"multipart/form-data; boundary={hostile.BOUNDARY}"])  # fmt: skip
def test_empty_body_is_422(ctype: str) -> None:
    response = post(b"", ctype)
    assert response.status_code == 422
    assert "empty" in assert_detail(response)


# ---------------------------------------------------------------------------------------------
# the byte cap, in-process: how much of the body was pulled is counted
# ---------------------------------------------------------------------------------------------


def test_streamed_body_over_the_cap_stops_reading_at_the_cap() -> None:
    body = CountingBody(BIG)
    response = post(body, "application/octet-stream")
    assert response.status_code == 413
    assert "limit" in assert_detail(response)
    assert body.sent <= MAX_BYTES + MIB  # at most one chunk past the cap


def test_streamed_multipart_over_the_cap_stops_reading_at_the_cap() -> None:
    head = (f"--{hostile.BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            'filename="big.jpg"\r\n\r\n').encode()  # fmt: skip
    filler = CountingBody(BIG)

    async def chunks() -> AsyncIterator[bytes]:
        yield head
        async for piece in filler:
            yield piece

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=make_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            ctype = f"multipart/form-data; boundary={hostile.BOUNDARY}"
            return await client.post("/upload", content=chunks(), headers={"content-type": ctype})

    response = asyncio.run(run())
    assert response.status_code == 413
    assert filler.sent <= MAX_BYTES + MIB


def test_declared_length_over_the_cap_is_refused_without_reading() -> None:
    body = CountingBody(BIG)
    response = post(body, "image/jpeg", headers={"content-length": str(BIG)})
    assert response.status_code == 413
    assert str(BIG) in assert_detail(response)
    assert body.sent == 0


def test_body_exactly_at_the_cap_is_accepted() -> None:
    response = post(CountingBody(1000, chunk=100), "image/png", "max_bytes=1000")
    assert response.status_code == 200
    assert post(CountingBody(1001, chunk=100), "image/png", "max_bytes=1000").status_code == 413


# ---------------------------------------------------------------------------------------------
# a real uvicorn process on loopback: 200 MB sent to it, its memory watched
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}: {proc.stderr.read()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("uvicorn did not become ready")


@pytest.fixture(scope="module", params=["h11", "httptools"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[int, int]]:
    """(port, pid) of uvicorn serving ``make_app`` with the given HTTP implementation."""
    if request.param == "httptools":
        pytest.importorskip("httptools")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "tests.service.test_uploads:make_app",
         "--host", "127.0.0.1", "--port", str(port), "--http", request.param,
         "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        _wait_ready(proc, port)
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        if proc.stderr is not None:
            proc.stderr.close()


class PeakRss:
    """Growth of a process's peak RSS over a block (Linux: clear_refs resets VmHWM)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth_mib = 0.0

    def _read(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(key))

    def __enter__(self) -> PeakRss:
        with open(f"/proc/{self.pid}/clear_refs", "w") as handle:
            handle.write("5")
        self.start_kib = self._read("VmRSS:")
        return self

    def __exit__(self, *exc: object) -> None:
        self.growth_mib = (self._read("VmHWM:") - self.start_kib) / 1024


def _response(sock: socket.socket, received: bytes) -> tuple[int, dict]:
    """Finish reading one HTTP response with a Content-Length; (status, JSON body)."""
    sock.setblocking(True)
    sock.settimeout(30)
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body[:length])


def _chunked_upload(
    port: int, total: int, *, stop_at_answer: bool
) -> tuple[int, dict, int | None, int]:
    """Send ``total`` bytes with chunked encoding while watching for an answer.

    Returns (status, body, bytes sent when the answer arrived (None: after all), bytes sent).
    """
    head = (f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    frame = f"{MIB:x}\r\n".encode() + b"\xab" * MIB + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        sock.setblocking(False)
        sent = offset = 0
        received = b""
        answered_at = None
        deadline = time.monotonic() + 120
        while sent < total and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 5)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
                if answered_at is None:
                    answered_at = sent
                if stop_at_answer:
                    break
            if writable:
                offset += sock.send(frame[offset:])
                if offset == len(frame):
                    sent += MIB
                    offset = 0
                    if sent >= total:
                        sock.setblocking(True)
                        sock.sendall(b"0\r\n\r\n")
                        sock.setblocking(False)
        status, body = _response(sock, received)
        return status, body, answered_at, sent


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads the server's peak RSS in /proc")
def test_200mb_body_gets_413_while_still_sending(server: tuple[int, int]) -> None:
    """A client that reads while it sends sees the 413 after about the cap, not 200 MB."""
    port, pid = server
    with PeakRss(pid) as rss:
        status, body, answered_at, _ = _chunked_upload(port, BIG, stop_at_answer=True)
    assert answered_at is not None
    print(f"413 after {answered_at / MIB:.0f} MiB sent; server peak RSS +{rss.growth_mib:.0f} MiB")
    assert status == 413
    assert "limit" in body["detail"]
    assert answered_at < MAX_BYTES + 16 * MIB  # the cap plus what socket buffers hold
    assert rss.growth_mib < 64  # the cap's worth at most, not the body's 190 MiB


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads the server's peak RSS in /proc")
def test_200mb_body_sent_to_the_end_still_gets_413(server: tuple[int, int]) -> None:
    """A client that sends everything before reading (as httpx does) gets its 413 too: the
    server reads and discards the rest, memory flat, and the connection stays usable."""
    port, pid = server
    with PeakRss(pid) as rss:
        status, body, answered_at, sent = _chunked_upload(port, BIG, stop_at_answer=False)
    print(f"sent {sent / MIB:.0f} MiB (413 arrived after {(answered_at or sent) / MIB:.0f} MiB); "
          f"server peak RSS +{rss.growth_mib:.0f} MiB")  # fmt: skip
    assert status == 413
    assert sent == BIG // MIB * MIB + MIB * (BIG % MIB > 0)
    assert rss.growth_mib < 64
    with PeakRss(pid) as rss:
        response = httpx.post(f"http://127.0.0.1:{port}/upload",
                              content=iter([b"\xab" * MIB] * (BIG // MIB)),
                              headers={"content-type": "image/jpeg"}, timeout=120)  # fmt: skip
    assert response.status_code == 413
    assert rss.growth_mib < 64
    assert httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200


@pytest.mark.slow
def test_200mb_declared_length_is_answered_before_any_body(server: tuple[int, int]) -> None:
    port, _ = server
    head = (f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: image/jpeg\r\nContent-Length: {BIG}\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        status, body = _response(sock, b"")  # nothing of the body sent
    assert status == 413
    assert str(BIG) in body["detail"]
