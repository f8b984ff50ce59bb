"""The test clock itself: jumps over sleeps, and turns a hang into an error."""

import asyncio

import pytest

from conftest import Deadlock, VirtualClockLoop, run_virtual


@pytest.mark.asyncio
async def test_sleep_costs_no_wall_time_and_is_exact() -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualClockLoop)
    start = loop.time()
    await asyncio.sleep(3600)
    assert loop.time() - start == pytest.approx(3600)


def test_a_future_nobody_resolves_is_a_deadlock() -> None:
    async def hang() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(Deadlock):
        run_virtual(hang())
