"""Tools for making the service faster, measured: ``profile`` and ``compare``.

``python -m bench profile --model r18 --concurrency 32 --duration 15``
    starts the service, loads it with the load generator and records it with py-spy
    (``--format raw``: collapsed stacks of the non-idle threads); prints where the samples go
    (by thread, by pipeline stage, top functions) and keeps the stacks (and ``--svg``
    a flame graph) under ``bench/.cache/profiles``.

``python -m bench compare --model r20 --variant base: --variant t1:TORCH_THREADS=1 ...``
    measures variants of the service (settings, or ``TREE=DIR``: another copy of the
    ``service`` package, e.g. a snapshot from before a change) at a few load points, in
    alternating rounds so that the noise of a shared machine falls on every variant alike;
    prints the median per variant and point. ``--target limit`` compares LIMIT variants.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from . import archives, images, targets
from .config import CACHE, Timing, open_window
from .runner import Runner

# pipeline stages, matched innermost-first against "function (file...)" frames
STAGES: tuple[tuple[str, str], ...] = (
    ("forward: model", r"\(torch/nn/|forward \(.*service/inference\.py"),
    ("decode: simplejpeg", r"_decode_jpeg \(.*service/imaging\.py|simplejpeg"),
    ("decode: torchvision", r"decode_jpeg"),  # nvjpeg, on a GPU (service/gpu_preprocess.py)
    ("decode: Pillow", r"\(PIL/|_finish \(|_load \(.*imaging|to_tensor \(.*imaging"),
    ("decode: checks/headers", r"service/imaging\.py"),
    ("preprocess: EvalPreset", r"trainer/data/presets\.py|torchvision/transforms"),
    ("upload reading", r"service/uploads\.py|multipart"),
    ("batcher", r"service/batching\.py"),
    ("metrics", r"prometheus_client|service/metrics\.py"),
    ("response/JSON", r"orjson|responses\.py|render \("),
    ("routes", r"service/api/"),
    ("HTTP server", r"uvicorn|httptools|h11|starlette|fastapi|anyio"),
    ("event loop", r"asyncio|uvloop|selectors"),
    ("thread pool", r"concurrent/futures|threading\.py"),
)


def parse_raw(text: str) -> list[tuple[list[str], int]]:
    """py-spy ``--format raw`` lines ("frame;frame;... COUNT") -> (frames root first, count)."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in STAGES:
            if re.search(pattern, frame):
                return name
    return "other"


def _thread_of(frames: list[str]) -> str:
    """ "thread: NAME", or "process PID thread: NAME" where py-spy followed child processes
    (``--subprocesses``: a ``process PID:"cmd"`` frame per generation above the thread)."""
    if not frames or not frames[0].startswith(("thread", "process")):
        return "?"
    processes = [f for f in frames if f.startswith("process ")]
    thread = next((f for f in frames if f.startswith("thread")), frames[0])
    thread = re.sub(r"\s*\((0x)?[0-9a-f]+\)", "", thread)
    if len(processes) > 1:  # a child of the process py-spy was pointed at (WORKERS > 1)
        return f"{processes[-1].split(':')[0]} {thread}"
    return thread


def summarize_profile(stacks: list[tuple[list[str], int]]) -> dict[str, Any]:
    total = sum(count for _, count in stacks) or 1
    threads: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    by_thread_stage: dict[str, Counter[str]] = defaultdict(Counter)
    for frames, count in stacks:
        thread = _thread_of(frames)
        stage = stage_of(frames)
        threads[thread] += count
        stages[stage] += count
        by_thread_stage[thread][stage] += count
        leaves[re.sub(r":\d+\)$", ")", frames[-1])] += count

    def shares(counter: Counter[str], n: int = 15) -> list[tuple[str, float]]:
        return [(key, round(100 * value / total, 1)) for key, value in counter.most_common(n)]

    return {
        "samples": total,
        "threads": shares(threads),
        "stages": shares(stages),
        "top_functions": shares(leaves, 20),
        "thread_stages": {t: shares(c, 6) for t, c in by_thread_stage.items()},
    }


