"""Multi-host in Linux network namespaces: a client and two agents on three "hosts", one link cut.

::

    netns C (client) ── veth 10.N.1.1 ──── 10.N.1.2 ── netns A (agent, CURVE keys)
                     └─ veth 10.N.2.1 ──── 10.N.2.2 ── netns B (agent, CURVE keys)

Every address lives inside these namespaces only (nothing is sent anywhere else);
the namespaces, their addresses and routes are checked before any packet is sent,
and deleted (with their veths) in a ``finally``. Needs root and iproute2; skips
cleanly where namespaces cannot be made. Mid-run, ``ip link set down`` cuts A off:
A is declared dead after ``heartbeat_timeout``, its items are re-dispatched to B,
and every item is delivered exactly once.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(sys.platform != "linux" or shutil.which("ip") is None, reason="needs Linux and iproute2"),
]

CLIENT = r"""
import asyncio, json, os, sys, time
from collections import Counter
from pypline import Pipeline, configure, work_pool
from pypline.backends.remote import ZmqBackend
from pypline.util import is_ok, unwrap

def work(x):
    time.sleep(0.02)
    return (x * x, os.getppid())

async def main():
    configure(heartbeat_timeout=1.0, connect_timeout=10.0, fallback="error")
    backend = ZmqBackend()
    n = int(sys.argv[1])
    outs, fails = [], []
    p = Pipeline(range(n)) >> work_pool(work, multi_proc=True, num_workers=2, buffer=16)
    async with p.stream(executor=backend) as s:
        async for r in s:
            (outs if is_ok(r) else fails).append(unwrap(r) if is_ok(r) else str(r))
            if len(outs) % 10 == 0:
                print("PROGRESS", len(outs), flush=True)
    print("RESULT", json.dumps({"values": [o[0] for o in outs], "agents": sorted({o[1] for o in outs}),
                                "fails": fails, "stats": backend.statistics()}), flush=True)

asyncio.run(main())
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


class Netns:
    """Three namespaces joined by two veth pairs; removed (with the veths) by ``cleanup``."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.c, self.a, self.b = f"pypc{tag}", f"pypa{tag}", f"pypb{tag}"
        self.net = f"10.{random.randint(150, 249)}"
        self.created: list[str] = []
        self.links = {"a": (f"c{tag}a", f"a{tag}c"), "b": (f"c{tag}b", f"b{tag}c")}

    def addr(self, which: str, side: str) -> str:
        sub = 1 if which == "a" else 2
        return f"{self.net}.{sub}.{1 if side == 'c' else 2}"

    def setup(self) -> None:
        for ns in (self.c, self.a, self.b):
            _ip("netns", "add", ns)
            self.created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for which, ns in (("a", self.a), ("b", self.b)):
            cend, aend = self.links[which]
            _ip("link", "add", cend, "netns", self.c, "type", "veth", "peer", "name", aend, "netns", ns)
            _ip("-n", self.c, "addr", "add", f"{self.addr(which, 'c')}/24", "dev", cend)
            _ip("-n", ns, "addr", "add", f"{self.addr(which, 'a')}/24", "dev", aend)
            _ip("-n", self.c, "link", "set", cend, "up")
            _ip("-n", ns, "link", "set", aend, "up")

    def check(self) -> None:
        """The namespaces exist and each route stays on its veth, before anything is sent."""
        listed = _ip("netns", "list").stdout
        for ns in (self.c, self.a, self.b):
            assert ns in listed, f"namespace {ns} missing"
        for which, ns in (("a", self.a), ("b", self.b)):
            cend, aend = self.links[which]
            fwd = _ip("-n", self.c, "route", "get", self.addr(which, "a")).stdout
            back = _ip("-n", ns, "route", "get", self.addr(which, "c")).stdout
            assert f"dev {cend}" in fwd, fwd
            assert f"dev {aend}" in back, back

    def cleanup(self) -> None:
        for ns in self.created:
            _ip("netns", "del", ns, check=False)


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0:
        return False
    probe = f"pypprobe{os.getpid() % 100000}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    _ip("netns", "del", probe, check=False)
    return True


def _read_lines(proc: subprocess.Popen[str], until: Any, timeout: float) -> list[str]:
    """Read the client's stdout until ``until(line)`` is true; fail on timeout or exit."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; client said: {lines[-5:]}"
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            assert line, f"client exited ({proc.poll()}) early; it said: {lines[-5:]}"
            lines.append(line.strip())
            if until(line):
                return lines
    finally:
        sel.close()


def test_two_agents_in_their_own_namespaces_survive_a_cut_link(tmp_path: Path) -> None:
    """Client and agents on separate network namespaces with CURVE keys: both agents work; after
    `ip link set down` on one agent's link it is declared dead, its items finish on the other agent,
    and every item is delivered exactly once."""
    if not _can_make_namespaces():
        pytest.skip("cannot create network namespaces here (needs root / CAP_NET_ADMIN)")
    from pypline.worker_agent.security import keygen

    keys = tmp_path / "keys"
    keygen(keys)
    net = Netns()
    procs: list[subprocess.Popen[Any]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYPLINE_")}
    try:
        net.setup()
        net.check()
        eps = {w: f"tcp://{net.addr(w, 'a')}:5701" for w in ("a", "b")}
        for w, ns in (("a", net.a), ("b", net.b)):
            with open(tmp_path / f"agent-{w}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
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
                            eps[w],
                            "--keys",
                            str(keys),
                            "--workers",
                            "2",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=tmp_path,
                        env=env,
                    )
                )
        for w, ep in eps.items():  # ready when it answers a ping from the client's namespace
            deadline = time.monotonic() + 30
            while (
                subprocess.run(
                    [
                        "ip",
                        "netns",
                        "exec",
                        net.c,
                        sys.executable,
                        "-m",
                        "pypline.worker_agent",
                        "ping",
                        ep,
                        "--keys",
                        str(keys),
                        "--timeout",
                        "1",
                    ],
                    capture_output=True,
                    check=False,
                    env=env,
                    cwd=tmp_path,
                ).returncode
                != 0
            ):
                assert time.monotonic() < deadline, (tmp_path / f"agent-{w}.log").read_text()
        script = tmp_path / "client.py"
        script.write_text(CLIENT)
        cenv = {**env, "PYPLINE_AGENTS": ",".join(eps.values()), "PYPLINE_KEYS": str(keys)}
        n = 300
        client = subprocess.Popen(
            ["ip", "netns", "exec", net.c, sys.executable, str(script), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=cenv,
            cwd=tmp_path,
        )
        procs.append(client)
        _read_lines(client, lambda line: line.startswith("PROGRESS") and int(line.split()[1]) >= 60, 60)
        _, aend = net.links["a"]
        _ip("-n", net.a, "link", "set", aend, "down")  # cut agent A off
        lines = _read_lines(client, lambda line: line.startswith("RESULT"), 60)
        assert client.wait(30) == 0
        result = json.loads(lines[-1].split(" ", 1)[1])
        values = result["values"]
        assert result["fails"] == []
        assert sorted(values) == [x * x for x in range(n)] and len(values) == n  # exactly once
        assert len(result["agents"]) == 2  # both agents worked before the cut
        stats = result["stats"]
        assert stats[eps["a"]]["deaths"] >= 1 and stats[eps["b"]]["deaths"] == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass
            if p.stdout is not None:
                p.stdout.close()
        net.cleanup()
    assert not any(ns in _ip("netns", "list").stdout for ns in (net.c, net.a, net.b))
