"""Interop with TorchServe 0.12: our ``.mar`` archives are served by unmodified TorchServe.

Two levels:

- ``test_handler_*`` (no Java, ~10-30 s for one subprocess importing torch): the archive's own ``handler.py`` + ``mar_code/`` run in a
  separate Python process where the ``trainer`` package cannot be imported, with a stand-in for
  TorchServe's context, and must agree with our loading code.
- ``test_torchserve_*`` (slow): a real TorchServe (Java frontend + Python worker) on loopback
  serves the digits archive made by ``trainer fit``; every digits TEST image, sent as PNG bytes,
  must get the same top-1 as ``read_archive`` + ``load_model`` + ``EvalPreset`` give in-process.
  Skipped with the reason where TorchServe or Java is missing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from trainer.archive import ModelCard, load_model, read_archive, write_archive
from trainer.data.presets import EvalPreset, PreprocessSpec
from trainer.models import build_model

MODEL_NAME = "digits"
READY_TIMEOUT_S = 240.0  # JVM start + worker importing torch, on a busy 2-core machine
TS_INSTALL_HINT = "run scripts/torchserve_env.sh, or pip install 'torchserve==0.12.0'"


# ---------------------------------------------------------------------------------------------
# Inputs and our own reference predictions
# ---------------------------------------------------------------------------------------------


def digits_test_pngs() -> tuple[list[bytes], list[int]]:
    """The digits TEST split as PNG files: 8x8 grayscale, some upscaled, some saved as RGB."""
    from trainer.data.datasets import load_dataset

    with tempfile.TemporaryDirectory() as root:
        test = load_dataset("digits", data_root=root, download=False).test
    pngs, targets = [], []
    for index in range(len(test)):
        image_tensor, target = test[index]
        image = Image.fromarray(image_tensor[0].numpy())  # uint8 [H, W] -> mode L
        if index % 2:  # exercise the preset's down-scaling as well as up-scaling
            image = image.resize((24, 24), Image.Resampling.NEAREST)
        if index % 3 == 0:  # exercise the colour conversion to the card's mode
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
        targets.append(int(target))
    return pngs, targets


@dataclass
class Reference:
    """Our service's view of one image: probabilities after the card's temperature."""

    probs: torch.Tensor  # [N, K]

    @property
    def top1(self) -> list[int]:
        return self.probs.argmax(dim=1).tolist()

    def margin(self, index: int) -> float:
        top2 = self.probs[index].topk(2).values
        return float(top2[0] - top2[1])


def reference_predictions(archive_path: Path, pngs: list[bytes]) -> Reference:
    loaded = read_archive(archive_path)
    model = load_model(loaded)
    spec = loaded.card.preprocess_spec
    preset = EvalPreset(spec)
    batch = []
    for data in pngs:
        with Image.open(io.BytesIO(data)) as image:
            batch.append(preset(pil_to_tensor(image.convert(spec.color_mode))))
    with torch.inference_mode():
        logits = model(torch.stack(batch))
    return Reference(torch.softmax(logits / loaded.card.temperature, dim=1))


def compare(
    reference: Reference, answers: list[dict[str, Any]], labels: list[str]
) -> tuple[int, list[str]]:
    """Count top-1 agreements; list disagreements that are not float near-ties."""
    agree, problems = 0, []
    for index, answer in enumerate(answers):
        expected = reference.top1[index]
        if answer["class_id"] == expected:
            agree += 1
            confidence = float(reference.probs[index, expected])
            if abs(answer["confidence"] - confidence) > 1e-4:
                problems.append(f"image {index}: confidence {answer['confidence']} vs {confidence}")
            if answer["label"] != labels[expected]:
                problems.append(f"image {index}: label {answer['label']!r} vs {labels[expected]!r}")
        elif reference.margin(index) > 1e-4:
            problems.append(f"image {index}: top-1 {answer['class_id']} vs ours {expected}")
    return agree, problems


def check_answer_shape(answer: dict[str, Any], num_classes: int) -> None:
    assert set(answer) == {"label", "class_id", "confidence", "topk"}, answer
    topk = answer["topk"]
    assert len(topk) == min(5, num_classes)
    assert topk[0] == {k: answer[k] for k in ("label", "class_id", "confidence")}
    confidences = [entry["confidence"] for entry in topk]
    assert confidences == sorted(confidences, reverse=True)
    assert all(0.0 <= c <= 1.0 for c in confidences)


# ---------------------------------------------------------------------------------------------
# The archive's handler on its own (no TorchServe, no Java): fast, always runs
# ---------------------------------------------------------------------------------------------

DIGITS_SPEC = PreprocessSpec(input_size=(32, 32), color_mode="L", mean=(0.3057,), std=(0.3233,))
DIGITS_LABELS = [str(d) for d in range(10)]

_HANDLER_DRIVER = r"""
import json, sys
sys.modules["trainer"] = None  # the archive must not need our package: importing it fails
jobs = json.load(open(sys.argv[1]))
sys.path.insert(0, jobs[0]["model_dir"])
import handler

