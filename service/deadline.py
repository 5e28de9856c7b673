"""Awaiting something no later than a request's deadline (a ``time.monotonic()`` time)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def before(deadline: float, awaitable: Awaitable[T]) -> T:
    """``await awaitable``; past ``deadline``, cancel it and raise ``asyncio.TimeoutError``.

    Why not ``asyncio.wait_for`` everywhere: on Python 3.11 it wraps a coroutine in a task of
    its own and waits for a future beside it, so every request paid for a task and two more
    trips through the event loop. ``asyncio.timeout`` (3.11+) cancels the awaiting task itself
    at the deadline instead; 3.12's ``wait_for`` is built on it. 3.10 keeps ``wait_for``.
    """
    delay = deadline - time.monotonic()
    if sys.version_info < (3, 11):  # pragma: no cover - CI runs 3.11
        return await asyncio.wait_for(awaitable, delay)
    async with asyncio.timeout(delay):
        return await awaitable
