"""Hostile and broken input through the real server: the generated corpus of
``tests/service/hostile.py`` on every image route, raw and multipart, HTTP-level junk, huge
heads and 200 MB bodies, with the server's memory watched from outside (psutil + VmHWM).

Figures are printed (run with ``-s`` or ``-rP`` to see them).
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections import Counter

import httpx
import pytest

from tests.service import hostile
from tests.service.conftest import ServiceProcess
from tests.service.hostile import Case, Part

from .helpers import MIB, RssSampler, server_errors

pytestmark = pytest.mark.slow

MAX_UPLOAD = 25 * MIB  # the default MAX_UPLOAD_BYTES
BIG = 200 * 1000 * 1000
BOMB_GROWTH_MIB = 48  # the smallest bomb (8000 x 8000, 1 byte per pixel) would take 61 MiB
CORPUS_GROWTH_MIB = 160  # everything, incl. a 2400 x 1800 photo decoded: ~13 MiB of pixels


def post_case(client: httpx.Client, path: str, case: Case) -> httpx.Response:
    headers = {} if case.content_type is None else {"content-type": case.content_type}
    return client.post(path, content=case.body, headers=headers)


def check(response: httpx.Response, case: Case, path: str) -> str | None:
    """None if the answer is the contract's, else what is wrong."""
    where = f"{path} {case.name}"
    if response.status_code != case.status:
        return f"{where}: {response.status_code} (want {case.status}) {response.text[:200]}"
    if case.status == 200:
        return None
    if not response.headers.get("content-type", "").startswith("application/json"):
        return f"{where}: error answer is {response.headers.get('content-type')}"
    detail = response.json().get("detail")
    if not isinstance(detail, str) or not detail:
        return f"{where}: detail {detail!r} is not a string"
    return None


