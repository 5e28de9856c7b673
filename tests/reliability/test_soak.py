"""The short soak in the suite (the closing note reports a full 3-minute run of
``python -m tests.reliability.soak --duration 180``)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.service.conftest import ServiceProcess

from .helpers import server_errors
from .soak import RSS_GROWTH_LIMIT, run_soak

pytestmark = pytest.mark.slow

DURATION_S = 25.0
WARMUP_S = 8.0


def test_short_soak_keeps_memory_fds_and_threads_flat(server: ServiceProcess):
    report = asyncio.run(run_soak(server.url, server.proc.pid, duration=DURATION_S,
                                  warmup=WARMUP_S))  # fmt: skip
    print(f"\nFIGURE {report.summary()}")
    assert report.requests > 200
    assert report.wrong == []
    assert report.server_5xx == 0 and not any(int(s) >= 500 for s in report.statuses)
    assert report.rss_growth < RSS_GROWTH_LIMIT
    assert report.end["threads"] <= report.warm["threads"]
    assert report.after["fds"] <= report.before["fds"]
    assert report.failures() == []
    # the shared server answered no 5xx at all, to any test of this folder that used it
    assert server_errors(httpx.get(f"{server.url}/metrics", timeout=30).text) == 0
