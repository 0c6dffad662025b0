"""Shared test helpers: running coroutines with a deadline, and leak checks.

Tests are plain pytest (no asyncio plugin): ``arun(coro)`` runs a coroutine in a
fresh event loop with a hard deadline, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest

T = TypeVar("T")


def arun(coro: Awaitable[T], timeout: float = 20.0) -> T:
    """Run ``coro`` in a new event loop; fail (not hang) after ``timeout`` seconds."""

    async def main() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(main())


def pypline_threads() -> list[threading.Thread]:
    """Live threads started by pypline (they are all named ``pypline-...``)."""
    return [t for t in threading.enumerate() if t.name.startswith("pypline-") and t.is_alive()]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until true or ``timeout``; for clean-up that happens in other threads."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def no_thread_leaks() -> Iterator[None]:
    """Fail if a test leaves a pypline thread running (abandoned ones must finish by themselves)."""
    before = set(pypline_threads())
    yield
    gc.collect()
    assert wait_until(lambda: not (set(pypline_threads()) - before)), (
        f"leaked threads: {sorted(t.name for t in set(pypline_threads()) - before)}"
    )


def all_tasks_done(loop_tasks: Any) -> bool:
    return all(t.done() for t in loop_tasks)


@pytest.fixture(name="arun")
def arun_fixture() -> Callable[..., Any]:
    """``arun(coro, timeout=20)``: run a coroutine in a fresh loop with a deadline."""
    return arun


# --- remote agents (tests/test_agent*.py) ---------------------------------------------------------
#
# Agents run as real subprocesses (``python -m pypline.worker_agent serve``) on a random
# 127.0.0.x address and a free port; readiness is a successful ping, never a sleep.
# Teardown kills each agent and every process it started (only those pids), and resets
# ``configure()``.

import os as _os
import random as _random
import signal as _signal
import socket as _socket
import subprocess as _subprocess
import sys as _sys
from pathlib import Path as _Path


def free_endpoint(host: str | None = None) -> str:
    """``tcp://127.0.0.x:PORT`` with a port that was free a moment ago."""
    host = host or f"127.0.0.{_random.randint(2, 250)}"
    with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"tcp://{host}:{port}"


