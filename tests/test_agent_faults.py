"""Faults with real agents: kill -9, a partition that heals (SIGSTOP/SIGCONT), SIGTERM drain.

The invariant under every fault: the run delivers every item's output exactly once
(execution is at-least-once; a late answer from a presumed-dead agent is dropped).
Faults are injected from inside the consumer of ``stream()`` once some results have
arrived, so they always hit a run in progress; nothing here sleeps to wait for state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

import cloudpickle
import pytest

from pypline import Pipeline, WorkerLost, work_pool
from pypline.util import is_ok, unwrap, unwrap_err

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slow_square(x: int) -> tuple[int, int]:
    time.sleep(0.02)
    return (x * x, os.getppid())


def slower_square(x: int) -> tuple[int, int]:
    time.sleep(0.4)
    return (x * x, os.getppid())


async def _stream_with_fault(pipeline: Pipeline, after: int, fault: Any, **run_kw: Any) -> tuple[list[Any], list[Any]]:
    """Consume an unordered stream; call ``fault()`` once ``after`` results arrived. (outputs, failures)."""
    outs: list[Any] = []
    fails: list[Any] = []
    fired = False
    async with pipeline.stream(**run_kw) as s:
        async for r in s:
            if is_ok(r):
                outs.append(unwrap(r))
            else:
                fails.append(unwrap_err(r))
            if not fired and len(outs) >= after:
                fired = True
                fault()
    return outs, fails


def _exactly_once(outs: list[Any], n: int) -> None:
    values = Counter(o[0] for o in outs)
    assert sorted(values) == [x * x for x in range(n)], "an item is missing"
    assert max(values.values()) == 1, f"duplicates: {[v for v, c in values.items() if c > 1][:5]}"


@pytest.mark.timeout(60)
def test_kill_9_one_of_two_agents_delivers_every_item_exactly_once(
    arun: Any, agents: Any, use_agents: Any, caplog: Any
) -> None:
    """kill -9 of an agent mid-run: its in-flight items are re-dispatched; every item arrives once."""
    a, b = agents(), agents()
    use_agents(a, b, heartbeat_timeout=1.0)
    n = 300
    p = Pipeline(range(n)) >> work_pool(slow_square, multi_proc=True, num_workers=2, buffer=32)
    with caplog.at_level(logging.WARNING, logger="pypline.backends.remote"):
        outs, fails = arun(_stream_with_fault(p, 40, lambda: a.send(signal.SIGKILL)), timeout=45)
    assert fails == []
    _exactly_once(outs, n)
    assert a.proc.poll() == -signal.SIGKILL
    assert {o[1] for o in outs} == {a.pid, b.pid}
    assert any(f"agent {a.where} declared dead" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_sigstop_then_sigcont_is_a_partition_that_heals(arun: Any, agents: Any, use_agents: Any) -> None:
    """A frozen agent is declared dead after heartbeat_timeout and its items re-run elsewhere; when it
    thaws, nothing it still sends for those items reaches the output (no duplicates) and it serves
    again. (Whether it sends late results before it handles the client's new HELLO depends on its
    event order; test_agent_protocol checks the dropping of late results deterministically.)"""
    from pypline.backends.remote import ZmqBackend

    a, b = agents(), agents()
    use_agents(a, b, heartbeat_timeout=0.8)
    backend = ZmqBackend()
    n = 300
    p = Pipeline(range(n)) >> work_pool(slow_square, multi_proc=True, num_workers=2, buffer=32)

    def freeze() -> None:
        a.send(signal.SIGSTOP)
        asyncio.get_running_loop().call_later(2.0, os.kill, a.pid, signal.SIGCONT)

    outs, fails = arun(_stream_with_fault(p, 30, freeze, executor=backend), timeout=45)
    assert fails == []
    _exactly_once(outs, n)
    stats = backend.statistics()[a.endpoint]
    assert stats["deaths"] >= 1
    a.wait_ready(timeout=10)  # thawed, and answering again
    # And it takes work again in the next run.
    p2 = Pipeline(range(60)) >> work_pool(slow_square, multi_proc=True, num_workers=2, buffer=32)
    out2 = unwrap(arun(p2.run()))
    assert a.pid in {o[1] for o in out2}


@pytest.mark.timeout(60)
def test_sigterm_drain_exits_0_and_hands_running_items_back(arun: Any, agents: Any, use_agents: Any) -> None:
    """SIGTERM: the agent takes no new work, hands queued and (after --drain-timeout) running items back
    as lost, says BYE and exits 0; the client finishes them elsewhere (here: the local fallback)."""
    a = agents("--drain-timeout", "0.1")
    use_agents(a, fallback="local")
    n = 10
    p = Pipeline(range(n)) >> work_pool(slower_square, multi_proc=True, num_workers=2, buffer=8)
    outs, fails = arun(_stream_with_fault(p, 1, lambda: a.send(signal.SIGTERM)), timeout=45)
    assert a.wait(10) == 0
    assert fails == []
    _exactly_once(outs, n)
    log = a.log()
    assert "draining" in log and "handed back" in log and "drained; exiting" in log
    assert os.getpid() in {o[1] for o in outs}  # the rest ran locally


@pytest.mark.timeout(60)
def test_sigterm_drain_lets_running_items_finish(arun: Any, agents: Any, use_agents: Any) -> None:
    """With enough --drain-timeout, items running at SIGTERM finish on the agent and are delivered."""
    a = agents("--drain-timeout", "20")
    use_agents(a, fallback="local")
    n = 8
    p = Pipeline(range(n)) >> work_pool(slower_square, multi_proc=True, num_workers=2, buffer=8)
    outs, fails = arun(_stream_with_fault(p, 1, lambda: a.send(signal.SIGTERM)), timeout=45)
    assert a.wait(10) == 0
    assert fails == []
    _exactly_once(outs, n)
    assert "still running after" not in a.log()
    # The first result plus the items running at SIGTERM came from the agent.
    assert sum(1 for o in outs if o[1] == a.pid) >= 2


@pytest.mark.timeout(60)
def test_losing_the_only_agent_falls_back_to_local(arun: Any, agents: Any, use_agents: Any, caplog: Any) -> None:
    """When every agent is gone mid-run, fallback='local' finishes the run on this machine."""
    a = agents()
    use_agents(a, fallback="local")
    n = 120
    p = Pipeline(range(n)) >> work_pool(slow_square, multi_proc=True, num_workers=2, buffer=16)
    with caplog.at_level(logging.WARNING, logger="pypline.backends.remote"):
        outs, fails = arun(_stream_with_fault(p, 20, lambda: a.send(signal.SIGKILL)), timeout=45)
    assert fails == []
    _exactly_once(outs, n)
    assert {o[1] for o in outs} == {a.pid, os.getpid()}
    assert any("continues on the local machine" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_items_lost_more_than_max_lost_times_fail_with_worker_lost(arun: Any, agents: Any, use_agents: Any) -> None:
    """max_lost=0: an item in flight on an agent that dies fails with WorkerLost naming that agent;
    its retries are not used, and the other items complete."""
    a = agents()
    use_agents(a, fallback="local", max_lost=0)
    n = 60
    p = Pipeline(range(n)) >> work_pool(slow_square, multi_proc=True, num_workers=2, buffer=8, retries=3)
    outs, fails = arun(_stream_with_fault(p, 10, lambda: a.send(signal.SIGKILL)), timeout=45)
    assert fails, "something was in flight on the killed agent"
    for f in fails:
        assert isinstance(f.error, WorkerLost) and a.where in f.error.agents and f.attempts == 1
    values = Counter(o[0] for o in outs)
    assert max(values.values()) == 1
    assert len(values) + len(fails) == n


@pytest.mark.timeout(60)
def test_fallback_error_fails_waiting_items_when_every_agent_is_gone(arun: Any, agents: Any, use_agents: Any) -> None:
    """fallback='error' and the only agent dies mid-run: the waiting items fail (WorkerLost), the run ends."""
    a = agents()
    use_agents(a, fallback="error", connect_timeout=0.5)
    n = 60
    p = Pipeline(range(n)) >> work_pool(slow_square, multi_proc=True, num_workers=2, buffer=8)
    outs, fails = arun(_stream_with_fault(p, 10, lambda: a.send(signal.SIGKILL)), timeout=45)
    assert fails and all(isinstance(f.error, WorkerLost) for f in fails)
    assert len({o[0] for o in outs}) + len(fails) == n
