"""Fuzzing a live agent: random multipart messages must be dropped and counted, never crash it.

Hypothesis throws (a) raw random frames and (b) structurally plausible messages (a JSON
header of a real type with random fields, random payload frames) at one agent, from a
peer that never said HELLO and from one that did (so messages get past the session
check into the per-type validation). Afterwards the agent must still answer a ping and
run a real pipeline correctly, and its counters must show the rejected messages.
"""

from __future__ import annotations

import json
import pickle
import sys
from typing import Any

import cloudpickle
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pypline.backends.wire import protocol as P

from pypline import Pipeline, work_pool
from pypline.util import unwrap

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.timeout(90)


def square(x: int) -> int:
    return x * x


_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=40)
)
_json_value = st.recursive(
    _json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
_field_names = st.sampled_from(
    [
        "sid",
        "n",
        "nf",
        "fn",
        "fns",
        "kinds",
        "name",
        "fork",
        "timeout",
        "retries",
        "buffer",
        "seq",
        "ack",
        "win",
        "proto",
        "python",
        "cloudpickle",
        "hb",
        "hello",
        "pypline",
        "detail",
        "code",
        "message",
        "x",
    ]
)


@st.composite
def plausible(draw: Any) -> list[bytes]:
    """A header of a real message type with random fields, plus random payload frames."""
    t = draw(st.sampled_from(sorted(P.TYPES)))
    fields = draw(st.dictionaries(_field_names, _json_value, max_size=8))
    payload = draw(st.lists(st.binary(max_size=64), max_size=4))
    if draw(st.booleans()):
        fields["nf"] = len(payload)
    if t in (P.TASKS, P.RESULTS) and draw(st.booleans()):
        n = draw(st.integers(1, 3))
        fields.update(sid=draw(st.integers(0, 3)), n=n, nf=2 + len(payload))
        index = draw(st.binary(min_size=19 * n, max_size=19 * n))
        inline = draw(st.binary(max_size=32))
        return [json.dumps({"t": t, **fields}).encode(), index, inline, *payload]
    try:
        head = json.dumps({"t": t, **fields}).encode()
    except ValueError:
        head = b"{"
    return [head, *payload]


raw_frames = st.lists(st.binary(max_size=128), min_size=1, max_size=6)


@st.composite
def extreme(draw: Any) -> list[bytes]:
    """A real message type whose header nests deeper than the JSON parser goes, or holds
    numbers past what the parser or the checks take, or has a truncated or extra frame."""
    t = draw(st.sampled_from(sorted(P.TYPES)))
    head = json.dumps({"t": t, "nf": 0, "seq": 1, "sid": 1, "n": 1}).encode()[:-1]
    kind = draw(st.sampled_from(["nested", "huge", "truncated", "frames"]))
    if kind == "nested":
        depth = draw(st.sampled_from([50, 1500, 2000]))  # past json's C parser depth on 3.11
        return [head + b', "x": ' + b"[" * depth + b"]" * depth + b"}"]
    if kind == "huge":
        field = draw(_field_names).encode()
        number = draw(st.sampled_from([b"1" * 4000, b"1e999", b"-1e999", b"9" * 30]))
        return [head + b', "' + field + b'": ' + number + b"}"]
    full = P.header(t, 1, sid=1, n=1, seq=1)
    if kind == "truncated":
        return [full[: draw(st.integers(1, len(full) - 1))], b"x"]
    return [full, *draw(st.lists(st.binary(max_size=8), max_size=4))]  # a frame count other than announced

SID = 1  # the stage the HELLOed fuzz session declares (it runs ``square``)


@st.composite
def near_valid(draw: Any) -> list[bytes]:
    """A valid message for the declared stage with one part mutated: gets past the header checks."""
    kind = draw(st.sampled_from(["tasks", "tasks", "tasks", "ping", "credit", "stage", "func"]))
    if kind == "tasks":
        n = draw(st.integers(1, 4))
        mostly_ok = draw(st.integers(0, 3)) > 0  # most batches have a valid index, some a subtly bad one
        index = P.Index(
            draw(st.lists(st.integers(0, 2**62), min_size=n, max_size=n)),
            draw(st.lists(st.integers(1, 3) if mostly_ok else st.integers(0, 6), min_size=n, max_size=n)),
            draw(st.lists(st.integers(-1, 1) if mostly_ok else st.integers(-3, 4), min_size=n, max_size=n)),
            [P.ENC_INLINE] * n if mostly_ok else draw(st.lists(st.integers(0, 7), min_size=n, max_size=n)),
            [0] * n if mostly_ok else draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)),
        ).pack()
        if not draw(st.integers(0, 4)):
            index = draw(st.binary(max_size=19 * n + 2))
        values = draw(
            st.lists(
                st.one_of(st.integers(-1000, 1000), st.text(max_size=5), st.none()),
                min_size=n if mostly_ok else 0,
                max_size=n if mostly_ok else 5,
            )
        )
        inline = pickle.dumps(values) if draw(st.integers(0, 3)) else draw(st.binary(max_size=40))
        extras = [] if mostly_ok else draw(st.lists(st.binary(max_size=40), max_size=3))
        return [
            P.header(P.TASKS, 2 + len(extras), sid=draw(st.sampled_from([SID] * 5 + [7])), n=n),
            index,
            inline,
            *extras,
        ]
    if kind == "ping":
        return [P.header(P.PING, seq=draw(st.integers(0, 2**40)), detail=draw(st.booleans()))]
    if kind == "credit":
        return [P.header(P.CREDIT, sid=draw(st.integers(0, 3)), ack=draw(st.integers(0, 2**40)))]
    if kind == "stage":
        k = draw(st.integers(1, 3))
        return [
            P.header(
                P.STAGE,
                sid=draw(st.integers(2, 5)),
                name=draw(st.text(min_size=1, max_size=10)),
                kinds=draw(st.lists(st.sampled_from(P.KINDS), min_size=k, max_size=k)),
                fns=draw(st.lists(st.text("0123456789abcdef", min_size=32, max_size=32), min_size=k, max_size=k)),
                fork=draw(st.booleans()),
                timeout=None,
                retries=1,
                buffer=1,
            )
        ]
    return [
        P.header(P.FUNC, 1, fn=draw(st.text("0123456789abcdef", min_size=32, max_size=32))),
        draw(st.binary(max_size=64)),
    ]


