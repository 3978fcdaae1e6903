"""A bounded pool of request slots: work beyond the queue limit is refused, never piled up.

Heavy requests (an analysis, a forward pass) hold a slot while they run in threads, so the event
loop stays free for health checks; when every slot is taken and ``max_queued`` requests already
wait, the next one is answered RESOURCE_EXHAUSTED at once.

A slot is held until its thread has really finished, also when the RPC ends first (the client
cancelled, its deadline passed): see ``in_thread``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from sensorium.errors import Cancelled, ResourceExhausted

logger = logging.getLogger(__name__)

T = TypeVar("T")


async def in_thread(work: Callable[[threading.Event], T]) -> T:
    """``work(cancel)`` in a worker thread, awaited until the thread has ended, however the RPC ends.

    Why not plain ``asyncio.to_thread``: cancelling the task that awaits it (the client went away,
    its deadline passed) returns at once while the thread keeps computing, so the caller's slot
    would be released with the work still running and the next request would wait behind it
    unseen. Here a cancellation sets ``cancel`` (long computations check it between batches and
    stop early, raising ``sensorium.errors.Cancelled``) and the cancellation is passed on only once
    the thread has returned, so a slot is held exactly as long as its work runs.
    """
    cancel = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(work, cancel))
    stopped: asyncio.CancelledError | None = None
    since = 0.0
    while not task.done():
        try:
            await asyncio.wait({task})  # unlike awaiting the task, never cancels it
        except asyncio.CancelledError as exc:
            stopped, since = stopped or exc, since or time.monotonic()
            cancel.set()
    if stopped is None:
        return task.result()
    outcome = task.exception()  # retrieved either way: the RPC is gone, nobody reads it
    logger.info("cancelled work stopped", extra={
        "stopped_early": isinstance(outcome, Cancelled), "waited_seconds": round(time.monotonic() - since, 3),
        **({"done": outcome.done, "total": outcome.total, "unit": outcome.unit} if isinstance(outcome, Cancelled)
           else {})})
    raise stopped


class WorkSlots:
    def __init__(self, service: str, workers: int, max_queued: int) -> None:
        self.service = service
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(workers)
        self._waiting = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self._waiting >= self.max_queued:
            raise ResourceExhausted(f"the {self.service} is busy: {self._waiting} requests are queued "
                                    f"(limit max_queued={self.max_queued}); retry later")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    async def run(self, work: Callable[[threading.Event], T]) -> T:
        """``work(cancel)`` in a thread under a slot, the slot held until the thread ends (``in_thread``)."""
        async with self.slot():
            return await in_thread(work)