def profile(
    model: str,
    *,
    concurrency: int,
    duration_s: float,
    settings: dict[str, str],
    target: str = "service",
    svg: bool = False,
    rate: int = 97,
    loadgen_procs: int = 1,
) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    out_dir = CACHE / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    from .config import BenchConfig

    cfg = BenchConfig(
        models=(model,), targets=(target,), repeats=1, service_env=settings,
        loadgen_procs=loadgen_procs,
    )  # fmt: skip
    runner = Runner(cfg)
    archive = archives.ensure(archives.MODELS[model], CACHE)
    runner.image_set = images.ensure(None, CACHE)
    from trainer.archive import read_card

    card = read_card(archive)
    try:
        with runner._start(target, archive, card) as endpoint:  # noqa: SLF001
            runner.measure(endpoint, Timing(warmup_s=2.0, duration_s=2.0), mode="closed",
                           concurrency=concurrency)  # fmt: skip
            raw = out_dir / f"{model}-{target}-c{concurrency}-{stamp}.txt"
            # --subprocesses: with WORKERS > 1 the service's processes are children of this pid
            argv = [spy, "record", "--pid", str(endpoint.pids[0]), "--rate", str(rate),
                    "--duration", str(int(duration_s)), "--threads", "--nonblocking",
                    "--subprocesses"]  # fmt: skip
            outputs = [("raw", raw)] + ([("flamegraph", raw.with_suffix(".svg"))] if svg else [])
            spies = []
            for fmt, path in outputs:  # --nonblocking: several samplers can read one process
                spy_proc = subprocess.Popen(
                    [*argv, "--format", fmt, "-o", str(path)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                )  # fmt: skip
                runner.tracker.add(spy_proc.pid)
                spies.append(spy_proc)
            point = runner.measure(
                endpoint, Timing(warmup_s=0.5, duration_s=duration_s), mode="closed",
                concurrency=concurrency,
            )  # fmt: skip
            for spy_proc in spies:
                _, err = spy_proc.communicate(timeout=duration_s + 60)
                if spy_proc.returncode != 0:
                    raise RuntimeError(f"py-spy failed: {err.decode()[-1000:]}")
    finally:
        runner.tracker.kill_all()
    summary = summarize_profile(parse_raw(raw.read_text()))
    summary.update(raw=str(raw), point=point["median"], settings=settings, model=model,
                   concurrency=concurrency)  # fmt: skip
    raw.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def print_profile(summary: dict[str, Any]) -> None:
    m = summary["point"]
    print(f"{summary['model']} C={summary['concurrency']} {summary['settings'] or 'defaults'}: "
          f"{m['img_s']:.1f} img/s, p50 {m['p50_s'] * 1000:.0f} ms, p99 {m['p99_s'] * 1000:.0f} ms, "
          f"batch {m['mean_batch'] or 0:.1f}, server CPU {m['server_cpu_s']:.2f} s/window")  # fmt: skip
    print(f"py-spy samples (non-idle threads): {summary['samples']}  -> {summary['raw']}")
    for title, key in (
        ("by thread", "threads"),
        ("by stage", "stages"),
        ("top functions", "top_functions"),
    ):
        print(f"  {title}:")
        for name, share in summary[key]:
            print(f"    {share:5.1f}%  {name}")


# ---------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------


def parse_variant(text: str) -> tuple[str, dict[str, str], Path | None]:
    name, _, rest = text.partition(":")
    env: dict[str, str] = {}
    tree = None
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {name}: {item!r} is not KEY=VALUE")
        if key.upper() == "TREE":
            tree = Path(value).resolve()
        else:
            env[key.strip().upper()] = value.strip()
    return name or "variant", env, tree


def compare(
    model: str,
    variants: list[str],
    *,
    concurrency: tuple[int, ...],
    rounds: int,
    timing: Timing,
    target: str = "service",
    open_fraction: float | None = None,
    images_dir: Path | None = None,
    loadgen_procs: int = 1,
) -> dict[str, Any]:
    from trainer.archive import read_card

    from .config import BenchConfig

    parsed = [parse_variant(v) for v in variants]
    archive = archives.ensure(archives.MODELS[model], CACHE)
    read_card(archive)  # a readable card, before anything starts
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: defaultdict(list) for name, _, _ in parsed
    }
    runner = Runner(
        BenchConfig(models=(model,), targets=(target,), repeats=1, loadgen_procs=loadgen_procs)
    )
    runner.image_set = images.ensure(images_dir, CACHE)
    try:
        for round_index in range(rounds):
            order = parsed if round_index % 2 == 0 else list(reversed(parsed))
            for name, env, tree in order:
                if target == "limit":
                    _compare_limit(runner, model, archive, name, env, tree, timing, results)
                    continue
                logs = runner.logs / f"compare-{name}"
                with targets.service(name, archive, logs, runner.tracker, env, tree=tree) as ep:
                    capacity = 0.0
                    for c in concurrency:
                        point = runner.measure(ep, timing, mode="closed", concurrency=c)
                        results[name][f"C={c}"].append(point["median"])
                        capacity = max(capacity, point["median"]["req_s"] or 0.0)
                        runner.log(f"round {round_index + 1} {name} C={c}: "
                                   f"{point['median']['img_s']:.1f} img/s p50 "
                                   f"{(point['median']['p50_s'] or 0) * 1000:.1f} ms")  # fmt: skip
                    if open_fraction and capacity:
                        rate = capacity * open_fraction
                        point = runner.measure(ep, open_window(timing, rate), mode="open",
                                               rate=rate, max_connections=256)  # fmt: skip
                        results[name][f"open {open_fraction:.0%}"].append(point["median"])
                runner.tracker.kill_all()
    finally:
        runner.tracker.kill_all()
    table = {
        name: {
            point: {
                key: _median([m.get(key) for m in runs])
                for key in ("img_s", "p50_s", "p99_s", "mean_batch", "server_cpu_ms_per_req")
            }  # fmt: skip
            for point, runs in points.items()
        }
        for name, points in results.items()
    }
    out = {"model": model, "variants": variants, "rounds": rounds, "timing": vars(timing),
           "images": [str(p) for p in runner.image_set.files],
           "median": table, "runs": {k: dict(v) for k, v in results.items()}}  # fmt: skip
    path = CACHE / "compare" / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    out["path"] = str(path)
    return out


