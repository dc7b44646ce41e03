"""The scheduler loop's pacing (node/tasks.py): a busy node ticks TICK_SPACING_S apart, but work
that ended locally is submitted, and its slot refilled, FINISH_SPACING_S after the last tick.
Virtual time (trio's MockClock): the figures are exact, not measured."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mossnode.node.tasks import (
    FINISH_SPACING_S,
    MIN_TICK_S,
    TICK_SPACING_S,
    pause_before_tick,
)
from mossnode.protocols import tasks as T


def paused(last_ago: float, end_after: float | None, already: bool = False) -> float:
    """Seconds from the previous tick to the next one, with the previous tick ``last_ago``
    seconds before the pause starts and local work ending ``end_after`` seconds into it."""

    async def main() -> float:
        ended: list[T.Finished] = [T.Finished("A:x", {})] if already else []
        finish = trio.Event()
        last = trio.current_time() - last_ago

        async def end(delay: float) -> None:
            await trio.sleep(delay)
            ended.append(T.Finished("A:t", {}))
            finish.set()

        async with trio.open_nursery() as nursery:
            if end_after is not None:
                nursery.start_soon(end, end_after)
            await pause_before_tick(last, ended, finish)
            nursery.cancel_scope.cancel()
        return trio.current_time() - last

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_busy_node_waits_a_full_spacing() -> None:
    assert paused(0.0, None) == pytest.approx(TICK_SPACING_S)


def test_an_idle_node_ticks_soon_after_a_change() -> None:
    assert paused(5.0, None) == pytest.approx(5.0 + MIN_TICK_S)


def test_ended_work_cuts_the_spacing_short() -> None:
    assert FINISH_SPACING_S < TICK_SPACING_S
    # work ends 10 ms after the last tick: the next comes FINISH_SPACING_S after that tick
    assert paused(0.0, 0.01) == pytest.approx(FINISH_SPACING_S)
    # ended before the pause began: the same
    assert paused(0.0, None, already=True) == pytest.approx(FINISH_SPACING_S)


def test_late_ending_work_waits_only_for_company() -> None:
    # ends 0.12 s after the last tick: the tick follows MIN_TICK_S later, so that others ending
    # about then share it, well before the full spacing
    assert paused(0.0, 0.12) == pytest.approx(0.12 + MIN_TICK_S)
    assert 0.12 + MIN_TICK_S < TICK_SPACING_S
