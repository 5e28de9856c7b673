"""Access: the admin key guards management (and never reaches the logs), registration takes
only a file name inside the model store, CORS is off unless configured.

Already proven in ``tests/service/test_api.py`` (not repeated here): 401 without a key (with
``WWW-Authenticate: Bearer``), 403 with a wrong key, 401 for a non-Bearer scheme on all three
management routes; 403 for all three when no ``ADMIN_API_KEY`` is configured; 422 for 11
traversal/absolute/URL/odd file names. This file adds what those leave open.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import httpx
import pytest

from tests.service.conftest import ServiceProcess

from .conftest import ADMIN_KEY

pytestmark = pytest.mark.slow

WRONG_KEY = "rel-wrong-key-1d2c3b4a5f6e7d"
MANAGEMENT = [
    ("POST", "/models", {"file": "digits-v1.mar"}),
    ("DELETE", "/models/digits/1", None),
    ("PUT", "/models/digits/default", {"version": "1"}),
]
NEAR_MISSES = {  # Authorization header -> expected status
    f"Bearer {WRONG_KEY}": 403,
    f"Bearer {ADMIN_KEY[:-1]}": 403,  # a prefix of the key
    f"Bearer {ADMIN_KEY}x": 403,  # the key plus one character
    f"Bearer {ADMIN_KEY.upper()}": 403,
    f"Bearer {ADMIN_KEY[:8]}": 403,
    "Bearer": 401,
    f"bearer-{ADMIN_KEY}": 401,
    f"Token {ADMIN_KEY}": 401,
    f"Basic {ADMIN_KEY}": 401,
    "Bearer " + "k" * 60_000: 403,  # long, still under the 64 KiB head cap
}


def test_management_refuses_every_near_miss_of_the_key(server: ServiceProcess):
    counts = {401: 0, 403: 0}
    with server.client() as client:
        for method, path, body in MANAGEMENT:
            kw = {"json": body} if body is not None else {}
            for header, status in NEAR_MISSES.items():
                response = client.request(method, path, headers={"authorization": header}, **kw)
                assert response.status_code == status, (method, path, header[:40], response.text)
                assert isinstance(response.json()["detail"], str)
                counts[status] += 1
            # a key in the query string is not a key
            response = client.request(method, f"{path}?key={ADMIN_KEY}", **kw)
            assert response.status_code == 401
            counts[401] += 1
        assert client.get("/models/digits").json()["versions"][0]["status"] == "ready"
    print(f"\nFIGURE auth: {sum(counts.values())} refused management calls {counts}, 0 accepted")


def test_the_admin_key_never_reaches_the_logs(server: ServiceProcess):
    """Debug logging and the access log are on for this server; its stdout+stderr are read."""
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    answers: list[httpx.Response] = []
    with server.client() as client:
        answers.append(client.put("/models/digits/default", json={"version": "1"}, headers=admin))
        answers.append(client.post("/models", json={"file": "digits-v1.mar"}, headers=admin))
        answers.append(client.post("/models", json={"file": "../x.mar"}, headers=admin))
        answers.append(client.post("/models", json={"file": "absent-v9.mar"}, headers=admin))
        answers.append(client.post("/models", content=b"{not json", headers=admin))
        answers.append(client.delete("/models/digits/99", headers=admin))
        answers.append(client.put("/models/digits/default", json={"version": "7"}, headers=admin))
        for header in NEAR_MISSES:
            answers.append(client.put("/models/digits/default", json={"version": "1"},
                                      headers={"authorization": header}))  # fmt: skip
        # a client that puts the key in the URL: refused, and the access log redacts it
        answers.append(client.post(f"/models?key={ADMIN_KEY}", json={"file": "digits-v1.mar"}))
        answers.append(client.post(f"/predict?model=digits&api_key={ADMIN_KEY}", content=b"x",
                                   headers={"content-type": "image/png"}))  # fmt: skip
        answers.append(client.get("/readyz"))
    assert [r.status_code for r in answers[:7]] == [200, 409, 422, 404, 422, 404, 404]
    assert [r.status_code for r in answers[-3:]] == [401, 415, 200]
    log = server.log()
    assert '"PUT /models/digits/default HTTP/1.1" 200' in log  # the access log is on
    assert " DEBUG " in log  # and so is debug logging
    assert "/predict?model=digits&api_key=[redacted]" in log
    for secret in (ADMIN_KEY, WRONG_KEY, ADMIN_KEY[:-1], ADMIN_KEY.upper()):
        assert secret not in log
        assert all(secret not in r.text for r in answers)
    print(f"\nFIGURE key in logs: 0 occurrences in {len(log.splitlines())} log lines "
          f"after {len(answers)} calls")  # fmt: skip


@pytest.mark.parametrize(
    "file",
    ["..%2f..%2fetc%2fpasswd", "%2e%2e/x.mar", "digits-v1.mar/../../x.mar", "~/.ssh/id_rsa",
     "C:\\x.mar", "\\\\host\\share\\x.mar", "file:///etc/passwd", "ftp://example.com/x.mar",
     "model_store/digits-v1.mar", "./digits-v1.mar", " digits-v1.mar", "digits-v1.mar\n",
     "x" * 300 + ".mar", "digits-v1.MAR"],
)  # fmt: skip
def test_register_refuses_more_path_tricks(server: ServiceProcess, file: str):
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    with server.client() as client:
        response = client.post("/models", json={"file": file}, headers=admin)
    assert response.status_code == 422, response.text


def test_register_refuses_a_symlink_leading_out_of_the_store(server: ServiceProcess, tmp_path):
    outside = tmp_path / "outside-v1.mar"
    outside.write_bytes((server.store / "digits-v1.mar").read_bytes())
    link = server.store / "link-v1.mar"
    link.symlink_to(outside)
    try:
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        with server.client() as client:
            response = client.post("/models", json={"file": "link-v1.mar"}, headers=admin)
            assert response.status_code == 422, response.text
            assert "inside MODEL_STORE" in response.json()["detail"]
            assert [m["file"] for m in client.get("/models").json()["models"]] == ["digits-v1.mar"]
    finally:
        link.unlink()


def test_register_never_fetches_a_url(server: ServiceProcess):
    """A URL naming a local listener: 422, and the listener sees no connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(1.5)
    port = listener.getsockname()[1]
    connections = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            connections.append(listener.accept())

    thread = threading.Thread(target=accept)
    thread.start()
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    with server.client() as client:
        for url in (f"http://127.0.0.1:{port}/x-v1.mar", f"127.0.0.1:{port}/x-v1.mar"):
            response = client.post("/models", json={"file": url}, headers=admin)
            assert response.status_code == 422, response.text
    thread.join()
    listener.close()
    assert connections == []


