"""No client can slow another: what one client's items or functions cost to unpickle on the
agent (a slow import, a slow ``__reduce__``) never stops the agent's loop, so another client's
heartbeats and results keep flowing."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import cloudpickle
import pytest

from pypline import Pipeline, work_pool
from pypline.util import unwrap

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)


def _slow_rebuild(value: int) -> SlowToLoad:
    time.sleep(2.5)  # as a slow import would
    return SlowToLoad(value)


class SlowToLoad:
    """An item that takes 2.5 s to unpickle."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __reduce__(self) -> Any:
        return (_slow_rebuild, (self.value,))


class SlowToLoadFunction:
    """A stage function that takes 2.5 s to unpickle."""

    def __call__(self, x: Any) -> Any:
        return x

    def __reduce__(self) -> Any:
        return (_slow_function, ())


def _slow_function() -> SlowToLoadFunction:
    time.sleep(2.5)
    return SlowToLoadFunction()


def value_of(x: SlowToLoad) -> int:
    return x.value


def double(x: int) -> int:
    return 2 * x


@pytest.mark.parametrize("slow", ["items", "function"])
def test_one_clients_slow_unpickling_does_not_stall_another(
    slow: str, arun: Any, agents: Any, use_agents: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a = agents(workers=2)
    use_agents(a, heartbeat_timeout=1.0)
    if slow == "items":
        slow_run = Pipeline([SlowToLoad(i) for i in range(2)]) >> work_pool(value_of, multi_proc=True)
        expected: list[Any] = [0, 1]
    else:
        slow_run = Pipeline(range(2)) >> work_pool(SlowToLoadFunction(), multi_proc=True)
        expected = [0, 1]
    steady = Pipeline(range(300)) >> work_pool(double, multi_proc=True, buffer=4)

    async def steady_after(delay: float) -> Any:
        await asyncio.sleep(delay)  # start once the slow client's payload is on the agent
        return await steady.run()

    async def both() -> tuple[Any, Any]:
        return await asyncio.gather(slow_run.run(), steady_after(0.5))

    with caplog.at_level(logging.WARNING, logger="pypline.backends.remote"):
        slow_result, steady_result = arun(both(), timeout=90)
    assert unwrap(steady_result) == [2 * x for x in range(300)]
    assert unwrap(slow_result) == expected
    dead = [r.getMessage() for r in caplog.records if "declared dead" in r.getMessage() or "local" in r.getMessage()]
    assert not dead, dead  # no client took the agent for gone, and nothing fell back to this machine