class Context:  # the parts of ts.context.Context a handler uses
    def __init__(self, model_dir):
        self.system_properties = {"model_dir": model_dir, "gpu_id": None, "batch_size": 8}
        self.statuses = {}
    def set_response_status(self, code=200, phrase="", idx=0):
        self.statuses[idx] = [code, phrase]

results = []
for number, job in enumerate(jobs):
    context = Context(job["model_dir"])
    entry = handler.handle if number == 0 else handler.CardHandler().handle
    try:
        entry(None, context)  # TorchServe's first call initialises
    except Exception as exc:
        results.append({"init_error": f"{type(exc).__name__}: {exc}"})
        continue
    requests = [
        {k: bytes.fromhex(v[4:]) if v.startswith("hex:") else v for k, v in row.items()}
        for row in job["requests"]
    ]
    answers = entry(requests, context)
    results.append({"answers": answers, "statuses": context.statuses})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def random_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits-shaped ResNet-20 archive with random weights (agreement needs no training)."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_chans=1, small_input=True).eval()
    card = ModelCard(
        name=MODEL_NAME, version="1", arch="resnet20", num_classes=10,
        labels=DIGITS_LABELS, in_chans=1, small_input=True,
        grayscale_policy="native", preprocess=DIGITS_SPEC.to_dict(), temperature=0.7,
    )  # fmt: skip
    return write_archive(card, model.state_dict(), tmp_path_factory.mktemp("random_store"))


@pytest.fixture(scope="module")
def digits_pngs() -> tuple[list[bytes], list[int]]:
    return digits_test_pngs()


