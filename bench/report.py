"""Machine and version facts, the T1-T8 ratios, and the JSON + markdown outputs of a run."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import MAX_OPEN_LOOP_WINDOW_S, MIN_OPEN_LOOP_ANSWERS
from .limit import parse_config_key

PACKAGES = (
    "torch", "torchvision", "numpy", "pillow", "fastapi", "starlette", "uvicorn", "uvloop",
    "httptools", "orjson", "python-multipart", "pydantic", "torchserve", "psutil",
)  # fmt: skip


def describe_batch(key: str) -> str:
    """A LIMIT configuration's key (``bench.limit.config_key``) in words."""
    batch, threads, decode_on_forward = parse_config_key(key)
    text = f"{batch} x {threads} forward threads" if threads > 1 else str(batch)
    return text + (" decoding their own images" if decode_on_forward else "")


TS_CONFIGS = ("torchserve-1w", "torchserve-1w-omp1", "torchserve-2w")


# ---------------------------------------------------------------------------------------------
# facts
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def machine() -> dict[str, Any]:
    import psutil

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "usable_cores": affinity,
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpu_names(),
        "platform": platform.platform(),
    }


def java_version() -> str | None:
    java = shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stderr or out.stdout).strip().splitlines()
    return text[0] if text else None


def versions() -> dict[str, Any]:
    found: dict[str, Any] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["java"] = java_version()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parents[1], check=False,
        )  # fmt: skip
        found["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        found["git_commit"] = None
    return found


def service_defaults(overrides: dict[str, str]) -> dict[str, Any]:
    """The settings the 'service' target runs with (defaults + overrides), as it computes them."""
    from pydantic import ValidationError

    from service.allocator import find_tcmalloc
    from service.settings import Settings

    values = {k.lower(): v for k, v in overrides.items()}
    try:
        settings = Settings(**values)
    except ValidationError:  # e.g. DEVICE=cuda shown by --dry-run on a machine without CUDA
        settings = Settings(**{k: v for k, v in values.items() if k != "device"})
        settings = settings.model_copy(update={"device": values.get("device", "auto")})
    return {
        "MAX_BATCH_SIZE": settings.max_batch_size,
        "MAX_BATCH_DELAY_MS": settings.max_batch_delay_ms,
        "TORCH_THREADS": settings.threads,
        "INFERENCE_WORKERS": settings.forward_workers,
        "HELPER_BACKLOG": settings.helper_backlog,
        "FOLD_BATCHNORM": settings.fold_batchnorm,
        "TORCHSCRIPT": settings.torchscript,
        "PREPROCESS_THREADS": settings.pool_threads,
        "CHANNELS_LAST": "on (default)"
        if settings.channels_last is None
        else settings.channels_last,
        "PRECISION": settings.precision,
        "DEVICE": settings.device,
        "MAX_QUEUE": settings.max_queue,
        "WORKERS": settings.workers,
        "MALLOC": settings.malloc
        + ("" if settings.malloc == "system" else f" ({find_tcmalloc() or 'not installed'})"),
    }


# ---------------------------------------------------------------------------------------------
# ratios
# ---------------------------------------------------------------------------------------------


def closed_point(models: dict[str, Any], model: str, target: str, c: int) -> dict | None:
    data = models.get(model, {}).get("targets", {}).get(target, {})
    for point in data.get("points", []):
        if point["mode"] == "closed" and point["concurrency"] == c:
            return point["median"]
    return None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def limit_figures(data: dict[str, Any]) -> dict[str, Any]:
    """The LIMIT that the service of one model is compared with.

    With ``limit_after`` (measured again right after the service) the mean of both runs, so a
    host that drifted while the service was measured shifts both sides alike; each run's own
    figure is kept (``img_s_runs``, ``single_p50_runs``) so the drift shows in the report.
    """
    runs = [r for r in (data.get("limit"), data.get("limit_after")) if r and "img_s" in r]
    single = [r.get("single", {}).get("p50_s") for r in runs]
    return {
        "img_s": _mean([r["img_s"] for r in runs]),
        "single_p50_s": _mean(single),
        "cpu_s_per_img": _mean([limit_cpu_per_image(r) for r in runs]),
        "img_s_runs": [r["img_s"] for r in runs],
        "single_p50_runs": single,
    }


def _complete_rounds(paired: dict[str, Any], other: str) -> list[dict[str, Any]]:
    """The rounds that measured both sides (a failed start loses one side: not counted)."""
    return [r for r in paired.get("rounds", []) if "service" in r and other in r]


def _median_ratio(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return statistics.median(values) if values else None


def paired_figures(data: dict[str, Any]) -> dict[str, Any] | None:
    """The median per-round ratios of the paired rounds (``Runner.run_paired``), or None.

    ``throughput``: service img/s at C=32 / LIMIT img/s at its best configuration;
    ``latency``: service p50 at C=1 / in-process single-image p50; each side of a ratio was
    measured within a minute of the other. ``floor_job``: the floor app's C=1 p50 around an
    off-loop job of the single-image p50 / that p50 (T6's bound; None in older results).
    """
    paired = data.get("paired") or {}
    rounds = _complete_rounds(paired, "limit")
    if not rounds:
        return None
    c = paired.get("concurrency", 32)
    return {
        "config": paired.get("config"),
        "concurrency": c,
        "warmup_s": paired.get("warmup_s"),  # None in results of runs before commit 55216d6
        "throughput": _median_ratio(rounds, "throughput_ratio"),
        "latency": _median_ratio(rounds, "latency_ratio"),
        "rounds": rounds,
        "service_img_s": [r["service"][f"c{c}"]["img_s"] for r in rounds],
        "limit_img_s": [r["limit"]["img_s"] for r in rounds],
        "service_p50_s": [r["service"]["c1"]["p50_s"] for r in rounds],
        "single_p50_s": [r["limit"]["single_p50_s"] for r in rounds],
        "floor_job": _median_ratio(rounds, "floor_job_ratio"),
        "floor_job_p50_s": [(r.get("floor_job") or {}).get("p50_s") for r in rounds],
    }


def _after_warmup(warmup_s: float | None) -> str:
    return "" if warmup_s is None else f" after a warm-up of {warmup_s:g} s (at least)"


def paired_peer_figures(data: dict[str, Any]) -> dict[str, Any] | None:
    """The median per-round ratios of the service and its peer (``Runner.run_paired_peer``).

    ``throughput``: service img/s / peer img/s at C=32; ``p99``: service p99 / peer p99;
    both sides of a round were measured within a minute of each other.
    """
    paired = data.get("paired-peer") or {}
    rounds = _complete_rounds(paired, "peer")
    if not rounds:
        return None
    return {
        "peer": paired.get("peer"),
        "warmup_s": paired.get("warmup_s"),
        "throughput": _median_ratio(rounds, "throughput_ratio"),
        "p99": _median_ratio(rounds, "p99_ratio"),
        "rounds": rounds,
        "throughput_pairs": _pairs([r["service"]["img_s"] for r in rounds],
                                   [r["peer"]["img_s"] for r in rounds]),
        "p99_pairs": _pairs([r["service"]["p99_s"] for r in rounds],
                            [r["peer"]["p99_s"] for r in rounds], 1000, 0),
    }  # fmt: skip


def _paired_throughput(paired: dict[str, Any] | None) -> tuple[float | None, str]:
    if paired is None:
        return None, ""
    return paired["throughput"], (
        f"service / LIMIT {paired['config']}: "
        f"{_pairs(paired['service_img_s'], paired['limit_img_s'])} img/s"
    )


def _paired_latency(paired: dict[str, Any] | None) -> tuple[float | None, str]:
    if paired is None:
        return None, ""
    return paired["latency"], (
        "service C=1 p50 / single: "
        f"{_pairs(paired['service_p50_s'], paired['single_p50_s'], 1000, 2)} ms"
    )


def _pairs(
    ours: list[float | None], theirs: list[float | None], scale: float = 1.0, digits: int = 1
) -> str:
    return ", ".join(
        f"{fmt(a, scale, digits)}/{fmt(b, scale, digits)}"
        for a, b in zip(ours, theirs, strict=True)
    )


def _prefer_paired(
    value: float | None, detail: str, paired: float | None, pairs: str
) -> tuple[float | None, str]:
    """The paired rounds' median ratio where measured (both sides within a minute of each
    other), with the full table's ratio kept in the detail; else the full table's."""
    if paired is None:
        return value, detail
    return (
        paired,
        f"paired rounds, {pairs} -> median ratio; full table {detail} = {fmt(value, 1, 2)}",
    )


def _limit_note(runs: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    if len(runs) < 2:
        return ""
    return f" (LIMIT before/after the service {fmt(runs[0], scale, digits)}/{fmt(runs[1], scale, digits)})"


def open_point_whole(
    models: dict[str, Any], model: str, target: str, fraction: float
) -> dict | None:
    """The open-loop point at ``fraction`` with its rate and windows (``open_point``: medians)."""
    data = models.get(model, {}).get("targets", {}).get(target, {})
    for point in data.get("points", []):
        if point["mode"] == "open" and abs(point.get("fraction", 0) - fraction) < 1e-9:
            return point
    return None


def open_point(models: dict[str, Any], model: str, target: str, fraction: float) -> dict | None:
    point = open_point_whole(models, model, target, fraction)
    return point["median"] if point else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _meets(value: float, op: str, threshold: float) -> bool:
    return value >= threshold if op == ">=" else value <= threshold


def _entry(
    tid: str, model: str, what: str, value: float | None, op: str, threshold: float, detail: str
) -> dict[str, Any]:
    passed = None if value is None else _meets(value, op, threshold)
    return {"id": tid, "model": model, "what": what, "value": value, "op": op,
            "threshold": threshold, "pass": passed, "detail": detail}  # fmt: skip


def best_torchserve(models: dict[str, Any], model: str, c: int) -> tuple[str, dict] | None:
    """The TorchServe configuration with the most img/s at concurrency ``c``."""
    found = [(name, closed_point(models, model, name, c)) for name in TS_CONFIGS]
    found = [(name, point) for name, point in found if point and point.get("img_s")]
    return max(found, key=lambda item: item[1]["img_s"]) if found else None


def closed_loop_p99_bound(
    models: dict[str, Any], model: str, c: int, peer_p99_s: float | None
) -> dict[str, float] | None:
    """The lowest p99 / peer p99 any server no faster than ``model``'s LIMIT could show at C=c.

    In a closed loop every client waits for its answer before sending again, so the mean
    latency is C / throughput (Little's law), and a p99 is at least the mean. A service at
    the LIMIT's img/s with no tail at all (p99 = mean) still has p99 >= C / LIMIT: when that
    exceeds 0.60 of TorchServe's p99, T3 needs a faster pipeline, not a better scheduler.
    """
    limit_img_s = limit_figures(models.get(model, {}))["img_s"]
    if not limit_img_s or not peer_p99_s:
        return None
    latency_s = c / limit_img_s
    return {"limit_img_s": limit_img_s, "latency_s": latency_s, "ratio": latency_s / peer_p99_s}


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def ratios(models: dict[str, Any], c: int = 32) -> list[dict[str, Any]]:
    out = []

    def service_vs_limit(tid: str, model: str, threshold: float) -> None:
        service = closed_point(models, model, "service", c)
        limit = limit_figures(models.get(model, {}))
        value, detail = _prefer_paired(
            ratio(service and service["img_s"], limit["img_s"]),
            f"{fmt(service and service['img_s'])} / {fmt(limit['img_s'])} img/s"
            + _limit_note(limit["img_s_runs"]),
            *_paired_throughput(paired_figures(models.get(model, {}))),
        )
        out.append(_entry(
            tid, model, f"C={c}: service img/s / LIMIT img/s", value, ">=", threshold, detail,
        ))  # fmt: skip

    svc18 = closed_point(models, "r18", "service", c)
    service_vs_limit("T1", "r18", 0.90)
    best = best_torchserve(models, "r18", c)
    ts_name, ts = best if best else ("torchserve", None)
    peer = paired_peer_figures(models.get("r18", {}))
    value, detail = _prefer_paired(
        ratio(svc18 and svc18["img_s"], ts and ts["img_s"]),
        f"{fmt(svc18 and svc18['img_s'])} / {fmt(ts and ts['img_s'])} img/s ({ts_name})",
        *((peer["throughput"], f"service / {peer['peer']}: {peer['throughput_pairs']} img/s")
          if peer else (None, "")),
    )  # fmt: skip
    out.append(_entry(
        "T2", "r18", f"C={c}: service img/s / best TorchServe img/s", value, ">=", 1.40, detail,
    ))  # fmt: skip
    value, detail = _prefer_paired(
        ratio(svc18 and svc18["p99_s"], ts and ts["p99_s"]),
        f"{fmt(svc18 and svc18['p99_s'], 1000, 0)} / {fmt(ts and ts['p99_s'], 1000, 0)} ms ({ts_name})",
        *((peer["p99"], f"service / {peer['peer']} p99: {peer['p99_pairs']} ms")
          if peer else (None, "")),
    )  # fmt: skip
    t3 = _entry("T3", "r18", f"C={c}: service p99 / best TorchServe p99", value, "<=", 0.60, detail)
    bound = closed_loop_p99_bound(models, "r18", c, ts and ts["p99_s"])
    if bound is not None:
        t3["bound"] = bound["ratio"]
        t3["detail"] += (
            f"; at the LIMIT with no tail at all: {c} / {bound['limit_img_s']:.1f} img/s = "
            f"{bound['latency_s'] * 1000:.0f} ms -> {bound['ratio']:.2f}"
        )
    out.append(t3)
    svc20 = closed_point(models, "r20", "service", c)
    naive20 = closed_point(models, "r20", "naive", c)
    service_vs_limit("T4", "r20", 0.85)
    out.append(_entry(
        "T5", "r20", f"C={c}: service img/s / naive FastAPI img/s",
        ratio(svc20 and svc20["img_s"], naive20 and naive20["img_s"]), ">=", 2.0,
        f"{fmt(svc20 and svc20['img_s'])} / {fmt(naive20 and naive20['img_s'])} img/s",
    ))  # fmt: skip
    for model in models:
        one = closed_point(models, model, "service", 1)
        limit = limit_figures(models[model])
        single = limit["single_p50_s"]
        paired = paired_figures(models[model])
        value, detail = _prefer_paired(
            ratio(one and one["p50_s"], single),
            f"{fmt(one and one['p50_s'], 1000, 2)} / {fmt(single, 1000, 2)} ms"
            + _limit_note(limit["single_p50_runs"], 1000, 2),
            *_paired_latency(paired),
        )
        t6 = _entry("T6", model, "C=1: service p50 / in-process single-image latency",
                    value, "<=", 1.15, detail)  # fmt: skip
        floor = floor_point(models, 1)
        if paired and paired["floor_job"] is not None:
            # the same work as the single image, handed to a thread by a bare FastAPI app
            t6["bound"] = paired["floor_job"]
            t6["detail"] += (
                "; a bare FastAPI app around an off-loop CPU job of the single-image p50: "
                f"{_pairs(paired['floor_job_p50_s'], paired['single_p50_s'], 1000, 2)} ms "
                f"-> {t6['bound']:.2f}"
            )
        elif floor and floor.get("p50_s") and single:
            # a service that added nothing but a minimal FastAPI round trip to the pipeline
            t6["bound"] = (single + floor["p50_s"]) / single
            t6["detail"] += (
                f"; the HTTP floor's C=1 p50 ({floor['p50_s'] * 1000:.2f} ms) alone on top of "
                f"the in-process latency -> {t6['bound']:.2f}"
            )
        out.append(t6)
    service_vs_limit("T7", "r50", 0.90)
    for model in models:
        point = open_point(models, model, "service", 0.9)
        tail = point and point.get("p99_over_p50")
        if tail is None:  # results written before the per-window ratio existed
            tail = ratio(point and point["p99_s"], point and point["p50_s"])
        windows = ", ".join(f"{t:.2f}" for t in (point or {}).get("p99_over_p50_windows", []))
        entry = _entry(
            "T8", model, "open loop at 90% of capacity: service p99 / p50 (median of windows)",
            tail, "<=", 3.0,
            f"windows {windows or '-'}; medians p99 {fmt(point and point['p99_s'], 1000, 1)}"
            f" / p50 {fmt(point and point['p50_s'], 1000, 1)} ms",
        )  # fmt: skip
        service = models.get(model, {}).get("targets", {}).get("service", {})
        if service.get("capacity_probes"):
            entry["detail"] += (
                f"; capacity {service['capacity_req_s']:.1f} req/s (open-loop probe; closed-loop "
                f"best {service['closed_capacity_req_s']:.1f})"
            )
        past = overloaded(models, model, 0.9)
        if past is not None:  # a queue that only grows has p99 ~ p50: no pass for that
            entry.update({"pass": None, "verdict": "not valid: overloaded"})
            entry["detail"] += f"; overloaded ({past}): the rate was past this run's capacity"
        out.append(entry)
    return out


OVERLOAD_SERVED = 0.97  # an open-loop point that served less than this share of its rate...
OVERLOAD_P50 = 10.0  # ...or whose p50 was this many times the C=1 p50 was past capacity


def overloaded(models: dict[str, Any], model: str, fraction: float) -> str | None:
    """Why the service's open-loop point at ``fraction`` was past capacity, or None.

    The rate is a fraction of the best closed-loop throughput measured minutes earlier; when
    the host slowed meanwhile (or the open loop's extra connections cost more), the queue
    grows for the whole point and every request waits about as long as the others, so
    p99 / p50 comes out near 1 and says nothing about the tail.
    """
    point = open_point_whole(models, model, "service", fraction)
    if point is None:
        return None
    one = closed_point(models, model, "service", 1)
    return overload_reason(point["median"], point.get("rate"), one and one.get("p50_s"))


def overload_reason(
    median: dict[str, Any], rate: float | None, c1_p50_s: float | None
) -> str | None:
    """Why an open-loop window at ``rate`` req/s was past capacity (``median``: its figures)."""
    served = median.get("req_s")
    if rate and served is not None and served < OVERLOAD_SERVED * rate:
        return f"served {served:.1f} of {rate:.1f} req/s"
    p50 = median.get("p50_s")
    if c1_p50_s and p50 and p50 > OVERLOAD_P50 * c1_p50_s:
        return f"p50 {p50 * 1000:.0f} ms, {p50 / c1_p50_s:.0f}x the C=1 p50"
    return None


def floor_point(models: dict[str, Any], c: int) -> dict[str, Any] | None:
    """The http-floor target's closed-loop point at ``c`` (measured with one model's load)."""
    for model in models:
        point = closed_point(models, model, "http-floor", c)
        if point is not None:
            return point
    return None


def limit_cpu_per_image(limit: dict[str, Any]) -> float | None:
    """CPU seconds per image of the LIMIT's best configuration (all its threads together)."""
    best = limit.get(f"batch_{limit.get('best_batch')}", {})
    windows = best.get("windows") or []
    images = sum(w.get("images", 0) for w in windows)
    return sum(w["cpu_s"] for w in windows) / images if images else None


def ceilings(models: dict[str, Any], cores: int, c: int = 32) -> list[dict[str, Any]]:
    """How close any FastAPI service could come to each LIMIT on these cores.

    A service must spend, per image, at least the LIMIT's CPU plus what the http-floor app
    (read the body, answer a small JSON) and the load generator cost per request on the same
    cores. Throughput then cannot exceed ``cores / (limit + floor + loadgen)``.
    """
    floor = floor_point(models, c)
    if floor is None or not floor.get("req_s") or floor.get("server_cpu_ms_per_req") is None:
        return []
    loadgen_per_request = (floor.get("loadgen_cpu_s") or 0.0) / (
        floor["req_s"] * _window_s(models, "http-floor")
    )
    per_request = floor["server_cpu_ms_per_req"] / 1000 + loadgen_per_request
    out = []
    for model, data in models.items():
        limit = limit_figures(data)
        limit_cpu, limit_img_s = limit["cpu_s_per_img"], limit["img_s"]
        if not limit_cpu or not limit_img_s:
            continue
        ceiling_img_s = min(limit_img_s, cores / (limit_cpu + per_request))
        out.append({
            "model": model, "c": c, "limit_img_s": limit_img_s,
            "limit_cpu_ms_per_img": 1000 * limit_cpu, "floor_cpu_ms_per_req": 1000 * per_request,
            "floor_req_s": floor["req_s"], "ceiling_img_s": ceiling_img_s,
            "ceiling_ratio": ceiling_img_s / limit_img_s,
        })  # fmt: skip
    return out


def _window_s(models: dict[str, Any], target: str) -> float:
    """The window length of ``target``'s points (CPU seconds are per window)."""
    for data in models.values():
        if target in data.get("targets", {}):
            return float(data.get("timing", {}).get("duration_s") or 1.0)
    return 1.0


def ceiling_table(entries: list[dict[str, Any]]) -> list[str]:
    if not entries:
        return []
    first = entries[0]
    lines = [
        f"#### Ceiling for any FastAPI service (HTTP floor at C={first['c']}: "
        f"{first['floor_req_s']:.0f} req/s, {first['floor_cpu_ms_per_req']:.2f} CPU ms per "
        "request, server + load generator)",
        "",
        "| model | LIMIT img/s | LIMIT CPU ms/img | ceiling img/s | ceiling / LIMIT |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in entries:
        lines.append(
            f"| {e['model']} | {e['limit_img_s']:.1f} | {e['limit_cpu_ms_per_img']:.2f} | "
            f"{e['ceiling_img_s']:.1f} | {e['ceiling_ratio']:.2f} |"
        )
    lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "machine"


def write_json(result: dict[str, Any], results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    meta = result["meta"]
    name = f"{meta['date_file']}-{slug(meta['machine']['hostname'])}"
    if meta.get("label") not in (None, "full"):
        name += f"-{meta['label']}"
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)
    return path


def _row(target: str, point: dict[str, Any], duration: float) -> str:
    m = point["median"]
    if point["mode"] == "closed":
        load = f"C={point['concurrency']}"
    else:
        window_s = point.get("duration_s") or duration
        # a window lengthened to hold enough answers for a p99 (``config.open_window``)
        longer = f", {window_s:.0f} s windows" if abs(window_s - duration) > 0.05 else ""
        load = f"open {point.get('fraction', 0) * 100:.0f}% ({point['rate']:.1f}/s{longer})"
    errors = f"{m['error_count']:.0f}" if m["error_count"] else "0"
    if m.get("errors"):
        errors += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(m["errors"].items())) + ")"
    if m.get("retried"):  # idle keep-alive connections the server had closed: sent again
        errors += f" (retried on a new connection: {m['retried']})"
    cells = [
        target, load, fmt(m["req_s"]), fmt(m["img_s"]), fmt(m["p50_s"], 1000),
        fmt(m["p95_s"], 1000), fmt(m["p99_s"], 1000), fmt(m["max_s"], 1000), errors,
        fmt(m["mean_batch"], 1, 2), fmt(m["server_cpu_s"], 1, 2),
        fmt(m["server_cpu_ms_per_req"], 1, 2), fmt(m["loadgen_cpu_s"], 1, 2),
    ]  # fmt: skip
    if point.get("gpu"):
        cells.append(fmt(point["gpu"].get("util_mean_pct"), 1, 0))
    return "| " + " | ".join(cells) + " |"


def paired_tables(data: dict[str, Any]) -> list[str]:
    """The per-round tables of the paired rounds (LIMIT, and the peer), or what stopped them."""
    lines: list[str] = []
    paired = paired_figures(data)
    if paired is not None:
        c = paired["concurrency"]
        lines += [
            f"Paired rounds (T1/T4/T6/T7): the LIMIT at {describe_batch(paired['config'])} and a "
            f"fresh service at C=1 and C={c}, back to back, one window each"
            f"{_after_warmup(paired['warmup_s'])}:",
            "",
            f"| round | order | service C={c} img/s | LIMIT img/s | ratio | service C=1 p50 ms "
            "| single p50 ms | ratio | floor + job p50 ms | ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for index, r in enumerate(paired["rounds"], 1):
            lines.append(
                f"| {index} | {' then '.join(r['order'])} | {fmt(r['service'][f'c{c}']['img_s'])}"
                f" | {fmt(r['limit']['img_s'])} | {fmt(r.get('throughput_ratio'), 1, 2)} | "
                f"{fmt(r['service']['c1']['p50_s'], 1000, 2)} | "
                f"{fmt(r['limit']['single_p50_s'], 1000, 2)} | "
                f"{fmt(r.get('latency_ratio'), 1, 2)} | "
                f"{fmt((r.get('floor_job') or {}).get('p50_s'), 1000, 2)} | "
                f"{fmt(r.get('floor_job_ratio'), 1, 2)} |"
            )
        if paired["floor_job"] is not None:
            lines += [
                "",
                "floor + job: bench/floor_app.py's `/predict-job` at C=1, a bare FastAPI app that "
                "hands a GIL-free CPU job of the round's single-image p50 to a thread (T6's "
                "bound: what the service's C=1 p50 cannot go below on this stack).",
            ]
        lines.append("")
    elif data.get("paired"):
        failed = data["paired"]
        lines += [f"Paired rounds: {failed.get('error') or failed.get('skipped') or 'none'}", ""]
    peer = paired_peer_figures(data)
    if peer is not None:
        lines += [
            f"Paired peer rounds (T2/T3): a fresh service and a fresh {peer['peer']} at C=32, "
            f"back to back, one window each{_after_warmup(peer['warmup_s'])}:",
            "",
            "| round | order | service img/s | peer img/s | ratio | service p99 ms | peer p99 ms "
            "| ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for index, r in enumerate(peer["rounds"], 1):
            lines.append(
                f"| {index} | {' then '.join(r['order'])} | {fmt(r['service']['img_s'])} | "
                f"{fmt(r['peer']['img_s'])} | {fmt(r.get('throughput_ratio'), 1, 2)} | "
                f"{fmt(r['service']['p99_s'], 1000, 0)} | {fmt(r['peer']['p99_s'], 1000, 0)} | "
                f"{fmt(r.get('p99_ratio'), 1, 2)} |"
            )
        lines.append("")
    elif data.get("paired-peer"):
        failed = data["paired-peer"]
        lines += [f"Paired peer rounds: {failed.get('error') or 'none'}", ""]
    return lines


def capacity_lines(data: dict[str, Any]) -> list[str]:
    """How the open-loop capacity was found: the probes below the closed loop's best."""
    lines = []
    for target, result in data.get("targets", {}).items():
        probes = result.get("capacity_probes")
        if not probes:
            continue
        tried = "; ".join(
            f"{p['fraction']:.0%} ({p['rate']:.1f}/s): served {fmt(p['median'].get('req_s'))}, "
            f"p50 {fmt(p['median'].get('p50_s'), 1000, 0)} ms"
            + (f", past capacity ({p['overloaded']})" if p.get("overloaded") else ", sustained")
            for p in probes
        )  # fmt: skip
        lines += [
            f"Open-loop capacity of {target}: one window at fractions of its best closed-loop "
            f"{result['closed_capacity_req_s']:.1f} req/s until one is sustained: {tried}. "
            f"Capacity {result['capacity_req_s']:.1f} req/s; the open-loop points are "
            "fractions of it.",
            "",
        ]
    return lines


def model_table(key: str, data: dict[str, Any], gpu: bool) -> list[str]:
    timing = data.get("timing", {})
    duration = float(timing.get("duration_s", 0))
    lines = [
        f"### {data.get('label', key)}: `{data.get('archive')}` "
        f"({data.get('color_mode')}, {data.get('resize_mode')} to {data.get('input_size')})",
        "",
    ]
    limit = data.get("limit")
    if limit and "img_s" in limit:
        batches = "; ".join(
            f"batch {describe_batch(k.removeprefix('batch_'))}: {v['img_s']:.1f} img/s"
            for k, v in limit.items() if k.startswith("batch_")
        )  # fmt: skip
        single = limit.get("single", {})
        lines.append(
            f"LIMIT (in-process, no HTTP; {limit['settings'].get('torch_threads')} torch "
            f"thread(s), {limit['settings'].get('preprocess_threads')} decode threads, "
            f"{limit['settings'].get('allocator', 'system')} allocator): "
            f"{batches}; best {limit.get('img_s', 0):.1f} img/s; "
            f"single image p50 {fmt(single.get('p50_s'), 1000, 2)} ms "
            f"({fmt(single.get('img_s'))} img/s on one thread)."
        )
        lines.append("")
    elif limit:
        lines += [f"LIMIT: {limit.get('error') or limit.get('skipped')}", ""]
    after = data.get("limit_after")
    if after and "img_s" in after and limit and "img_s" in limit:
        drift = after["img_s"] / limit["img_s"] - 1
        lines += [
            f"LIMIT again right after the service: best {after['img_s']:.1f} img/s "
            f"({drift:+.0%} vs before), single image p50 "
            f"{fmt(after.get('single', {}).get('p50_s'), 1000, 2)} ms; the ratios use the mean "
            "of both.",
            "",
        ]
    elif after:
        lines += [f"LIMIT after the service: {after.get('error') or after.get('skipped')}", ""]
    lines += paired_tables(data)
    lines += capacity_lines(data)
    head = ("| target | load | req/s | img/s | p50 ms | p95 ms | p99 ms | max ms | errors | "
            "mean batch | server CPU s | server CPU ms/req | loadgen CPU s |")  # fmt: skip
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    if gpu:
        head += " GPU util % |"
        sep += "---:|"
    lines += [
        f"Medians of the windows ({duration:g} s each after a {timing.get('warmup_s', 0):g} s "
        "warm-up; an open-loop window lasts long enough for "
        f"{MIN_OPEN_LOOP_ANSWERS} answers, at most {MAX_OPEN_LOOP_WINDOW_S:g} s); CPU seconds "
        "are per window.",
        "",
        head,
        sep,
    ]
    for target, result in data.get("targets", {}).items():
        if "points" not in result:
            reason = result.get("skipped") or result.get("error", "?")
            lines.append(f"| {target} | skipped: {reason.splitlines()[0][:160]} |" + " |" * 11)
            continue
        for point in result["points"]:
            lines.append(_row(target, point, duration))
    lines.append("")
    return lines


def ratio_text(value: float, op: str, threshold: float) -> str:
    """Two decimals, or four where two would round the value onto the other verdict (a T2 of
    1.3999 against >= 1.4 fails, and "1.40 FAIL" read like a bug)."""
    text = f"{value:.2f}"
    if _meets(float(text), op, threshold) != _meets(value, op, threshold):
        text = f"{value:.4f}"
    return text


def ratio_table(entries: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| # | model | ratio | measured | value | must | result |",
        "|---|---|---|---|---:|---|---|",
    ]
    for e in entries:
        verdict = (
            e.get("verdict")
            or {True: "**pass**", False: "**FAIL**", None: "not measured"}[e["pass"]]
        )
        value = "-" if e["value"] is None else ratio_text(e["value"], e["op"], e["threshold"])
        lines.append(
            f"| {e['id']} | {e['model']} | {e['what']} | {e['detail']} | {value} | "
            f"{e['op']} {e['threshold']:g} | {verdict} |"
        )
    lines.append("")
    return lines


def markdown(result: dict[str, Any], json_path: Path | None) -> str:
    meta = result["meta"]
    mach = meta["machine"]
    v = meta["versions"]
    gpu = bool(meta["config"].get("gpu"))
    lines = [
        f"## {meta['date']} - {meta['label']} run on {mach['hostname']}",
        "",
        f"- machine: {mach['cores']} cores ({mach['usable_cores']} usable), {mach['cpu_model']}, "
        f"{mach['memory_gib']} GiB; GPU: {', '.join(mach['gpus']) or 'none'}",
        f"- load average (1 min) at start {meta['loadavg_start'][0]:.2f}, at end "
        f"{meta['loadavg_end'][0]:.2f}; run took {meta['wall_s'] / 60:.1f} min",
        f"- versions: python {v['python']}, torch {v['torch']}, torchvision {v['torchvision']}, "
        f"fastapi {v['fastapi']}, uvicorn {v['uvicorn']}, uvloop {v['uvloop']}, httptools "
        f"{v['httptools']}, pillow {v['pillow']}, torchserve {v['torchserve']} "
        f"({result.get('torchserve', {}).get('source') or 'not used'}), java: {v['java']}, "
        f"commit {v['git_commit']}",
        f"- service settings: {', '.join(f'{k}={val}' for k, val in meta['service_settings'].items())}",
        f"- TorchServe: batch_size {meta['config']['ts_batch_size']}, max_batch_delay "
        f"{meta['config']['ts_max_batch_delay_ms']} ms; 1 worker (torch threads default) and 2 "
        "workers (OMP_NUM_THREADS=1); default logging",
        f"- load: {meta['config']['body']} bodies, {meta['config']['images_per_request']} image(s) "
        f"per request, {meta['images']['count']} JPEGs ({meta['images']['mean_bytes']} bytes mean, "
        f"sizes {', '.join(meta['images']['sizes'])}; set {meta['images']['sha256_12']} from "
        f"{meta['images']['directory']}); {meta['config']['repeats']} windows per point, median",
    ]
    if json_path is not None:
        lines.append(f"- raw results: `{json_path.name}` in bench/results/")
    if result.get("torchserve", {}).get("skipped"):
        lines.append(f"- {result['torchserve']['skipped']}")
    lines.append("")
    for key, data in result["models"].items():
        lines += model_table(key, data, gpu)
    lines += ["#### Targets (ratios within this run)", ""]
    lines += ratio_table(result["ratios"])
    lines += ceiling_table(result.get("ceilings", []))
    return "\n".join(lines) + "\n"


def append_markdown(text: str, path: Path) -> None:
    header = ""
    if not path.exists():
        header = (
            "# Benchmark results\n\nAppended by `python -m bench run` (see the README's "
            "Benchmarks section); the newest run is at the bottom. Every ratio compares "
            "targets measured in the same run on the same machine.\n\n"
        )
    with path.open("a") as handle:
        handle.write(header + text + "\n")


def meta(cfg: Any, image_info: dict[str, Any], started: float, wall: float, load0: tuple) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
        "date_file": time.strftime("%Y%m%d-%H%M", time.localtime(started)),
        "label": cfg.label,
        "machine": machine(),
        "versions": versions(),
        "config": cfg.to_dict(),
        "service_settings": service_defaults(cfg.service_settings()),
        "images": image_info,
        "loadavg_start": load0,
        "loadavg_end": os.getloadavg(),
        "wall_s": wall,
    }
