"""Declared stages: functions by content hash, and the executors that run them.

::

    FUNC(id, pickle) ─► check sha256 == id ─► fns (agent-wide LRU, FN_CACHE_BYTES)
    STAGE(sid, fns, kinds, hooks, ...) ─► a function missing? ─► NEED_FUNC (the client sends it again)
        │ unpickle the functions here (after HELLO, on an authenticated connection:
        │ PROTOCOL.md, "What is unpickled, where") ─► ERROR STAGE_FAILED if that fails
        ▼
    a warm executor with the same key (pool.py)?  ─ yes ─► STAGE_OK at once
        │ no
        ▼
    the agent's local backend makes one (process: spawns worker processes) ─► start ─► STAGE_OK
        (a stage with setup/teardown hooks: each worker runs setup as it starts; such an
        executor is closed when its session's stage ends, so teardown runs, never parked)
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from pypline.executor import Executor, StageStartError

from pypline.backends.wire import protocol as P
from .pool import ExecutorPool, SinkProxy
from .session import Session, StageHost, build_spec, stage_key

if TYPE_CHECKING:
    from .server import Agent

__all__ = ["FN_CACHE_BYTES", "StageStarter"]

log = logging.getLogger("pypline.agent")

#: Bytes of function pickles kept agent-wide (LRU). A client whose function was
#: evicted gets NEED_FUNC and sends it again; nothing fails.
FN_CACHE_BYTES = 256 * 1024 * 1024


class StageStarter:
    """The agent's function cache, warm-executor pool and stage start-up."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.fns: OrderedDict[str, bytes] = OrderedDict()
        self.fn_bytes = 0
        self.loaded: dict[str, Any] = {}
        self.pool = ExecutorPool()

    def on_func(self, h: dict[str, Any], body: list[Any]) -> None:
        """Keep a function pickle (checked against its id) in the agent-wide LRU."""
        data = body[1].bytes
        fid = h["fn"]
        if P.fn_id(data) != fid:
            raise P.ProtocolError("FUNC: content does not match its id")
        if fid not in self.fns:
            self.fns[fid] = data
            self.fn_bytes += len(data)
            while self.fn_bytes > FN_CACHE_BYTES and len(self.fns) > 1:
                old, blob = self.fns.popitem(last=False)
                self.fn_bytes -= len(blob)
                self.loaded.pop(old, None)
        else:
            self.fns.move_to_end(fid)

    def on_stage(self, s: Session, h: dict[str, Any]) -> None:
        """Start (or reuse) an executor for a declared stage; NEED_FUNC when a function is missing."""
        sid = h["sid"]
        missing = sorted({f for f in [*h["fns"], *(h.get("hooks") or ())] if f is not None and f not in self.fns})
        if missing:
            s.send(P.header(P.NEED_FUNC, sid=sid, fns=missing))
            return
        old = s.stages.pop(sid, None)
        if old is not None:
            old.closed = True
            self.agent.spawn(old.aclose(), f"pypline-agent-close-stage-{sid}")
        self.agent.spawn(self._start(s, h), f"pypline-agent-stage-{sid}")

    async def _load_fns(self, fids: list[str]) -> list[Any]:
        """The stage's functions, unpickled in a thread (a slow import must not stop the loop),
        within DECODE_DEADLINE_S; cached by id."""
        from .server import DECODE_DEADLINE_S, off_loop

        missing = sorted({f for f in fids if f not in self.loaded})
        if missing:
            import cloudpickle  # type: ignore[import-untyped]

            blobs = [self.fns[f] for f in missing]
            try:
                loaded = await asyncio.wait_for(off_loop(lambda: [cloudpickle.loads(b) for b in blobs]), DECODE_DEADLINE_S)
            except asyncio.TimeoutError:
                raise TimeoutError(f"unpickling took more than {DECODE_DEADLINE_S:g} s") from None
            for f, fn in zip(missing, loaded):
                if f in self.fns:  # not evicted meanwhile
                    self.loaded[f] = fn
            by_id = dict(zip(missing, loaded))
        else:
            by_id = {}
        return [by_id[f] if f in by_id else self.loaded[f] for f in fids]

    async def _start(self, s: Session, h: dict[str, Any]) -> None:
        sid, name = h["sid"], h["name"]
        try:
            hooks = h.get("hooks") or [None, None]
            loaded = await self._load_fns([*h["fns"], *(f for f in hooks if f is not None)])
            fns, rest = loaded[: len(h["fns"])], iter(loaded[len(h["fns"]) :])
            setup, teardown = (None if f is None else next(rest) for f in hooks)
        except BaseException as exc:  # noqa: BLE001 - e.g. ModuleNotFoundError: the agent's environment
            if isinstance(exc, asyncio.CancelledError):
                raise
            msg = (
                f"the function of stage {name!r} could not be loaded on agent {self.agent.hostname} "
                f"({P.describe_versions(P.local_versions())}): {type(exc).__name__}: {exc}"
            )
            if isinstance(exc, ModuleNotFoundError):
                msg += (
                    f". Install {exc.name!r} on the agent's host, or have the client ship it by value with "
                    f"cloudpickle.register_pickle_by_value(module)"
                )
            log.warning("session %s: %s", s.name, msg)
            s.send(P.header(P.ERROR, code=P.E_STAGE, message=msg, sid=sid))
            return
        spec = build_spec(h, fns, self.agent.config.workers, setup, teardown)
        key = stage_key(h, spec, s.user)
        warm = self.pool.take(key)
        if warm is not None:
            ex, proxy = warm
            host = StageHost(s, sid, spec, ex, proxy, key)
            s.stages[sid] = host
            self._ready(s, host, "a warm executor")
            return
        try:
            ex = self.agent.backend.executor(spec)
            proxy = SinkProxy()
            host = StageHost(s, sid, spec, ex, proxy, key)
            if s.closed:
                await ex.aclose()
                return
            s.stages[sid] = host
            await ex.start(spec, proxy)
        except BaseException as exc:
            if s.stages.get(sid) is not None:
                host = s.stages.pop(sid)
                await host.aclose()
            if isinstance(exc, asyncio.CancelledError):
                raise
            detail = exc.message if isinstance(exc, StageStartError) else f"{type(exc).__name__}: {exc}"
            msg = f"stage {name!r} could not start on agent {self.agent.hostname}: {detail}"
            log.warning("session %s: %s", s.name, msg)
            s.send(P.header(P.ERROR, code=P.E_STAGE, message=msg, sid=sid))
            return
        if s.closed or host.closed:
            if host.closed:
                return
            host.started = True
            await host.aclose()  # the session went away while it started: park it for the next one
            return
        self._ready(s, host, "new worker processes" if self.agent.backend_name == "process" else "a new executor")

    def _ready(self, s: Session, host: StageHost, how: str) -> None:
        host.started = True
        w = host.window()
        host.last_window = w
        log.info(
            "session %s: stage %r (sid %d) runs with %d workers (%s)",
            s.name,
            host.spec.name,
            host.sid,
            host.spec.num_workers,
            how,
        )
        s.send(P.header(P.STAGE_OK, sid=host.sid, win=w, workers=host.spec.num_workers))
        host.pump()

    # --- warm executors --------------------------------------------------------------------

    def park(self, key: Hashable, ex: Executor, proxy: SinkProxy) -> None:
        """Keep an idle executor for the next identical stage; close what the pool evicts."""
        for old in self.pool.park(key, ex, proxy):
            self.agent.spawn(old.aclose(), "pypline-agent-close-executor")

    def expire(self, now: float) -> None:
        for ex in self.pool.expired(now):
            self.agent.spawn(ex.aclose(), "pypline-agent-close-executor")

    async def aclose_parked(self) -> None:
        await asyncio.gather(*(ex.aclose() for ex in self.pool.clear()), return_exceptions=True)