def _probe(endpoint: str) -> zmq.Socket:
    """A well-behaved session, used only to check that the agent still answers."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    sock.send_multipart([P.header(P.HELLO, hb=60.0, hello=1, **P.local_versions())])
    _expect(sock, P.HELLO_OK)
    return sock


def _sockets(endpoint: str) -> tuple[zmq.Socket, zmq.Socket]:
    """A peer that never says HELLO, and one with a session whose stage ``SID`` runs ``square``."""
    ctx = zmq.Context.instance()
    anon = ctx.socket(zmq.DEALER)
    anon.linger = 0
    anon.connect(endpoint)
    helloed = ctx.socket(zmq.DEALER)
    helloed.linger = 0
    helloed.connect(endpoint)
    helloed.send_multipart([P.header(P.HELLO, hb=30.0, hello=1, **P.local_versions())])
    _expect(helloed, P.HELLO_OK)
    fn = cloudpickle.dumps(square, protocol=5)
    fid = P.fn_id(fn)
    helloed.send_multipart([P.header(P.FUNC, 1, fn=fid), fn])
    helloed.send_multipart(
        [
            P.header(
                P.STAGE,
                sid=SID,
                name="square",
                kinds=["sync"],
                fns=[fid],
                fork=False,
                timeout=None,
                retries=1,
                buffer=4,
            )
        ]
    )
    _expect(helloed, P.STAGE_OK)
    return anon, helloed


def _expect(sock: zmq.Socket, t: str) -> None:
    while True:
        assert sock.poll(15000), f"no {t}"
        if P.parse_header(sock.recv_multipart())["t"] == t:
            return


def test_random_messages_are_dropped_and_the_agent_keeps_serving(shared_agent: Any, arun: Any, use_agents: Any) -> None:
    """Hundreds of random and half-valid messages: all refused or answered sanely; the agent then
    still runs a real pipeline and has counted what it dropped."""
    anon, helloed = _sockets(shared_agent.endpoint)
    probe = _probe(shared_agent.endpoint)
    sent = {"n": 0, "pings": 0}

    def send(sock: zmq.Socket, frames: list[bytes]) -> None:
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            sent["n"] += 1
        except zmq.Again:
            pass
        while sock.poll(0):  # keep our receive queue short
            sock.recv_multipart()

    @settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        st.one_of(
            st.tuples(st.one_of(raw_frames, plausible(), extreme()), st.booleans()),
            st.tuples(near_valid(), st.just(True)),
        )
    )
    def fuzz(case: tuple[list[bytes], bool]) -> None:
        frames, after_hello = case
        if after_hello and P.HELLO.encode() in frames[0][:40] or b'"BYE"' in frames[0][:40]:
            after_hello = False  # keep the fuzz session (and its stage) alive
        send(helloed if after_hello else anon, frames)
        sent["pings"] += 1
        probe.send_multipart([P.header(P.PING, seq=sent["pings"])])
        while True:  # after every case, the agent still answers
            assert probe.poll(5000), f"the agent stopped answering after {frames!r:.300}"
            h = P.parse_header(probe.recv_multipart())
            if h["t"] == P.PONG and h["seq"] == sent["pings"]:
                break

    try:
        send(anon, [P.header(P.PING, seq=1)])  # well-formed, but this peer never said HELLO
        fuzz()
        # Say HELLO again (the fuzzer may have sent BYE) and make sure the session still works.
        helloed.send_multipart([P.header(P.PING, seq=1)])
    finally:
        anon.close(0)
        helloed.close(0)
        probe.close(0)
    assert sent["n"] > 100
    assert shared_agent.proc.poll() is None, shared_agent.log()
    counters = shared_agent.status()["counters"]
    assert counters["malformed"] > 50 and counters["unhelloed"] >= 1 and counters["tasks"] > 10
    use_agents(shared_agent)
    out = unwrap(arun((Pipeline(range(100)) >> work_pool(square, multi_proc=True, num_workers=2)).run()))
    assert out == [x * x for x in range(100)]
    assert "Traceback" not in shared_agent.log()
