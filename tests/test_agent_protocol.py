"""The wire protocol (``pypline.backends.wire.protocol``) and the client against scripted fake agents.

Unit tests check header validation, the batch index and value encoding without
sockets. The fake-agent tests run a ROUTER in this process that follows a script
(answer, stay silent, answer late, answer twice, forget functions), so the client's
rules are checked deterministically: first result per task id wins, late answers
from a presumed-dead agent are dropped, NEED_FUNC re-ships functions.
"""

from __future__ import annotations

import asyncio
import gc
import json
import pickle
import threading
from typing import Any

import cloudpickle
import pytest
import zmq
import zmq.asyncio
from pypline.backends.wire import protocol as P
from pypline.worker_agent.security import is_local_endpoint

from pypline import Pipeline, configure, work_pool
from pypline.util import is_err, unwrap

pytestmark = pytest.mark.timeout(30)


# --- headers -------------------------------------------------------------------------------


def test_header_round_trip_and_complete_validation() -> None:
    """A header the sender makes parses back; nf must match the frames present."""
    h = P.header(P.TASKS, 2, sid=3, n=1)
    assert P.parse_header([h, b"idx", b"inl"]) == {"t": "TASKS", "nf": 2, "sid": 3, "n": 1}
    with pytest.raises(P.ProtocolError, match="payload frames"):
        P.parse_header([h, b"idx"])


@pytest.mark.parametrize(
    "frames, why",
    [
        ([], "empty"),
        ([b"x" * (P.MAX_HEADER + 1)], "header of"),
        ([b"\x80\x04pickle"], "not a JSON object"),
        ([b"{not json"], "not valid JSON"),
        ([b"[1, 2]"], "not a JSON object"),
        ([b'{"t": "NOPE", "nf": 0}'], "unknown message type"),
        ([b'{"t": "PING", "nf": 0}'], "missing field 'seq'"),
        ([b'{"t": "PING", "nf": 0, "seq": true}'], "bad value"),
        ([b'{"t": "PING", "nf": 0, "seq": -1}'], "bad value"),
        ([b'{"t": "PING", "nf": 1, "seq": 1}', b""], "carries 0 payload frames"),
        ([b'{"t": "TASKS", "nf": 2, "sid": 1, "n": 0}', b"", b""], "batch of 0"),
        ([b'{"t": "TASKS", "nf": 1, "sid": 1, "n": 1}', b""], "needs an index"),
        ([b'{"t": "FUNC", "nf": 1, "fn": "../../etc"}', b""], "bad function id"),
        (
            [
                (
                    b'{"t": "HELLO", "nf": 0, "proto": 1, "pypline": "x", "python": [3, 11], "cloudpickle": "3",'
                    b' "hb": 1, "hello": 1}'
                )
            ],
            "implementation",
        ),
        (
            [
                (
                    b'{"t": "STAGE", "nf": 0, "sid": 1, "name": "s", "kinds": ["sync"], "fns": [], "fork": false,'
                    b' "timeout": null, "retries": 1, "buffer": 1}'
                )
            ],
            "equally long",
        ),
    ],
)
def test_malformed_headers_are_refused_before_any_payload_is_touched(frames: list[bytes], why: str) -> None:
    """Every malformed header raises ProtocolError naming the problem."""
    with pytest.raises(P.ProtocolError, match=why):
        P.parse_header(frames)


def test_version_check_names_both_sides() -> None:
    """A mismatch message names protocol, Python and cloudpickle versions of client and agent."""
    mine = P.local_versions()
    assert P.check_versions(mine, dict(mine)) is None
    other = {**mine, "python": ["cpython", 3, 99, 0], "cloudpickle": "9.9"}
    msg = P.check_versions(mine, other)
    assert msg is not None and "client has" in msg and "agent has" in msg
    assert "3.99.0" in msg and "cloudpickle 9.9" in msg and mine["cloudpickle"] in msg
    assert P.check_versions(mine, {**mine, "python": [*mine["python"][:3], 999]}) is None  # micro may differ


# --- batches -------------------------------------------------------------------------------


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("no pickling for me")


class Unloadable:
    def __reduce__(self) -> Any:
        return (_boom, ())


def _boom() -> Any:
    raise ImportError("cannot load this here")