def extra_multipart_cases() -> list[Case]:
    """Multipart and Content-Type cases beyond ``hostile.multipart_cases``."""
    jpeg = hostile.encode(hostile.photo_image((96, 64)), "JPEG")
    body, ctype = hostile.multipart_body([("file", jpeg)])
    boundary = hostile.BOUNDARY
    huge_part_header = body.replace(
        b"Content-Disposition", b"X-Pad: " + b"a" * 100_000 + b"\r\nContent-Disposition", 1
    )
    cases = [
        Case("mp_quoted_boundary", body, f'multipart/form-data; boundary="{boundary}"', 200),
        Case("mp_empty_boundary", body, "multipart/form-data; boundary=", 400),
        Case("mp_truncated_mid_part", body[: len(body) // 2], ctype, 400),
        Case("mp_lf_only_line_ends", body.replace(b"\r\n", b"\n"), ctype, 400),
        Case("mp_part_header_100k", huge_part_header, ctype, 400),
        Case("mp_body_sent_as_image_jpeg", body, "image/jpeg", 415),
        Case("jpeg_as_text_html", jpeg, "text/html", 415),
        Case("jpeg_with_garbage_content_type", jpeg, ";;;==", 415),
    ]
    for name, parts, status in [
        ("mp_part_declared_text_plain", [Part("file", jpeg, "a.txt", "text/plain")], 200),
        ("mp_filename_traversal", [Part("file", jpeg, "../../etc/passwd", "image/jpeg")], 200),
        ("mp_utf8_filename", [Part("file", jpeg, "кот.jpg", "image/jpeg")], 200),
        ("mp_2000_fields_then_file", [Part("n", b"x", None, None)] * 2000 + [("file", jpeg)], 200),
        ("mp_64_files_at_the_limit", [("file", jpeg)] * 64, 200),
        ("mp_65_files_over_the_limit", [("file", jpeg)] * 65, 413),
        ("mp_100_bombs", [("file", hostile.bomb_png(30_000, 30_000))] * 100, 413),
        ("mp_bomb_first", [("file", hostile.bomb_png(30_000, 30_000)), ("file", jpeg)], 413),
    ]:
        multipart, multipart_type = hostile.multipart_body(parts)
        cases.append(Case(name, multipart, multipart_type, status))
    return cases


def test_hostile_corpus_gets_the_contract_status_and_bounded_memory(server: ServiceProcess):
    raw = list(hostile.raw_body_cases())
    multipart = [*hostile.multipart_cases(64), *extra_multipart_cases()]
    assert any(c.name == "mp_100_file_parts" and c.status == 413 for c in multipart)
    bombs = [c for c in raw if c.name.startswith("bomb_")]
    assert len(bombs) == 9
    problems: list[str] = []
    statuses: Counter[int] = Counter()
    tried = 0
    with server.client(timeout=60) as client:
        with RssSampler(server.proc.pid) as bomb_rss:
            for case in bombs:
                for path in ("/predict", "/topk", "/explain"):
                    response = post_case(client, path, case)
                    problems.append(check(response, case, path))
        with RssSampler(server.proc.pid) as corpus_rss:
            for path in ("/predict", "/topk", "/explain"):
                for case in raw:
                    response = post_case(client, path, case)
                    statuses[response.status_code] += 1
                    tried += 1
                    problems.append(check(response, case, path))
            for path in ("/predict", "/topk"):
                for case in multipart:
                    response = post_case(client, path, case)
                    statuses[response.status_code] += 1
                    tried += 1
                    problems.append(check(response, case, path))
        ready = client.get("/readyz")
        detail = client.post("/predict", content=multipart[0].body,
                             headers={"content-type": multipart[0].content_type})  # fmt: skip
    problems = [p for p in problems if p]
    print(f"\nFIGURE hostile: {len(raw)} raw + {len(multipart)} multipart cases, {tried} requests; "
          f"statuses {dict(sorted(statuses.items()))}; server RSS {bomb_rss.baseline / MIB:.0f} MiB, "
          f"peak +{bomb_rss.growth_mib:.1f} MiB during the bombs, "
          f"+{corpus_rss.growth_mib:.1f} MiB during the whole corpus")  # fmt: skip
    assert problems == []
    assert not [s for s in statuses if s >= 500]
    assert set(statuses) <= {200, 400, 413, 415, 422}
    assert bomb_rss.growth_mib < BOMB_GROWTH_MIB
    assert corpus_rss.growth_mib < CORPUS_GROWTH_MIB
    assert ready.status_code == 200
    assert detail.status_code == 200


def test_too_many_file_parts_names_the_limit(server: ServiceProcess):
    tiny = hostile.encode(hostile.photo_image((8, 8)), "PNG")
    body, ctype = hostile.multipart_body([("file", tiny)] * 100)
    with server.client() as client:
        for path in ("/predict", "/topk", "/explain"):
            response = client.post(path, content=body, headers={"content-type": ctype})
            assert response.status_code == 413, (path, response.text)
            assert "more than 64 images" in response.json()["detail"]


# -- below the application: HTTP framing ------------------------------------------------------


def raw_exchange(port: int, data: bytes, *, shutdown: bool = False, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection and read the answer (until close or one response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
            head, sep, body = received.partition(b"\r\n\r\n")
            length = [
                line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
            ]
            if sep and length and len(body) >= int(length[0].split(b":")[1]):
                break
        return received


def status_of(answer: bytes) -> int | None:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None


FRAMING = {
    "garbage_request_line": (b"HELLO WORLD\r\n\r\n", 400),
    "binary_junk": (bytes(range(256)) * 4, 400),
    "content_length_not_a_number": (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                    b"Content-Length: abc\r\n\r\n", 400),
    "negative_content_length": (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                b"Content-Length: -5\r\n\r\n", 400),
    "content_length_and_chunked": (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                   b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "bad_chunk_size": (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    "non_ascii_path": ("GET /models/кот HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400),
    "header_of_256_kib": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 256 * 1024 + b"\r\n\r\n", 431),
    "url_of_256_kib": (b"GET /healthz?" + b"a" * 256 * 1024 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
    "3000_small_headers": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                           + b"".join(b"X-%d: a\r\n" % i for i in range(3000)) + b"\r\n", 200),
    "encoded_traversal": (b"GET /static/..%2f..%2f..%2fetc%2fpasswd HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "nul_in_path": (b"GET /models/a%00b HTTP/1.1\r\nHost: x\r\n\r\n", 404),
}  # fmt: skip


def test_http_framing_junk_is_refused_without_5xx(server: ServiceProcess):
    port = int(server.url.rsplit(":", 1)[1])
    seen = {}
    for name, (data, _) in FRAMING.items():
        seen[name] = status_of(raw_exchange(port, data))
    # a body cut short (the client closes): nothing to answer, and no 5xx counted
    raw_exchange(port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                       b"Content-Length: 1000\r\n\r\n\x89PNG", shutdown=True)  # fmt: skip
    print(
        f"\nFIGURE framing: {len(FRAMING)} cases, statuses {sorted(Counter(seen.values()).items())}"
    )
    assert seen == {name: status for name, (_, status) in FRAMING.items()}
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
    assert server_errors(metrics) == 0


def test_a_huge_request_head_is_cut_off_early(server: ServiceProcess):
    """httptools alone would buffer a 200 MiB header (and copy it over and over); the service
    caps the head at 64 KiB with a 431 and keeps memory flat."""
    port = int(server.url.rsplit(":", 1)[1])
    sent = 0
    start = time.monotonic()
    with RssSampler(server.proc.pid) as rss, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: ")
        chunk = b"a" * MIB
        sock.settimeout(10)
        try:
            while sent < 200 * MIB:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the server closed the connection: refused
            pass
        elapsed = time.monotonic() - start
    with server.client() as client:
        assert client.get("/healthz").status_code == 200
    print(f"\nFIGURE huge head: cut off after {sent / MIB:.0f} MiB sent, {elapsed:.2f} s, "
          f"server RSS +{rss.growth_mib:.1f} MiB")  # fmt: skip
    assert sent < 200 * MIB
    assert rss.growth_mib < 16


# -- 200 MB bodies against the full application ----------------------------------------------


def chunked_upload(
    port: int, path: str, head_extra: bytes, prefix: bytes, total: int
) -> tuple[int, dict, int]:
    """Stream ``prefix`` + ``total`` filler bytes chunked, reading while sending.

    Returns (status, JSON body, bytes sent when the answer arrived).
    """
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n".encode()
            + head_extra + b"\r\n")  # fmt: skip
    frame = f"{MIB:x}\r\n".encode() + b"\xab" * MIB + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head + f"{len(prefix):x}\r\n".encode() + prefix + b"\r\n")
        sock.setblocking(False)
        sent = offset = 0
        received = b""
        deadline = time.monotonic() + 120
        while sent < total and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 5)
            if readable:
                data = sock.recv(65536)
                received += data
                break
            if writable:
                offset += sock.send(frame[offset:])
                if offset == len(frame):
                    sent, offset = sent + MIB, 0
        sock.setblocking(True)
        sock.settimeout(30)
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head_bytes, _, body = received.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head_bytes.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))  # fmt: skip
        while len(body) < length:
            body += sock.recv(65536)
    return status_of(received) or 0, json.loads(body[:length]), sent


@pytest.mark.parametrize("path", ["/predict", "/explain"])
@pytest.mark.parametrize("kind", ["raw", "multipart"])
def test_200mb_body_gets_413_after_about_the_limit(server: ServiceProcess, kind: str, path: str):
    port = int(server.url.rsplit(":", 1)[1])
    if kind == "raw":
        head, prefix = b"Content-Type: application/octet-stream\r\n", b"\xff\xd8\xff"
    else:
        head = f"Content-Type: multipart/form-data; boundary={hostile.BOUNDARY}\r\n".encode()
        prefix = (f"--{hostile.BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
                  'filename="big.jpg"\r\n\r\n').encode()  # fmt: skip
    with RssSampler(server.proc.pid) as rss:
        status, body, answered_at = chunked_upload(port, path, head, prefix, BIG)
    print(f"\nFIGURE 200 MB {kind} {path}: {status} after {answered_at / MIB:.0f} MiB sent; "
          f"server RSS +{rss.growth_mib:.1f} MiB (limit {MAX_UPLOAD / MIB:.0f} MiB)")  # fmt: skip
    assert status == 413
    assert "limit" in body["detail"]
    assert answered_at < MAX_UPLOAD + 16 * MIB  # the cap plus what socket buffers hold
    assert rss.growth_mib < 1.5 * MAX_UPLOAD / MIB
    with server.client() as client:
        assert client.get("/readyz").status_code == 200


def test_200mb_body_sent_in_full_by_a_client_that_reads_late(server: ServiceProcess):
    """httpx sends the whole body before reading: it still gets the 413, memory stays flat."""
    with RssSampler(server.proc.pid) as rss, server.client(timeout=120) as client:
        response = client.post("/predict", content=iter([b"\xab" * MIB] * (BIG // MIB)),
                               headers={"content-type": "image/jpeg"})  # fmt: skip
    print(
        f"\nFIGURE 200 MB sent in full: {response.status_code}, server RSS +{rss.growth_mib:.1f} MiB"
    )
    assert response.status_code == 413
    assert rss.growth_mib < 1.5 * MAX_UPLOAD / MIB
