"""``service.deadline.before``: a request's deadline around one awaitable."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.deadline import before


def test_returns_what_it_awaited_before_the_deadline() -> None:
    async def work() -> int:
        await asyncio.sleep(0.01)
        return 7

    assert asyncio.run(before(time.monotonic() + 5.0, work())) == 7


def test_cancels_the_work_and_raises_timeout_past_the_deadline() -> None:
    cancelled = False

    async def slow() -> None:
        nonlocal cancelled
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled = True
            raise

    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await before(start + 0.05, slow())
        return time.monotonic() - start

    took = asyncio.run(main())
    assert cancelled
    assert 0.04 <= took < 2.0


def test_a_future_is_cancelled_at_the_deadline_and_the_caller_goes_on() -> None:
    async def main() -> tuple[bool, str]:
        future = asyncio.get_running_loop().create_future()
        with pytest.raises(asyncio.TimeoutError):
            await before(time.monotonic() + 0.02, future)
        # the task that awaited is not left cancelled: it can await again
        await asyncio.sleep(0)
        return future.cancelled(), "went on"

    assert asyncio.run(main()) == (True, "went on")


def test_a_deadline_already_past_times_out_what_would_wait() -> None:
    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await before(time.monotonic() - 1.0, asyncio.sleep(1))

    asyncio.run(main())
