"""What an agent holds: credit follows free workers (plus a small prefetch) and a memory budget,
so a client's large ``buffer`` cannot pile items up at one agent, a second agent gets work as
soon as it can take it, and a drain hands back at once everything that has not started."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from typing import Any

import cloudpickle
import pytest

from pypline import Pipeline, work_pool
from pypline.util import unwrap

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024


def slow_len(b: bytes) -> int:
    time.sleep(0.03)
    return len(b)


def fast_len(b: bytes) -> int:
    time.sleep(0.0005)  # fast enough for a deep window (~40 calls per worker), slow enough to watch
    return len(b)


def blocking(x: int) -> tuple[int, int]:
    time.sleep(0.5)
    return x, os.getppid()


class Peak:
    """Polls an agent's status in a thread; keeps the largest held_bytes / queued seen."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.held = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                st = self.agent.status()
            except Exception:  # noqa: BLE001 - the agent may be busy starting
                continue
            self.held = max(self.held, st["held_bytes"])
            time.sleep(0.01)

    def __enter__(self) -> Peak:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(10)


def test_a_large_client_buffer_does_not_pile_items_up_at_the_agent(arun: Any, agents: Any, use_agents: Any) -> None:
    """1 worker, client buffer=256, 1 MiB items taking 30 ms: the agent holds about two items
    (one running, one prefetched), not the client's whole buffer."""
    a = agents(workers=1)
    use_agents(a)
    items = (bytes(MiB) for _ in range(40))
    p = Pipeline(items) >> work_pool(slow_len, multi_proc=True, buffer=256)
    with Peak(a) as peak:
        assert unwrap(arun(p.run(), timeout=60)) == [MiB] * 40
    assert 0 < peak.held <= 3 * MiB + 64 * 1024, peak.held


def test_the_memory_budget_caps_what_fast_calls_may_hold(arun: Any, agents: Any, use_agents: Any) -> None:
    """Fast calls earn a deep window (10 MiB of these items); --max-memory 1 still keeps the
    items held near 1 MiB."""
    a = agents("--max-memory", "1", workers=1)
    use_agents(a)
    n = 1000
    items = (bytes(64 * 1024) for _ in range(n))
    p = Pipeline(items) >> work_pool(fast_len, multi_proc=True, buffer=1024)
    with Peak(a) as peak:
        assert unwrap(arun(p.run(), timeout=60)) == [64 * 1024] * n
    assert 0 < peak.held <= MiB + 2 * 65 * 1024, peak.held


def test_work_goes_to_the_agent_with_free_workers(arun: Any, agents: Any, use_agents: Any) -> None:
    """Two agents of 2 workers, a 4-worker stage of blocking items: both agents run items."""
    a, b = agents(workers=2), agents(workers=2)
    use_agents(a, b)
    p = Pipeline(range(8)) >> work_pool(blocking, multi_proc=True, num_workers=4, buffer=16)
    out = unwrap(arun(p.run(), timeout=60))
    assert [x for x, _ in out] == list(range(8))
    served = {pid: sum(1 for _, p_ in out if p_ == pid) for pid in (a.pid, b.pid)}
    assert min(served.values()) >= 2, served


def test_drain_hands_back_what_has_not_started_at_once(arun: Any, agents: Any, use_agents: Any) -> None:
    """SIGTERM with a backlog: the agent exits once its running call ends, not after the backlog."""
    a = agents("--drain-timeout", "30", workers=1)
    use_agents(a, fallback="local")
    p = Pipeline(range(10)) >> work_pool(blocking, multi_proc=True, num_workers=4, buffer=16)
    timing: dict[str, float] = {}

    async def main() -> list[Any]:
        out = []
        async with p.stream() as results:
            async for r in results:
                out.append(unwrap(r))
                if "sigterm" not in timing:
                    timing["sigterm"] = time.monotonic()
                    a.send(signal.SIGTERM)
                    threading.Thread(target=lambda: (a.wait(60), timing.setdefault("exit", time.monotonic()))).start()
        return out

    out = arun(main(), timeout=90)
    assert sorted(x for x, _ in out) == list(range(10))
    deadline = time.monotonic() + 10
    while "exit" not in timing and time.monotonic() < deadline:
        time.sleep(0.05)
    assert timing["exit"] - timing["sigterm"] < 2.0, timing  # one 0.5 s call, not the backlog
    assert a.wait(1) == 0
