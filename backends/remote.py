"""The ``zmq`` backend: ``multi_proc`` stages served by ``pypline-agent`` daemons.

How an item flows::

    StageRunner ─submit([a, ...])─► RemoteExecutor: each attempt goes to the agent with the
         ▲                          most free credit (window - in flight there), else to the
         │                          local fallback executor when one is running
         │                                 │ LinkStage.to_send; one flush per loop tick per agent
         │                                 ▼
         │                          AgentLink ── TASKS (batched, zero-copy big frames) ──► agent
         │                                    ◄── RESULTS (batched; window piggy-backed) ──
         │                                 │ reader task: first result per task id wins
         └── sink.ok / error / lost ◄──────┘ (generator stages: an ordered queue + a task that
                                              awaits sink.emit, then acks the agent's emits)

**Credits.** ``capacity()`` is the sum over agents of their free credit for the stage,
plus the local fallback's capacity when it runs. The engine already bounds a stage to
``buffer + num_workers`` items; the agents' windows bound how many of those are at
an agent, so nothing is sent beyond what an agent granted (see the memory bound in the docs).

**Faults.** An agent that dies, is cut off (silent for ``heartbeat_timeout``), says BYE or
restarts: every attempt in flight there is reported ``sink.lost(attempt, "host:port")``;
the engine re-dispatches it (front of the queue) without using ``retries`` and fails it
with ``WorkerLost`` after ``max_lost`` losses. A late result for such an attempt has no
entry any more and is dropped. Worker crashes and timeouts inside an agent come back as
``WorkerDied`` / ``TimeoutError`` errors from the agent's process backend.

**Fallback.** When no agent completes the handshake within ``connect_timeout`` (or every
agent died mid-run), ``fallback="local"`` runs the stage on the local ``process``
backend (``asyncio`` if that is unavailable) with a logged warning, and
``fallback="error"`` fails the stage's start (``StageStartError``: ``run()`` returns
``Err``) or, mid-run, fails the waiting items with ``WorkerLost``. Agents keep being
asked in the background and are used again as soon as they answer.

**No tax on every run.** With ``fallback="local"``, an agent that did not answer is
remembered for this process (``_reachability.py``): the next runs do not wait for it (they
fall back at once, still asking it in the background, and use it as soon as it answers);
after a backoff (30 s, doubling up to 5 min) one run waits for it again. The warning says
when. ``forget_unreachable()`` makes the next run wait for every agent again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import zmq
import zmq.asyncio

from pypline.executor import Backend, Executor, StageSpec, StageStartError
from pypline.lowlevel import current_settings, effective_agents, effective_keys

from ._reachability import Reachability
from ._remote_executor import RemoteExecutor
from ._remote_link import ALIVE, AgentLink

__all__ = ["RemoteExecutor", "ZmqBackend", "forget_unreachable"]

log = logging.getLogger("pypline.backends.remote")

#: After the first agent answers, how long open() waits for the others before the run
#: starts (they join whenever they answer). Short: a dead agent must not delay every run.
JOIN_GRACE_S = 0.2

#: One ZeroMQ context per process (its I/O thread is shared); sockets belong to one run.
_context: zmq.asyncio.Context | None = None

#: Agents that did not answer lately, per process (see "No tax on every run" above).
_reachability = Reachability()


def forget_unreachable() -> None:
    """Make the next run wait for every configured agent again, even one that was silent lately."""
    _reachability.forget()


def _ctx() -> zmq.asyncio.Context:
    global _context
    if _context is None or _context.closed:
        _context = zmq.asyncio.Context()
    return _context


def _local_backend() -> Backend:
    from .process import ProcessBackend

    return ProcessBackend()


class ZmqBackend(Backend):
    """Backend ``zmq``: one DEALER per configured agent, shared by the run's stages."""

    name = "zmq"

    def __init__(self, agents: Sequence[str] | None = None) -> None:
        self._agents = tuple(agents) if agents is not None else None
        self.links: list[AgentLink] = []
        self.executors: dict[int, RemoteExecutor] = {}
        self.sids = itertools.count(1)  # stage ids, one per stage of the run
        self.tids = itertools.count(1)  # task ids, unique in the run (a late result is matched by it)
        self.no_agent_reason: str | None = None
        self._local: Backend | None = None  # the fallback backend, opened on first use

    async def open(self) -> None:
        settings = current_settings()
        agents = self._agents if self._agents is not None else effective_agents(settings)
        self.fallback = settings.fallback
        self.connect_timeout = settings.connect_timeout
        self.heartbeat_timeout = settings.heartbeat_timeout
        keys_dir = effective_keys(settings)
        keys = None
        if keys_dir is not None and agents:
            from .wire.keys import KeyError_, load_client_keys

            try:
                keys = load_client_keys(keys_dir)
            except KeyError_ as exc:
                raise StageStartError("<zmq backend>", f"client keys: {exc}") from None
        ctx = _ctx()
        self.links = [AgentLink(self, ep, keys) for ep in agents]
        for link in self.links:
            link.start(ctx)
        if not self.links:
            self.no_agent_reason = "no agents are configured"
            return
        # With a local fallback, an agent silent lately is not waited for (it is still asked).
        remember = self.fallback == "local"
        due = [link for link in self.links if not remember or _reachability.due(link.endpoint)]
        if due:
            await self._wait_handshakes(due)
        retry_in: list[float] = []
        for link in self.links:
            if link.state == ALIVE:
                _reachability.answered(link.endpoint)
            elif remember and link in due and link.error is None:  # silent, not refused
                retry_in.append(_reachability.silent(link.endpoint))
            elif remember:
                retry_in.append(_reachability.retry_in(link.endpoint) or 0.0)
        if not any(link.state == ALIVE for link in self.links):
            reasons = "; ".join(
                link.error or f"agent {link.endpoint}: no answer" + ("" if link in due else " lately")
                for link in self.links
           )
            waited = f"within {self.connect_timeout:g} s" if due else "lately (not waited for this time)"
            self.no_agent_reason = f"no pypline agent completed the handshake {waited} ({reasons})"
            if self.fallback == "local":
                when = f"; they are asked in the background, and waited for again in {min(retry_in):.0f} s" if (
                    retry_in
               ) else ""
                log.warning(
                    "%s; multi_proc stages run on the local machine instead (fallback='local')%s",
                    self.no_agent_reason,
                    when,
               )

    async def _wait_handshakes(self, links: list[AgentLink]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        waiters = {asyncio.ensure_future(link.resolved.wait()) for link in links}
        try:
            while waiters:
                left = deadline - loop.time()
                if left <= 0:
                    break
                if any(link.state == ALIVE for link in self.links):
                    left = min(left, JOIN_GRACE_S)
                done, waiters = await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    def executor(self, spec: StageSpec) -> Executor:
        return RemoteExecutor(self, spec)

    def link_changed(self, link: AgentLink) -> None:
        """A link became alive, died or failed: tell every stage."""
        if link.state == ALIVE:
            _reachability.answered(link.endpoint)
        if link.state == ALIVE and not link.stages and not link.draining:
            for ex in list(self.executors.values()):
                link.declare(ex)
        for ex in list(self.executors.values()):
            ex.on_links_changed()

    def alive(self) -> list[AgentLink]:
        """Agents that take new work (alive, not draining)."""
        return [link for link in self.links if link.state == ALIVE and not link.draining]

    async def local_backend(self) -> Backend:
        """The local fallback backend (process, else asyncio), opened once per run."""
        if self._local is None:
            backend = _local_backend()
            await backend.open()
            self._local = backend
        return self._local

    async def aclose(self) -> None:
        local, self._local = self._local, None
        if local is not None:  # the engine closed every executor before this
            await local.aclose()
        links, self.links = self.links, []
        if links:
            self._closed_links = links
        await asyncio.gather(*(link.aclose() for link in links), return_exceptions=True)

    def statistics(self) -> dict[str, dict[str, Any]]:
        """Per agent endpoint: state, instance, late results dropped, deaths, last error (also after the run)."""
        return {
            link.endpoint: {
                "state": link.state,
                "instance": link.instance,
                "late_results": link.late,
                "deaths": link.deaths,
                "error": link.error,
            }
            for link in (self.links or getattr(self, "_closed_links", []))
        }
