"""Background tasks stop even when one cancel is swallowed (as redis-py sometimes does)."""

from __future__ import annotations

import asyncio

import pytest

from fareway.process import stop_task


def test_a_task_that_swallows_a_cancel_is_still_stopped() -> None:
    async def body() -> None:
        cancels = 0

        async def swallows_the_first_cancel() -> None:
            nonlocal cancels
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancels += 1           # swallowed: the task runs on
            await asyncio.sleep(60)

        task = asyncio.create_task(swallows_the_first_cancel())
        await asyncio.sleep(0)
        await asyncio.wait_for(stop_task(task, retry_s=0.05), timeout=5)
        assert task.cancelled() and cancels == 1
    asyncio.run(body())


def test_the_exception_a_task_ended_with_is_raised() -> None:
    async def body() -> None:
        async def fails() -> None:
            raise RuntimeError("broken")
        task = asyncio.create_task(fails())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="broken"):
            await stop_task(task)
    asyncio.run(body())
