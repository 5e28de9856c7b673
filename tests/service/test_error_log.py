"""Server-side error answers are logged, but not one line per answer under overload."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest
from fastapi import FastAPI

from service.api.errors import ThrottledWarnings, install_error_handlers
from service.errors import QueueFull, RequestTimeout

LOGGER = "test.throttled"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_one_line_per_interval_and_status_with_the_count_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    warnings = ThrottledWarnings(logging.getLogger(LOGGER), interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(500):
            warnings.warn(503, "queue full")
            clock.now += 0.01  # 500 answers in 5 s
        warnings.warn(504, "too slow")  # another status is not folded into the 503s
        clock.now = 110.5
        warnings.warn(503, "queue full again")
        warnings.warn(503, "queue full again")
    assert messages(caplog) == [
        "503: queue full",
        "504: too slow",
        "503: queue full again (and 499 more 503 answers in the last 10 s)",
    ]


def test_the_service_error_handler_throttles_its_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/full")
    async def full() -> None:
        raise QueueFull("the queue of m is full; retry later", retry_after=2)

    @app.get("/slow")
    async def slow() -> None:
        raise RequestTimeout("waited too long")

    async def ask() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get("/full") for _ in range(50)] + [await client.get("/slow")]

    with caplog.at_level(logging.WARNING, logger="service.api"):
        answers = asyncio.run(ask())
    assert [a.status_code for a in answers] == [503] * 50 + [504]
    assert answers[0].json() == {"detail": "the queue of m is full; retry later"}
    assert answers[0].headers["Retry-After"] == "2"
    logged = [r.getMessage() for r in caplog.records if r.name == "service.api"]
    assert logged == ["503: the queue of m is full; retry later", "504: waited too long"]