def _compare_limit(runner, model, archive, name, env, tree, timing, results) -> None:  # noqa: ANN001
    spec = {"archive": str(archive), "images": [str(p) for p in runner.image_set.files],
            "warmup_s": timing.warmup_s, "duration_s": timing.duration_s, "repeats": 1,
            "batch_sizes": [int(env.get("MAX_BATCH_SIZE", 16))], "single": True}  # fmt: skip
    path = runner._write_spec(f"limit-{name}", spec)  # noqa: SLF001
    full_env = targets.base_env(env)
    if tree is not None:
        full_env["PYTHONPATH"] = str(targets.ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.limit", str(path)], cwd=tree or targets.ROOT, env=full_env,
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    raw = json.loads(proc.stdout)
    for batch, data in raw["pipelined"].items():
        results[name][f"batch {batch}"].append({"img_s": data["windows"][0]["img_s"]})
    single = raw["single"]["windows"][0]
    results[name]["single"].append({"img_s": single["img_s"], "p50_s": single["p50_s"]})
    runner.log(f"{name}: limit {raw['pipelined']} single p50 {single['p50_s'] * 1000:.1f} ms")


def _median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def print_compare(out: dict[str, Any]) -> None:
    print(f"{out['model']}: {out['rounds']} alternating rounds, medians ({out['path']})")
    for name, points in out["median"].items():
        for point, m in points.items():
            cells = []
            for key, label, scale in (("img_s", "img/s", 1), ("p50_s", "p50 ms", 1000),
                                      ("p99_s", "p99 ms", 1000), ("mean_batch", "batch", 1),
                                      ("server_cpu_ms_per_req", "CPU ms/req", 1)):  # fmt: skip
                if m.get(key) is not None:
                    cells.append(f"{label} {m[key] * scale:.1f}")
            print(f"  {name:>14} {point:>9}: {', '.join(cells)}")
