"""Request slots: beyond the queue limit a request is refused at once, and slots are released."""

from __future__ import annotations

import asyncio

import pytest

from sensorium.errors import ResourceExhausted
from services.common.workers import WorkSlots


def test_full_queue_is_refused_and_slots_come_back() -> None:
    async def scenario() -> list[str]:
        slots = WorkSlots("analyzer", workers=1, max_queued=1)
        gate = asyncio.Event()
        outcomes: list[str] = []

        async def job(name: str) -> None:
            try:
                async with slots.slot():
                    await gate.wait()
                    outcomes.append(name)
            except ResourceExhausted as exc:
                outcomes.append(f"refused: {exc}")

        running = asyncio.create_task(job("first"))  # holds the only slot
        await asyncio.sleep(0)
        queued = asyncio.create_task(job("second"))  # waits
        await asyncio.sleep(0)
        await job("third")  # one running, one queued: refused
        gate.set()
        await asyncio.gather(running, queued)
        await job("fourth")  # every slot is free again
        return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes[0].startswith("refused: the analyzer is busy: 1 requests are queued (limit max_queued=1)")
    assert outcomes[1:] == ["first", "second", "fourth"]


@pytest.mark.parametrize("workers", [1, 3])
def test_slots_bound_concurrency(workers: int) -> None:
    async def scenario() -> int:
        slots = WorkSlots("extractor", workers=workers, max_queued=100)
        active = peak = 0

        async def job() -> None:
            nonlocal active, peak
            async with slots.slot():
                active += 1
                peak = max(peak, active)
                await asyncio.sleep(0.01)
                active -= 1

        await asyncio.gather(*(job() for _ in range(10)))
        return peak

    assert asyncio.run(scenario()) == workers
