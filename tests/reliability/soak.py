"""A bounded soak: steady mixed traffic against a real server, its memory, fds and threads
watched from outside.

    .venv/bin/python -m tests.reliability.soak --duration 180

starts ``python -m service`` on a model store holding a digits archive (``--store``; default
``$REL_DIGITS_STORE``, else ``model_store/`` if it has one, else one is trained first with the
trainer CLI, ~2-3 minutes), or targets a running server (``--url`` and ``--pid``). Traffic, from
``--workers`` keep-alive clients: good images (raw and multi-image multipart), /topk with
random k, Grad-CAM explanations (one worker, PNG and JSON), broken and hostile bodies from
``tests/service/hostile.py``, invalid parameters, and the listing/probe routes. Every answer
is checked against the status its request must get.

After a warm-up (``--warmup``, default 20% of the duration, at least 5 s): RSS growth under
10%, no fd or thread growth, zero 5xx. Exit code 0 when all hold; ``--json FILE`` writes the
figures. ``tests/reliability/test_soak.py`` runs a short version in the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from tests.service import hostile
from tests.service.conftest import digit_png

from .helpers import process_stats, server_errors

ROOT = Path(__file__).resolve().parents[2]
RSS_GROWTH_LIMIT = 0.10


@dataclass
class SoakReport:
    duration_s: float
    warmup_s: float
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    server_5xx: float = 0.0
    before: dict[str, float] = field(default_factory=dict)  # idle, before the traffic
    warm: dict[str, float] = field(default_factory=dict)  # end of the warm-up
    end: dict[str, float] = field(default_factory=dict)  # end of the traffic
    after: dict[str, float] = field(default_factory=dict)  # idle again, clients closed
    peak_rss_mib: float = 0.0
    samples: list[dict[str, float]] = field(default_factory=list)

    @property
    def rss_growth(self) -> float:
        return self.end["rss_mib"] / self.warm["rss_mib"] - 1

    def failures(self) -> list[str]:
        problems = []
        if self.wrong:
            problems.append(f"{len(self.wrong)} unexpected answers, e.g. {self.wrong[:3]}")
        if any(int(s) >= 500 for s in self.statuses) or self.server_5xx:
            problems.append(f"5xx answers: {self.statuses}, server counted {self.server_5xx}")
        if self.rss_growth >= RSS_GROWTH_LIMIT:
            problems.append(f"RSS grew {self.rss_growth:.1%} after warm-up")
        if self.end["threads"] > self.warm["threads"]:
            problems.append(f"threads {self.warm['threads']} -> {self.end['threads']}")
        if self.after["fds"] > self.before["fds"]:
            problems.append(f"fds {self.before['fds']} -> {self.after['fds']} once idle")
        return problems

    def summary(self) -> str:
        return (
            f"soak {self.duration_s:.0f} s (warm-up {self.warmup_s:.0f} s): {self.requests} "
            f"requests {self.by_kind}; statuses {self.statuses}; unexpected {len(self.wrong)}; "
            f"server 5xx {self.server_5xx:.0f}; RSS {self.warm['rss_mib']:.0f} -> "
            f"{self.end['rss_mib']:.0f} MiB ({self.rss_growth:+.1%}, peak {self.peak_rss_mib:.0f}); "
            f"threads {self.warm['threads']:.0f} -> {self.end['threads']:.0f}; fds idle "
            f"{self.before['fds']:.0f} -> {self.after['fds']:.0f} (under load "
            f"{self.warm['fds']:.0f} -> {self.end['fds']:.0f})"
        )


class Traffic:
    """Request makers, each returning (kind, method, path, kwargs, expected status)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.digits = [digit_png(d, size, nth=-1 - n) for d in range(10) for size in (8, 32)
                       for n in range(2)]  # fmt: skip
        self.photos = [hostile.encode(hostile.photo_image((160, 120), i), "JPEG") for i in (0, 1)]
        self.bad = [c for c in hostile.raw_body_cases() if c.status != 200]
        self.good_odd = [c for c in hostile.image_cases() if len(c.body) < 300_000]
        self.multipart = list(hostile.multipart_cases(64))

    def image(self) -> bytes:
        return self.rng.choice(self.digits + self.photos)

    def next(self, explainer: bool) -> tuple[str, str, str, dict, int]:
        rng = self.rng
        if explainer and rng.random() < 0.5:
            body = self.image()
            if rng.random() < 0.5:
                headers = {"content-type": "image/png", "accept": "application/json"}
            else:
                headers = {"content-type": "image/png"}
            return "explain", "POST", "/explain", {"content": body, "headers": headers}, 200
        roll = rng.random()
        raw = {"content-type": "application/octet-stream"}
        if roll < 0.35:
            return "predict", "POST", "/predict", {"content": self.image(), "headers": raw}, 200
        if roll < 0.45:
            files = [("file", (f"{i}.png", self.image(), "image/png"))
                     for i in range(rng.randint(2, 8))]  # fmt: skip
            return "multi", "POST", "/predict", {"files": files}, 200
        if roll < 0.57:
            k = rng.randint(1, 10)
            return "topk", "POST", f"/topk?k={k}", {"content": self.image(), "headers": raw}, 200
        if roll < 0.62:
            case = rng.choice(self.good_odd)
            headers = {"content-type": case.content_type} if case.content_type else {}
            return "odd_image", "POST", "/predict", {"content": case.body, "headers": headers}, 200
        if roll < 0.80:
            case = rng.choice(self.bad)
            headers = {"content-type": case.content_type} if case.content_type else {}
            return (
                "bad",
                "POST",
                "/predict",
                {"content": case.body, "headers": headers},
                case.status,
            )
        if roll < 0.86:
            case = rng.choice(self.multipart)
            headers = {"content-type": case.content_type}
            return (
                "bad_multipart",
                "POST",
                "/topk",
                {"content": case.body, "headers": headers},
                case.status,
            )
        if roll < 0.93:
            path, status = rng.choice([("/topk?k=0", 422), ("/topk?k=11", 422),
                                       ("/predict?model=nope", 404), ("/predict?version=99", 404),
                                       ("/explain?target=zzz", 422)])  # fmt: skip
            return "bad_params", "POST", path, {"content": self.image(), "headers": raw}, status
        path = rng.choice(["/models", "/models/digits", "/readyz", "/healthz", "/metrics"])
        return "probe", "GET", path, {}, 200


