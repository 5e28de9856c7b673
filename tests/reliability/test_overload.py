"""Overload: open-loop arrivals at about 3x the measured capacity for 20 s.

The server is the test launcher with a 0.1 s forward per batch of at most 4 images (a model
slow enough that the load generator, on the same small machine, can outrun it 3x; the
forward sleeps, so the server's CPU is all HTTP, decoding and batching) and a queue of 32
images (``bounded_server``). Capacity is measured first (closed loop), then requests arrive at
a fixed rate whatever the answers. Figures are printed (``-s``).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.service.conftest import ServiceProcess, digit_png

from .conftest import set_forward
from .helpers import closed_loop, median, open_loop, percentile, timed_post

pytestmark = pytest.mark.slow

FORWARD_S = 0.1
REQUEST_TIMEOUT_S = 4.0  # bounded_server's setting
OVERLOAD = 3.0
DURATION_S = 20.0
RECOVERY_LIMIT_S = 5.0


async def sequential(url: str, body: bytes, seconds: float, count: int | None = None) -> list:
    outcomes = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop and (count is None or len(outcomes) < count):
        outcomes.append(await timed_post(url, "/predict", body, "image/png"))
    return outcomes


def test_open_loop_overload_sheds_and_recovers(bounded_server: ServiceProcess):
    url = bounded_server.url
    body = digit_png(7, 8)
    set_forward(bounded_server, delay_s=FORWARD_S)
    try:
        idle = asyncio.run(sequential(url, body, 10, count=15))
        assert {o.status for o in idle} == {200}
        idle_p50 = median([o.latency for o in idle])

        warm = asyncio.run(closed_loop(url, "/predict", body, "image/png", clients=24, duration=4))
        ok = [o for o in warm if o.status == 200 and o.start > warm[0].start + 0.5]
        assert {o.status for o in warm} == {200}
        capacity = len(ok) / (max(o.end for o in ok) - min(o.start for o in ok))
        rate = OVERLOAD * capacity

        async def overload_then_probe() -> tuple[list, float, list]:
            outcomes, last_sent = await open_loop(url, "/predict", body, "image/png",
                                                  rate=rate, duration=DURATION_S)  # fmt: skip
            probes = await sequential(url, body, RECOVERY_LIMIT_S + 2)
            return outcomes, last_sent, probes

        # probes start once the last arrival is answered: recovery counts the drain too
        outcomes, last_sent, probes = asyncio.run(overload_then_probe())
        alive = bounded_server.proc.poll() is None
        with bounded_server.client() as client:
            ready = client.get("/readyz").status_code
    finally:
        set_forward(bounded_server, delay_s=0.0)

    sent_rate = len(outcomes) / (last_sent - outcomes[0].start)
    accepted = [o for o in outcomes if o.status == 200]
    shed = [o for o in outcomes if o.status == 503]
    other = [o for o in outcomes if o.status not in (200, 503)]
    shed_ratio = len(shed) / len(outcomes)
    goodput = len(accepted) / (max(o.end for o in accepted) - outcomes[0].start)
    bound = 1.5 * idle_p50 + 0.01
    recovered_at = None
    for i in range(len(probes) - 4):
        if median([p.latency for p in probes[i : i + 5]]) <= bound:
            recovered_at = probes[i].start - last_sent
            break
    print(
        f"\nFIGURE overload: idle p50 {idle_p50 * 1000:.0f} ms; capacity {capacity:.1f} req/s; "
        f"offered {sent_rate:.1f} req/s ({sent_rate / capacity:.2f}x) for {DURATION_S:.0f} s = "
        f"{len(outcomes)} requests; 200: {len(accepted)}, 503: {len(shed)}, other: {len(other)}; "
        f"shed ratio {shed_ratio:.2f}; goodput {goodput:.1f} req/s; accepted p50/p99/max "
        f"{median([o.latency for o in accepted]) * 1000:.0f}/"
        f"{percentile([o.latency for o in accepted], 0.99) * 1000:.0f}/"
        f"{max(o.latency for o in accepted) * 1000:.0f} ms; 503 p99 "
        f"{percentile([o.latency for o in shed], 0.99) * 1000:.0f} ms; p50 back under "
        f"{bound * 1000:.0f} ms {recovered_at if recovered_at is None else round(recovered_at, 2)} s "
        f"after the load stopped"
    )
    assert alive and ready == 200
    assert sent_rate >= 2.5 * capacity  # the generator really offered about 3x
    assert other == [], [(o.status, o.error, o.detail) for o in other[:5]]
    assert 0.4 <= shed_ratio <= 0.85  # 3x offered: about 2/3 must be shed
    assert goodput >= 0.7 * capacity  # shedding kept the server working at capacity
    for response in shed:
        assert response.retry_after is not None and response.retry_after.isdigit()
        assert int(response.retry_after) >= 1
        assert response.detail and "full" in response.detail
    assert percentile([o.latency for o in shed], 0.99) < 1.0  # refused at once, not queued
    assert max(o.latency for o in accepted) < REQUEST_TIMEOUT_S
    assert all(p.status == 200 for p in probes)
    assert recovered_at is not None and recovered_at <= RECOVERY_LIMIT_S
