"""Waiting for what the code under test does in the background (a settle, a refresh, a
spooled row), by its outcome rather than by a fixed sleep: a loaded CI machine stalls for
tenths of a second, so the deadline is generous, and a condition that holds returns at once."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

PATIENCE = 30.0  # seconds: far beyond any stall, still ends a test whose condition never holds


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str,
                     seconds: float = PATIENCE, interval: float = 0.01) -> None:
    """Return once ``check()`` (plain or async) is true; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:.0f} s: {what}")
        await asyncio.sleep(interval)