async def run_soak(url: str, pid: int, *, duration: float, warmup: float, workers: int = 4,
                   seed: int = 0) -> SoakReport:  # fmt: skip
    """Drive mixed traffic for ``duration`` s and report (the server is left running)."""
    report = SoakReport(duration, warmup)
    traffic = Traffic(seed)
    statuses: Counter[int] = Counter()
    kinds: Counter[str] = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=60) as probe:
        report.before = process_stats(pid)
        start_5xx = server_errors((await probe.get("/metrics")).text)
    start = time.monotonic()
    stop = start + duration

    async def worker(index: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            while time.monotonic() < stop:
                kind, method, path, kwargs, expected = traffic.next(explainer=index == 0)
                response = await client.request(method, path, **kwargs)
                statuses[response.status_code] += 1
                kinds[kind] += 1
                if response.status_code != expected:
                    report.wrong.append(f"{kind} {path}: {response.status_code} != {expected}")
                elif expected >= 400 and not isinstance(response.json().get("detail"), str):
                    report.wrong.append(f"{kind} {path}: detail is not a string")

    async def sampler() -> None:
        warm_taken = False
        while time.monotonic() < stop:
            await asyncio.sleep(1.0)
            stats = await asyncio.to_thread(process_stats, pid)
            stats["t"] = round(time.monotonic() - start, 1)
            report.samples.append(stats)
            if not warm_taken and time.monotonic() - start >= warmup:
                report.warm, warm_taken = stats, True
        report.end = report.samples[-1]

    await asyncio.gather(sampler(), *(worker(i) for i in range(workers)))
    await asyncio.sleep(1.5)  # idle: finished requests' sockets closed
    report.after = process_stats(pid)
    async with httpx.AsyncClient(base_url=url, timeout=60) as probe:
        report.server_5xx = server_errors((await probe.get("/metrics")).text) - start_5xx
    report.requests = sum(statuses.values())
    report.statuses = {str(k): v for k, v in sorted(statuses.items())}
    report.by_kind = dict(sorted(kinds.items()))
    report.peak_rss_mib = max(s["rss_mib"] for s in report.samples)
    return report


def default_store() -> Path:
    given = os.environ.get("REL_DIGITS_STORE")
    if given:
        return Path(given)
    local = ROOT / "model_store"
    if any(local.glob("*.mar")):
        return local
    target = Path(tempfile.mkdtemp(prefix="soak-store-"))
    print(f"training a digits archive into {target} (no --store given)", flush=True)
    from tests.conftest import run_trainer

    proc = run_trainer("fit", "--dataset", "digits", "--arch", "resnet20", "--epochs", "4",
                       "--archive", "digits", "--model-store", str(target / "model_store"),
                       "--runs-dir", str(target / "runs"), "--seed", "0")  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    return target / "model_store"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of traffic")
    parser.add_argument("--warmup", type=float, default=None, help="default: 20%% (min 5 s)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--store", type=Path, default=None, help="model store to serve")
    parser.add_argument("--url", default=None, help="a running server instead (needs --pid)")
    parser.add_argument("--pid", type=int, default=None, help="that server's process id")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(5.0, 0.2 * args.duration)
    server = None
    if args.url:
        if args.pid is None:
            parser.error("--url needs --pid (memory, fds and threads are read from /proc)")
        url, pid = args.url, args.pid
    else:
        from tests.service.conftest import launch

        logs = Path(tempfile.mkdtemp(prefix="soak-logs-"))
        server = launch(args.store or default_store(), logs)
        url, pid = server.url, server.proc.pid
        print(f"server {url} (pid {pid}), log {server.log_path}", flush=True)
    try:
        report = asyncio.run(run_soak(url, pid, duration=args.duration, warmup=warmup,
                                      workers=args.workers))  # fmt: skip
    finally:
        if server is not None:
            server.stop()
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "rss_growth": report.rss_growth,
                                         "failures": report.failures()}, indent=1))  # fmt: skip
    problems = report.failures()
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