def test_batch_round_trip_with_inline_blob_raw_and_error_entries() -> None:
    """Every kind of value survives a batch; big bytes travel as raw frames, not pickled."""
    enc = P.Encoder()
    big = bytes(range(256)) * 1024  # 256 KiB
    values: list[Any] = [1, "two", (3, 4.0), None, {"five": [5]}, big, bytearray(big), b"small"]
    for i, v in enumerate(values):
        assert enc.add(100 + i, 1, -1, v)
    enc.add_error(200, P.S_ERROR, P.error_info(ValueError("bad")))
    enc.add_none(201, P.S_LOST)
    n, frames = enc.finish()
    assert n == len(values) + 2
    assert any(f is big for f in frames)  # zero-copy: the object itself is a frame
    index = P.Index.parse(frames[0], n, len(frames) - 2, results=True)
    got = P.decode_values(index, frames)
    assert got[: len(values)] == values and type(got[6]) is bytearray
    assert got[-1] is None and got[-2][0] == "ValueError" and got[-2][1] == "bad"
    assert index.tid == [*range(100, 100 + len(values)), 200, 201]


def test_one_unpicklable_or_unloadable_value_fails_only_itself() -> None:
    """A value that cannot be pickled is refused alone; one that cannot be unpickled decodes to Undecodable."""
    enc = P.Encoder()
    assert enc.add(1, 1, -1, 1)
    assert not enc.add(2, 1, -1, Unpicklable()) and isinstance(enc.failure, TypeError)
    assert enc.add(3, 1, -1, Unloadable())
    assert enc.add(4, 1, -1, [4])
    n, frames = enc.finish()
    index = P.Index.parse(frames[0], n, len(frames) - 2, results=False)
    got = P.decode_values(index, frames)
    assert index.tid == [1, 3, 4] and got[0] == 1 and got[2] == [4]
    assert isinstance(got[1], P.Undecodable) and isinstance(got[1].error, ImportError)


def test_index_is_checked_against_the_frames_present() -> None:
    """An index whose size, encodings or extra-frame count do not match the message is a ProtocolError."""
    enc = P.Encoder()
    enc.add(1, 1, -1, {"x": 1})
    n, frames = enc.finish()
    with pytest.raises(P.ProtocolError, match="extra frames"):
        P.Index.parse(frames[0], n, 0, results=False)
    with pytest.raises(P.ProtocolError, match="index of"):
        P.Index.parse(frames[0][:-1], n, 1, results=False)
    bad = P.Index([1], [1], [-1], [77], [0]).pack()
    with pytest.raises(P.ProtocolError, match="unknown encoding"):
        P.Index.parse(bad, 1, 0, results=False)
    bad = P.Index([1], [0], [-1], [0], [0]).pack()
    with pytest.raises(P.ProtocolError, match="attempt"):
        P.Index.parse(bad, 1, 0, results=False)
    with pytest.raises(P.ProtocolError, match="inline"):
        P.decode_values(P.Index([1], [1], [-1], [0], [0]), [b"", pickle.dumps([1, 2])])


@pytest.mark.parametrize(
    "endpoint, local",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.3.4.5:1", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/agent.sock", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://10.0.0.1:5555", False),
        ("tcp://eth0:5555", False),
        ("tcp://agent.example.org:5555", False),
    ],
)
def test_loopback_detection(endpoint: str, local: bool) -> None:
    """Only loopback TCP and ipc/inproc count as local (no keys needed there)."""
    assert is_local_endpoint(endpoint) is local


def test_keygen_layout_and_loading(tmp_path: Any) -> None:
    """keygen writes both pairs; the agent authorises client keys only; missing pieces are clear errors."""
    from pypline.backends.wire.keys import KeyError_, keygen, load_client_keys
    from pypline.worker_agent.security import load_server_keys

    d = tmp_path / "k"
    keygen(d)
    sk = load_server_keys(d)
    ck = load_client_keys(d)
    clients = sk.clients.current()
    assert ck.server_key("tcp://127.0.0.1:5555") == sk.public and ck.public in clients and sk.public not in clients
    (d / "client.key").unlink()
    (d / "clients" / "local.key").unlink()
    with pytest.raises(KeyError_, match="no client public key"):
        load_server_keys(d)
    with pytest.raises(KeyError_, match="does not exist"):
        load_client_keys(tmp_path / "nowhere")


# --- the client against scripted fake agents -----------------------------------------------