def extract(archive: Path, target: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(target)
    return target


def run_handler_jobs(jobs: list[tuple[Path, list[dict[str, Any]]]], workdir: Path) -> list[Any]:
    """Run the archive's handler.py in a fresh interpreter (torch imports once for all jobs)."""
    encoded = [
        {
            "model_dir": str(model_dir),
            "requests": [
                {k: "hex:" + v.hex() if isinstance(v, bytes) else v for k, v in row.items()}
                for row in requests
            ],
        }
        for model_dir, requests in jobs
    ]
    jobs_path = workdir / "jobs.json"
    jobs_path.write_text(json.dumps(encoded))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", _HANDLER_DRIVER, str(jobs_path)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


BAD_INPUT_REQUESTS: list[dict[str, Any]] = [
    {"body": b"definitely not an image"},
    {"body": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40},  # PNG signature, broken content
    {"body": "not base64 !"},  # text bodies arrive decoded
    {},  # no image at all
]


@pytest.fixture(scope="module")
def handler_results(
    random_archive: Path, digits_pngs: tuple[list[bytes], list[int]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:  # fmt: skip
    pngs = digits_pngs[0][:48]
    workdir = tmp_path_factory.mktemp("handler")
    good = extract(random_archive, workdir / "good")
    tampered = extract(random_archive, workdir / "tampered")
    weights = tampered / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    # TorchServe hands a body over as bytearray under "body" (raw) or the form field's name.
    matching = [{"body" if i % 2 else "data": png} for i, png in enumerate(pngs)]
    mixed = [
        {"body": pngs[0]},
        *BAD_INPUT_REQUESTS,
        {"file": pngs[1], "k": "3"},  # a form upload under another field name, with k
        {"body": pngs[2], "k": "11"},  # k out of range
    ]
    matching_result, mixed_result, tampered_result = run_handler_jobs(
        [(good, matching), (good, mixed), (tampered, [])], workdir
    )
    return {"pngs": pngs, "matching": matching_result, "mixed": mixed_result,
            "tampered": tampered_result}  # fmt: skip


@pytest.mark.slow  # one fresh interpreter importing torch: 10-30 s
def test_handler_matches_our_loader_without_the_trainer_package(
    random_archive: Path, handler_results: dict[str, Any]
) -> None:
    pngs, result = handler_results["pngs"], handler_results["matching"]
    assert "init_error" not in result, result
    answers = result["answers"]
    assert result["statuses"] == {}
    assert len(answers) == len(pngs)
    for answer in answers:
        check_answer_shape(answer, 10)
    agree, problems = compare(reference_predictions(random_archive, pngs), answers, DIGITS_LABELS)
    assert not problems, problems[:10]
    assert agree >= 0.995 * len(pngs)


@pytest.mark.slow  # one fresh interpreter importing torch: 10-30 s
def test_handler_answers_bad_inputs_per_request(handler_results: dict[str, Any]) -> None:
    answers, statuses = handler_results["mixed"]["answers"], handler_results["mixed"]["statuses"]
    check_answer_shape(answers[0], 10)
    bad = list(range(1, len(BAD_INPUT_REQUESTS) + 1)) + [len(answers) - 1]
    for index in bad:
        assert statuses[str(index)][0] == 400, (index, statuses)
        assert set(answers[index]) == {"detail"} and answers[index]["detail"]
    assert set(statuses) == {str(index) for index in bad}
    assert len(answers[-2]["topk"]) == 3  # the form field k


@pytest.mark.slow  # one fresh interpreter importing torch: 10-30 s
def test_handler_refuses_weights_that_do_not_match_the_card(
    handler_results: dict[str, Any],
) -> None:
    assert "SHA-256" in handler_results["tampered"].get("init_error", ""), handler_results


def test_archive_carries_what_torchserve_needs(random_archive: Path) -> None:
    with zipfile.ZipFile(random_archive) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
        handler_source = zf.read("handler.py").decode()
    assert {"handler.py", "model-card.json", "weights.pt", "mar_code/presets.py"} <= names
    assert "mar_code/models/__init__.py" in names
    assert manifest["runtime"] == "python"
    model = manifest["model"]
    assert model["modelName"] == MODEL_NAME and model["handler"] == "handler.py"
    assert re.fullmatch(r"\d+\.0", model["modelVersion"])
    assert "modelFile" not in model  # no eager model file: the handler builds from the card
    assert "from trainer" not in handler_source and "import trainer" not in handler_source


# ---------------------------------------------------------------------------------------------
# A real TorchServe on loopback (slow; skipped where TorchServe or Java is missing)
# ---------------------------------------------------------------------------------------------


def _java_major() -> int | None:
    java = shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def torchserve_skip_reason() -> str | None:
    if find_spec("ts") is None or find_spec("psutil") is None:
        return f"TorchServe is not installed in this environment ({TS_INSTALL_HINT})"
    if not Path(sys.executable).with_name("torchserve").is_file():
        return f"the torchserve command is not next to {sys.executable} ({TS_INSTALL_HINT})"
    major = _java_major()
    if major is None:
        return (
            "Java is not installed (TorchServe's frontend needs Java 17: openjdk-17-jre-headless)"
        )
    if major < 11:
        return f"Java {major} is too old for TorchServe 0.12 (needs 17)"
    return None


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class TorchServe:
    """One TorchServe on loopback, with everything it writes kept in ``workdir``."""

    store: Path
    workdir: Path
    models: str = f"{MODEL_NAME}={MODEL_NAME}-v1.mar"
    ports: list[int] = field(default_factory=lambda: free_ports(5))
    members: list[Any] = field(default_factory=list)  # psutil.Process: frontend + workers

    @property
    def inference(self) -> str:
        return f"http://127.0.0.1:{self.ports[0]}"

    @property
    def management(self) -> str:
        return f"http://127.0.0.1:{self.ports[1]}"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    @property
    def env(self) -> dict[str, str]:
        tmp = self.workdir / "tmp"
        env = {k: v for k, v in os.environ.items() if k not in ("TS_CONFIG_FILE", "PYTHONPATH")}
        env.update(
            TEMP=str(tmp),  # java.io.tmpdir: extracted archives and the worker sockets
            TMPDIR=str(tmp),  # the CLI's pid file (.model_server.pid)
            LOG_LOCATION=str(self.logs),
            METRICS_LOCATION=str(self.logs),
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def config(self) -> Path:
        inference, management, metrics, grpc_inference, grpc_management = self.ports
        path = self.workdir / "config.properties"
        path.write_text(
            "\n".join(
                [
                    f"inference_address=http://127.0.0.1:{inference}",
                    f"management_address=http://127.0.0.1:{management}",
                    f"metrics_address=http://127.0.0.1:{metrics}",
                    "grpc_inference_address=127.0.0.1",
                    "grpc_management_address=127.0.0.1",
                    f"grpc_inference_port={grpc_inference}",
                    f"grpc_management_port={grpc_management}",
                    "default_workers_per_model=1",
                    "disable_token_authorization=true",
                    "enable_model_api=true",  # lets POST /models register archives
                    "disable_system_metrics=true",
                    "",
                ]
            )
        )
        return path

    def command(self, *args: str) -> str:
        """Run the ``torchserve`` CLI; its output (and the frontend's console) go to a file,
        since the Java process it starts inherits them and would hold a pipe open."""
        self.logs.mkdir(parents=True, exist_ok=True)
        out_path = self.logs / "torchserve.out"
        with out_path.open("ab") as out:
            start = out.tell()
            proc = subprocess.run(
                [str(Path(sys.executable).with_name("torchserve")), *args],
                cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, timeout=120,
                start_new_session=True,  # the frontend and its workers get their own group
            )  # fmt: skip
        with out_path.open("rb") as out:
            out.seek(start)
            text = out.read().decode("utf-8", "replace")
        assert proc.returncode == 0, f"torchserve {' '.join(args)} failed:\n{text}"
        return text

    def start(self) -> None:
        import psutil

        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        output = self.command(
            "--start", "--ncs", "--disable-token-auth", "--model-store", str(self.store),
            "--models", self.models, "--ts-config", str(self.config()),
        )  # fmt: skip
        pid_file = self.workdir / "tmp" / ".model_server.pid"
        assert pid_file.is_file(), f"torchserve wrote no pid file:\n{output}"
        frontend = psutil.Process(int(pid_file.read_text().split()[0]))
        self.members = [frontend]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self._remember_workers()
            if not frontend.is_running() or frontend.status() == psutil.STATUS_ZOMBIE:
                raise AssertionError(f"TorchServe exited while starting:\n{self.log_tail()}")
            if self.worker_status(MODEL_NAME) == "READY":
                self._remember_workers()
                return
            time.sleep(0.5)
        raise AssertionError(
            f"TorchServe not ready after {READY_TIMEOUT_S:.0f}s:\n{self.log_tail()}"
        )

    def _remember_workers(self) -> None:
        import psutil

        try:
            children = self.members[0].children(recursive=True)
        except psutil.Error:
            return
        known = {p.pid for p in self.members}
        self.members.extend(p for p in children if p.pid not in known)

    def worker_status(self, model: str) -> str | None:
        try:
            described = get_json(f"{self.management}/models/{model}", timeout=5)
        except (OSError, ValueError):
            return None
        workers = described[0].get("workers") or [{}]
        return workers[0].get("status")

    def stop(self) -> None:
        """``torchserve --stop``, then make sure no process of ours is left (by pid)."""
        import psutil

        if not self.members:
            return
        self._remember_workers()
        with contextlib.suppress(AssertionError, subprocess.SubprocessError):
            self.command("--stop")  # if it fails, the processes are killed by pid below
        _, alive = psutil.wait_procs(self.members, timeout=30)
        for process in alive:  # psutil checks the pid still names the same process
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(alive, timeout=10)
        assert not alive, f"TorchServe processes left running: {alive}"

    def batch_sizes(self, model: str) -> dict[int, int]:
        """How many batches of each size the worker ran (from TorchServe's model metrics log:
        one PredictionTime line per handler call, listing the batch's request ids)."""
        path = self.logs / "model_metrics.log"
        sizes: dict[int, int] = {}
        for line in path.read_text().splitlines() if path.is_file() else []:
            if "PredictionTime" in line and f"ModelName:{model}," in line:
                ids = re.search(r"requestID:([^|]*?),timestamp:", line)
                size = len(ids.group(1).split(",")) if ids else 0
                sizes[size] = sizes.get(size, 0) + 1
        return dict(sorted(sizes.items()))

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for name in ("torchserve.out", "ts_log.log", "model_log.log"):
            path = self.logs / name
            if path.is_file():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(parts) or "(no TorchServe logs)"


def get_json(url: str, timeout: float = 30) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def post(url: str, data: bytes, content_type: str = "image/png") -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, body.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def torchserve(request: pytest.FixtureRequest) -> Iterator[TorchServe]:
    reason = torchserve_skip_reason()
    if reason:
        pytest.skip(reason)
    digits_store = request.getfixturevalue("digits_store")  # trains only when we can serve
    # A short private directory: the worker's unix socket path lives in it (108-byte limit).
    workdir = Path(tempfile.mkdtemp(prefix="ts-"))
    server = TorchServe(store=digits_store, workdir=workdir)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def digits_inputs(
    digits_store: Path, digits_pngs: tuple[list[bytes], list[int]]
) -> tuple[list[bytes], list[int], Reference]:
    pngs, targets = digits_pngs
    return pngs, targets, reference_predictions(digits_store / f"{MODEL_NAME}-v1.mar", pngs)


@pytest.mark.slow
def test_torchserve_gives_our_top1_on_every_digits_test_image(
    torchserve: TorchServe, digits_inputs: tuple[list[bytes], list[int], Reference]
) -> None:
    pngs, targets, reference = digits_inputs
    answers = []
    for data in pngs:  # one request at a time: the --models registration has batch size 1
        status, answer = post(f"{torchserve.inference}/predictions/{MODEL_NAME}", data)
        assert status == 200, answer
        answers.append(answer)
    check_answer_shape(answers[0], 10)
    agree, problems = compare(reference, answers, DIGITS_LABELS)
    # Accuracy is the trainer's business (and half of these PNGs are re-scaled): only reported.
    hits = [a["class_id"] == t for a, t in zip(answers, targets, strict=True)]
    print(
        f"TorchServe top-1 agreement: {agree}/{len(pngs)}; accuracy {sum(hits) / len(hits):.3f}, "
        f"{sum(hits[::2]) / len(hits[::2]):.3f} on the images left at 8x8"
    )
    assert not problems, problems[:10]
    assert agree >= 0.995 * len(pngs), f"{agree}/{len(pngs)} agree"


@pytest.mark.slow
def test_torchserve_batching_registration_gives_the_same_answers(
    torchserve: TorchServe, digits_inputs: tuple[list[bytes], list[int], Reference]
) -> None:
    """The benchmark's registration: management API, batch_size 8, max_batch_delay 10 ms."""
    pngs, _, reference = digits_inputs
    name = f"{MODEL_NAME}_b8"
    status, answer = post(
        f"{torchserve.management}/models?url={MODEL_NAME}-v1.mar&model_name={name}"
        "&batch_size=8&max_batch_delay=10&initial_workers=1&synchronous=true",
        b"",
        content_type="application/x-www-form-urlencoded",
    )
    assert status == 200, answer
    described = get_json(f"{torchserve.management}/models/{name}")[0]
    assert described["batchSize"] == 8 and described["maxBatchDelay"] == 10, described

    def predict(data: bytes) -> dict[str, Any]:
        code, body = post(f"{torchserve.inference}/predictions/{name}", data)
        assert code == 200, body
        return body

    with ThreadPoolExecutor(max_workers=16) as pool:  # concurrent: batches actually form
        answers = list(pool.map(predict, pngs))
    agree, problems = compare(reference, answers, DIGITS_LABELS)
    sizes = torchserve.batch_sizes(name)
    print(f"TorchServe (batch 8) top-1 agreement: {agree}/{len(pngs)}; batch sizes {sizes}")
    assert not problems, problems[:10]
    assert agree >= 0.995 * len(pngs), f"{agree}/{len(pngs)} agree"
    assert sizes and max(sizes) > 1, f"no batch of more than one request formed: {sizes}"


@pytest.mark.slow
def test_torchserve_answers_a_bad_image_with_400(torchserve: TorchServe) -> None:
    status, answer = post(f"{torchserve.inference}/predictions/{MODEL_NAME}", b"not an image")
    assert status == 400, answer
    assert "image" in json.dumps(answer)