# -- management without a configured key, and CORS ----------------------------------------------


def test_management_is_refused_without_a_configured_key_even_with_a_bearer(
    bounded_server: ServiceProcess,
):
    with bounded_server.client() as client:
        for method, path, body in MANAGEMENT:
            kw = {"json": body} if body is not None else {}
            for header in ("Bearer", f"Bearer {ADMIN_KEY}", "Bearer none", None):
                headers = {"authorization": header} if header else {}
                response = client.request(method, path, headers=headers, **kw)
                assert response.status_code == 403, response.text
                assert "disabled" in response.json()["detail"]
        assert client.get("/readyz").status_code == 200


def preflight(client: httpx.Client, origin: str, path: str = "/predict") -> httpx.Response:
    return client.options(path, headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    })  # fmt: skip


def test_cors_is_off_by_default(server: ServiceProcess):
    with server.client() as client:
        answers = [
            preflight(client, "http://evil.example"),
            preflight(client, "http://allowed.example"),
            client.get("/models", headers={"origin": "http://evil.example"}),
            client.post("/predict", content=b"x", headers={"origin": "http://evil.example",
                                                           "content-type": "image/png"}),
        ]  # fmt: skip
    assert [r.status_code for r in answers] == [405, 405, 200, 415]
    for response in answers:
        assert not any(h.lower().startswith("access-control-") for h in response.headers)


def test_cors_allows_only_the_configured_origins(bounded_server: ServiceProcess):
    with bounded_server.client() as client:
        for origin in ("http://allowed.example", "https://app.example"):
            response = preflight(client, origin)
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == origin
            assert "POST" in response.headers["access-control-allow-methods"]
            simple = client.get("/models", headers={"origin": origin})
            assert simple.headers["access-control-allow-origin"] == origin
        for origin in ("http://evil.example", "http://allowed.example.evil.com", "null"):
            response = preflight(client, origin)
            assert response.status_code == 400
            assert "access-control-allow-origin" not in response.headers
            simple = client.get("/models", headers={"origin": origin})
            assert simple.status_code == 200
            assert "access-control-allow-origin" not in simple.headers
