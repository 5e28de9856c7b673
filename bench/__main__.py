"""``python -m bench run``: build what it measures, measure every target, write the results.

    .venv/bin/python -m bench run                 # full CPU run (~32 min on 2 cores)
    .venv/bin/python -m bench run --quick         # a few minutes: r20 + r18, C=1 and 32
    .venv/bin/python -m bench run --images ../shared/bench-images   # the reference image set
    .venv/bin/python -m bench run --gpu --dry-run  # the CUDA plan, without running it
    .venv/bin/python -m bench images | archives    # only build the image set / the archives

Writes ``bench/results/<date>-<machine>.json`` and appends a markdown section to
``bench/RESULTS.md`` (``--no-append`` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from . import config as configs
from .archives import MODELS
from .config import (
    HTTP_TARGETS,
    MAX_OPEN_LOOP_WINDOW_S,
    MIN_OPEN_LOOP_ANSWERS,
    PEER_MODEL,
    TARGETS,
    BenchConfig,
    Timing,
)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in _csv(text))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in _csv(text))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="measure every target and write the results")
    run.add_argument("--quick", action="store_true", help="a few minutes instead of ~32")
    run.add_argument("--gpu", action="store_true", help="CUDA mode (ResNet-50, bf16, big batches)")
    run.add_argument("--images", type=Path, help="a folder of images (default: generated set)")
    run.add_argument("--models", type=_csv, help=f"comma list of {', '.join(MODELS)}")
    run.add_argument("--targets", type=_csv, help=f"comma list of {', '.join(TARGETS)}")
    run.add_argument("--all-targets", action="store_true",
                     help="every target for every model (default: ResNet-50 skips some peers)")  # fmt: skip
    run.add_argument("--concurrency", type=_ints, help="closed-loop levels, e.g. 1,8,32,64")
    run.add_argument("--open-loop", type=_floats, help="fractions of capacity, e.g. 0.5,0.9")
    run.add_argument("--open-loop-targets", type=_csv, help="targets that get open-loop points")
    run.add_argument("--capacity-probes", type=_floats,
                     help="fractions of the closed-loop best probed for the open-loop capacity, "
                     "e.g. 1,0.85,0.7 ('' = the closed-loop best)")  # fmt: skip
    run.add_argument("--repeats", type=int, help="windows per point (median reported)")
    run.add_argument("--duration", type=float, help="seconds per window (all models)")
    run.add_argument("--warmup", type=float, help="warm-up seconds before each point")
    run.add_argument("--limit-batches", type=_ints, help="LIMIT batch sizes, e.g. 8,16")
    run.add_argument("--paired-rounds", type=int,
                     help="rounds of LIMIT + service back to back for T1/T4/T6/T7 (0: none)")  # fmt: skip
    run.add_argument("--paired-settle", type=float, metavar="WINDOWS",
                     help="warm-up of each fresh process in the paired rounds, in windows "
                     "(default 2)")  # fmt: skip
    run.add_argument("--body", choices=("raw", "multipart"), help="request body (default raw)")
    run.add_argument("--images-per-request", type=int, help="images per request (multipart)")
    run.add_argument("--loadgen-procs", type=int, help="load-generator processes per point")
    run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                     help="a service setting for both service targets, e.g. TORCH_THREADS=1")  # fmt: skip
    run.add_argument("--no-install-torchserve", action="store_true",
                     help="do not create bench/.ts-venv; use an installed torchserve or skip")  # fmt: skip
    run.add_argument("--rebuild-archives", action="store_true")
    run.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    run.add_argument("--no-append", action="store_true", help="do not append to RESULTS.md")
    run.add_argument("--label", help="a name for this run in the results")
    run.add_argument("--cache", type=Path, help="images, archives, logs (default bench/.cache)")
    run.add_argument("--results-dir", type=Path, help="where the JSON goes (bench/results)")
    run.add_argument("--results-md", type=Path, help="the markdown to append to (bench/RESULTS.md)")
    prof = sub.add_parser("profile", help="py-spy profile of the service under load")
    prof.add_argument("--model", default="r18", choices=sorted(MODELS))
    prof.add_argument("--target", default="service", choices=("service", "naive"))
    prof.add_argument("--concurrency", type=int, default=32)
    prof.add_argument("--duration", type=float, default=15.0)
    prof.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    prof.add_argument("--svg", action="store_true", help="also write a flame graph")
    prof.add_argument("--loadgen-procs", type=int, default=1, help="load-generator processes")
    comp = sub.add_parser("compare", help="service variants in alternating rounds")
    comp.add_argument("--model", default="r20", choices=sorted(MODELS))
    comp.add_argument("--target", default="service", choices=("service", "limit"))
    comp.add_argument("--variant", action="append", required=True,
                      help="NAME:KEY=VALUE,... (settings; TREE=DIR runs another service copy)")  # fmt: skip
    comp.add_argument("--concurrency", type=_ints, default=(1, 32))
    comp.add_argument("--open-loop", type=float, help="also an open-loop point at this fraction")
    comp.add_argument("--rounds", type=int, default=2)
    comp.add_argument("--duration", type=float, default=3.0)
    comp.add_argument("--warmup", type=float, default=1.5)
    comp.add_argument("--images", type=Path, help="a folder of images (default: generated set)")
    comp.add_argument("--loadgen-procs", type=int, default=1, help="load-generator processes")
    sub.add_parser("images", help="write the generated image set into bench/.cache/images")
    sub.add_parser("archives", help="build (or reuse) the benchmark archives")
    return top


def build_config(args: argparse.Namespace) -> BenchConfig:
    overrides: dict[str, Any] = {}
    factory = configs.gpu if args.gpu else configs.quick if args.quick else BenchConfig
    base = factory()
    for name, value in (
        ("models", args.models), ("targets", args.targets), ("concurrency", args.concurrency),
        ("open_loop", args.open_loop), ("open_loop_targets", args.open_loop_targets),
        ("capacity_probes", args.capacity_probes),
        ("repeats", args.repeats), ("limit_batches", args.limit_batches), ("body", args.body),
        ("images_per_request", args.images_per_request), ("loadgen_procs", args.loadgen_procs),
        ("label", args.label),
    ):  # fmt: skip
        if value is not None:
            overrides[name] = value
    if args.all_targets or args.targets:
        overrides["model_targets"] = {}
    if args.images is not None:
        overrides["images_dir"] = args.images.resolve()
    for name in ("cache", "results_dir", "results_md"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name).resolve()
    if args.duration is not None or args.warmup is not None:
        overrides["timing"] = {
            key: Timing(
                warmup_s=args.warmup if args.warmup is not None else t.warmup_s,
                duration_s=args.duration if args.duration is not None else t.duration_s,
            )
            for key, t in base.timing.items()
        }
    overrides["service_env"] = {**base.service_env, **_settings(args.set)}
    overrides["install_torchserve"] = not args.no_install_torchserve
    if args.paired_rounds is not None:
        overrides["paired_rounds"] = args.paired_rounds
    if args.paired_settle is not None:
        overrides["paired_settle_windows"] = args.paired_settle
    overrides["rebuild_archives"] = args.rebuild_archives
    return factory(**{**_fields(base), **overrides})


def _settings(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs NAME=VALUE, not {item!r}")
        env[name.strip().upper()] = value.strip()
    return env


def _fields(cfg: BenchConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}


def estimate_s(cfg: BenchConfig, open_window_s: float | None = None) -> float:
    """A rough wall-clock estimate (2-core machine): start-ups + warm-ups + windows.

    An open-loop window lasts ``open_window_s`` (its length depends on the rate, which is
    measured during the run: ``open_window``); None: the model's own window, the shortest.
    """
    startup = {"service": 15, "service-mbs1": 15, "naive": 8, "torchserve-1w": 20,
               "torchserve-1w-omp1": 20, "torchserve-2w": 30, "http-floor": 4}  # fmt: skip
    total = 0.0
    for model in cfg.models:
        timing = cfg.timing_for(model)

        def point_s(window_s: float, timing: Timing = timing) -> float:
            return timing.warmup_s + cfg.repeats * window_s + 1.5

        point = point_s(timing.duration_s)
        for target in cfg.targets_for(model):
            if target == "limit":
                batches = len({*cfg.limit_batches, cfg.max_batch_size()}) + 1
                total += 15 + batches * (point - 1.0)
                if cfg.paired_rounds and "service" in cfg.targets_for(model):
                    window = cfg.paired_timing_for(model).warmup_s + timing.duration_s
                    # per round: a LIMIT process (one configuration + single), a service
                    # start-up and its C=1 and C=32 windows (+ the floor app's C=1 window)
                    total += cfg.paired_rounds * (15 + 2 * window + startup["service"] + 2 * window)
                    if "http-floor" in cfg.targets:
                        floor = timing.warmup_s + timing.duration_s
                        total += cfg.paired_rounds * (startup["http-floor"] + floor)
                continue
            if target.startswith("torchserve") and target == last_peer(cfg, model):
                window = cfg.paired_timing_for(model).warmup_s + timing.duration_s
                # per round: a service and a TorchServe start-up, one C=32 window each
                total += cfg.paired_rounds * (startup["service"] + startup[target] + 2 * window)
            points = len(cfg.concurrency)
            if target in cfg.open_loop_targets:
                total += len(cfg.open_loop) * point_s(max(timing.duration_s, open_window_s or 0.0))
                # the capacity probes: one window each, usually one or two of them
                total += min(2, len(cfg.capacity_probes)) * (timing.warmup_s + timing.duration_s)
            total += startup[target] + points * point
    return total


def estimate_text(cfg: BenchConfig) -> str:
    """The plan's length, as a range where open-loop windows may outlast the models' windows."""
    shortest = estimate_s(cfg) / 60
    longest = estimate_s(cfg, MAX_OPEN_LOOP_WINDOW_S) / 60
    if round(longest) <= round(shortest):
        return f"about {shortest:.0f} min"
    return (f"about {shortest:.0f}-{longest:.0f} min (open-loop windows of {MIN_OPEN_LOOP_ANSWERS} "
            f"answers at the measured rates, {MAX_OPEN_LOOP_WINDOW_S:g} s at most)")  # fmt: skip


def last_peer(cfg: BenchConfig, model: str) -> str | None:
    """The TorchServe target after which the paired peer rounds run for ``model``, or None."""
    steps = cfg.targets_for(model)
    peers = [t for t in steps if t.startswith("torchserve")]
    if not cfg.paired_rounds or model != PEER_MODEL or "service" not in steps or not peers:
        return None
    return peers[-1]


def dry_run(cfg: BenchConfig) -> None:
    from .report import service_defaults

    print(f"plan ({cfg.label}): {estimate_text(cfg)}; start-ups as on 2 CPU cores")
    print(f"service settings: {service_defaults(cfg.service_settings())}")
    for model in cfg.models:
        timing = cfg.timing_for(model)
        fresh = cfg.paired_timing_for(model).warmup_s
        print(f"- {model} ({MODELS[model].label}); warm-up {timing.warmup_s:g} s, "
              f"{cfg.repeats} x {timing.duration_s:g} s per point")  # fmt: skip
        for target in cfg.targets_for(model):
            if target == "limit":
                batches = sorted({*cfg.limit_batches, cfg.max_batch_size()})
                print(f"    limit: pipelined batches {batches} + single-image latency")
                if cfg.paired_rounds and "service" in cfg.targets_for(model):
                    floor = ("the floor app around a job of the single-image time (C=1), "
                             if "http-floor" in cfg.targets else "")  # fmt: skip
                    print(f"    paired (after the service): {cfg.paired_rounds} rounds of the "
                          f"LIMIT's best configuration + single, {floor}and a fresh service at "
                          f"C=1 and C=32, back to back, each warmed up {fresh:g} s")  # fmt: skip
                continue
            loads = [f"C={c}" for c in cfg.concurrency]
            if target in cfg.open_loop_targets:
                if cfg.capacity_probes:
                    probes = "/".join(f"{f:.0%}" for f in cfg.capacity_probes)
                    loads.append(f"open-loop capacity (first sustained of {probes} of the best)")
                loads += [f"open {f:.0%} of capacity" for f in cfg.open_loop]
                if cfg.open_loop:
                    loads[-1] += (f" (open-loop windows of {MIN_OPEN_LOOP_ANSWERS} answers or "
                                  f"more, at most {MAX_OPEN_LOOP_WINDOW_S:g} s)")  # fmt: skip
            print(f"    {target}: {', '.join(loads)}")
            if target == last_peer(cfg, model):
                print(f"    paired peer (T2/T3): {cfg.paired_rounds} rounds of a fresh service "
                      "and a fresh best TorchServe configuration at C=32, back to back, each "
                      f"warmed up {fresh:g} s")  # fmt: skip
    skipped = [t for t in HTTP_TARGETS if t not in cfg.targets]
    if skipped:
        print(f"targets not in this plan: {', '.join(skipped)}")
    print(f"load generator: {cfg.loadgen_procs} process(es), {cfg.body} bodies, "
          f"{cfg.images_per_request} image(s) per request")  # fmt: skip
    if cfg.gpu:
        from .gpu import GpuSampler

        sampler = GpuSampler()
        sampler.start()
        time.sleep(0.5)
        sampler.stop()
        print(f"GPU sampler: {sampler.source or 'no NVML / nvidia-smi here'}")
        import torch

        print(f"CUDA available here: {torch.cuda.is_available()}")


def run(cfg: BenchConfig, *, append: bool) -> int:
    from . import report
    from .runner import Runner

    if cfg.gpu:
        import torch

        if not torch.cuda.is_available():
            print("bench: --gpu needs CUDA (torch.cuda.is_available() is False); "
                  "--dry-run shows the plan", file=sys.stderr)  # fmt: skip
            return 2
    started, load0 = time.time(), os.getloadavg()
    print(f"bench: {cfg.label} run, {estimate_text(cfg)}; load average {load0[0]:.2f}",
          file=sys.stderr)  # fmt: skip
    runner = Runner(cfg)
    measured = runner.run()
    image_info = runner.image_set.describe() if runner.image_set else {}
    result = {
        "meta": report.meta(cfg, image_info, started, time.time() - started, load0),
        **measured,
    }
    result["ratios"] = report.ratios(result["models"])
    cores = result["meta"]["machine"]["usable_cores"]
    result["ceilings"] = report.ceilings(result["models"], cores)
    path = report.write_json(result, cfg.results_dir)
    text = report.markdown(result, path)
    if append:
        report.append_markdown(text, cfg.results_md)
    print(text)
    print(f"bench: results in {path}" + (f" and {cfg.results_md}" if append else ""),
          file=sys.stderr)  # fmt: skip
    return 0


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the runner's cleanup (kills by pid)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    images_dir = getattr(args, "images", None)
    if images_dir is not None and not images_dir.is_dir():  # one line, not a traceback later
        print(f"bench: --images {images_dir}: no such folder", file=sys.stderr)
        return 2
    if images_dir is not None:  # children may run in another folder (`TREE=`, the LIMIT)
        args.images = images_dir.resolve()
    if args.command == "images":
        from . import images

        image_set = images.ensure(None, configs.CACHE)
        print(json.dumps(image_set.describe(), indent=1))
        return 0
    if args.command == "archives":
        from . import archives

        for spec in MODELS.values():
            print(archives.ensure(spec, configs.CACHE, log=lambda m: print(m, file=sys.stderr)))
        return 0
    if args.command == "profile":
        from .experiment import print_profile, profile

        summary = profile(
            args.model, concurrency=args.concurrency, duration_s=args.duration,
            settings=_settings(args.set), target=args.target, svg=args.svg,
            loadgen_procs=args.loadgen_procs,
        )  # fmt: skip
        print_profile(summary)
        return 0
    if args.command == "compare":
        from .experiment import compare, print_compare

        out = compare(
            args.model, args.variant, concurrency=args.concurrency, rounds=args.rounds,
            timing=Timing(warmup_s=args.warmup, duration_s=args.duration), target=args.target,
            open_fraction=args.open_loop, images_dir=args.images,
            loadgen_procs=args.loadgen_procs,
        )  # fmt: skip
        print_compare(out)
        return 0
    try:
        cfg = build_config(args)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(cfg)
        return 0
    return run(cfg, append=not args.no_append)


if __name__ == "__main__":
    sys.exit(main())
