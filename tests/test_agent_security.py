"""Security of the agent — CURVE + ZAP, refused peers, bind rules, un-HELLOed input.

"Refused before anything is unpickled" is checked with a payload whose unpickling
would create a marker file: the file must never appear. These agents run the
``asyncio`` backend (``serve --backend asyncio``): what is tested is the front door,
and it is the same for every backend.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import zmq
from pypline.backends.wire import protocol as P

from pypline import Pipeline, work_pool
from pypline.util import unwrap

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def plus_one(x: int) -> int:
    return x + 1


class Marker:
    """Unpickling this creates ``path``: proof that someone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


def _evil_tasks(path: Path) -> list[bytes]:
    inline = pickle.dumps([Marker(str(path))], protocol=5)
    index = P.Index([1], [1], [-1], [P.ENC_INLINE], [0]).pack()
    return [P.header(P.TASKS, 2, sid=1, n=1), index, inline]


def _raw_client(endpoint: str, keys: Any = None) -> zmq.Socket:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if keys is not None:
        s.curve_secretkey, s.curve_publickey, s.curve_serverkey = keys
    s.connect(endpoint)
    return s


def _keys(tmp_path: Path) -> Path:
    from pypline.worker_agent.security import keygen

    d = tmp_path / "keys"
    keygen(d)
    return d


@pytest.mark.timeout(60)
def test_curve_agent_serves_a_keyed_client_and_refuses_others_before_unpickling(
    arun: Any, agents: Any, use_agents: Any, tmp_path: Path
) -> None:
    """With --keys: a client with the keys runs a pipeline; one without CURVE, or with an unknown key,
    never gets a frame through (nothing unpickled: the marker file never appears; refusals counted)."""
    from pypline.backends.wire.keys import keygen, load_client_keys

    keys = _keys(tmp_path)
    a = agents("--backend", "asyncio", keys=str(keys))
    use_agents(a, keys=str(keys))
    assert unwrap(arun((Pipeline(range(20)) >> work_pool(plus_one, multi_proc=True)).run())) == list(range(1, 21))

    marker = tmp_path / "unpickled-by-the-agent"
    plain = _raw_client(a.endpoint)  # NULL mechanism against a CURVE server
    other_dir = tmp_path / "other"
    keygen(other_dir)
    shutil.copy(keys / "agent.key", other_dir / "agent.key")  # knows the agent's key, not authorised itself
    ok = load_client_keys(other_dir)
    stranger = _raw_client(a.endpoint, (ok.secret, ok.public, ok.server_key(a.endpoint)))
    try:
        for s in (plain, stranger):
            hello = P.header(P.HELLO, hb=1.0, hello=1, **P.local_versions())
            try:
                s.send_multipart([hello], zmq.NOBLOCK)
                s.send_multipart(_evil_tasks(marker), zmq.NOBLOCK)
            except zmq.Again:
                pass  # not even queued: no connection was ever completed
        assert plain.poll(1000) == 0 and stranger.poll(200) == 0  # no answer to either
        deadline = time.monotonic() + 10
        while True:
            st = a.status()
            if st["counters"]["refused"] >= 2:
                break
            assert time.monotonic() < deadline, st["counters"]
            time.sleep(0.05)
    finally:
        plain.close(0)
        stranger.close(0)
    assert not marker.exists()
    assert st["secure"] and st["counters"]["malformed"] == 0 and st["counters"]["unhelloed"] == 0
    assert "refused a connection" in a.log()


@pytest.mark.timeout(60)
def test_unhelloed_messages_are_dropped_and_counted_without_unpickling(agents: Any, tmp_path: Path) -> None:
    """On an agent without keys (loopback), TASKS from a peer that never said HELLO are dropped, counted,
    and not unpickled; the peer is told to say HELLO first."""
    a = agents("--backend", "asyncio")
    marker = tmp_path / "unpickled"
    s = _raw_client(a.endpoint)
    try:
        s.send_multipart(_evil_tasks(marker))
        assert s.poll(5000)
        h = P.parse_header(s.recv_multipart())
        assert h["t"] == P.ERROR and h["code"] == P.E_NO_SESSION
    finally:
        s.close(0)
    assert not marker.exists()
    assert a.status()["counters"]["unhelloed"] >= 1


@pytest.mark.timeout(60)
def test_non_loopback_bind_without_keys_is_refused(tmp_path: Path) -> None:
    """serve on a non-loopback address without --keys exits with status 3 before binding anything."""
    r = subprocess.run(
        [sys.executable, "-m", "pypline.worker_agent", "serve", "--bind", "tcp://0.0.0.0:5599"],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        cwd=tmp_path,
   )
    assert r.returncode == 3
    assert "refusing to bind tcp://0.0.0.0:5599 without CURVE keys" in r.stderr and "--insecure" in r.stderr


@pytest.mark.timeout(60)
def test_keys_dir_without_client_keys_is_refused(tmp_path: Path) -> None:
    """A key directory from which no client key loads is a start-up error (status 3), not an open door."""
    keys = _keys(tmp_path)
    (keys / "client.key").unlink()
    (keys / "clients" / "local.key").unlink()
    r = subprocess.run(
        [sys.executable, "-m", "pypline.worker_agent", "serve", "--keys", str(keys)],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        cwd=tmp_path,
   )
    assert r.returncode == 3 and "no client public key" in r.stderr


def _netns_available() -> bool:
    return sys.platform == "linux" and os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.mark.timeout(60)
@pytest.mark.skipif(not _netns_available(), reason="needs root and iproute2 for a private network namespace")
def test_insecure_non_loopback_bind_warns_loudly(tmp_path: Path) -> None:
    """--insecure allows a non-loopback bind without keys, with a loud warning. (Bound inside a private
    network namespace, so nothing outside the test can reach it.)"""
    ns = f"pyp-sec-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", ns], capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    proc = None
    try:
        # A non-loopback address on the namespace's own lo: reachable from nowhere else.
        for cmd in (["addr", "add", "10.231.7.1/32", "dev", "lo"], ["link", "set", "lo", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, capture_output=True)
        out = subprocess.run(["ip", "-n", ns, "-4", "addr", "show", "lo"], capture_output=True, check=False, text=True)
        assert "10.231.7.1" in out.stdout  # the address exists in the namespace before anything binds it
        log = tmp_path / "agent.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    sys.executable,
                    "-m",
                    "pypline.worker_agent",
                    "serve",
                    "--bind",
                    "tcp://10.231.7.1:5598",
                    "--insecure",
                    "--backend",
                    "asyncio",
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
           )
        deadline = time.monotonic() + 20
        while "INSECURE" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        text = log.read_text()
        assert "WITHOUT authentication" in text and "arbitrary code" in text
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
