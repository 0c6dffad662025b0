"""Soak test: agents on separate "hosts" (network namespaces), several clients at once, random
faults, for minutes. Not part of CI (it needs root and runs for a long time)::

    sudo python tests/benchmarks/soak_agents.py --minutes 10 --agents 3 --clients 3

How it runs::

    netns C (clients) ─ veth ─ netns A1 (pypline-agent, CURVE keys, 2 workers)
                      ─ veth ─ netns A2 ...                    (10.N.i.1 <-> 10.N.i.2)
    each client: loops over runs of ITEMS random payloads (4 KiB .. 1 MiB, seeded by run)
        through zlib.compress on the agents; checks every output: decompresses to its own
        input (byte-identical), and each item delivered exactly once per run
    the fault injector, every 2..6 s, picks an agent and one of:
        kill -9 (restart 1..3 s later) · SIGSTOP (SIGCONT 1..4 s later) ·
        link down (up 1..4 s later) · SIGTERM (drain; restart when it has exited)
    every 2 s: each agent's RSS (with its worker processes), open fds, child processes

Prints a markdown report: runs and items checked per client, duplicates, missing and
corrupted outputs (all must be 0), failures by type, agent RSS and fds over time, and
processes left after the end. Exit status 0 when nothing was lost, duplicated, corrupted
or left running. The namespaces and every process started are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

CLIENT = r"""
import asyncio, json, random, sys, time, zlib
from collections import Counter
from pypline import Pipeline, configure, work_pool
from pypline.util import is_ok

def squeeze(item):
    i, data = item
    return i, zlib.compress(data, 1)

