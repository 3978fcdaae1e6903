"""A bounded pool of request slots: work beyond the queue limit is refused, never piled up.

Heavy requests (an analysis, a forward pass) hold a slot while they run in threads, so the event
loop stays free for health checks; when every slot is taken and ``max_queued`` requests already
wait, the next one is answered RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sensorium.errors import ResourceExhausted


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
