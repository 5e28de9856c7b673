"""Faults: bad archives, a failing forward pass, out-of-memory, SIGTERM under load, hot swap.

One server for the module (the test launcher: forward delay/faults steered at run time) on a
store holding the digits archive and four bad ones; the SIGTERM test runs last and ends it.
"""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.service import hostile
from tests.service.conftest import ServiceProcess, digit_png, launch, rewrite_archive
from trainer.archive import read_archive, write_archive

from .conftest import ADMIN_KEY, LAUNCHER, forward_state, set_forward
from .helpers import connection_refused, raw_request, timed_post

pytestmark = pytest.mark.slow

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
GRACEFUL_S = 15.0
PNG = {"content": digit_png(4, 8), "headers": {"content-type": "image/png"}}


class Payload:
    """Unpickling this runs code: it writes ``marker`` (through ``exec``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def torch_pickle(marker: Path) -> bytes:
    """A torch.save file (zip format) whose state dict holds a code-running object."""
    buffer = io.BytesIO()
    torch.save({"conv.weight": torch.zeros(2), "x": Payload(marker)}, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def markers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def fault_server(
    rel_store: Path, markers: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    store = tmp_path_factory.mktemp("fault_store")
    digits = rel_store / "digits-v1.mar"
    (store / "digits-v1.mar").write_bytes(digits.read_bytes())
    (store / "garbage-v1.mar").write_bytes(b"PK\x03\x04 not a zip at all" * 20)
    weights = bytearray(zipfile.ZipFile(digits).read("weights.pt"))
    weights[-100] ^= 0xFF
    rewrite_archive(digits, store / "tampered-v1.mar", card={"name": "tampered"}, weights=bytes(weights),
            fix_hash=False)  # fmt: skip
    rewrite_archive(digits, store / "alien-v1.mar", card={"name": "alien", "arch": "resnet9000"})
    rewrite_archive(digits, store / "evil-v1.mar", card={"name": "evil"},
            weights=torch_pickle(markers / "evil-at-start"))  # fmt: skip
    env = {
        "ADMIN_API_KEY": ADMIN_KEY, "MAX_BATCH_SIZE": "8", "MAX_QUEUE": "64",
        "GRACEFUL_TIMEOUT_S": str(GRACEFUL_S), "PREPROCESS_THREADS": "2",
        "INFERENCE_WORKERS": "1",  # one forward at a time: the batches below are exact
    }  # fmt: skip
    process = launch(store, tmp_path_factory.mktemp("fault_logs"), env=env, module=LAUNCHER)
    yield process
    process.stop()


def wait_loaded(client: httpx.Client, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get("/models").json()
        if not any(m["status"] == "loading" for m in body["models"]):
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


# -- archives ------------------------------------------------------------------------------------


def test_the_payload_is_live_under_full_pickle(tmp_path: Path):
    """Control: the same kind of file loaded with full unpickling does run its code."""
    control = tmp_path / "control"
    torch.load(io.BytesIO(torch_pickle(control)), weights_only=False)
    assert control.read_text() == "pwned"
    control.unlink()
    pickle.loads(pickle.dumps({"x": Payload(control)}))
    assert control.exists()


def test_bad_archives_are_refused_with_reasons_and_never_run_code(
    fault_server: ServiceProcess, markers: Path
):
    expected = {
        "garbage-v1.mar": "not a readable .mar",
        "tampered-v1.mar": "SHA-256",
        "alien-v1.mar": "resnet9000",
        "evil-v1.mar": "weights are not a plain tensor state dict",
    }
    with fault_server.client() as client:
        models = wait_loaded(client)
        by_file = {m["file"]: m for m in models["models"]}
        assert by_file["digits-v1.mar"]["status"] == "ready"
        for file, fragment in expected.items():
            assert by_file[file]["status"] == "failed"
            assert fragment in by_file[file]["error"], by_file[file]["error"]
        # the others keep serving
        assert client.get("/readyz").status_code == 200
        answer = client.post("/predict", **PNG)
        assert answer.status_code == 200 and answer.json()["model"] == "digits"
        # added at run time: a raw pickle and a torch.save file, both with a valid card hash
        digits = fault_server.store / "digits-v1.mar"
        rewrite_archive(digits, fault_server.store / "late-v1.mar", card={"name": "late"},
                weights=torch_pickle(markers / "evil-registered"))  # fmt: skip
        rewrite_archive(digits, fault_server.store / "raw-v1.mar", card={"name": "raw"},
                weights=pickle.dumps({"x": Payload(markers / "evil-raw")}))  # fmt: skip
        for file in ("late-v1.mar", "raw-v1.mar", "evil-v1.mar", "tampered-v1.mar"):
            response = client.post("/models", json={"file": file}, headers=ADMIN)
            assert response.status_code == 422, response.text
            assert "could not be loaded" in response.json()["detail"]
        statuses = {m["file"]: m["status"] for m in client.get("/models").json()["models"]}
        assert client.post("/predict", **PNG).status_code == 200
    print(f"\nFIGURE archives: {statuses}; marker files created: "
          f"{sorted(p.name for p in markers.iterdir())}")  # fmt: skip
    assert list(markers.iterdir()) == []  # no payload ever ran
    assert sum(s == "failed" for s in statuses.values()) == 6
    assert statuses["digits-v1.mar"] == "ready"


# -- the forward pass ----------------------------------------------------------------------------


async def post_many(url: str, bodies: list[tuple[bytes, str]], path: str = "/predict") -> list:
    return await asyncio.gather(*(timed_post(url, path, body, ctype) for body, ctype in bodies))


def wait_busy(server: ServiceProcess, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while forward_state(server)["busy"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_an_exception_in_the_forward_fails_only_its_batch(fault_server: ServiceProcess):
    url = fault_server.url
    images = [(digit_png(d, 8), "image/png") for d in range(6)]
    set_forward(fault_server, delay_s=0.5)

    async def scenario() -> tuple:
        blocker = asyncio.ensure_future(timed_post(url, "/predict", *images[0]))
        await asyncio.to_thread(wait_busy, fault_server)  # the blocker's forward is running
        set_forward(fault_server, fail_next=1)  # so the NEXT batch fails
        doomed = await post_many(url, images)  # queued together behind the blocker
        return await blocker, doomed

    try:
        first, doomed = asyncio.run(scenario())
        events = forward_state(fault_server)["events"]
        set_forward(fault_server, delay_s=0.05)
        later = asyncio.run(post_many(url, images + images))
        later_events = forward_state(fault_server)["events"]
    finally:
        set_forward(fault_server, delay_s=0.0, fail_next=0)
    print(f"\nFIGURE forward fault: batches {events}; the failed batch's {len(doomed)} requests "
          f"got {sorted({o.status for o in doomed})}; next {len(later)} requests got "
          f"{sorted({o.status for o in later})} in batches {later_events}")  # fmt: skip
    assert first.status == 200  # the batch before is untouched
    assert events == [[1, "ok"], [6, "fail"]]  # the blocker's batch, then the failing one
    assert [o.status for o in doomed] == [500] * 6
    assert all("injected fault" in o.detail for o in doomed)
    assert [o.status for o in later] == [200] * 12
    assert all(outcome == "ok" for _, outcome in later_events)
    assert max(size for size, _ in later_events) > 1  # batching still works


def test_out_of_memory_splits_the_batch_and_later_batches_succeed(fault_server: ServiceProcess):
    images = [digit_png(d, 8) for d in range(8)]
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    with fault_server.client() as client:
        clean = client.post("/predict", files=files).json()["predictions"]
        try:
            set_forward(fault_server, oom_min_size=3)  # batches of 3+ images run out of memory
            split = client.post("/predict", files=files)
            split_events = forward_state(fault_server)["events"]
            set_forward(fault_server, oom_min_size=1)  # even one image: fail cleanly
            failed = client.post("/predict", **PNG)
        finally:
            set_forward(fault_server, oom_min_size=0)
        after = client.post("/predict", files=files)
        after_events = forward_state(fault_server)["events"]
        metrics = client.get("/metrics").text
    print(
        f"\nFIGURE oom: one batch of 8 ran as {split_events} -> {split.status_code}; "
        f"OOM at batch 1 -> {failed.status_code}; then {after_events} -> {after.status_code}"
    )
    assert split.status_code == 200
    got = split.json()["predictions"]
    assert [p["class_id"] for p in got] == [p["class_id"] for p in clean]
    assert all(p["confidence"] == pytest.approx(q["confidence"], abs=1e-5)
               for p, q in zip(got, clean, strict=True))  # fmt: skip
    assert split_events[0] == [8, "oom"]
    assert sum(size for size, outcome in split_events if outcome == "ok") == 8
    assert max(size for size, outcome in split_events if outcome == "ok") <= 2
    assert failed.status_code == 500 and "out of memory" in failed.json()["detail"]
    assert after.status_code == 200 and after_events == [[8, "ok"]]
    assert "imgserve_oom_splits_total" in metrics


# -- hot swap --------------------------------------------------------------------------------------


def test_hot_swap_under_steady_load_loses_nothing_and_switches(fault_server: ServiceProcess):
    url = fault_server.url
    store = fault_server.store
    archive = read_archive(store / "digits-v1.mar")
    archive.card.version = "2"
    write_archive(archive.card, archive.state_dict, store)
    body = digit_png(4, 8)
    outcomes: list = []
    switches: list[tuple[float, float, str]] = []  # (sent, answered, version)
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            outcomes.append(await timed_post(url, "/predict", body, "image/png"))

    async def switch(call, version: str, status: int) -> None:
        sent = time.monotonic()
        response = await call
        assert response.status_code == status, response.text
        switches.append((sent, time.monotonic(), version))

    async def manage(client: httpx.AsyncClient) -> None:
        await asyncio.sleep(1.0)  # the newest ready version becomes the default once warm
        await switch(
            client.post("/models", json={"file": "digits-v2.mar"}, headers=ADMIN), "2", 201
        )
        await asyncio.sleep(1.0)
        await switch(
            client.put("/models/digits/default", json={"version": "1"}, headers=ADMIN), "1", 200
        )
        await asyncio.sleep(1.0)
        await switch(
            client.put("/models/digits/default", json={"version": "2"}, headers=ADMIN), "2", 200
        )
        await asyncio.sleep(0.5)
        await switch(client.delete("/models/digits/1", headers=ADMIN), "2", 200)
        await asyncio.sleep(1.0)
        stop.set()

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await asyncio.gather(manage(client), *(load() for _ in range(6)))

    set_forward(fault_server, delay_s=0.02)
    try:
        asyncio.run(scenario())
    finally:
        set_forward(fault_server, delay_s=0.0)
    failed = [o for o in outcomes if o.status != 200]
    wrong = []  # answered by another version than the one chosen by the last switch
    checked = 0
    for outcome in outcomes:
        before = [sw for sw in switches if sw[1] < outcome.start]  # switched before it started
        during = [sw for sw in switches if sw[0] < outcome.end and sw[1] >= outcome.start]
        if before and not during:
            checked += 1
            if outcome.version != before[-1][2]:
                wrong.append((outcome.version, before[-1][2]))
    versions = {v: sum(o.version == v for o in outcomes) for v in ("1", "2")}
    print(f"\nFIGURE hot swap: {len(outcomes)} requests under load, {len(failed)} failed, "
          f"answers by version {versions}; of {checked} sent after a switch had returned "
          f"(and not during the next), {len(wrong)} answered by another version")  # fmt: skip
    assert len(outcomes) > 100 and checked > 50
    assert failed == [], [(o.status, o.detail, o.error) for o in failed[:5]]
    assert wrong == []
    assert versions["1"] > 0 and versions["2"] > 0
    assert outcomes[-1].version == "2"
    with fault_server.client() as client:
        assert [v["version"] for v in client.get("/models/digits").json()["versions"]] == ["2"]
        assert ADMIN_KEY not in fault_server.log()


# -- graceful shutdown (last: it ends the server) ------------------------------------------------


def test_sigterm_with_32_requests_in_flight_answers_all_of_them(fault_server: ServiceProcess):
    url = fault_server.url
    port = int(url.rsplit(":", 1)[1])
    png = digit_png(2, 8)
    pair, pair_type = hostile.multipart_body([("file", png), ("file", digit_png(9, 8))])
    requests = ([("/predict", png, "image/png")] * 16 + [("/topk", png, "image/png")] * 8
                + [("/predict", pair, pair_type)] * 8)  # fmt: skip
    images = 16 + 8 + 8 * 2
    set_forward(fault_server, delay_s=0.4)  # 40 images, batches of 8: about 2 s of work

    async def scenario() -> tuple:
        tasks = [asyncio.ensure_future(raw_request(url, "POST", path, body, {"Content-Type": c}))
                 for path, body, c in requests]  # fmt: skip
        deadline = time.monotonic() + 10
        while True:  # every image admitted: queued or in the running batch
            state = await asyncio.to_thread(forward_state, fault_server)
            done = sum(size for size, _ in state["events"])
            if state["pending"] + state["running"] + done >= images:
                break
            assert time.monotonic() < deadline, state
            await asyncio.sleep(0.02)
        signalled = time.monotonic()
        fault_server.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        refused = await asyncio.to_thread(connection_refused, "127.0.0.1", port)
        alive_when_refused = fault_server.proc.poll() is None
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return signalled, refused, alive_when_refused, results

    signalled, refused, alive_when_refused, results = asyncio.run(scenario())
    code = fault_server.proc.wait(GRACEFUL_S + 10)
    exited_after = time.monotonic() - signalled
    answered = []
    for (path, _, _), result in zip(requests, results, strict=True):
        if isinstance(result, BaseException):
            answered.append((path, repr(result)))
            continue
        status, _, payload = result
        body = json.loads(payload)
        answered.append((path, status, len(body.get("predictions", []))))
    ok = [a for a in answered if len(a) == 3 and a[1] == 200 and a[2] >= 1]
    print(f"\nFIGURE shutdown: SIGTERM with {len(requests)} requests ({images} images) in flight: "
          f"{len(ok)} answered in full, {len(requests) - len(ok)} lost; new connections refused "
          f"{refused} (process still draining: {alive_when_refused}); exit code {code} after "
          f"{exited_after:.2f} s (grace {GRACEFUL_S:.0f} s)")  # fmt: skip
    assert len(ok) == len(requests), answered
    assert [a[2] for a in answered] == [1] * 24 + [2] * 8
    assert refused and alive_when_refused
    assert code in (0, -signal.SIGTERM)
    assert exited_after < GRACEFUL_S
    assert "Application shutdown complete" in fault_server.log()