def payloads(run, n):
    rng = random.Random(run)
    for i in range(n):
        size = rng.choice([4096, 65536, 262144, 1 << 20])
        yield i, rng.randbytes(size // 2) * 2

async def main():
    configure(heartbeat_timeout=1.5, connect_timeout=5.0, fallback="local", max_lost=50)
    stop = sys.argv[1]
    n = int(sys.argv[2])
    run = int(sys.argv[3]) * 1_000_000
    stage = work_pool(squeeze, multi_proc=True, num_workers=4, buffer=16, retries=3)
    while not __import__("os").path.exists(stop):
        run += 1
        expected = dict(payloads(run, n))
        seen, corrupt, fails = Counter(), 0, Counter()
        t0 = time.monotonic()
        async for r in (Pipeline(payloads(run, n)) >> stage).stream():
            if is_ok(r):
                i, out = r.value
                seen[i] += 1
                corrupt += zlib.decompress(out) != expected[i]
            else:
                fails[type(r.error.error).__name__] += 1
        print(json.dumps({"run": run, "delivered": sum(seen.values()), "dups": sum(c - 1 for c in seen.values() if c > 1),
                          "missing": n - len(seen) - sum(fails.values()), "corrupt": corrupt, "fails": dict(fails),
                          "seconds": round(time.monotonic() - t0, 2)}), flush=True)

asyncio.run(main())
"""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


class Hosts:
    """A client namespace and one namespace per agent, each joined to the client's by a veth."""

    def __init__(self, agents: int) -> None:
        tag = os.getpid() % 100000
        self.client = f"soakc{tag}"
        self.agents = [f"soaka{tag}x{i}" for i in range(agents)]
        self.net = f"10.{random.randint(150, 249)}"
        self.veths = [(f"sc{tag}x{i}", f"sa{tag}x{i}") for i in range(agents)]
        self.made: list[str] = []

    def addr(self, i: int, side: str) -> str:
        return f"{self.net}.{i + 1}.{1 if side == 'client' else 2}"

    def setup(self) -> None:
        for ns in (self.client, *self.agents):
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for i, ns in enumerate(self.agents):
            c, a = self.veths[i]
            ip("link", "add", c, "netns", self.client, "type", "veth", "peer", "name", a, "netns", ns)
            ip("-n", self.client, "addr", "add", f"{self.addr(i, 'client')}/24", "dev", c)
            ip("-n", ns, "addr", "add", f"{self.addr(i, 'agent')}/24", "dev", a)
            ip("-n", self.client, "link", "set", c, "up")
            ip("-n", ns, "link", "set", a, "up")
        listed = ip("netns", "list").stdout
        for i, ns in enumerate(self.agents):  # check before any packet is sent
            assert ns in listed and self.client in listed
            assert f"dev {self.veths[i][0]}" in ip("-n", self.client, "route", "get", self.addr(i, "agent")).stdout

    def link(self, i: int, up: bool) -> None:
        ip("-n", self.client, "link", "set", self.veths[i][0], "up" if up else "down")

    def cleanup(self) -> None:
        for ns in self.made:
            ip("netns", "del", ns, check=False)


class Agent:
    def __init__(self, hosts: Hosts, i: int, keys: str, log_dir: Path) -> None:
        self.hosts, self.i, self.keys = hosts, i, keys
        self.endpoint = f"tcp://{hosts.addr(i, 'agent')}:5555"
        self.log = open(log_dir / f"agent{i}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopped = False  # SIGSTOPped
        self.pids: set[int] = set()

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return  # still running (a restart was already due)
        argv = ["ip", "netns", "exec", self.hosts.agents[self.i], sys.executable, "-m", "pypline.worker_agent",
                "serve", "--bind", self.endpoint, "--keys", self.keys, "--workers", "2", "--drain-timeout", "3"]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log)
        self.pids.add(self.proc.pid)
        self.stopped = False

    def tree(self) -> list[psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            p = psutil.Process(self.proc.pid)
            return [p, *p.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> dict[str, Any]:
        procs = self.tree()
        for p in procs:
            self.pids.add(p.pid)
        rss = fds = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
                fds += p.num_fds() if p.name().startswith("python") else 0
            except psutil.Error:
                pass
        return {"rss_mib": round(rss / 2**20, 1), "fds": fds, "children": max(0, len(procs) - 2)}

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for p in self.tree():
                if p.name().startswith("python") and "worker_agent" in " ".join(p.cmdline()):
                    p.send_signal(sig)
                    return

    def kill(self) -> None:
        for p in reversed(self.tree()):
            try:
                p.kill()
            except psutil.Error:
                pass
        if self.proc is not None:
            self.proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    random.seed(args.seed)
    from pypline.worker_agent.security import keygen

    work = Path(tempfile.mkdtemp(prefix="pypline-soak-"))
    keys = str(work / "keys")
    keygen(keys)
    hosts = Hosts(args.agents)
    agents: list[Agent] = []
    clients: list[subprocess.Popen[str]] = []
    events: Counter[str] = Counter()
    samples: list[tuple[float, list[dict[str, Any]]]] = []
    pending: list[tuple[float, Any]] = []  # (when, action)
    stop_file = work / "stop"
    left_behind: list[int] = []
    outputs: list[str] = []
    t0 = time.monotonic()
    try:
        hosts.setup()
        agents = [Agent(hosts, i, keys, work) for i in range(args.agents)]
        for a in agents:
            a.start()
        time.sleep(2)
        env = {**os.environ, "PYPLINE_AGENTS": ",".join(a.endpoint for a in agents), "PYPLINE_KEYS": keys}
        for c in range(args.clients):
            clients.append(subprocess.Popen(
                ["ip", "netns", "exec", hosts.client, sys.executable, "-c", CLIENT, str(stop_file), str(args.items),
                 str(c + 1)], stdout=subprocess.PIPE, stderr=open(work / f"client{c}.log", "w"), text=True, env=env))
        end = t0 + args.minutes * 60
        next_fault = time.monotonic() + random.uniform(2, 6)
        next_sample = time.monotonic()
        while time.monotonic() < end:
            now = time.monotonic()
            for item in [p for p in pending if p[0] <= now]:
                pending.remove(item)
                item[1]()
            if now >= next_sample:
                samples.append((round(now - t0, 1), [a.sample() for a in agents]))
                next_sample = now + 2
            if now >= next_fault:
                a = random.choice(agents)
                fault = random.choice(["kill -9", "SIGSTOP", "link down", "SIGTERM"])
                events[fault] += 1
                if fault == "kill -9":
                    a.kill()
                    pending.append((now + random.uniform(1, 3), a.start))
                elif fault == "SIGSTOP" and not a.stopped:
                    a.signal(signal.SIGSTOP)
                    a.stopped = True
                    pending.append((now + random.uniform(1, 4), lambda a=a: (a.signal(signal.SIGCONT), setattr(a, "stopped", False))))
                elif fault == "link down":
                    hosts.link(a.i, False)
                    pending.append((now + random.uniform(1, 4), lambda a=a: hosts.link(a.i, True)))
                elif fault == "SIGTERM" and not a.stopped:
                    a.signal(signal.SIGTERM)

                    def restart(a: Agent = a) -> None:
                        if a.proc is not None and a.proc.poll() is None:
                            pending.append((time.monotonic() + 0.5, restart))
                        else:
                            a.start()

                    pending.append((now + 0.5, restart))
                next_fault = now + random.uniform(2, 6)
            time.sleep(0.05)
        for _, action in sorted(pending, key=lambda p: p[0]):  # heal everything, then let runs finish
            action()
        for a in agents:
            if a.proc is None or a.proc.poll() is not None:
                a.start()
        stop_file.touch()
        outputs = [c.communicate(timeout=300)[0] for c in clients]
    finally:
        stop_file.touch()
        for c in clients:
            if c.poll() is None:
                c.kill()
        for a in agents:
            a.signal(signal.SIGCONT)
            a.signal(signal.SIGTERM)
        for a in agents:
            try:
                if a.proc is not None:
                    a.proc.wait(15)
            except subprocess.TimeoutExpired:
                a.kill()
        time.sleep(1)
        for a in agents:  # anything of ours still alive is a finding; stop it anyway
            for pid in a.pids:
                try:
                    p = psutil.Process(pid)
                    if p.status() != psutil.STATUS_ZOMBIE:
                        left_behind.append(pid)
                        p.kill()
                except psutil.Error:
                    pass
        hosts.cleanup()
    return report(args, outputs, events, samples, sorted(left_behind), time.monotonic() - t0)


def report(args: Any, outputs: list[str], events: Counter[str], samples: list[Any], left: list[int],
           seconds: float) -> int:
    print(f"## Soak: {args.agents} agents in network namespaces, {args.clients} clients, {seconds / 60:.1f} min\n")
    print(f"`python tests/benchmarks/soak_agents.py --minutes {args.minutes:g} --agents {args.agents} "
          f"--clients {args.clients} --items {args.items} --seed {args.seed}`, "
          f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs\n")
    print("Faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(events.items())) + "\n")
    print("| client | runs | items checked | duplicates | missing | corrupted | failures |")
    print("|---|---|---|---|---|---|---|")
    bad = 0
    for c, out in enumerate(outputs):
        runs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        fails: Counter[str] = Counter()
        for r in runs:
            fails.update(r["fails"])
        dups, missing, corrupt = (sum(r[k] for r in runs) for k in ("dups", "missing", "corrupt"))
        bad += dups + missing + corrupt
        print(f"| {c} | {len(runs)} | {sum(r['delivered'] for r in runs)} | {dups} | {missing} | {corrupt} | "
              f"{dict(fails) or 0} |")
    print("\n| agent | RSS MiB (min / median / max, with its workers) | fds max | worker processes max |")
    print("|---|---|---|---|")
    for i in range(args.agents):
        rss = sorted(s[1][i]["rss_mib"] for s in samples if s[1][i]["rss_mib"] > 0)
        fds = max((s[1][i]["fds"] for s in samples), default=0)
        kids = max((s[1][i]["children"] for s in samples), default=0)
        if rss:
            print(f"| {i} | {rss[0]} / {rss[len(rss) // 2]} / {rss[-1]} | {fds} | {kids} |")
    first, last = samples[len(samples) // 10] if samples else (0, []), samples[-1] if samples else (0, [])
    print(f"\nRSS at {first[0]} s: {[s['rss_mib'] for s in first[1]]}; at {last[0]} s: {[s['rss_mib'] for s in last[1]]}")
    print(f"\nProcesses left after the end: {len(left)} {left or ''}")
    return 0 if bad == 0 and not left else 1


if __name__ == "__main__":
    sys.exit(main())
