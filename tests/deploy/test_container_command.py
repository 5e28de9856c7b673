"""What the container would run, run as a process: the Dockerfile's CMD with the Dockerfile's
ENV (paths that only exist in the image pointed at temporary folders, MODEL_STORE at a model
store holding a digits archive), on a free loopback port. It must turn ready, pass the image's
and compose's health checks, export the metrics the dashboard reads, and stop cleanly on SIGTERM.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import ROOT, find_tool, load_compose
from .test_compose import HISTOGRAMS, dashboard_metric_names
from .test_dockerfile import exec_form, image_env, runtime_stage

READY_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_env(store: Path, port: int, scratch: Path) -> dict[str, str]:
    """The image's ENV; what names a path inside the image is mapped to this machine."""
    env = image_env()
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, os.environ.get("PATH", "/usr/bin:/bin")])
    env["HOME"] = str(scratch / "home")
    for key, value in list(env.items()):
        if value.startswith("/tmp/"):
            env[key] = str(scratch / value.removeprefix("/tmp/"))
    env.update(MODEL_STORE=str(store), HOST="127.0.0.1", PORT=str(port))
    return env


def image_healthcheck() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK."""
    [args] = [a for k, a in runtime_stage() if k == "HEALTHCHECK"]
    return json.loads(args.split(" CMD ", 1)[1])


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`service` exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if get(f"{base}/readyz", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"/readyz not 200 after {READY_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def digit_png() -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(image).line([(16, 4), (16, 28)], fill=255, width=4)  # a "1"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def container(digits_store: Path, tmp_path: Path):
    """The CMD of the Dockerfile running with its ENV; yields (process, base URL, env, log)."""
    command = exec_form("CMD")
    executable = find_tool(command[0])
    if executable is None:
        pytest.skip(f"`{command[0]}` is not installed (pip install -e .)")
    port = free_port()
    env = container_env(digits_store, port, tmp_path)
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [executable, *command[1:]], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield proc, f"http://127.0.0.1:{port}", env, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.mark.slow
def test_container_command_turns_ready_and_stops_cleanly(container) -> None:
    proc, base, env, log = container
    wait_ready(proc, base, log)
    assert get(f"{base}/healthz")[0] == 200

    # The image's HEALTHCHECK command, as Docker would run it inside the container.
    assert subprocess.run(image_healthcheck(), env=env, timeout=30, check=False).returncode == 0
    # docker compose's healthcheck (/readyz), with the container port mapped to ours.
    compose_probe = load_compose(ROOT / "docker-compose.yml")["services"]["service"]["healthcheck"]
    argv = [
        a.replace("127.0.0.1:8000", f"127.0.0.1:{env['PORT']}") for a in compose_probe["test"][1:]
    ]
    assert subprocess.run(argv, env=env, timeout=30, check=False).returncode == 0

    # One prediction, then every metric the Grafana dashboard reads must be exported.
    request = urllib.request.Request(
        f"{base}/predict", data=digit_png(), headers={"Content-Type": "image/png"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    status, body = get(f"{base}/metrics")
    assert status == 200
    exported = body.decode()
    wanted = {
        name.rsplit("_", 1)[0] if name.rsplit("_", 1)[0] in HISTOGRAMS else name
        for name in dashboard_metric_names()
    }
    wanted = {n for n in wanted if "gpu_memory" not in n or "cuda" in exported}
    missing = sorted(n for n in wanted if f"# TYPE {n} " not in exported)
    assert not missing, f"dashboard metrics the service does not export: {missing}"
    promtool = find_tool("promtool")
    if promtool:  # Prometheus' own linter of the exposition format and naming conventions
        lint = subprocess.run(
            [promtool, "check", "metrics"], input=exported, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert lint.returncode == 0, lint.stdout + lint.stderr

    # SIGTERM (what `docker stop` and Kubernetes send) ends it cleanly, well within the grace.
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 45 s after SIGTERM:\n{log.read_text()[-4000:]}")
    # uvicorn drains, runs the lifespan shutdown, then re-raises the signal it caught: the exit
    # is 0 or "killed by SIGTERM" (-15 here, 143 from `docker stop` outside PID 1), never a crash.
    output = log.read_text()
    assert code in (0, -signal.SIGTERM), output[-4000:]
    assert "Application shutdown complete" in output, output[-4000:]
