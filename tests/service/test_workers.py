"""``WORKERS`` > 1: several service processes on one port (``service.workers``).

The real supervisor and its children run as processes on loopback; the assertions are what a
client or an operator sees: answers from every process, management calls applied everywhere
before they are answered, summed metrics, and clean stops.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from service.settings import Settings
from service.workers import Peers, PortHeld, SiblingFailed, hold_port
from trainer.archive import read_archive, write_archive

from .conftest import ADMIN_KEY, digit_png, free_port

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PNG = {"content": digit_png(4), "headers": {"content-type": "image/png"}}
FRESH = 24  # new connections per check: all on one process has odds 2**-23 if spread at random


def fresh(server, method: str, path: str, **kw) -> list[httpx.Response]:
    """One request per new connection, so the kernel picks a process for each."""
    answers = []
    for _ in range(FRESH):
        with httpx.Client(base_url=server.url, timeout=60) as client:
            answers.append(client.request(method, path, **kw))
    return answers


def serving_children(pid: int) -> list[psutil.Process]:
    return [child for child in psutil.Process(pid).children() if child.is_running()]


def digits_versions(served_store: Path, store: Path, versions: int) -> Path:
    """``store`` holding the digits archive as versions 1 to ``versions``."""
    store.mkdir()
    shutil.copy(served_store / "digits-v1.mar", store)
    archive = read_archive(served_store / "digits-v1.mar")
    for version in range(2, versions + 1):
        archive.card.version = str(version)
        write_archive(archive.card, archive.state_dict, store)
    return store


@pytest.fixture
def two_version_store(served_store: Path, tmp_path: Path) -> Path:
    return digits_versions(served_store, tmp_path / "mp_store", 2)


@pytest.fixture
def two_processes(start_service, two_version_store: Path):
    return start_service(
        store=two_version_store,
        env={"WORKERS": "2", "ADMIN_API_KEY": ADMIN_KEY, "MODELS": "digits-v1.mar"},
    )


def test_settings_split_the_cpus_between_the_processes(monkeypatch):
    for name in ("WORKERS", "TORCH_THREADS", "PREPROCESS_THREADS", "INFERENCE_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("service.settings.available_cpus", lambda: 8)
    one, four = Settings(), Settings(workers=4)
    assert (one.process_cpus, one.threads, one.pool_threads) == (8, 7, 8)
    assert (four.process_cpus, four.threads, four.pool_threads) == (2, 1, 2)
    assert four.forward_workers == 2 and Settings(workers=8).forward_workers == 1
    assert Settings(workers=4, torch_threads=3).threads == 3  # an explicit value wins


def test_several_processes_need_a_fixed_port():
    env = {**os.environ, "WORKERS": "2", "PORT": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr == (
        "service: invalid settings: WORKERS > 1 needs a fixed PORT: with 0 each process would "
        "get its own\n"
    )


def test_a_second_launch_on_the_port_is_refused(two_processes):
    """The kernel would let a second launch's processes join the first's ``SO_REUSEPORT``
    group and split the clients between two services; it fails as a single process would."""
    port = two_processes.url.rsplit(":", 1)[1]
    env = {**os.environ, "WORKERS": "2", "HOST": "127.0.0.1", "PORT": port,
           "MODEL_STORE": str(two_processes.store)}  # fmt: skip
    second = subprocess.Popen(
        [sys.executable, "-m", "service"], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, stderr = second.communicate(timeout=60)
    finally:  # had it joined, its processes would be serving: stop them all
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()
    assert second.returncode == 1
    assert stderr == (
        f"service: cannot bind 127.0.0.1:{port}: another service launch with WORKERS > 1 holds "
        f"port {port} (pid {two_processes.proc.pid})\n"
    )
    listeners = [
        c for c in psutil.net_connections("tcp")
        if c.laddr.port == int(port) and c.status == psutil.CONN_LISTEN
    ]  # fmt: skip
    assert sorted(c.pid for c in listeners) == sorted(
        child.pid for child in serving_children(two_processes.proc.pid)
    )
    with httpx.Client(base_url=two_processes.url, timeout=60) as client:
        assert client.post("/predict", **PNG).status_code == 200


def test_the_port_lock_names_its_holder_and_never_blocks():
    """Each refused launch leaves a queued connection on the lock; past the backlog the next
    ones are still refused at once, without the pid, instead of waiting on a full queue."""
    port = free_port()
    lock = hold_port(port)
    assert lock is not None
    refusals = []
    started = time.monotonic()
    for _ in range(100):
        with pytest.raises(PortHeld) as refused:
            hold_port(port)
        refusals.append(str(refused.value))
    assert time.monotonic() - started < 10
    held = f"another service launch with WORKERS > 1 holds port {port}"
    assert refusals[0] == f"{held} (pid {os.getpid()})"
    assert refusals[-1] == held
    lock.close()  # the process that held it is gone: the port is free for the next launch
    again = hold_port(port)
    assert again is not None
    again.close()


def test_every_process_answers_on_the_one_port(two_processes):
    children = serving_children(two_processes.proc.pid)
    assert len(children) == 2
    with httpx.Client(base_url=two_processes.url, timeout=60) as client:
        held = [httpx.Client(base_url=two_processes.url, timeout=60) for _ in range(FRESH)]
        try:
            for connection in held:  # open and keep FRESH connections
                assert connection.post("/predict", **PNG).status_code == 200
            port = int(two_processes.url.rsplit(":", 1)[1])
            per_child = [
                sum(1 for c in child.net_connections("tcp") if c.laddr.port == port and c.raddr)
                for child in children
            ]
        finally:
            for connection in held:
                connection.close()
        assert sum(per_child) == FRESH and min(per_child) > 0, per_child
        labels = {
            r.json()["predictions"][0]["label"]
            for r in fresh(two_processes, "POST", "/predict", **PNG)
        }
        assert labels == {client.post("/predict", **PNG).json()["predictions"][0]["label"]}


def test_management_calls_are_applied_in_every_process(two_processes):
    url = two_processes.url
    with httpx.Client(base_url=url, timeout=120) as client:
        registered = client.post("/models", json={"file": "digits-v2.mar"}, headers=ADMIN)
        assert registered.status_code == 201, registered.text
    # answered once every process has it: the newest ready version is the default everywhere
    assert {r.json()["version"] for r in fresh(two_processes, "POST", "/predict", **PNG)} == {"2"}

    with httpx.Client(base_url=url, timeout=60) as client:
        back = client.put("/models/digits/default", json={"version": "1"}, headers=ADMIN)
        assert back.status_code == 200 and back.json()["default_version"] == "1"
    assert {r.json()["version"] for r in fresh(two_processes, "POST", "/predict", **PNG)} == {"1"}

    # a made-up token does not make a call local to one process
    with httpx.Client(base_url=url, timeout=60) as client:
        headers = {**ADMIN, "x-imgserve-worker-token": "guessed"}
        gone = client.delete("/models/digits/1", headers=headers)
        assert gone.json() == {"name": "digits", "version": "1", "status": "unloaded"}
    for answer in fresh(two_processes, "GET", "/models/digits"):
        assert [v["version"] for v in answer.json()["versions"]] == ["2"]
    for answer in fresh(two_processes, "POST", "/predict?model=digits&version=1", **PNG):
        assert answer.status_code == 404
    # its series (counted by both processes) are left out, as one process removes them
    for answer in fresh(two_processes, "GET", "/metrics"):
        assert 'model="digits",version="1"' not in answer.text
        assert 'imgserve_images_total{model="digits",version="2"}' in answer.text

    # refused where it is received: no process changes, the client gets the usual answer
    with httpx.Client(base_url=url, timeout=60) as client:
        again = client.delete("/models/digits/1", headers=ADMIN)
        assert again.status_code == 404 and isinstance(again.json()["detail"], str)
        assert client.post("/models", json={"file": "digits-v2.mar"}).status_code == 401
        # registered again, it is shown again
        back = client.post("/models", json={"file": "digits-v1.mar"}, headers=ADMIN)
        assert back.status_code == 201, back.text
    for answer in fresh(two_processes, "GET", "/metrics"):
        assert 'imgserve_model_load_seconds{model="digits",version="1"}' in answer.text


def test_a_call_passed_on_accepts_the_state_it_asks_for(two_processes):
    """Two clients registering (or unloading) one version through two processes at once: the
    call each process passes on finds the other's done already. That is the state asked for,
    not a conflict; only with this launch's token, on a process's private socket."""
    child = serving_children(two_processes.proc.pid)[0]
    env = child.environ()
    private = Path(env["IMGSERVE_WORKER_DIR"]) / f"worker-{env['IMGSERVE_WORKER_INDEX']}.sock"
    passed_on = {**ADMIN, "x-imgserve-worker-token": env["IMGSERVE_WORKER_TOKEN"]}
    transport = httpx.HTTPTransport(uds=str(private))
    with httpx.Client(transport=transport, base_url="http://worker", timeout=60) as c:
        again = c.post("/models", json={"file": "digits-v1.mar"}, headers=passed_on)
        assert again.status_code == 201 and again.json()["version"] == "1"
        gone = c.delete("/models/digits/7", headers=passed_on)
        assert gone.json() == {"name": "digits", "version": "7", "status": "unloaded"}
        # the same calls from a client: the usual conflict and not-found
        assert c.post("/models", json={"file": "digits-v1.mar"}, headers=ADMIN).status_code == 409
        assert c.delete("/models/digits/7", headers=ADMIN).status_code == 404
        wrong = {**ADMIN, "x-imgserve-worker-token": "x" * 43}
        assert c.delete("/models/digits/7", headers=wrong).status_code == 404
        # the same version from another file is a real conflict, passed on or not
        shutil.copy(two_processes.store / "digits-v1.mar", two_processes.store / "copy-v1.mar")
        clash = c.post("/models", json={"file": "copy-v1.mar"}, headers=passed_on)
        assert clash.status_code == 409 and "digits-v1.mar" in clash.json()["detail"]


def test_metrics_count_every_process(two_processes):
    before = _images_total(two_processes.metrics())
    answers = fresh(two_processes, "POST", "/predict", **PNG)
    assert {a.status_code for a in answers} == {200}
    for _ in range(4):  # any process answers /metrics with the sum of all
        assert _images_total(two_processes.metrics()) == before + FRESH
    text = two_processes.metrics()
    assert "imgserve_batch_size_count" in text and "python_info{" in text
    # the process metrics of each process, labelled with its index: prometheus-client's own
    # collector read for every sibling's pid (one process's would describe a random half)
    children = serving_children(two_processes.proc.pid)
    started = sorted(child.create_time() for child in children)
    assert sorted(_by_worker(text, "process_start_time_seconds")) == ["0", "1"]
    assert sorted(_by_worker(text, "process_start_time_seconds").values()) == pytest.approx(
        started, abs=0.05
    )
    for name, low in [("process_resident_memory_bytes", 50e6), ("process_cpu_seconds_total", 0.5),
                      ("process_open_fds", 5)]:  # fmt: skip
        values = _by_worker(text, name)
        assert sorted(values) == ["0", "1"] and min(values.values()) > low, (name, values)
    assert "python_gc_objects_collected_total" not in text  # only the answering process's


def _by_worker(text: str, name: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line.startswith(name + '{worker="'):
            labels, value = line.rsplit(" ", 1)
            values[labels.split('"')[1]] = float(value)
    return values


def _images_total(text: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith("imgserve_images_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_sigterm_stops_every_process_and_cleans_up(two_processes):
    children = serving_children(two_processes.proc.pid)
    directories = {Path(c.environ()["IMGSERVE_WORKER_DIR"]) for c in children}
    assert len(directories) == 1 and next(iter(directories)).is_dir()
    assert two_processes.stop() == 0
    assert not any(child.is_running() and child.status() != "zombie" for child in children)
    assert not next(iter(directories)).exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_the_store_load_stops_after_the_model_in_hand(
    start_service, served_store: Path, tmp_path: Path, workers: int
):
    """A stop must not wait for the whole store (one of large models can outlast a Kubernetes
    grace period); with ``WORKERS`` each process loads its store before it listens."""
    versions = 12
    store = digits_versions(served_store, tmp_path / "many_versions", versions)
    server = start_service(store=store, env={"WORKERS": str(workers)}, wait=None)
    deadline = time.monotonic() + 120
    while True:  # every process runs uvicorn (its signal handlers) and one has loaded a model
        log = server.log()
        if log.count("Started server process") == workers and "loaded model 'digits'" in log:
            break
        assert server.proc.poll() is None and time.monotonic() < deadline, log[-3000:]
        time.sleep(0.02)
    children = serving_children(server.proc.pid)
    # one process: uvicorn re-raises the SIGTERM it handled once it has shut down (-15)
    assert server.stop() in (0, -signal.SIGTERM)
    assert not any(child.is_running() and child.status() != "zombie" for child in children)
    log = server.log()
    loaded = log.count("loaded model 'digits'")
    skipped = log.count("the service shut down before this archive was loaded")
    # each process finishes the model it is loading, then skips the rest (one may be a model
    # or two ahead of the other); before, each of WORKERS loaded all twelve before it stopped
    assert 1 <= loaded <= 3 * workers and loaded + skipped == workers * versions, log[-3000:]
    assert "ready to listen" not in log


def test_a_process_that_dies_stops_the_service(two_processes):
    children = serving_children(two_processes.proc.pid)
    children[0].send_signal(signal.SIGKILL)
    assert two_processes.proc.wait(60) == 1
    deadline = time.monotonic() + 30
    while children[1].is_running() and children[1].status() != "zombie":
        assert time.monotonic() < deadline, "the other process kept running"
        time.sleep(0.1)
    assert "exited with -9; stopping the others" in two_processes.log()


def test_ready_once_every_sibling_listens(tmp_path: Path):
    """``/readyz`` of one process stays 503 while a sibling has not started listening."""
    import socket

    peers = Peers(index=0, count=3, directory=tmp_path, token="t" * 43, timeout_s=5)
    with socket.socket(socket.AF_UNIX) as one, socket.socket(socket.AF_UNIX) as two:
        one.bind(str(peers.socket_path(1)))
        one.listen()
        assert peers.not_listening() == [2]  # no socket file yet
        two.bind(str(peers.socket_path(2)))
        assert peers.not_listening() == [2]  # bound, not listening: its store is loading
        two.listen()
        assert peers.not_listening() == []


def test_a_sibling_that_refuses_is_a_500_naming_it(tmp_path: Path):
    """``Peers.forward`` against a real Unix-socket HTTP peer that answers 409."""
    peers = Peers(index=0, count=3, directory=tmp_path, token="t" * 43, timeout_s=5)
    seen: list[bytes] = []

    async def answer(status: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )  # fmt: skip
        seen.append(head + await reader.readexactly(length))
        body = b'{"detail":"digits-v2.mar is already registered (ready)"}'
        writer.write(f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        ok = await asyncio.start_unix_server(
            lambda r, w: answer("200 OK", r, w), str(peers.socket_path(1))
        )
        refusing = await asyncio.start_unix_server(
            lambda r, w: answer("409 Conflict", r, w), str(peers.socket_path(2))
        )
        async with ok, refusing:
            await peers.forward("POST", "/models", b'{"file":"digits-v2.mar"}', "Bearer k")

    with pytest.raises(SiblingFailed) as caught:
        asyncio.run(scenario())
    assert caught.value.status_code == 500
    assert caught.value.detail == (
        "POST /models was applied in service process 0, but process 2 answered 409: "
        "digits-v2.mar is already registered (ready)"
    )
    assert len(seen) == 2 and all(h.endswith(b'{"file":"digits-v2.mar"}') for h in seen)
    assert all(f"x-imgserve-worker-token: {'t' * 43}".encode() in h.lower() for h in seen)
    assert all(b"authorization: bearer k" in h.lower() for h in seen)