class FakeAgent:
    """A ROUTER in this process speaking just enough of the protocol, with scripted misbehaviour.

    ``silent``: takes tasks but never answers anything after STAGE_OK (a partition);
    when the client gives up and says HELLO again, it first sends "late" results
    (value -1) for every task it held, then sets ``late_sent``. ``duplicate``:
    answers every task twice, both in the same RESULTS message (so the client has read
    every duplicate by the time it has every result: the count is exact). ``wait_for``: holds its answers until that event is set.
    ``forget_funcs``: answers the first STAGE with NEED_FUNC even if it has the function.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        silent: bool = False,
        duplicate: bool = False,
        wait_for: asyncio.Event | None = None,
        forget_funcs: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.silent = silent
        self.duplicate = duplicate
        self.wait_for = wait_for
        self.forget_funcs = forget_funcs
        self.late_sent = asyncio.Event()
        self.held: list[tuple[bytes, int, int]] = []  # (rid, sid, tid)
        self.fns: dict[str, Any] = {}
        self.stages: dict[int, Any] = {}
        self.funcs_received = 0
        self.tasks_received = 0
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(endpoint)
        self.task: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._serve())
        self.instance = "f" * 32

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close(0)

    def _send(self, rid: bytes, *frames: Any) -> None:
        self.sock.send_multipart([rid, *frames])

    async def _serve(self) -> None:
        hellos = 0
        while True:
            rid, *frames = await self.sock.recv_multipart()
            h = P.parse_header(frames)
            t = h["t"]
            if t == P.HELLO:
                hellos += 1
                if self.silent and hellos > 1:
                    if not self.late_sent.is_set():
                        self._send_late()
                    continue
                self._send(
                    rid,
                    P.header(
                        P.HELLO_OK,
                        instance=self.instance,
                        workers=1,
                        backend="fake",
                        max_msg=P.DEFAULT_MAX_MSG,
                        hello=h["hello"],
                        **P.local_versions(),
                    ),
                )
            elif t == P.FUNC:
                self.funcs_received += 1
                self.fns[h["fn"]] = cloudpickle.loads(frames[1])
            elif t == P.STAGE:
                if self.forget_funcs:
                    self.forget_funcs = False
                    self._send(rid, P.header(P.NEED_FUNC, sid=h["sid"], fns=h["fns"]))
                    continue
                self.stages[h["sid"]] = self.fns[h["fns"][0]]
                self._send(rid, P.header(P.STAGE_OK, sid=h["sid"], win=8, workers=1))
            elif t == P.TASKS:
                index = P.Index.parse(frames[1], h["n"], len(frames) - 3, results=False)
                values = P.decode_values(index, frames[1:])
                self.tasks_received += h["n"]
                if self.silent:
                    self.held += [(rid, h["sid"], tid) for tid in index.tid]
                    continue
                asyncio.get_running_loop().create_task(self._answer(rid, h["sid"], index.tid, values))
            elif t == P.PING and not self.silent:
                self._send(
                    rid,
                    P.header(
                        P.PONG, seq=h["seq"], instance=self.instance, inflight=0, capacity=1, workers=1, draining=False
                    ),
                )

    async def _answer(self, rid: bytes, sid: int, tids: list[int], values: list[Any]) -> None:
        if self.wait_for is not None:
            await self.wait_for.wait()
        fn = self.stages[sid]
        enc = P.Encoder()
        for tid, v in zip(tids, values):
            for _ in range(2 if self.duplicate else 1):
                enc.add(tid, P.S_OK, -1, fn(v))
        n, frames = enc.finish()
        self._send(rid, P.header(P.RESULTS, len(frames), sid=sid, n=n, win=8), *frames)

    def _send_late(self) -> None:
        by: dict[tuple[bytes, int], list[int]] = {}
        for rid, sid, tid in self.held:
            by.setdefault((rid, sid), []).append(tid)
        for (rid, sid), tids in by.items():
            enc = P.Encoder()
            for tid in tids:
                enc.add(tid, P.S_OK, -1, -1)  # a wrong value: it must never reach the output
            n, frames = enc.finish()
            self._send(rid, P.header(P.RESULTS, len(frames), sid=sid, n=n, win=8), *frames)
        self.late_sent.set()


def plus_ten(x: int) -> int:
    return x + 10


cloudpickle.register_pickle_by_value(__import__("sys").modules[__name__])


def test_late_results_from_a_presumed_dead_agent_are_dropped(arun: Any, free_endpoint: Any) -> None:
    """A silent agent is declared dead; its items are re-dispatched; its late answers are dropped by task id."""
    from pypline.backends.remote import ZmqBackend

    async def scenario() -> tuple[list[int], dict[str, Any], int]:
        ep_a, ep_b = free_endpoint(), free_endpoint()
        a = FakeAgent(ep_a, silent=True)
        b = FakeAgent(ep_b, wait_for=a.late_sent)  # b answers only once a's late results are out
        try:
            configure(agents=[ep_a, ep_b], heartbeat_timeout=0.3, connect_timeout=3)
            backend = ZmqBackend()
            res = await (Pipeline(range(40)) >> work_pool(plus_ten, multi_proc=True, buffer=30)).run(executor=backend)
            return unwrap(res), backend.statistics(), a.tasks_received
        finally:
            configure()
            await a.close()
            await b.close()

    out, stats, held = arun(scenario())
    assert out == [x + 10 for x in range(40)]  # no -1 from the late answers, nothing twice
    late = [s for s in stats.values() if s["deaths"]]
    assert len(late) == 1 and late[0]["late_results"] == held > 0


def test_first_result_per_task_wins_over_duplicates(arun: Any, free_endpoint: Any) -> None:
    """An agent answering every task twice: each output appears once; the extra answers are counted."""
    from pypline.backends.remote import ZmqBackend

    async def scenario() -> tuple[list[int], dict[str, Any]]:
        ep = free_endpoint()
        a = FakeAgent(ep, duplicate=True, forget_funcs=True)
        try:
            configure(agents=[ep], heartbeat_timeout=1, connect_timeout=3)
            backend = ZmqBackend()
            res = await (Pipeline(range(50)) >> work_pool(plus_ten, multi_proc=True)).run(executor=backend)
            assert a.funcs_received == 2  # NEED_FUNC made the client ship the function again
            return unwrap(res), backend.statistics()
        finally:
            configure()
            await a.close()

    out, stats = arun(scenario())
    assert out == [x + 10 for x in range(50)]
    assert next(iter(stats.values()))["late_results"] == 50


def test_probe_reads_status_as_json_not_pickle(arun: Any, free_endpoint: Any) -> None:
    """PONG's status detail is a JSON frame: the client never unpickles what an agent says about itself."""

    async def scenario() -> None:
        ep = free_endpoint()
        ctx = zmq.asyncio.Context.instance()
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.bind(ep)

        async def serve() -> None:
            while True:
                rid, *frames = await router.recv_multipart()
                h = P.parse_header(frames)
                if h["t"] == P.HELLO:
                    await router.send_multipart(
                        [
                            rid,
                            P.header(
                                P.HELLO_OK,
                                instance="a" * 32,
                                workers=3,
                                backend="fake",
                                max_msg=1,
                                hello=h["hello"],
                                **P.local_versions(),
                            ),
                        ]
                    )
                elif h["t"] == P.PING:
                    await router.send_multipart(
                        [
                            rid,
                            P.header(
                                P.PONG,
                                1,
                                seq=h["seq"],
                                instance="a" * 32,
                                inflight=0,
                                capacity=3,
                                workers=3,
                                draining=True,
                            ),
                            json.dumps({"sessions": []}).encode(),
                        ]
                    )

        task = asyncio.get_running_loop().create_task(serve())
        try:
            from pypline.worker_agent.probe import probe

            r = await probe(ep, timeout=3)
            assert r.status == {"sessions": []} and r.pong["workers"] == 3 and not r.healthy
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            router.close(0)

    arun(scenario())


def test_no_thread_or_socket_outlives_a_run_against_a_dead_endpoint(arun: Any, free_endpoint: Any) -> None:
    """A run whose agents never answer leaves no pypline thread and closes its sockets (fallback='error')."""
    before = {t.name for t in threading.enumerate()}
    configure(agents=[free_endpoint()], connect_timeout=0.2, fallback="error")
    try:
        res = arun((Pipeline([1]) >> work_pool(plus_ten, multi_proc=True)).run())
    finally:
        configure()
    assert is_err(res)
    gc.collect()  # an unclosed zmq socket would warn here (filterwarnings = error)
    leaked = {t.name for t in threading.enumerate()} - before
    assert not [n for n in leaked if n.startswith("pypline")]
