"""Runs the plan: for each model the LIMIT, then each HTTP target at each load point.

Every load point is a fresh load-generator process (``bench.loadgen``) doing a warm-up and
``repeats`` windows; a point's figures are the medians over its windows. Targets run one at a
time, so they never share the 2 cores with each other, only with the load generator (whose
CPU seconds are reported). A target that cannot start is recorded with its error and the run
goes on; every process started is killed by pid at the end, whatever happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import archives, images, report, targets
from .config import MAX_WARMUP_S, PEER_MODEL, BenchConfig, Timing, open_window
from .gpu import GpuSampler
from .limit import parse_config_key
from .report import describe_batch, fmt, overload_reason, ratio

MEDIAN_KEYS = (
    "req_s", "img_s", "p50_s", "p95_s", "p99_s", "max_s", "mean_s", "mean_batch",
    "server_cpu_s", "loadgen_cpu_s", "error_count", "late", "dropped",
)  # fmt: skip


def median_of(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median over the windows (keys with no values are None)."""
    out: dict[str, Any] = {}
    for key in MEDIAN_KEYS:
        values = [w[key] for w in windows if w.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    ok = [w["ok"] for w in windows]
    cpu = [w["server_cpu_s"] for w in windows if w.get("server_cpu_s") is not None]
    out["ok"] = sum(ok)
    out["server_cpu_ms_per_req"] = (
        1000 * sum(cpu) / sum(ok) if cpu and sum(ok) else None
    )  # fmt: skip
    # a ratio of two quantiles is taken within each window, then the median over windows (the
    # medians of p99 and of p50 taken apart can come from different windows)
    tails = [w["p99_s"] / w["p50_s"] for w in windows if w.get("p99_s") and w.get("p50_s")]
    out["p99_over_p50"] = statistics.median(tails) if tails else None
    out["p99_over_p50_windows"] = [round(t, 2) for t in tails]
    out["retried"] = sum(w.get("retried", 0) for w in windows)
    out["errors"] = {}
    for window in windows:
        for kind, count in window.get("errors", {}).items():
            out["errors"][kind] = out["errors"].get(kind, 0) + count
    return out


def merge_loadgen(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several load-generator processes on one point -> one result (raw latencies merged)."""
    from .loadgen import percentile

    if len(results) == 1:
        return results[0]
    merged = dict(results[0])
    windows = []
    for index, first in enumerate(results[0]["windows"]):
        parts = [r["windows"][index] for r in results]
        lat = sorted(x for p in parts for x in p.get("latencies", []))
        window = dict(first)
        for key in (
            "ok", "req_s", "img_s", "loadgen_cpu_s", "error_count", "late", "dropped", "retried",
        ):  # fmt: skip
            window[key] = sum(p.get(key) or 0 for p in parts)
        errors: dict[str, int] = {}
        for part in parts:
            for kind, count in part["errors"].items():
                errors[kind] = errors.get(kind, 0) + count
        window.update(
            errors=errors, p50_s=percentile(lat, 0.5), p95_s=percentile(lat, 0.95),
            p99_s=percentile(lat, 0.99), max_s=lat[-1] if lat else None,
            mean_s=sum(lat) / len(lat) if lat else None, latencies=[],
        )  # fmt: skip
        windows.append(window)
    merged["windows"] = windows
    for key in ("concurrency", "rate"):  # each process had its share: the point had the sum
        shares = [r.get(key) for r in results]
        if all(share is not None for share in shares):
            merged[key] = sum(shares)
    merged["loadgen_cpu_total_s"] = sum(r["loadgen_cpu_total_s"] for r in results)
    merged["processes"] = len(results)
    return merged


def split_load(load: dict[str, Any], procs: int) -> list[dict[str, Any]]:
    """One load point (``concurrency`` or ``rate``) shared among up to ``procs`` load-generator
    processes. Each process holds at least one connection, so C=1 is one process."""
    procs = max(1, procs)
    if "concurrency" in load:
        procs = min(procs, int(load["concurrency"]))
    shares = []
    for index in range(procs):
        share = dict(load)
        if "concurrency" in load:
            share["concurrency"] = load["concurrency"] // procs + (
                index < load["concurrency"] % procs
            )
        if "rate" in load:
            share["rate"] = load["rate"] / procs
        shares.append(share)
    return shares


MODEL_STEPS = ("limit", "paired", "paired-peer")  # results beside "targets", not in it
PAIRED_C = 32  # the closed-loop concurrency of T1, T4 and T7


def torchserve_config(target: str) -> tuple[int, int | None]:
    """(workers, OMP_NUM_THREADS or None) of ``torchserve-<W>w[-omp<N>]``."""
    match = re.fullmatch(r"torchserve-(\d+)w(?:-omp(\d+))?", target)
    if match is None:
        raise ValueError(f"not a TorchServe target: {target}")
    workers = int(match[1])
    omp = int(match[2]) if match[2] else (1 if workers > 1 else None)
    return workers, omp


def open_loop_capacity(
    closed_req_s: float,
    fractions: tuple[float, ...],
    c1_p50_s: float | None,
    measure: Callable[[float], dict[str, Any]],
) -> tuple[float, list[dict[str, Any]]]:
    """The highest probed rate the target sustains in an open loop, and every probe.

    ``measure(rate)`` runs one open-loop window and returns its figures; probes go from the
    highest fraction of the closed loop's best down and stop at the first one that is not past
    capacity (``report.overload_reason``). With no fractions, or none sustained, the closed
    loop's best or the lowest rate probed is the capacity (the points at fractions of it are
    then judged for overload as before).
    """
    probes: list[dict[str, Any]] = []
    for fraction in sorted(fractions, reverse=True):
        rate = closed_req_s * fraction
        median = measure(rate)
        reason = overload_reason(median, rate, c1_p50_s)
        keep = ("req_s", "p50_s", "p99_s", "mean_batch", "error_count")
        probes.append({"fraction": fraction, "rate": rate, "overloaded": reason,
                       "median": {k: median.get(k) for k in keep}})  # fmt: skip
        if reason is None:
            return rate, probes
    return (probes[-1]["rate"] if probes else closed_req_s), probes


def warmed(timing: Timing, concurrency: int, rate: float | None) -> Timing:
    """The point's timing with a warm-up of at least 1.5 rounds of the closed loop.

    At C=64 and 8 req/s one round (every connection answered once) takes 8 s: until then the
    server is still draining the first burst, not in steady state.
    """
    if not rate:
        return timing
    cycle = 1.5 * concurrency / rate
    return Timing(warmup_s=min(MAX_WARMUP_S, max(timing.warmup_s, cycle)),
                  duration_s=timing.duration_s)  # fmt: skip


class Runner:
    def __init__(self, cfg: BenchConfig, *, log: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.tracker = targets.Tracker()
        self.started = time.monotonic()
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.logs = cfg.cache / "logs" / stamp
        self.spec_dir = Path(tempfile.mkdtemp(prefix="bench-specs-"))
        self.image_set: images.ImageSet | None = None
        self.ts_binary: Path | None = None
        self.ts_problem: str | None = None
        self.ts_source: str | None = None

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        self._log(f"[bench {elapsed:6.0f}s] {message}")

    # -- preparation ----------------------------------------------------------------------

    def prepare(self) -> dict[str, Path]:
        cfg = self.cfg
        self.image_set = images.ensure(cfg.images_dir, cfg.cache)
        self.log(f"images: {len(self.image_set.files)} files from {self.image_set.directory}")
        built = {}
        for key in cfg.models:
            built[key] = archives.ensure(
                archives.MODELS[key], cfg.cache, rebuild=cfg.rebuild_archives, log=self.log
            )
        if any(t.startswith("torchserve") for t in cfg.targets):
            try:
                self.ts_binary, self.ts_source = targets.find_torchserve(
                    install=cfg.install_torchserve
                )
                self.log(f"torchserve: {self.ts_binary} from {self.ts_source}")
            except targets.TargetUnavailable as exc:
                self.ts_problem = str(exc)
                self.log(self.ts_problem)
        return built

    # -- measuring ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            built = self.prepare()
            models = {}
            for key in self.cfg.models:
                models[key] = self.run_model(key, built[key])
            return {"models": models, "torchserve": self._ts_info()}
        finally:
            killed = self.tracker.kill_all()
            if killed:
                self.log(f"killed leftover processes {killed}")
            with contextlib.suppress(OSError):
                for path in self.spec_dir.iterdir():
                    path.unlink()
                self.spec_dir.rmdir()

    def _ts_info(self) -> dict[str, Any]:
        return {"binary": str(self.ts_binary) if self.ts_binary else None,
                "source": self.ts_source, "skipped": self.ts_problem}  # fmt: skip

    def run_model(self, key: str, archive: Path) -> dict[str, Any]:
        from trainer.archive import read_card

        card = read_card(archive)
        spec = archives.MODELS[key]
        result: dict[str, Any] = {
            "label": spec.label,
            "archive": archive.name,
            "arch": card.arch,
            "input_size": list(card.input_size),
            "color_mode": card.preprocess_spec.color_mode,
            "resize_mode": card.preprocess_spec.resize_mode,
            "timing": vars(self.cfg.timing_for(key)),
            "targets": {},
        }
        for target in self._steps(key):
            if target == "paired" and "best_batch" not in (result.get("limit") or {}):
                continue  # no LIMIT configuration to pair the service with
            peer = None
            if target == "paired-peer":  # the best TorchServe configuration of the table
                peer = report.best_torchserve({key: result}, key, PAIRED_C)
                if peer is None:
                    continue  # TorchServe was skipped or failed: no peer to pair with
            self.log(f"{key}: {target}")
            try:
                if target == "limit":
                    result[target] = self.run_limit(key, archive)
                elif target == "paired":
                    result[target] = self.run_paired(key, archive, result["limit"]["best_batch"])
                elif target == "paired-peer" and peer is not None:
                    result[target] = self.run_paired_peer(key, archive, card, peer[0], result)
                else:
                    result["targets"][target] = self.run_target(key, target, archive, card)
            except targets.TargetUnavailable as exc:
                result["targets"][target] = {"skipped": str(exc)}
                self.log(str(exc))
            except Exception as exc:  # noqa: BLE001 - record, clean up, go on with the next
                self.log(f"{key}: {target} failed: {exc}")
                bucket = result if target in MODEL_STEPS else result["targets"]
                bucket[target] = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
            finally:
                self.tracker.kill_all()
        return result

    def _steps(self, key: str) -> list[str]:
        """The model's targets in order, with the paired rounds right after the service."""
        steps = list(self.cfg.targets_for(key))
        if self.cfg.paired_rounds and "limit" in steps and "service" in steps:
            steps.insert(steps.index("service") + 1, "paired")
        peers = [i for i, step in enumerate(steps) if step.startswith("torchserve")]
        if self.cfg.paired_rounds and "service" in steps and peers and key == PEER_MODEL:
            steps.insert(peers[-1] + 1, "paired-peer")  # after the table chose the best peer
        return steps

    def _limit_child(self, key: str, archive: Path, **spec: Any) -> dict[str, Any]:
        """Run ``bench.limit`` on ``archive`` in its own process; its JSON output."""
        cfg = self.cfg
        timing = cfg.timing_for(key)
        spec = {
            "archive": str(archive),
            "images": [str(p) for p in self.image_set.files],
            "warmup_s": timing.warmup_s,
            "duration_s": timing.duration_s,
            "repeats": cfg.repeats,
            "single": True,
            **spec,
        }
        path = self._write_spec(f"limit-{key}", spec)
        # one process on the whole machine, whatever WORKERS the service has
        env = {k: v for k, v in targets.base_env(cfg.service_settings()).items()
               if k.upper() != "WORKERS"}  # fmt: skip
        configs = len(spec["batch_sizes"]) * 3 + 1  # 1 and N forward threads (pool, own), single
        budget = 120 + configs * (spec["warmup_s"] + spec["repeats"] * spec["duration_s"]) * 3
        return json.loads(
            self._child([sys.executable, "-m", "bench.limit", str(path)], env, budget)
        )

    def run_limit(self, key: str, archive: Path) -> dict[str, Any]:
        batches = sorted({*self.cfg.limit_batches, self.cfg.max_batch_size()})
        with self._gpu_sampled() as gpu:
            raw = self._limit_child(key, archive, batch_sizes=batches)
        summary: dict[str, Any] = {
            "settings": {k: raw[k] for k in raw if k not in ("pipelined", "single")}
        }
        best = None
        for batch, data in raw["pipelined"].items():
            img_s = statistics.median(w["img_s"] for w in data["windows"])
            cpu = statistics.median(w["cpu_s"] for w in data["windows"])
            summary[f"batch_{batch}"] = {
                "img_s": img_s, "cpu_s": cpu, "forward_per_batch": data["forward_per_batch"],
                "windows": data["windows"],
            }  # fmt: skip
            if best is None or img_s > best[1]:
                best = (batch, img_s)
            self.log(f"{key}: limit batch {describe_batch(batch)}: {img_s:.1f} img/s")
        single = raw.get("single")
        if single:
            p50 = statistics.median(w["p50_s"] for w in single["windows"] if w["p50_s"])
            summary["single"] = {
                "p50_s": p50, "p99_s": single["p99_s"], "mean_s": single["mean_s"],
                "img_s": statistics.median(w["img_s"] for w in single["windows"]),
                "windows": single["windows"],
            }  # fmt: skip
            self.log(f"{key}: limit single image: p50 {p50 * 1000:.1f} ms")
        if best is not None:
            summary["best_batch"], summary["img_s"] = best
        summary["gpu"] = gpu.summary() if gpu else None
        return summary

    def run_paired(self, key: str, archive: Path, config: str) -> dict[str, Any]:
        """The LIMIT at ``config`` and the service at C=1 and C=32, back to back, in rounds.

        Each round measures one window of each (the LIMIT's pipelined ``config`` and its
        single-image latency; a fresh service process's C=1 and C=32 points), the LIMIT first
        in even rounds and the service first in odd ones, so a host that drifts during the
        round shifts both sides alike. ``config`` is the LIMIT's best configuration from its
        full sweep: fixed here, so the paired LIMIT is not a maximum over noisy configurations.

        With ``http-floor`` among the targets, each round also measures the floor app's C=1 p50
        around an off-loop CPU job of that round's single-image p50, right after the LIMIT
        (``/predict-job``): T6's bound, what a bare FastAPI app computing off the loop answers in.
        """
        cfg = self.cfg
        batch = parse_config_key(str(config))[0]
        timing = cfg.timing_for(key)
        fresh = cfg.paired_timing_for(key)
        rounds = []
        for index in range(cfg.paired_rounds):
            sides = ["limit", "service"] if index % 2 == 0 else ["service", "limit"]
            if "http-floor" in cfg.targets:
                sides.insert(sides.index("limit") + 1, "floor-job")
            entry: dict[str, Any] = {"order": sides}
            for side in sides:
                if side == "floor-job":
                    entry["floor_job"] = self._floor_job(
                        archive, timing, entry["limit"]["single_p50_s"]
                    )
                    continue
                if side == "limit":
                    raw = self._limit_child(
                        key, archive, batch_sizes=[batch], configs=[str(config)], repeats=1,
                        warmup_s=fresh.warmup_s,
                    )  # fmt: skip
                    window = raw["pipelined"][str(config)]["windows"][0]
                    single = raw["single"]["windows"][0]
                    entry["limit"] = {"img_s": window["img_s"], "cpu_s": window["cpu_s"],
                                      "single_p50_s": single["p50_s"]}  # fmt: skip
                    continue
                settings = cfg.service_settings()
                with targets.service("service-paired", archive, self.logs / archive.stem,
                                     self.tracker, settings) as endpoint:  # fmt: skip
                    for pid in endpoint.pids:
                        self.tracker.add_tree(pid)
                    one = self.measure(endpoint, fresh, mode="closed", concurrency=1, repeats=1)
                    loaded = self.measure(
                        endpoint, warmed(fresh, PAIRED_C, one["median"]["req_s"]),
                        mode="closed", concurrency=PAIRED_C, repeats=1,
                    )  # fmt: skip
                entry["service"] = {"c1": one["median"], f"c{PAIRED_C}": loaded["median"]}
            service, limit = entry["service"], entry["limit"]
            entry["throughput_ratio"] = ratio(service[f"c{PAIRED_C}"]["img_s"], limit["img_s"])
            entry["latency_ratio"] = ratio(service["c1"]["p50_s"], limit["single_p50_s"])
            if "floor_job" in entry:
                entry["floor_job_ratio"] = ratio(entry["floor_job"]["p50_s"], limit["single_p50_s"])
            rounds.append(entry)
            self.log(
                f"{key}: paired round {index + 1}: service C={PAIRED_C} "
                f"{service[f'c{PAIRED_C}']['img_s']:.1f} / LIMIT {config} {limit['img_s']:.1f} "
                f"img/s = {fmt(entry['throughput_ratio'], 1, 2)}; C=1 p50 "
                f"{fmt(service['c1']['p50_s'], 1000)} / single {fmt(limit['single_p50_s'], 1000)} "
                f"ms = {fmt(entry['latency_ratio'], 1, 2)}"
                + (
                    f"; floor + job p50 {fmt(entry['floor_job']['p50_s'], 1000)} ms = "
                    f"{fmt(entry['floor_job_ratio'], 1, 2)}"
                    if "floor_job" in entry
                    else ""
                )
            )
        return {"config": str(config), "concurrency": PAIRED_C, "warmup_s": fresh.warmup_s,
                "rounds": rounds}  # fmt: skip

    def _floor_job(self, archive: Path, timing: Timing, job_s: float) -> dict[str, Any]:
        """The floor app at C=1 around a ``job_s`` CPU job on a thread (bench/floor_app.py)."""
        with targets.http_floor(self.logs / archive.stem, self.tracker) as endpoint:
            endpoint = dataclasses.replace(endpoint, path=f"/predict-job?ms={job_s * 1000:.3f}")
            one = self.measure(endpoint, timing, mode="closed", concurrency=1, repeats=1)
        return {"job_s": job_s, "p50_s": one["median"]["p50_s"], "req_s": one["median"]["req_s"]}

    def run_paired_peer(
        self, key: str, archive: Path, card: Any, peer: str, result: dict[str, Any]
    ) -> dict[str, Any]:
        """The service and the best TorchServe configuration at C=32, back to back, in rounds.

        T2 and T3 compare the service with TorchServe, which the table measures many minutes
        later; on this host the same code drifts by 20-40% in that time (the 15:30 run's
        TorchServe ran in a slow period: 22.4 img/s against 35.2 in the run before). As in
        ``run_paired``, each round starts both afresh and measures one C=32 window of each,
        the service first in even rounds and the peer first in odd ones.
        """
        timing = self.cfg.paired_timing_for(key)
        rates = {
            side: (report.closed_point({key: result}, key, side, PAIRED_C) or {}).get("req_s")
            for side in ("service", peer)
        }
        rounds = []
        for index in range(self.cfg.paired_rounds):
            sides = ("service", peer) if index % 2 == 0 else (peer, "service")
            entry: dict[str, Any] = {"order": list(sides)}
            for side in sides:
                with self._start(side, archive, card) as endpoint:
                    for pid in endpoint.pids:
                        self.tracker.add_tree(pid)
                    point = self.measure(
                        endpoint, warmed(timing, PAIRED_C, rates[side]), mode="closed",
                        concurrency=PAIRED_C, repeats=1,
                    )  # fmt: skip
                entry["service" if side == "service" else "peer"] = point["median"]
            service, other = entry["service"], entry["peer"]
            entry["throughput_ratio"] = ratio(service["img_s"], other["img_s"])
            entry["p99_ratio"] = ratio(service["p99_s"], other["p99_s"])
            rounds.append(entry)
            self.log(
                f"{key}: paired peer round {index + 1}: service C={PAIRED_C} "
                f"{service['img_s']:.1f} / {peer} {other['img_s']:.1f} img/s = "
                f"{fmt(entry['throughput_ratio'], 1, 2)}; p99 {fmt(service['p99_s'], 1000, 0)} / "
                f"{fmt(other['p99_s'], 1000, 0)} ms = {fmt(entry['p99_ratio'], 1, 2)}"
            )
        return {"peer": peer, "concurrency": PAIRED_C, "warmup_s": timing.warmup_s,
                "rounds": rounds}  # fmt: skip

    def run_target(self, key: str, target: str, archive: Path, card: Any) -> dict[str, Any]:
        with self._start(target, archive, card) as endpoint:
            for pid in endpoint.pids:
                self.tracker.add_tree(pid)
            self.log(f"{key}: {target} ready in {endpoint.started_s:.1f} s")
            result: dict[str, Any] = {
                "settings": endpoint.settings,
                "startup_s": endpoint.started_s,
                "points": [],
            }
            timing = self.cfg.timing_for(key)
            rate = None  # req/s of the previous point: sizes the next warm-up
            for concurrency in self.cfg.concurrency:
                point = self.measure(
                    endpoint, warmed(timing, concurrency, rate), mode="closed",
                    concurrency=concurrency,
                )  # fmt: skip
                result["points"].append(point)
                rate = point["median"]["req_s"] or rate
                self._log_point(key, target, point)
            closed = [p for p in result["points"] if p["median"]["req_s"]]
            if target in self.cfg.open_loop_targets and closed:
                best = max(closed, key=lambda p: p["median"]["req_s"])
                one = next((p for p in closed if p["concurrency"] == 1), None)
                result["closed_capacity_req_s"] = best["median"]["req_s"]

                def probe(rate: float) -> dict[str, Any]:
                    point = self.measure(endpoint, timing, repeats=1, mode="open", rate=rate,
                                         max_connections=max(64, 4 * max(self.cfg.concurrency)))  # fmt: skip
                    self.log(f"{key}: {target} capacity probe {rate:.1f}/s: served "
                             f"{point['median']['req_s'] or 0:.1f}/s")  # fmt: skip
                    return point["median"]

                capacity, probes = open_loop_capacity(
                    best["median"]["req_s"], self.cfg.capacity_probes,
                    one and one["median"]["p50_s"], probe,
                )  # fmt: skip
                result["capacity_req_s"] = capacity
                result["capacity_probes"] = probes
                for fraction in self.cfg.open_loop:
                    rate = capacity * fraction
                    point = self.measure(
                        endpoint, open_window(timing, rate), mode="open", rate=rate,
                        max_connections=max(64, 4 * max(self.cfg.concurrency)),
                    )  # fmt: skip
                    point["fraction"] = fraction
                    result["points"].append(point)
                    self._log_point(key, target, point)
            return result

    @contextlib.contextmanager
    def _start(self, target: str, archive: Path, card: Any) -> Iterator[targets.Endpoint]:
        cfg = self.cfg
        logs = self.logs / archive.stem
        if target == "service":
            with targets.service(target, archive, logs, self.tracker, cfg.service_settings()) as ep:
                yield ep
        elif target == "service-mbs1":
            settings = {**cfg.service_settings(), "MAX_BATCH_SIZE": "1"}
            with targets.service(target, archive, logs, self.tracker, settings) as ep:
                yield ep
        elif target == "naive":
            device = "cuda" if cfg.gpu else "cpu"
            with targets.naive(archive, logs, self.tracker, device=device) as ep:
                yield ep
        elif target == "http-floor":
            with targets.http_floor(logs, self.tracker) as ep:
                yield ep
        elif target.startswith("torchserve"):
            if self.ts_binary is None:
                raise targets.TargetUnavailable(self.ts_problem or "TorchServe skipped")
            workers, omp = torchserve_config(target)
            with targets.torchserve(
                self.ts_binary, archive, card.name, logs, self.tracker, workers=workers,
                omp_threads=omp, batch_size=cfg.ts_batch_size,
                max_batch_delay_ms=cfg.ts_max_batch_delay_ms,
            ) as ep:  # fmt: skip
                yield ep
        else:
            raise ValueError(f"unknown target {target}")

    def measure(
        self, endpoint: targets.Endpoint, timing: Any, *, repeats: int | None = None, **load: Any
    ) -> dict[str, Any]:
        cfg = self.cfg
        repeats = repeats or cfg.repeats
        shares = split_load(load, cfg.loadgen_procs)
        procs = len(shares)
        base = {
            "host": "127.0.0.1",
            "port": endpoint.port,
            "path": endpoint.path,
            "images": [str(p) for p in self.image_set.files],
            "body": cfg.body,
            "images_per_request": cfg.images_per_request,
            "warmup_s": timing.warmup_s,
            "duration_s": timing.duration_s,
            "repeats": repeats,
            "timeout_s": 60.0,
            "pids": endpoint.pids,
            "batch_probe": endpoint.batch_probe,
            "raw_latencies": procs > 1,
        }
        specs = []
        for index, share in enumerate(shares):
            spec = {**base, **share}
            if index > 0:  # one process reads the server's counters
                spec["batch_probe"] = None
            specs.append(spec)
        budget = 90 + timing.warmup_s + repeats * timing.duration_s * 2
        with self._gpu_sampled() as gpu:
            outputs = self._loadgen(specs, budget)
        result = merge_loadgen(outputs)
        for window in result["windows"]:
            window.pop("latencies", None)
        return {
            **{k: v for k, v in result.items() if k != "windows"},
            "warmup_s": timing.warmup_s,
            "duration_s": timing.duration_s,
            "windows": result["windows"],
            "median": median_of(result["windows"]),
            "gpu": gpu.summary() if gpu else None,
        }

    def _loadgen(self, specs: list[dict[str, Any]], budget: float) -> list[dict[str, Any]]:
        procs = []
        try:
            for index, spec in enumerate(specs):
                path = self._write_spec(f"loadgen-{index}", spec)
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bench.loadgen", str(path)], cwd=targets.ROOT,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                )  # fmt: skip
                self.tracker.add(proc.pid)
                procs.append(proc)
            outputs = []
            for proc in procs:
                out, err = proc.communicate(timeout=budget)
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"load generator failed ({proc.returncode}): {err.decode()[-2000:]}"
                    )
                outputs.append(json.loads(out))
            return outputs
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)

    def _child(self, argv: list[str], env: dict[str, str], timeout: float) -> str:
        proc = subprocess.Popen(
            argv, cwd=targets.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.tracker.add(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[2]} failed ({proc.returncode}): {err.decode()[-3000:]}")
        return out.decode()

    @contextlib.contextmanager
    def _gpu_sampled(self) -> Iterator[GpuSampler | None]:
        if not self.cfg.gpu:
            yield None
            return
        sampler = GpuSampler()
        sampler.start()
        try:
            yield sampler
        finally:
            sampler.stop()

    def _write_spec(self, name: str, spec: dict[str, Any]) -> Path:
        path = self.spec_dir / f"{name}.json"
        path.write_text(json.dumps(spec))
        return path

    def _log_point(self, key: str, target: str, point: dict[str, Any]) -> None:
        m = point["median"]
        where = (
            f"C={point['concurrency']}"
            if point["mode"] == "closed"
            else f"open {point['rate']:.1f}/s"
        )
        p50 = f"{m['p50_s'] * 1000:.1f}" if m["p50_s"] is not None else "-"
        p99 = f"{m['p99_s'] * 1000:.1f}" if m["p99_s"] is not None else "-"
        batch = f"{m['mean_batch']:.1f}" if m["mean_batch"] is not None else "-"
        self.log(
            f"{key}: {target} {where}: {m['img_s']:.1f} img/s, p50 {p50} ms, p99 {p99} ms, "
            f"batch {batch}, errors {m['error_count']:.0f}, server CPU {m['server_cpu_s'] or 0:.2f} s, "
            f"loadgen CPU {m['loadgen_cpu_s']:.2f} s"
        )
