"""The model registry through the real server: empty and broken stores, registration, defaults,
hot swap under load."""

from __future__ import annotations

import pickle
import shutil
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from trainer.archive import read_archive, write_archive

from .conftest import ADMIN_KEY, digit_png, rewrite_archive

pytestmark = pytest.mark.slow
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
PNG = {"content": digit_png(4), "headers": {"content-type": "image/png"}}


def new_version(source: Path, store: Path, version: str) -> Path:
    archive = read_archive(source)
    archive.card.version = version
    return write_archive(archive.card, archive.state_dict, store)


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def broken_archives(source: Path, store: Path, marker: Path) -> dict[str, str]:
    """Four bad archives; returns file -> a fragment of the expected error."""
    (store / "garbage-v1.mar").write_bytes(b"PK\x03\x04 this is not a zip file at all" * 10)
    tampered = bytearray(zipfile.ZipFile(source).read("weights.pt"))
    tampered[-100] ^= 0xFF
    rewrite_archive(source, store / "tampered-v1.mar", card={"name": "tampered"},
                    weights=bytes(tampered), fix_hash=False)  # fmt: skip
    rewrite_archive(source, store / "alien-v1.mar", card={"name": "alien", "arch": "resnet9000"})
    rewrite_archive(source, store / "evil-v1.mar", card={"name": "evil"},
                    weights=pickle.dumps({"x": Evil(marker)}))  # fmt: skip
    return {
        "garbage-v1.mar": "not a readable .mar",
        "tampered-v1.mar": "SHA-256",
        "alien-v1.mar": "resnet9000",
        "evil-v1.mar": "weights",
    }


