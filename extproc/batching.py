"""Natural batching (group commit) for the ledger: the first item goes out at once; items that
arrive while ``max_in_flight`` batches are running wait for one to finish and go out
together, as one statement in one transaction. No timer: at low load nothing waits, under
load the batch grows with the queue and the per-commit and per-round-trip costs are divided
by its size.

The batch function returns one result per item, in order, or raises; when it raises, every
item is run again on its own (``run_one``), so one failing item never fails the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Awaitable[list[R]]],
        run_one: Callable[[T], Awaitable[R]],
        *,
        max_batch: int = 64,
        max_in_flight: int = 2,
        fatal: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.run_batch = run_batch
        self.run_one = run_one
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        # Errors that mean "the database is not there": no point retrying item by item.
        self.fatal = fatal
        self.queue: list[tuple[T, asyncio.Future[R]]] = []
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.items = 0

    @property
    def waiting(self) -> int:
        """Items queued behind the batches in flight (the backlog gauge)."""
        return len(self.queue)

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        while self.queue and self.in_flight < self.max_in_flight:
            batch, self.queue = self.queue[:self.max_batch], self.queue[self.max_batch:]
            self.in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        self.batches += 1
        self.items += len(items)
        try:
            try:
                results = await self.run_batch(items) if len(items) > 1 else [await self.run_one(items[0])]
            except Exception as exc:
                if isinstance(exc, self.fatal) or len(batch) == 1:
                    for _, future in batch:
                        _resolve(future, error=exc)
                    return
                log.warning("batch of %d failed (%s): running its items one by one", len(items), exc)
                for item, future in batch:
                    try:
                        result = await self.run_one(item)
                    except Exception as one:  # this item's own failure, for its caller
                        _resolve(future, error=one)
                    else:
                        _resolve(future, result)
                return
            for (_, future), result in zip(batch, results, strict=True):
                _resolve(future, result)
        finally:
            self.in_flight -= 1
            self._kick()


def _resolve(future: asyncio.Future[R], result: R | None = None, *, error: BaseException | None = None) -> None:
    """Give a waiting caller its result or its error (not if it stopped waiting)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
