"""Pipelines through real ``pypline-agent`` processes — results, errors, fallback.

Agents are subprocesses on random 127.0.0.x ports (fixtures in ``conftest.py``);
readiness is a ping. Stage functions live at module level (shipped by value,
since pytest imports this file from its path).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from typing import Any

import cloudpickle
import pytest

from pypline import (
    Pipeline,
    RemoteError,
    StageStartError,
    WorkerDied,
    configure,
    current_worker,
    mix_pool,
    work_pool,
)
from pypline.util import is_err, unwrap, unwrap_err

# The agent's host has pypline installed but not this test module: ship it by value,
# as a user does for a module under development (README "Running on several hosts").
cloudpickle.register_pickle_by_value(sys.modules[__name__])

# --- stage functions (run on the agent's workers) ----------------------------------------------


def where(x: int) -> tuple[int, str, int, int, int]:
    info = current_worker()
    return (x * 2, info.stage, info.attempt, os.getpid(), os.getppid())


async def async_triple(x: int) -> int:
    return x * 3


def explode(n: int) -> Any:
    for i in range(n):
        yield (n, i)


def fail_on_seven(x: int) -> int:
    if x == 7:
        raise ValueError(f"seven is bad: {x}")
    return x


def die_on_first_attempt(x: int) -> int:
    if x % 5 == 0 and current_worker().attempt == 1:
        os._exit(13)
    return x + 1000


def hang_on_three(x: int) -> int:
    if x == 3:
        time.sleep(30)
    return x


def slow_identity(x: int) -> int:
    time.sleep(0.01)
    return x


# --- results -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_pipeline_through_one_agent_gives_ordered_results(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """Every item is processed on the agent's worker processes, once, and results keep source order."""
    use_agents(shared_agent)
    stage = work_pool(where, multi_proc=True, num_workers=2, buffer=8)
    out = unwrap(arun((Pipeline(range(200)) >> stage).run()))
    assert [o[0] for o in out] == [2 * i for i in range(200)]
    assert {o[1] for o in out} == {"where"} and {o[2] for o in out} == {1}
    assert os.getpid() not in {o[3] for o in out}
    assert {o[4] for o in out} == {shared_agent.pid}  # the agent's own worker processes