def wait_loaded(client: httpx.Client, timeout: float = 120) -> dict:
    """/models once no entry is loading any more."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get("/models").json()
        if not any(m["status"] == "loading" for m in body["models"]):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def digits_archive(served_store: Path) -> Path:
    return served_store / "digits-v1.mar"


def test_empty_store_stays_up_and_serves_once_an_archive_is_registered(
    start_service, served_store: Path, tmp_path: Path
):
    store = tmp_path / "empty_store"
    store.mkdir()
    server = start_service(store=store, env={"ADMIN_API_KEY": ADMIN_KEY}, wait="/healthz")
    with server.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert "no model archives" in ready.json()["detail"]
        models = c.get("/models").json()
        assert models["models"] == [] and "no model archives" in models["detail"]
        predict = c.post("/predict", **PNG)
        assert predict.status_code == 503 and "no model" in predict.json()["detail"]
        shutil.copy(digits_archive(served_store), store / "digits-v1.mar")
        not_yet = c.get("/readyz").json()["detail"]  # on disk is not registered
        assert "1 archive(s) in MODEL_STORE" in not_yet and "POST /models" in not_yet
        response = c.post("/models", json={"file": "digits-v1.mar"}, headers=ADMIN)
        assert response.status_code == 201, response.text
        entry = response.json()
        assert entry["status"] == "ready" and entry["name"] == "digits" and entry["default"]
        assert c.get("/readyz").status_code == 200
        answer = c.post("/predict", **PNG)
        assert answer.status_code == 200 and answer.json()["version"] == "1"
        # unloading the last version leaves the file: the answers say so, not "no archives"
        assert c.delete("/models/digits/1", headers=ADMIN).status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "were unloaded" in ready.json()["detail"]
        assert c.get("/models").json()["detail"] == ready.json()["detail"]
        assert c.post("/predict", **PNG).status_code == 503


def test_archives_left_out_by_models_are_named_without_management(tmp_path: Path):
    """Without ADMIN_API_KEY nothing can be registered or unloaded: the only way to have
    archives and no model is MODELS, and the detail points there, not to POST /models."""
    from service.metrics import Metrics
    from service.registry import Registry
    from service.settings import Settings

    (tmp_path / "digits-v1.mar").write_bytes(b"not read: MODELS leaves it out")
    settings = Settings(model_store=tmp_path, models=["other-v1.mar"], admin_api_key=None)
    registry = Registry(settings, Metrics())
    assert registry.scan() == []
    ready, why = registry.readiness()
    assert not ready
    assert (
        why
        == f"no model is registered: the 1 archive(s) in MODEL_STORE ({tmp_path}) are not in MODELS"
    )


def test_missing_store_directory_is_reported(start_service, tmp_path: Path):
    server = start_service(store=tmp_path / "does-not-exist", wait="/healthz")
    with server.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "not a directory" in ready.json()["detail"]
        assert c.get("/models").json()["detail"]


def test_broken_archives_are_failed_with_reasons_and_never_run_code(
    start_service, served_store: Path, tmp_path: Path
):
    store = tmp_path / "broken_store"
    store.mkdir()
    marker = tmp_path / "pwned"
    expected = broken_archives(digits_archive(served_store), store, marker)
    server = start_service(store=store, env={"ADMIN_API_KEY": ADMIN_KEY}, wait="/healthz")
    with server.client() as c:
        body = wait_loaded(c)
        assert body["detail"]
        by_file = {m["file"]: m for m in body["models"]}
        assert set(by_file) == set(expected)
        for file, fragment in expected.items():
            entry = by_file[file]
            assert entry["status"] == "failed", entry
            assert fragment in entry["error"], (file, entry["error"])
        garbage = by_file["garbage-v1.mar"]
        assert garbage["arch"] is None and garbage["labels"] is None and garbage["version"] == "1"
        assert c.get("/readyz").status_code == 503
        assert c.get("/models/alien").json()["versions"][0]["status"] == "failed"
        failed = c.post("/predict?model=alien", **PNG)
        assert failed.status_code == 503 and "resnet9000" in failed.json()["detail"]
        # registering a broken file again answers 422 with the reason; a valid one serves
        again = c.post("/models", json={"file": "tampered-v1.mar"}, headers=ADMIN)
        assert again.status_code == 422 and "SHA-256" in again.json()["detail"]
        shutil.copy(digits_archive(served_store), store / "digits-v1.mar")
        assert c.post("/models", json={"file": "digits-v1.mar"}, headers=ADMIN).status_code == 201
        assert c.get("/readyz").status_code == 200
        assert c.post("/predict", **PNG).status_code == 200
    assert not marker.exists()


def test_a_broken_archive_does_not_stop_the_others(start_service, served_store, tmp_path):
    store = tmp_path / "mixed_store"
    store.mkdir()
    shutil.copy(digits_archive(served_store), store)
    (store / "zzz-v1.mar").write_bytes(b"junk")
    server = start_service(store=store)
    with server.client() as c:
        assert c.post("/predict", **PNG).status_code == 200
        statuses = {m["file"]: m["status"] for m in c.get("/models").json()["models"]}
        assert statuses == {"digits-v1.mar": "ready", "zzz-v1.mar": "failed"}


def test_models_setting_and_default_model(start_service, served_store, tmp_path):
    store = tmp_path / "two_models"
    store.mkdir()
    shutil.copy(digits_archive(served_store), store)
    rewrite_archive(digits_archive(served_store), store / "other-v1.mar", card={"name": "other"})
    server = start_service(store=store, env={"DEFAULT_MODEL": "digits"})
    with server.client() as c:
        assert wait_loaded(c)["default_model"] == "digits"
        assert c.post("/predict", **PNG).json()["model"] == "digits"
        assert c.post("/predict?model=other", **PNG).json()["model"] == "other"
    only = start_service(store=store, env={"MODELS": "other-v1.mar"})
    with only.client() as c:
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["other"]
        assert c.post("/predict", **PNG).json()["model"] == "other"
    missing = start_service(store=store, env={"DEFAULT_MODEL": "absent"}, wait="/healthz")
    with missing.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "absent" in ready.json()["detail"]


def test_hot_swap_under_load_loses_no_request(start_service, served_store, tmp_path):
    store = tmp_path / "swap_store"
    store.mkdir()
    shutil.copy(digits_archive(served_store), store)
    server = start_service(store=store, env={"ADMIN_API_KEY": ADMIN_KEY})
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                response = c.post("/predict", **PNG)
                version = response.json().get("version") if response.status_code == 200 else None
                results.append((response.status_code, version))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        with server.client() as c:
            time.sleep(0.5)
            new_version(digits_archive(served_store), store, "2")
            registered = c.post("/models", json={"file": "digits-v2.mar"}, headers=ADMIN)
            assert registered.status_code == 201, registered.text
            assert c.get("/models/digits").json()["default_version"] == "2"  # newest ready
            time.sleep(0.5)
            back = c.put("/models/digits/default", json={"version": "1"}, headers=ADMIN)
            assert back.status_code == 200 and back.json()["default_version"] == "1"
            time.sleep(0.5)
            forward = c.put("/models/digits/default", json={"version": "2"}, headers=ADMIN)
            assert forward.status_code == 200
            time.sleep(0.3)
            unloaded = c.delete("/models/digits/1", headers=ADMIN)
            assert unloaded.status_code == 200, unloaded.text
            assert unloaded.json() == {"name": "digits", "version": "1", "status": "unloaded"}
            time.sleep(0.5)
            assert [v["version"] for v in c.get("/models/digits").json()["versions"]] == ["2"]
            gone = c.post("/predict?model=digits&version=1", **PNG)
            assert gone.status_code == 404
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    statuses = [status for status, _ in results]
    assert len(results) > 20
    assert set(statuses) == {200}, [r for r in results if r[0] != 200][:5]
    versions = [version for _, version in results]
    assert "1" in versions and "2" in versions
    assert versions[-1] == "2"
    metrics = server.metrics()
    assert 'imgserve_model_info{arch="resnet20",device="cpu",model="digits",sha256=' in metrics
    assert 'model="digits",version="1"' not in metrics  # the unloaded version's series are gone
