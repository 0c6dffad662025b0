"""Sessions under stalls and bursts: a client's repeated HELLO costs no worker processes, late
traffic from an ended session is routine (not a security event), a session's time-to-live is
bounded whatever the client asks, and warm workers are never shared between clients."""

from __future__ import annotations

import sys
import time
from typing import Any

import cloudpickle
import psutil
import pytest
import zmq
from pypline.backends.wire import protocol as P

pytestmark = pytest.mark.timeout(90)

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def nap(x: float) -> float:
    time.sleep(x)
    return x


def _recv(sock: zmq.Socket, t: str, timeout_ms: int = 15000) -> dict[str, Any]:
    while True:
        assert sock.poll(timeout_ms), f"no {t}"
        frames = sock.recv_multipart()
        h = P.parse_header(frames)
        if h["t"] == t:
            return h


def _client(endpoint: str, hb: float = 30.0) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    sock.send_multipart([P.header(P.HELLO, hb=hb, hello=1, **P.local_versions())])
    _recv(sock, P.HELLO_OK)
    return sock


def _declare(sock: zmq.Socket, sid: int = 1) -> None:
    fn = cloudpickle.dumps(nap, protocol=5)
    fid = P.fn_id(fn)
    sock.send_multipart([P.header(P.FUNC, 1, fn=fid), fn])
    sock.send_multipart(
        [P.header(P.STAGE, sid=sid, name="nap", kinds=["sync"], fns=[fid], fork=False, timeout=None, retries=1, buffer=2)]
    )
    _recv(sock, P.STAGE_OK)


def _send_tasks(sock: zmq.Socket, values: list[Any], first_tid: int = 1, sid: int = 1) -> None:
    enc = P.Encoder()
    for i, v in enumerate(values):
        enc.add(first_tid + i, 1, -1, v)
    n, frames = enc.finish()
    sock.send_multipart([P.header(P.TASKS, len(frames), sid=sid, n=n), *frames])


def _workers(agent: Any) -> set[int]:
    return {c.pid for c in psutil.Process(agent.proc.pid).children(recursive=True) if c.status() != "zombie"}


def test_repeated_hello_costs_no_worker_processes(agents: Any) -> None:
    """A stalled client's queued HELLO retries arrive in a burst while its call still runs: the
    agent's worker processes are the same before and after, and the new session gets results."""
    a = agents(workers=1)
    sock = _client(a.endpoint)
    try:
        _declare(sock)
        before = _workers(a)
        assert before
        _send_tasks(sock, [0.5])  # a call that is still running when the HELLOs come
        time.sleep(0.1)
        for seq in range(2, 7):
            sock.send_multipart([P.header(P.HELLO, hb=30.0, hello=seq, **P.local_versions())])
        for _ in range(5):
            _recv(sock, P.HELLO_OK)
        _declare(sock)
        _send_tasks(sock, [0.0], first_tid=1)  # the same task id as the abandoned call's
        h = _recv(sock, P.RESULTS)
        assert h["n"] == 1
        assert _workers(a) == before
        assert "killing" not in a.log().lower()
    finally:
        sock.close(0)


def test_late_traffic_of_an_ended_session_is_counted_as_stale(agents: Any) -> None:
    a = agents("--backend", "asyncio")
    sock = _client(a.endpoint)
    stranger = zmq.Context.instance().socket(zmq.DEALER)
    stranger.linger = 0
    stranger.connect(a.endpoint)
    try:
        sock.send_multipart([P.header(P.BYE, reason="test")])
        time.sleep(0.2)
        for seq in range(3):
            sock.send_multipart([P.header(P.PING, seq=seq)])
            assert _recv(sock, P.ERROR)["code"] == P.E_NO_SESSION  # told to say HELLO again
        stranger.send_multipart([P.header(P.PING, seq=1)])
        _recv(stranger, P.ERROR)
        counters = a.status()["counters"]
        assert counters["stale"] == 3 and counters["unhelloed"] == 1
        assert a.log().count("before HELLO") == 1  # only the stranger's message is a warning
    finally:
        sock.close(0)
        stranger.close(0)


def test_a_session_ttl_is_clamped(agents: Any) -> None:
    from pypline.worker_agent.session import MAX_TTL_S

    a = agents("--backend", "asyncio")
    sock = _client(a.endpoint, hb=1e308)
    try:
        sessions = a.status()["sessions"]
        assert [s["ttl_s"] for s in sessions] == [MAX_TTL_S]
    finally:
        sock.close(0)


def test_warm_executors_are_keyed_by_client_identity() -> None:
    from pypline.worker_agent.session import build_spec, stage_key

    h = {"fns": ["a" * 32], "kinds": ["sync"], "fork": False, "timeout": None, "retries": 1, "name": "s"}
    spec = build_spec(h, [abs], 2)
    assert stage_key(h, spec, "client-one") != stage_key(h, spec, "client-two")
    assert stage_key(h, spec, "client-one") == stage_key(dict(h), spec, "client-one")


def die_on_zero(x: int) -> int:
    if x == 0:
        import os

        os._exit(3)
    return x


def test_a_worker_crash_leaves_no_spare_process(agents: Any) -> None:
    """After a worker process dies and is replaced, the agent has as many worker processes as
    before (none lingers for the agent's life)."""
    a = agents(workers=1)
    sock = _client(a.endpoint)
    try:
        fn = cloudpickle.dumps(die_on_zero, protocol=5)
        fid = P.fn_id(fn)
        sock.send_multipart([P.header(P.FUNC, 1, fn=fid), fn])
        sock.send_multipart([P.header(P.STAGE, sid=1, name="d", kinds=["sync"], fns=[fid], fork=False,
                                      timeout=None, retries=1, buffer=2)])
        _recv(sock, P.STAGE_OK)
        before = _workers(a)
        _send_tasks(sock, [0])
        _recv(sock, P.RESULTS)  # WorkerDied for that task
        _send_tasks(sock, [5], first_tid=2)
        _recv(sock, P.RESULTS)
        deadline = time.monotonic() + 5
        while len(_workers(a)) != len(before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_workers(a)) == len(before)
    finally:
        sock.close(0)