class AgentHandle:
    """One ``pypline-agent serve`` subprocess started by a test."""

    def __init__(self, proc: "_subprocess.Popen[bytes]", endpoint: str, log_path: _Path, keys: str | None) -> None:
        self.proc = proc
        self.endpoint = endpoint
        self.log_path = log_path
        self.keys = keys
        self.children: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def where(self) -> str:
        return self.endpoint.split("://", 1)[1]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def probe(self, timeout: float = 1.0, **kw: Any) -> Any:
        from pypline.worker_agent.probe import run_probe

        return run_probe(self.endpoint, keys=self.keys, timeout=timeout, **kw)

    def status(self) -> dict[str, Any]:
        return self.probe(timeout=3.0, detail=True).status  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 30.0) -> None:
        from pypline.worker_agent.probe import ProbeError

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode} before it was ready:\n{self.log()}")
            try:
                self.probe(timeout=0.5, detail=False)
                return
            except ProbeError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agent at {self.endpoint} not ready after {timeout} s:\n{self.log()}") from None

    def remember_children(self) -> None:
        try:
            import psutil

            self.children |= {c.pid for c in psutil.Process(self.pid).children(recursive=True)}
        except Exception:  # noqa: BLE001 - it is gone already
            pass

    def send(self, sig: int) -> None:
        self.remember_children()
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Stop the agent and whatever it started, and reap it: SIGTERM (it closes its own worker
        processes), then SIGKILL for the agent and any of its children still there."""
        self.remember_children()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(_signal.SIGCONT)  # in case a test froze it
                self.proc.send_signal(_signal.SIGTERM)
                self.proc.wait(3)
            except (ProcessLookupError, _subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except _subprocess.TimeoutExpired:  # pragma: no cover
            pass
        try:
            import psutil
        except ImportError:  # pragma: no cover
            return
        leftovers = []
        for pid in self.children:
            try:
                p = psutil.Process(pid)
                p.kill()
                if p.status() != psutil.STATUS_ZOMBIE:  # a zombie is its new parent's to reap
                    leftovers.append(p)
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=5)


def start_agent(
    tmp: _Path,
    *args: str,
    endpoint: str | None = None,
    workers: int = 2,
    keys: str | None = None,
    client_keys: str | None = None,
    wait: bool = True,
    prefix: tuple[str, ...] = (),
    log_level: str = "INFO",
) -> AgentHandle:
    """Start ``pypline-agent serve`` (``prefix`` e.g. ``ip netns exec NS``) and wait until it answers a ping."""
    endpoint = endpoint or free_endpoint()
    log_path = tmp / f"agent-{endpoint.rsplit(':', 1)[-1]}-{_random.randint(0, 1 << 30)}.log"
    argv = [*prefix, _sys.executable, "-m", "pypline.worker_agent", "serve", "--bind", endpoint,
            "--workers", str(workers), "--log-level", log_level]
    if keys is not None:
        argv += ["--keys", keys]
    argv += list(args)
    env = dict(_os.environ)
    env.pop("PYPLINE_AGENTS", None)
    env.pop("PYPLINE_KEYS", None)
    with open(log_path, "wb") as logf:
        proc = _subprocess.Popen(argv, stdout=logf, stderr=_subprocess.STDOUT, stdin=_subprocess.DEVNULL, env=env,
                                 cwd=str(tmp))
    handle = AgentHandle(proc, endpoint, log_path, client_keys if client_keys is not None else keys)
    if wait:
        try:
            handle.wait_ready()
        except BaseException:
            handle.kill()
            raise
    return handle


@pytest.fixture
def agents(tmp_path: _Path) -> Iterator[Callable[..., AgentHandle]]:
    """``agents(*serve_args, workers=2, keys=None, ...)`` starts an agent; all are killed at the end."""
    from pypline import configure

    started: list[AgentHandle] = []

    def start(*args: str, **kw: Any) -> AgentHandle:
        h = start_agent(tmp_path, *args, **kw)
        started.append(h)
        return h

    configure()
    try:
        yield start
    finally:
        configure()
        for h in started:
            h.kill()


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentHandle]:
    """One agent (2 workers) shared by the tests of a module that do not hurt it."""
    h = start_agent(tmp_path_factory.mktemp("agent"))
    try:
        yield h
    finally:
        h.kill()


@pytest.fixture
def use_agents() -> Iterator[Callable[..., None]]:
    """``use_agents(*handles, **configure_kw)``: point pypline at these agents; reset afterwards."""
    from pypline import configure

    def use(*handles: AgentHandle, **kw: Any) -> None:
        from pypline.backends.remote import forget_unreachable

        forget_unreachable()  # an endpoint silent in an earlier test may be this agent's now
        kw.setdefault("heartbeat_timeout", 1.0)
        kw.setdefault("connect_timeout", 5.0)
        configure(agents=[h.endpoint for h in handles], **kw)

    configure()
    try:
        yield use
    finally:
        configure()


@pytest.fixture(name="free_endpoint")
def free_endpoint_fixture() -> Callable[..., str]:
    """``free_endpoint(host=None)``: a ``tcp://127.0.0.x:PORT`` nobody listens on."""
    return free_endpoint


#: Every process the tests start inherits this variable (worker processes, agents, their
#: workers, Dask and Ray processes), however it was started and whoever its parent is now.
SESSION_MARKER = "PYPLINE_TEST_SESSION"


def tagged_processes(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose environment carries ``SESSION_MARKER=marker``,
    this one excepted. It reads /proc, so a process re-parented away from this one (a
    daemonised agent worker, a double fork) is seen too."""
    wanted = f"{SESSION_MARKER}={marker}".encode()
    found = []
    for entry in _os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == _os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if wanted not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                    continue  # a zombie is its parent's to reap, not running
        except OSError:  # it exited meanwhile, or is not ours to read
            continue
        found.append((int(entry), cmdline))
    return found


@pytest.fixture(scope="session", autouse=True)
def _no_orphan_processes() -> Iterator[None]:
    """No process started by the tests outlives the test session (workers, agents, clusters),
    found by the environment marker every child inherits, wherever it was re-parented."""
    import uuid

    marker = f"{_os.getpid()}-{uuid.uuid4().hex[:12]}"
    previous = _os.environ.get(SESSION_MARKER)
    _os.environ[SESSION_MARKER] = marker
    try:
        yield
    finally:
        if previous is None:
            _os.environ.pop(SESSION_MARKER, None)
        else:
            _os.environ[SESSION_MARKER] = previous

    def leftovers() -> list[tuple[int, str]]:
        # multiprocessing's resource tracker (started by Dask's LocalCluster) is one helper per
        # interpreter that exits with it: not an orphan of any run.
        return [(pid, cmd) for pid, cmd in tagged_processes(marker) if "multiprocessing.resource_tracker" not in cmd]

    assert wait_until(lambda: not leftovers(), 15.0), f"orphan processes: {leftovers()}"


@pytest.fixture(name="tagged_processes")
def tagged_processes_fixture() -> Callable[[str], list[tuple[int, str]]]:
    """``tagged_processes(marker)``: the session's orphan check, for tests of the check itself."""
    return tagged_processes
