"""Fuzzing the client: a fake agent answers a real run's TASKS with hostile messages first.

Structure-aware (hypothesis): real message types with fields of the wrong type, nested
deeper than the JSON parser goes, huge numbers, unknown fields, truncated or missing
payload frames, wrong frame counts, and raw bytes. After each case the run must end (an
``Ok``, or an ``Err`` naming what went wrong; never a hang), the link's reader must still
be alive or the link must have failed cleanly, and no task may die with an exception
nobody handled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import Any

import cloudpickle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pypline.backends.wire import protocol as P

from pypline import Pipeline, configure, work_pool

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from conftest import free_endpoint  # noqa: E402
from test_agent_protocol import FakeAgent  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(120)


def inc(x: int) -> int:
    return x + 1


AGENT_TYPES = sorted({P.HELLO_OK, P.STAGE_OK, P.RESULTS, P.PONG, P.CREDIT, P.NEED_FUNC, P.ERROR, P.DRAIN, P.BYE})

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_value = st.recursive(_scalar, lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=6), v, max_size=3),
                      max_leaves=6)
_fields = st.sampled_from(["sid", "n", "nf", "win", "seq", "instance", "inflight", "capacity", "workers", "draining",
                           "fns", "code", "message", "hello", "reason", "ack", "x"])


@st.composite
def hostile(draw: Any) -> list[bytes]:
    t = draw(st.sampled_from(AGENT_TYPES))
    kind = draw(st.sampled_from(["fields", "nested", "huge", "frames", "raw", "results"]))
    if kind == "raw":
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
    if kind == "nested":
        depth = draw(st.sampled_from([50, 1500, 2000]))  # past json's C parser depth on 3.11
        return [json.dumps({"t": t, "nf": 0}).encode()[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"]
    if kind == "huge":
        field = draw(_fields)
        number = draw(st.sampled_from([b"1" * 4000, b"1e999", b"-1e999", b"123456789012345678901234567890"]))
        return [json.dumps({"t": t, "nf": 0}).encode()[:-1] + b', "' + field.encode() + b'": ' + number + b"}"]
    if kind == "results":  # a RESULTS for our stage with a bad index or payload
        n = draw(st.integers(1, 3))
        index = draw(st.binary(max_size=19 * n + 3))
        payload = draw(st.lists(st.binary(max_size=32), min_size=0, max_size=3))
        nf = draw(st.sampled_from([len(payload), len(payload) + 1, 2 + len(payload)]))
        return [P.header(P.RESULTS, nf, sid=draw(st.integers(0, 2)), n=n, win=8), index, *payload]
    fields = draw(st.dictionaries(_fields, _value, max_size=6))
    payload = draw(st.lists(st.binary(max_size=32), max_size=3))
    if draw(st.booleans()):
        fields["nf"] = len(payload) + draw(st.sampled_from([0, 0, 1, -1]))
    return [json.dumps({"t": t, **fields}).encode(), *payload]


class HostileAgent(FakeAgent):
    """Sends the queued hostile messages before answering a TASKS message normally."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(endpoint)
        self.queue: list[list[bytes]] = []

    async def _answer(self, rid: bytes, sid: int, tids: list[int], values: list[Any]) -> None:
        for frames in self.queue:
            self._send(rid, *frames)
        self.queue = []
        await super()._answer(rid, sid, tids, values)


def test_hostile_agent_messages_never_hang_or_crash_the_client(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pypline.backends import _remote_link
    from pypline.backends.remote import ZmqBackend

    ended: list[str] = []  # the link's reader or ticker had stopped before the run closed it
    real_aclose = _remote_link.AgentLink.aclose

    async def checked_aclose(link: Any) -> None:
        ended.extend(f"{t.get_name()}: {t.exception()!r}" for t in link.tasks if t.done() and not t.cancelled())
        await real_aclose(link)

    monkeypatch.setattr(_remote_link.AgentLink, "aclose", checked_aclose)

    loop = asyncio.new_event_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    endpoint = free_endpoint()
    agent: HostileAgent = loop.run_until_complete(_make(endpoint))
    configure(agents=[endpoint], heartbeat_timeout=0.5, connect_timeout=3, max_lost=2)
    outcomes = {"ok": 0, "err": 0}

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(hostile(), min_size=1, max_size=3))
    def case(messages: list[list[bytes]]) -> None:
        agent.queue = messages
        pipeline = Pipeline(range(3)) >> work_pool(inc, multi_proc=True)
        result = loop.run_until_complete(asyncio.wait_for(pipeline.run(executor=ZmqBackend()), 30))
        outcomes["ok" if result.is_ok() else "err"] += 1
        if result.is_err():
            error = result.unwrap_err()
            assert error.failures or error.cause is not None, error  # an Err says what went wrong
        assert not ended, ended  # the reader survived every message

    try:
        case()
    finally:
        configure()
        loop.run_until_complete(agent.close())
        loop.close()
    assert not unhandled, unhandled[:3]
    assert sum(outcomes.values()) >= 30 and outcomes["ok"] >= 1, outcomes
    crashed = [r for r in caplog.records if r.levelno >= logging.ERROR and "stopped" in r.getMessage()]
    assert not crashed, [r.getMessage() for r in crashed]


async def _make(endpoint: str) -> HostileAgent:
    return HostileAgent(endpoint)
