"""The HTTP contract against the real server (uvicorn subprocess) serving the digits archive."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import ADMIN_KEY, ServiceProcess, digit_png, jpeg_bytes

pytestmark = pytest.mark.slow
DIGITS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def client(service: ServiceProcess):
    with service.client() as c:
        yield c


def files(*images: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]


def assert_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body


# -- health ------------------------------------------------------------------------------------


def test_healthz_and_readyz(client: httpx.Client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model"] == "digits" and ready.json()["version"] == "1"


def test_metrics_exposes_the_documented_names(client: httpx.Client):
    client.post("/predict", content=digit_png(3), headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    for name in (
        "imgserve_http_requests_total", "imgserve_http_request_duration_seconds_bucket",
        "imgserve_queue_wait_seconds_bucket", "imgserve_preprocess_seconds_bucket",
        "imgserve_forward_seconds_bucket", "imgserve_batch_size_bucket", "imgserve_queue_depth",
        "imgserve_images_total", "imgserve_predictions_total", "imgserve_confidence_bucket",
        "imgserve_model_info", "imgserve_model_load_seconds",
        "imgserve_request_duration_seconds_bucket", "process_resident_memory_bytes",
    ):  # fmt: skip
        assert name in text, name
    assert 'route="/predict"' in text
    assert re.search(r'imgserve_model_info\{[^}]*arch="resnet20"[^}]*\} 1\.0', text)
    client.get("/models/does-not-exist")
    text = client.get("/metrics").text
    assert 'route="/models/{name}",status="404"' in text  # the template, never the raw path
    assert "does-not-exist" not in text


# -- predict -----------------------------------------------------------------------------------


def test_predict_raw_body(client: httpx.Client):
    response = client.post("/predict", content=digit_png(7), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "digits" and body["version"] == "1"
    (prediction,) = body["predictions"]
    assert set(prediction) == {"label", "class_id", "confidence"}
    assert prediction["label"] == str(prediction["class_id"])
    assert 0.0 <= prediction["confidence"] <= 1.0


@pytest.mark.parametrize("content_type", ["application/octet-stream", "image/jpeg", "image/x-foo"])
def test_predict_raw_body_content_decides_not_the_declared_type(client, content_type):
    response = client.post("/predict", content=digit_png(2), headers={"content-type": content_type})
    assert response.status_code == 200, response.text


def test_predict_jpeg_and_rgb_input(client: httpx.Client):
    response = client.post("/predict", content=jpeg_bytes((300, 200)),
                           headers={"content-type": "image/jpeg"})  # fmt: skip
    assert response.status_code == 200, response.text
    response = client.post("/predict", files=files(digit_png(4, 64, mode="RGB")))
    assert response.status_code == 200, response.text


def _preprocess_count(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sum(
        float(v) for v in re.findall(r"imgserve_preprocess_seconds_count\{[^}]*\} (\S+)", text)
    )


def test_lone_requests_and_concurrent_ones_get_the_same_answers(service: ServiceProcess):
    """One at a time, each image is decoded on a free forward thread (no pool hand-off); under
    concurrency the pool decodes and the batcher batches. Same probabilities either way, and
    every decode is measured in ``imgserve_preprocess_seconds``."""
    images = [digit_png(d) for d in DIGITS]
    raw = {"content-type": "image/png"}
    with service.client() as client:
        before = _preprocess_count(client)
        lone = [client.post("/predict", content=data, headers=raw).json() for data in images]
    with ThreadPoolExecutor(len(images)) as pool, service.client() as client:
        together = list(pool.map(lambda d: client.post("/predict", content=d, headers=raw), images))
        after = _preprocess_count(client)
    for alone, response in zip(lone, together, strict=True):
        assert response.status_code == 200, response.text
        (a,), (b,) = alone["predictions"], response.json()["predictions"]
        assert a["class_id"] == b["class_id"]
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
    assert after - before == 2 * len(images)


def test_multipart_images_are_answered_in_order_and_match_single_requests(client: httpx.Client):
    images = [digit_png(d) for d in DIGITS]
    singles = []
    for data in images:
        response = client.post("/predict", files=files(data))
        assert response.status_code == 200, response.text
        singles.append(response.json()["predictions"][0])
    response = client.post("/predict", files=files(*images))
    assert response.status_code == 200, response.text
    together = response.json()["predictions"]
    assert len(together) == len(images)
    for alone, batched in zip(singles, together, strict=True):
        assert alone["class_id"] == batched["class_id"]
        assert alone["confidence"] == pytest.approx(batched["confidence"], abs=1e-5)
    confidences = [p["confidence"] for p in together]
    assert all(isinstance(c, float) and 0.0 <= c <= 1.0 for c in confidences)
    assert any(c != round(c, 6) for c in confidences)  # full floats, not rounded


def test_the_trained_model_recognises_digits(client: httpx.Client):
    digits = [d for d in DIGITS for _ in range(4)]
    images = [digit_png(d, 8, nth=-1 - i % 4) for i, d in enumerate(digits)]
    response = client.post("/predict", files=files(*images))
    assert response.status_code == 200, response.text
    labels = [p["label"] for p in response.json()["predictions"]]
    correct = sum(label == str(d) for label, d in zip(labels, digits, strict=True))
    # chance is 4 of 40; the short-trained archive scores 50-80% on its test split
    assert correct >= 10, labels


def test_topk_default_sorted_and_consistent_with_predict(client: httpx.Client):
    images = [digit_png(d) for d in (1, 8, 9)]
    top1 = client.post("/predict", files=files(*images)).json()["predictions"]
    response = client.post("/topk", files=files(*images))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "digits" and body["version"] == "1"
    assert len(body["predictions"]) == 3
    for entry, best in zip(body["predictions"], top1, strict=True):
        topk = entry["topk"]
        assert len(topk) == 5  # min(5, 10 classes)
        confidences = [t["confidence"] for t in topk]
        assert confidences == sorted(confidences, reverse=True)
        assert all(0.0 <= c <= 1.0 for c in confidences)
        assert len({t["class_id"] for t in topk}) == 5
        assert topk[0]["class_id"] == best["class_id"]
        assert topk[0]["confidence"] == pytest.approx(best["confidence"], abs=1e-6)
    full = client.post("/topk?k=10", files=files(images[0])).json()["predictions"][0]["topk"]
    assert sum(t["confidence"] for t in full) == pytest.approx(1.0, abs=1e-4)
    one = client.post("/topk", params={"k": 1}, files=files(images[0])).json()
    assert len(one["predictions"][0]["topk"]) == 1


@pytest.mark.parametrize("k", ["0", "11", "-1", "abc", "2.5"])
def test_topk_k_out_of_range_is_422_with_a_string_detail(client: httpx.Client, k: str):
    response = client.post("/topk", params={"k": k}, files=files(digit_png(1)))
    assert_error(response, 422, "k")


def test_model_and_version_selection(client: httpx.Client):
    png = {"content": digit_png(5), "headers": {"content-type": "image/png"}}
    assert client.post("/predict?model=digits", **png).status_code == 200
    assert client.post("/predict?model=digits&version=1", **png).status_code == 200
    assert client.post("/predict?version=1", **png).json()["model"] == "digits"
    assert_error(client.post("/predict?model=nope", **png), 404, "nope")
    assert_error(client.post("/predict?model=digits&version=9", **png), 404, "9")
    assert_error(client.post("/predict?version=42", **png), 404, "42")
    assert_error(client.post("/topk?model=nope", **png), 404)


# -- bad input ---------------------------------------------------------------------------------


def test_bad_images_get_the_contract_status(client: httpx.Client):
    png = digit_png(3)
    assert_error(
        client.post("/predict", content=b"hello world", headers={"content-type": "image/png"}), 415
    )  # noqa: E501
    assert_error(client.post("/predict", content=png[: len(png) // 2],
                             headers={"content-type": "image/png"}), 400)  # fmt: skip
    assert_error(client.post("/predict", content=b"", headers={"content-type": "image/png"}), 422)
    assert_error(client.post("/predict", content=b"x", headers={"content-type": "text/plain"}), 415)
    assert_error(client.post("/predict", files={"other": ("a.png", png, "image/png")}), 422)


def test_a_bad_image_fails_the_whole_request_naming_its_index(client: httpx.Client):
    good = digit_png(3)
    response = client.post("/predict", files=files(good, good, b"%PDF-1.4 not an image", good[:40]))
    assert_error(response, 415, "2")  # the first bad one decides: part 2
    response = client.post("/topk", files=files(good, good[:60], b"plain text"))
    assert_error(response, 400, "1")


def test_decoding_on_the_forward_threads_answers_as_the_pool_does(start_service, served_store):
    """DECODE_ON_FORWARD_THREAD on (auto's choice for small inputs on a CPU) and off: the same
    probabilities for lone, multipart and concurrent requests, and the same errors, naming the
    first bad image of a request."""
    images = [digit_png(d) for d in DIGITS]
    good = images[3]
    raw = {"content-type": "image/png"}
    answers = {}
    for mode in ("on", "off"):
        server = start_service(store=served_store, env={"DECODE_ON_FORWARD_THREAD": mode})
        with ThreadPoolExecutor(len(images)) as pool, server.client() as client:
            lone = [client.post("/predict", content=data, headers=raw) for data in images]
            together = client.post("/topk", files=files(*images), params={"k": 3})
            concurrent = list(
                pool.map(lambda d: client.post("/predict", content=d, headers=raw), images)
            )
            bad = [
                client.post("/predict", files=files(good, good, b"%PDF-1.4 no", good[:40])),
                client.post("/topk", files=files(good, good[:60], b"plain text")),
                client.post("/predict", content=good[:60], headers=raw),
            ]
            ok = [together, *lone, *concurrent]
            assert all(r.status_code == 200 for r in ok), [r.text for r in ok]
            answers[mode] = {
                "lone": [r.json()["predictions"][0] for r in lone],
                "concurrent": [r.json()["predictions"][0] for r in concurrent],
                "topk": together.json()["predictions"],
                "errors": [(r.status_code, r.json()["detail"]) for r in bad],
            }
        server.stop()
    on, off = answers["on"], answers["off"]
    assert on["errors"] == off["errors"]
    assert [status for status, _ in on["errors"]] == [415, 400, 400]
    assert "image 2" in on["errors"][0][1] and "image 1" in on["errors"][1][1]
    for key in ("lone", "concurrent"):
        for a, b in zip(on[key], off[key], strict=True):
            assert a["class_id"] == b["class_id"]
            assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)
    assert [p["class_id"] for p in on["lone"]] == [p["class_id"] for p in on["concurrent"]]
    for a, b in zip(on["topk"], off["topk"], strict=True):
        assert [c["class_id"] for c in a["topk"]] == [c["class_id"] for c in b["topk"]]


def test_too_many_images_is_413(client: httpx.Client):
    tiny = digit_png(1, 8)
    assert_error(client.post("/predict", files=files(*[tiny] * 65)), 413)


def test_unknown_route_and_wrong_method_are_json(client: httpx.Client):
    assert_error(client.get("/nope"), 404)
    response = client.get("/predict")
    assert_error(response, 405)
    assert "POST" in response.headers["allow"]
    assert_error(client.delete("/models"), 405)


def test_openapi_schema_is_served(client: httpx.Client):
    schema = client.get("/openapi.json").json()
    for path in ("/predict", "/topk", "/models", "/models/{name}", "/healthz", "/readyz"):
        assert path in schema["paths"]


# -- models ------------------------------------------------------------------------------------


def test_models_listing(client: httpx.Client):
    body = client.get("/models").json()
    assert body["detail"] is None and body["default_model"] == "digits"
    (entry,) = [m for m in body["models"] if m["name"] == "digits" and m["version"] == "1"]
    assert entry["status"] == "ready" and entry["default"] is True and entry["error"] is None
    assert entry["arch"] == "resnet20" and entry["num_classes"] == 10
    assert entry["labels"] == [str(d) for d in DIGITS]
    assert entry["input_size"] == [32, 32]
    assert isinstance(entry["metrics"], dict) and "accuracy" in entry["metrics"]


def test_model_versions(client: httpx.Client):
    body = client.get("/models/digits").json()
    assert body["name"] == "digits" and body["default_version"] == "1"
    assert [v["version"] for v in body["versions"]] == ["1"]
    assert body["versions"][0]["status"] == "ready"
    assert_error(client.get("/models/unknown-model"), 404, "unknown-model")


# -- management and access -----------------------------------------------------------------------

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/models", {"file": "digits-v1.mar"}),
        ("DELETE", "/models/digits/1", None),
        ("PUT", "/models/digits/default", {"version": "1"}),
    ],
)
def test_management_needs_the_admin_key(client: httpx.Client, method, path, body):
    kw = {"json": body} if body is not None else {}
    response = client.request(method, path, **kw)
    assert_error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"
    assert_error(
        client.request(method, path, headers={"authorization": "Bearer wrong-key-123"}, **kw), 403
    )  # noqa: E501
    assert_error(
        client.request(method, path, headers={"authorization": f"Basic {ADMIN_KEY}"}, **kw), 401
    )  # noqa: E501
    assert client.get("/readyz").status_code == 200  # nothing changed


@pytest.mark.parametrize(
    "file",
    ["../digits-v1.mar", "../../etc/passwd", "/etc/passwd", "/tmp/x.mar", "http://example.com/x.mar",
     "sub/x.mar", "..\\x.mar", "x.txt", "", ".mar", "digits-v1.mar\x00.txt"],
)  # fmt: skip
def test_register_refuses_anything_but_a_file_name_in_the_store(client: httpx.Client, file: str):
    assert_error(client.post("/models", json={"file": file}, headers=ADMIN), 422)


def test_register_errors(client: httpx.Client):
    assert_error(client.post("/models", json={"file": "absent-v3.mar"}, headers=ADMIN), 404)
    assert_error(client.post("/models", json={"file": "digits-v1.mar"}, headers=ADMIN), 409)
    assert_error(client.post("/models", json={"path": "digits-v1.mar"}, headers=ADMIN), 422)
    assert_error(client.post("/models", content=b"{not json", headers=ADMIN), 422)
    assert_error(client.post("/models", json=["digits-v1.mar"], headers=ADMIN), 422)


def test_default_and_unload_errors(client: httpx.Client):
    assert_error(client.put("/models/digits/default", json={"version": "7"}, headers=ADMIN), 404)
    assert_error(client.put("/models/nope/default", json={"version": "1"}, headers=ADMIN), 404)
    assert_error(client.put("/models/digits/default", json={}, headers=ADMIN), 422)
    ok = client.put("/models/digits/default", json={"version": "1"}, headers=ADMIN)
    assert ok.status_code == 200 and ok.json()["default_version"] == "1"
    assert_error(client.delete("/models/digits/7", headers=ADMIN), 404)
    assert_error(client.delete("/models/nope/1", headers=ADMIN), 404)


def test_management_is_refused_without_a_configured_key(start_service, served_store):
    server = start_service(store=served_store, env={"ADMIN_API_KEY": ""})
    with server.client() as c:
        for method, path in (("POST", "/models"), ("DELETE", "/models/digits/1"),
                             ("PUT", "/models/digits/default")):  # fmt: skip
            response = c.request(method, path, headers=ADMIN, json={"file": "digits-v1.mar"})
            assert_error(response, 403, "disabled")
        assert c.get("/readyz").status_code == 200


def test_inference_key_when_api_key_is_set(start_service, served_store):
    key = "inference-key-42"
    server = start_service(store=served_store, env={"API_KEY": key})
    png = {"content": digit_png(6), "headers": {"content-type": "image/png"}}
    with server.client() as c:
        assert_error(c.post("/predict", **png), 401)
        wrong = {"content-type": "image/png", "authorization": "Bearer nope-nope-nope"}
        assert_error(c.post("/topk", content=png["content"], headers=wrong), 403)
        right = {"content-type": "image/png", "authorization": f"Bearer {key}"}
        assert c.post("/predict", content=png["content"], headers=right).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/models").status_code == 200
        assert c.get("/readyz").status_code == 200
