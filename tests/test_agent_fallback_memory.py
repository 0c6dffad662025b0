"""Falling back without a tax on every run: an agent that did not answer is remembered.

The policy (``Reachability``) is tested on a fake clock; the backend's use of it with a real
silent endpoint and then a real agent started on that endpoint.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import pytest

from pypline import Pipeline, configure, work_pool
from pypline.backends._reachability import FIRST_BACKOFF_S, MAX_BACKOFF_S, Reachability
from pypline.backends.remote import forget_unreachable
from pypline.util import unwrap


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_up_to_its_cap_and_an_answer_forgets() -> None:
    """Silent once: not waited for during FIRST_BACKOFF_S, then due; each further silence
    doubles the pause up to MAX_BACKOFF_S; an answer (or forget()) makes it due at once."""
    clock = FakeClock()
    memo = Reachability(clock)
    ep = "tcp://10.0.0.1:5555"
    assert memo.due(ep) and memo.retry_in(ep) is None
    assert memo.silent(ep) == FIRST_BACKOFF_S
    assert not memo.due(ep) and memo.retry_in(ep) == FIRST_BACKOFF_S
    clock.now += FIRST_BACKOFF_S - 0.001
    assert not memo.due(ep)
    clock.now += 0.001
    assert memo.due(ep)
    delays = [memo.silent(ep) for _ in range(6)]
    assert delays == [2 * FIRST_BACKOFF_S, 4 * FIRST_BACKOFF_S, 8 * FIRST_BACKOFF_S] + [MAX_BACKOFF_S] * 3
    assert memo.due("tcp://other:1")  # per endpoint
    memo.answered(ep)
    assert memo.due(ep)
    memo.silent(ep)
    memo.forget()
    assert memo.due(ep)


def where(x: int) -> tuple[int, int]:
    """(x, the parent of the worker process): this test process for the local fallback."""
    time.sleep(0.01)
    return x, os.getppid()


@pytest.mark.timeout(90)
def test_second_run_falls_back_at_once_then_rejoins_the_agent(
    arun: Any, caplog: Any, free_endpoint: Any, agents: Any
) -> None:
    """Run 1 waits connect_timeout for a silent agent, then falls back; run 2 does not wait
    and its warning says when the agent is waited for again; once an agent answers on that
    endpoint (asked in the background during a run), the memo is cleared and the next run
    goes to the agent."""
    forget_unreachable()
    endpoint = free_endpoint()
    configure(agents=[endpoint], connect_timeout=2.0, fallback="local")
    stage = work_pool(where, multi_proc=True, num_workers=2)
    try:
        with caplog.at_level(logging.WARNING, logger="pypline.backends.remote"):
            t0 = time.monotonic()
            first = unwrap(arun((Pipeline(range(4)) >> stage).run()))
            t1 = time.monotonic()
            second = unwrap(arun((Pipeline(range(4)) >> stage).run()))
            t2 = time.monotonic()
        assert t1 - t0 >= 2.0  # waited for the handshake
        assert t2 - t1 < 2.0  # did not wait again
        me = os.getpid()
        assert first == second == [(x, me) for x in range(4)]  # both ran here
        warnings = [r.getMessage() for r in caplog.records if "no pypline agent" in r.getMessage()]
        assert len(warnings) == 2
        assert "within 2 s" in warnings[0] and "waited for again in 30 s" in warnings[0]
        assert "not waited for this time" in warnings[1] and "no answer lately" in warnings[1]

        agent = agents(endpoint=endpoint)  # now something answers there
        deadline = time.monotonic() + 30
        while True:  # runs within the backoff still ask in the background and use it when it answers
            out = unwrap(arun((Pipeline(range(40)) >> stage).run()))
            if {ppid for _, ppid in out} != {me} or time.monotonic() > deadline:
                break
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pypline.backends.remote"):
            final = unwrap(arun((Pipeline(range(20)) >> stage).run()))
        assert me not in {ppid for _, ppid in final}, "the answering agent was not used"
        assert not [r for r in caplog.records if "no pypline agent" in r.getMessage()]
        agent.kill()
    finally:
        configure()
        forget_unreachable()
