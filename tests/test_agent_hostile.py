"""One hostile message must never make an agent (or a client) deaf.

A header of deeply nested JSON fits under MAX_HEADER yet makes ``json.loads`` raise
``RecursionError``; any exception while handling one message must drop that message,
count it and keep the reader alive. If a reader dies anyway, the agent exits non-zero
(a supervisor restarts it) instead of staying up and never answering again.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import cloudpickle
import pytest
import zmq
from pypline.backends.wire import protocol as P

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(60)

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from conftest import free_endpoint  # noqa: E402


def nested(depth: int, t: str = P.PING) -> bytes:
    """A header of message type ``t`` whose field ``x`` nests ``depth`` lists deep."""
    head = json.dumps({"t": t, "nf": 0, "seq": 1}).encode()[:-1]
    return head + b', "x": ' + b"[" * depth + b"]" * depth + b"}"


def _ping(endpoint: str, seq: int = 7, timeout_ms: int = 5000) -> dict[str, Any] | None:
    """HELLO, then PING on a fresh connection: the PONG's header, or None if no answer."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    try:
        sock.send_multipart([P.header(P.HELLO, hb=30.0, hello=1, **P.local_versions())])
        if not sock.poll(timeout_ms):
            return None
        assert P.parse_header(sock.recv_multipart())["t"] == P.HELLO_OK
        sock.send_multipart([P.header(P.PING, seq=seq)])
        while sock.poll(timeout_ms):
            h = P.parse_header(sock.recv_multipart())
            if h["t"] == P.PONG:
                return h
        return None
    finally:
        sock.close(0)


DEPTH = 2000  # 4 KB: under MAX_HEADER, and deeper than json's C parser goes on Python 3.11


def test_parse_header_turns_any_parser_failure_into_a_protocol_error(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = nested(DEPTH)
    assert len(frame) < P.MAX_HEADER
    try:
        P.parse_header([frame])  # accepted where the parser can go this deep (the field is unknown)
    except P.ProtocolError as exc:
        assert "header is not valid JSON" in str(exc)

    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")

    monkeypatch.setattr(P.json, "loads", explode)
    with pytest.raises(P.ProtocolError, match="header is not valid JSON: RecursionError"):
        P.parse_header([P.header(P.PING, seq=1)])


@pytest.mark.parametrize("after_hello", [False, True])
def test_a_deeply_nested_header_does_not_make_the_agent_deaf(shared_agent: Any, after_hello: bool) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(shared_agent.endpoint)
    try:
        if after_hello:
            sock.send_multipart([P.header(P.HELLO, hb=30.0, hello=1, **P.local_versions())])
            assert sock.poll(5000)
            sock.recv_multipart()
        before = shared_agent.status()["counters"]["malformed"]
        for t in (P.PING, P.TASKS, P.HELLO, P.STAGE):
            sock.send_multipart([nested(DEPTH, t)])
        pong = _ping(shared_agent.endpoint)
        assert pong is not None, shared_agent.log()
        # TASKS, HELLO and STAGE lack their required fields whatever the parser does; the
        # PING is malformed where json cannot go this deep (3.11), a valid PING where it can.
        assert shared_agent.status()["counters"]["malformed"] >= before + 3
    finally:
        sock.close(0)
    assert "Traceback" not in shared_agent.log()  # dropped as malformed, not as a crash


def test_an_agent_whose_reader_dies_stops_with_a_failure_status(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reader that stops for a reason nobody handled takes the agent down, loudly: serve()
    returns a non-zero status (the CLI exits with it), instead of leaving a deaf process up."""
    import asyncio
    import threading

    from pypline.worker_agent import server

    def broken_recv(sock: Any) -> Any:
        raise zmq.ZMQError(zmq.EFSM, "the socket is in a state nobody expected")

    monkeypatch.setattr(server, "recv_now", broken_recv)  # the reader's second read fails
    agent = server.Agent(server.AgentConfig(bind=free_endpoint(), workers=1, backend="asyncio"))

    def poke(a: server.Agent) -> None:
        def send() -> None:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(a.endpoint)
            sock.send_multipart([P.header(P.PING, seq=1)])
            sock.close(1000)

        threading.Thread(target=send).start()

    status = asyncio.run(asyncio.wait_for(agent.serve(poke), 20))
    assert status == server.EXIT_INTERNAL != 0
    assert any("reader stopped" in r.getMessage() and r.levelname == "CRITICAL" for r in caplog.records)


MiB = 1024 * 1024


def test_big_items_travel_in_pieces_and_arrive_whole(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """Items and results above MAX_FRAME are split on the wire and joined on arrival."""
    from pypline import Pipeline, work_pool
    from pypline.util import unwrap

    big = bytes(range(256)) * (20 * MiB // 256)  # 20 MiB: three pieces each way
    use_agents(shared_agent)
    p = Pipeline([big, b"small", bytearray(big)]) >> work_pool(reverse, multi_proc=True)
    out = unwrap(arun(p.run(), timeout=60))
    assert [bytes(o) for o in out] == [big[::-1], b"llams", big[::-1]]


def reverse(b: bytes) -> bytes:
    return bytes(b[::-1])


def test_split_frames_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "MAX_FRAME", 4)
    msg = P.message(P.FUNC, [b"0123456789"], fn="a" * 32)
    h = P.parse_header(msg)
    assert h["split"] == [[0, 3]] and len(msg) == 4
    assert bytes(P.joined(h, msg)[1].buffer) == b"0123456789"
    for bad in ([[0, 1]], [[1, 3]], [[0, 3], [0, 2]], "x", [[0, 3, 1]]):
        head = json.dumps({"t": P.FUNC, "nf": 3, "fn": "a" * 32, "split": bad}).encode()
        with pytest.raises(P.ProtocolError):
            P.parse_header([head, b"012", b"345", b"6789"])


def test_a_hundred_hostile_connections_cost_the_agent_little(tmp_path: Any) -> None:
    """Before authentication, 100 raw TCP peers each announce a 250 MiB frame and send 8 MiB of
    it: libzmq refuses frames above MAX_FRAME at once, so the agent's memory barely moves."""
    import socket
    import struct

    import psutil

    from pypline.worker_agent.security import keygen

    keys = tmp_path / "keys"
    keygen(keys)
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from conftest import start_agent

    h = start_agent(tmp_path, keys=str(keys), workers=1)
    try:
        proc = psutil.Process(h.proc.pid)
        before = proc.memory_info().rss
        host, port = h.endpoint.removeprefix("tcp://").rsplit(":", 1)
        greeting = b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"CURVE".ljust(20, b"\0") + b"\0" * 32
        conns = []
        for _ in range(100):
            s = socket.create_connection((host, int(port)))
            s.setblocking(False)
            try:
                s.send(greeting + bytes([0x06]) + struct.pack(">Q", 250 * MiB))
            except OSError:
                pass
            conns.append(s)
        chunk = bytes(MiB)
        peak = before
        for _ in range(8):
            for s in conns:
                try:
                    s.send(chunk)
                except OSError:
                    pass  # refused and closed by the agent: the point
            peak = max(peak, proc.memory_info().rss)
        for s in conns:
            s.close()
        assert (peak - before) / MiB < 64, f"grew by {(peak - before) / MiB:.0f} MiB"
        assert h.proc.poll() is None
        assert h.status()["workers"] == 1  # and it still answers a keyed client
    finally:
        h.kill()