@pytest.mark.timeout(60)
def test_async_generator_and_chained_stages_through_an_agent(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """async def and generator (flat-map) stages run remotely; chained remote stages compose."""
    use_agents(shared_agent)
    p = (
        Pipeline(range(30))
        >> work_pool(async_triple, multi_proc=True, num_workers=2)
        >> work_pool(explode, multi_proc=True, buffer=4)
   )
    out = unwrap(arun(p.run()))
    assert out == [(3 * x, i) for x in range(30) for i in range(3 * x)]


def _part(i: int) -> Any:
    def part(x: int) -> tuple[int, int]:
        return (current_worker().index, x + i)

    return part


@pytest.mark.timeout(60)
def test_fork_mode_runs_every_worker_on_the_agent(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """Fork mode: each item reaches every worker; fork_merge sees results in worker order."""
    use_agents(shared_agent)

    @mix_pool(multi_proc=True, fork_merge=lambda rs: rs)
    def fork() -> list[Any]:
        return [_part(0), _part(10), _part(20)]

    out = unwrap(arun((Pipeline(range(10)) >> fork).run()))
    assert out == [[(0, x), (1, x + 10), (2, x + 20)] for x in range(10)]


@pytest.mark.timeout(60)
def test_remote_exceptions_keep_type_and_traceback(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """A function's exception comes back with its type, message and the remote traceback."""
    use_agents(shared_agent)
    res = arun((Pipeline(range(10)) >> work_pool(fail_on_seven, multi_proc=True, retries=2)).run())
    assert is_err(res)
    err = unwrap_err(res)
    assert err.outputs == [x for x in range(10) if x != 7]
    (f,) = err.failures
    assert (f.index, f.item, f.attempts) == (7, 7, 2)
    assert isinstance(f.error, ValueError) and "seven is bad" in str(f.error)
    assert isinstance(f.error.__cause__, RemoteError)
    assert "fail_on_seven" in f.error.__cause__.traceback_text


@pytest.mark.timeout(60)
def test_worker_crash_inside_an_agent_is_worker_died_and_retried(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """A worker process dying mid-item costs the item one attempt (WorkerDied); retries recover it."""
    use_agents(shared_agent)
    ok = arun((Pipeline(range(12)) >> work_pool(die_on_first_attempt, multi_proc=True, retries=2)).run())
    assert unwrap(ok) == [x + 1000 for x in range(12)]
    res = arun((Pipeline(range(6)) >> work_pool(die_on_first_attempt, multi_proc=True, retries=1)).run())
    err = unwrap_err(res)
    assert sorted(f.index for f in err.failures) == [0, 5]
    for f in err.failures:
        assert isinstance(f.error, WorkerDied) and f.error.exitcode == 13 and f.attempts == 1
    assert shared_agent.proc.poll() is None  # the agent itself is fine


@pytest.mark.timeout(60)
def test_timeout_inside_an_agent_kills_the_attempt(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """timeout bounds each remote attempt: a stuck call fails with TimeoutError, the rest complete."""
    use_agents(shared_agent)
    t0 = time.monotonic()
    res = arun((Pipeline(range(6)) >> work_pool(hang_on_three, multi_proc=True, timeout=0.5, num_workers=2)).run())
    assert time.monotonic() - t0 < 15
    err = unwrap_err(res)
    assert err.outputs == [0, 1, 2, 4, 5]
    (f,) = err.failures
    assert f.index == 3 and isinstance(f.error, TimeoutError)


@pytest.mark.timeout(60)
def test_unpicklable_item_fails_only_that_item(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """An item that cannot be pickled fails alone; an unpicklable function is an Err at start naming the stage."""
    use_agents(shared_agent)
    items: list[Any] = [1, 2, threading.Lock(), 4]
    res = arun((Pipeline(items) >> work_pool(fail_on_seven, multi_proc=True)).run())
    err = unwrap_err(res)
    assert err.outputs == [1, 2, 4]
    assert [f.index for f in err.failures] == [2] and "pickle" in str(err.failures[0].error).lower()

    lock = threading.Lock()

    def uses_lock(x: int) -> int:
        with lock:
            return x

    res = arun((Pipeline([1]) >> work_pool(uses_lock, multi_proc=True, name="locky")).run())
    cause = unwrap_err(res).cause
    assert isinstance(cause, StageStartError) and "locky" in str(cause)


@pytest.mark.timeout(60)
def test_two_agents_share_the_work(arun: Any, agents: Any, use_agents: Any) -> None:
    """With two agents both get items (the one with the most free credit gets the next item)."""
    a, b = agents(), agents()
    use_agents(a, b)
    stage = work_pool(where_slow, multi_proc=True, num_workers=2, buffer=16)
    out = unwrap(arun((Pipeline(range(120)) >> stage).run()))
    assert [o[0] for o in out] == [2 * i for i in range(120)]
    used = {o[4] for o in out}
    assert used == {a.pid, b.pid}


def where_slow(x: int) -> tuple[int, str, int, int, int]:
    time.sleep(0.005)
    return where(x)


# --- the memory bound ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_buffer_bound_holds_through_an_agent(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """Items pulled but not delivered never exceed sum(buffer + workers) + stages + 1 (credits included)."""
    use_agents(shared_agent)
    buffer, workers = 3, 2
    bound = (buffer + workers) + 1 + 1
    state = {"pulled": 0, "delivered": 0, "max": 0}

    def source() -> Any:
        for i in range(150):
            state["pulled"] += 1
            state["max"] = max(state["max"], state["pulled"] - state["delivered"])
            yield i

    async def consume() -> list[int]:
        got = []
        p = Pipeline(source()) >> work_pool(slow_identity, multi_proc=True, num_workers=workers, buffer=buffer)
        async with p.stream(ordered=False) as s:
            async for r in s:
                state["delivered"] += 1
                got.append(unwrap(r))
        return got

    got = arun(consume())
    assert sorted(got) == list(range(150))
    assert 0 < state["max"] <= bound


# --- fallback and versions -------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_fallback_to_local_when_no_agent_answers(arun: Any, caplog: Any, free_endpoint: Any) -> None:
    """No agent completes the handshake: a warning is logged and the stage runs locally, correctly."""
    dead = free_endpoint()
    configure(agents=[dead], connect_timeout=0.5, fallback="local")
    try:
        with caplog.at_level(logging.WARNING, logger="pypline.backends.remote"):
            res = arun((Pipeline(range(20)) >> work_pool(where, multi_proc=True)).run())
    finally:
        configure()
    out = unwrap(res)
    assert [o[0] for o in out] == [2 * i for i in range(20)]
    assert {o[4] for o in out} == {os.getpid()}  # local worker processes, children of this process
    assert any("no pypline agent completed the handshake" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_fallback_error_makes_the_run_an_err(arun: Any, free_endpoint: Any) -> None:
    """fallback='error': no agent answers, so the stage fails to start and run() returns Err."""
    configure(agents=[free_endpoint()], connect_timeout=0.3, fallback="error")
    try:
        res = arun((Pipeline(range(5)) >> work_pool(where, multi_proc=True, name="remote_only")).run())
    finally:
        configure()
    cause = unwrap_err(res).cause
    assert isinstance(cause, StageStartError) and "remote_only" in str(cause)
    assert "handshake" in str(cause)


@pytest.mark.timeout(60)
def test_version_mismatch_is_a_clear_error_naming_both_sides(
    arun: Any, shared_agent: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A HELLO with another protocol version is refused with both sides' versions named.
    (This client pretends to be another version: a test double of the versions it reports.)"""
    from pypline.backends.remote import ZmqBackend
    from pypline.backends.wire import protocol as wire
    from pypline.worker_agent.probe import ProbeError, probe

    real = wire.local_versions

    def pretend(**changes: Any) -> None:
        monkeypatch.setattr(wire, "local_versions", lambda: {**real(), **changes})

    pretend(proto=99, cloudpickle="0.0.1")
    with pytest.raises(ProbeError) as info:
        arun(probe(shared_agent.endpoint, timeout=3))
    msg = str(info.value)
    assert "version mismatch" in msg and "protocol 99" in msg and f"protocol {wire.PROTOCOL_VERSION}" in msg
    assert "cloudpickle 0.0.1" in msg
    monkeypatch.setattr(wire, "local_versions", real)  # this test's own status probe is honest
    assert shared_agent.status()["counters"]["version_mismatch"] >= 1

    backend = ZmqBackend(agents=[shared_agent.endpoint])
    pretend(python=["cpython", 2, 7, 18])
    configure(fallback="error", connect_timeout=3)
    try:
        res = arun((Pipeline([1]) >> work_pool(where, multi_proc=True)).run(executor=backend))
    finally:
        configure()
    cause = str(unwrap_err(res).cause)
    assert "version mismatch" in cause and "2.7.18" in cause and "CPython 3." in cause


# --- the CLI -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cli_ping_status_and_keygen(shared_agent: Any, tmp_path: Any, free_endpoint: Any) -> None:
    """ping prints version/workers/free and exits 0; status lists counters; keygen writes both pairs."""
    from click.testing import CliRunner
    from pypline.worker_agent.cli import main

    runner = CliRunner()
    r = runner.invoke(main, ["ping", shared_agent.endpoint])
    assert r.exit_code == 0, r.output
    assert "workers 2" in r.output and "free" in r.output and "CPython" in r.output
    r = runner.invoke(main, ["status", shared_agent.endpoint])
    assert r.exit_code == 0, r.output
    assert "counters:" in r.output and "workers 2" in r.output
    r = runner.invoke(main, ["status", "--json", shared_agent.endpoint])
    assert r.exit_code == 0 and '"instance"' in r.output
    r = runner.invoke(main, ["ping", "--timeout", "0.3", free_endpoint()])
    assert r.exit_code == 1 and "no answer" in r.output

    keys = tmp_path / "keys"
    r = runner.invoke(main, ["keygen", str(keys)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in keys.iterdir()) == [
        "agent.key",
        "agent.key_secret",
        "client.key",
        "client.key_secret",
        "clients",  # the client on this host is admitted: clients/local.key
    ]
    assert (keys / "clients" / "local.key").read_bytes() == (keys / "client.key").read_bytes()
    assert (keys / "client.key_secret").stat().st_mode & 0o077 == 0
    r = runner.invoke(main, ["keygen", str(keys)])
    assert r.exit_code == 3 and "--force" in r.output
    r = runner.invoke(main, ["--help"])
    assert r.exit_code == 0 and "serve" in r.output and "keygen" in r.output


@pytest.mark.timeout(60)
def test_log_format_json_writes_one_object_per_line(arun: Any, agents: Any, use_agents: Any) -> None:
    """``serve --log-format json``: every log record is one JSON object with time, level,
    logger, pid and message; the only other line is the ready line on stdout."""
    import json

    agent = agents("--log-format", "json")
    use_agents(agent)
    assert unwrap(arun((Pipeline(range(5)) >> work_pool(slow_identity, multi_proc=True)).run())) == list(range(5))
    agent.kill()  # SIGTERM first: the agent drains and logs that
    lines = [line for line in agent.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    others = [line for line in lines if not line.startswith("{")]
    assert len(others) == 1 and others[0].startswith("pypline-agent ready ")
    assert records and all(set(r) >= {"time", "level", "logger", "pid", "message"} for r in records)
    assert all(r["pid"] == agent.pid for r in records)
    messages = [r["message"] for r in records]
    assert any(m.startswith("serving ") for m in messages)
    assert any(m.startswith("SIGTERM: draining") for m in messages)
    assert any(r["message"].startswith("session ") and r["level"] == "INFO" for r in records)


def test_silent_session_expires_on_the_agent(arun: Any, shared_agent: Any) -> None:
    """A client that says HELLO and then goes silent is dropped after its ttl (its state freed)."""
    import zmq
    import zmq.asyncio
    from pypline.backends.wire import protocol as P

    async def hello_then_silence() -> None:
        ctx = zmq.asyncio.Context.instance()
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        try:
            s.connect(shared_agent.endpoint)
            await s.send_multipart([P.header(P.HELLO, hb=0.2, hello=1, **P.local_versions())])
            assert await s.poll(3000)
            assert P.parse_header(await s.recv_multipart())["t"] == P.HELLO_OK
        finally:
            s.close(0)

    before = shared_agent.status()["counters"]["sessions_expired"]
    arun(hello_then_silence())
    deadline = time.monotonic() + 10
    while shared_agent.status()["counters"]["sessions_expired"] <= before:
        assert time.monotonic() < deadline, "the silent session never expired"
        time.sleep(0.1)


# --- limits, status, clean-up --------------------------------------------------------------------


def size_of(x: bytes) -> int:
    return len(x)


@pytest.mark.timeout(60)
def test_items_larger_than_the_agents_limit_fail_alone(arun: Any, agents: Any, use_agents: Any) -> None:
    """An item bigger than the agent's --max-message fails with MessageTooLarge before it is sent;
    the others go through, and a raw oversized message does not hurt the agent."""
    import zmq
    from pypline.backends.wire.protocol import MessageTooLarge

    a = agents("--max-message", "1")
    use_agents(a)
    items = [b"x" * 1000, b"y" * (2 * 1024 * 1024), b"z" * 300_000]
    err = unwrap_err(arun((Pipeline(items) >> work_pool(size_of, multi_proc=True)).run()))
    assert err.outputs == [1000, 300_000]
    (f,) = err.failures
    assert f.index == 1 and isinstance(f.error, MessageTooLarge) and "--max-message" in str(f.error)

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    try:
        s.connect(a.endpoint)
        s.send_multipart([b"{}", b"\0" * (8 * 1024 * 1024)])  # libzmq drops this connection
    finally:
        s.close(0)
    a.wait_ready(timeout=10)
    assert unwrap(arun((Pipeline(items[:1]) >> work_pool(size_of, multi_proc=True)).run())) == [1000]


@pytest.mark.timeout(60)
def test_status_shows_sessions_stages_workers_and_credits(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """While a run is going, `status` lists its session with the stage's workers, credits and counts."""
    import asyncio

    from click.testing import CliRunner
    from pypline.worker_agent.cli import main

    use_agents(shared_agent)
    seen: dict[str, Any] = {}

    async def run_and_look() -> list[int]:
        out = []
        p = Pipeline(range(40)) >> work_pool(slow_identity, multi_proc=True, num_workers=2, name="looked_at")
        async with p.stream() as s:
            async for r in s:
                out.append(unwrap(r))
                if len(out) == 10:
                    seen["status"] = await asyncio.to_thread(shared_agent.status)
                    seen["cli"] = await asyncio.to_thread(CliRunner().invoke, main, ["status", shared_agent.endpoint])
        return out

    assert sorted(arun(run_and_look())) == list(range(40))
    st = seen["status"]
    stages = [g for s in st["sessions"] for g in s["stages"] if g["name"] == "looked_at"]
    assert len(stages) == 1
    g = stages[0]
    assert g["workers"] == 2 and g["window"] > 0 and g["received"] >= 10
    cli = seen["cli"]
    assert cli.exit_code == 0 and "stage 'looked_at'" in cli.output and "credits" in cli.output


@pytest.mark.timeout(60)
def test_leaving_a_stream_early_closes_the_session_on_the_agent(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """break out of a stream: the run's executors, sockets and session end (the agent drops the session)."""
    use_agents(shared_agent)

    async def take_five() -> list[int]:
        got = []
        p = Pipeline(range(10_000)) >> work_pool(slow_identity, multi_proc=True, num_workers=2)
        async with p.stream() as s:
            async for r in s:
                got.append(unwrap(r))
                if len(got) == 5:
                    break
        return got

    assert len(arun(take_five())) == 5
    deadline = time.monotonic() + 10
    while [s for s in shared_agent.status()["sessions"] if s["stages"]]:
        assert time.monotonic() < deadline, "the agent kept the abandoned session"
        time.sleep(0.05)


def count_to(n: int) -> Any:
    yield from range(n)


@pytest.mark.timeout(60)
def test_generators_yielding_more_than_the_emit_window_complete_in_order(
    arun: Any, shared_agent: Any, use_agents: Any
) -> None:
    """A remote generator yielding thousands of values (beyond the unacknowledged-emit window)
    neither deadlocks nor reorders: every value arrives once, in yield order per item."""
    use_agents(shared_agent)
    sizes = [3000, 5, 2500, 0, 7]
    p = Pipeline(sizes) >> work_pool(count_to, multi_proc=True, buffer=2)
    assert unwrap(arun(p.run())) == [v for n in sizes for v in range(n)]

    async def slow_consumer() -> int:
        seen = 0
        async with (Pipeline([4000]) >> work_pool(count_to, multi_proc=True)).stream(ordered=True) as s:
            async for r in s:
                assert unwrap(r) == seen
                seen += 1
                if seen % 500 == 0:
                    await asyncio.sleep(0.01)
        return seen

    assert arun(slow_consumer()) == 4000


@pytest.mark.timeout(60)
def test_run_statistics_show_per_agent_items_and_credits(arun: Any, shared_agent: Any, use_agents: Any) -> None:
    """A remote stage's statistics name each agent with its state, workers and credit window."""
    import json

    use_agents(shared_agent)
    p = Pipeline(range(50)) >> work_pool(where, multi_proc=True, num_workers=2, name="remote")
    assert len(unwrap(arun(p.run()))) == 50
    stats = p.last_stats
    assert stats is not None
    [stage] = stats.stages
    assert stage.backend == "zmq" and stage.received == 50 and stage.succeeded == 50
    [(where_, agent)] = stage.details["agents"].items()
    assert where_ in shared_agent.endpoint and agent["state"] == "alive" and agent["workers"] >= 1
    assert agent["in_flight"] == 0 and agent["credit_window"] >= 1
    json.dumps(stats.to_dict())
