"""One stage across the agents (and the local fallback): the executor the engine drives.

::

    submit([a, ...]) ─► the agent with the largest share of its credit free takes each
                        attempt: LinkStage.out[tid] = a, LinkStage.to_send; or the local fallback
    AgentLink.flush  ─► TASKS (one message per stage per agent per loop tick)
    on_results       ◄─ RESULTS: first result per task id wins; the window is updated;
                        plain stages report at once, generator stages through an ordered queue
                        (a task awaits sink.emit, then acknowledges the agent's emits)
    on_link_lost     ◄─ the agent died: its attempts are reported lost (re-dispatched by the engine)
    on_links_changed ◄─ no agent can run the stage any more: start the local fallback
                        (fallback="local"), or after connect_timeout fail what waits (fallback="error")

See ``remote.py`` for the backend around it and ``_remote_link.py`` for one agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .wire import protocol as P
from .wire.errors import rebuild, unpickled

from pypline import RemoteError, WorkerLost
from pypline.executor import (
    Attempt,
    Executor,
    ExecutorStatistics,
    OutcomeSink,
    StageSpec,
    StageStartError,
)

from ._remote_link import ALIVE, AgentLink, LinkStage

if TYPE_CHECKING:
    from .remote import ZmqBackend

__all__ = ["RemoteExecutor", "error_from_info"]

log = logging.getLogger("pypline.backends.remote")

#: How long a stage's start waits for an agent to start its workers (process spawn,
#: function import on the agent). Generous: a cold interpreter on a loaded host is slow.
STAGE_START_TIMEOUT_S = 60.0

#: Emit acknowledgements are sent in groups of this many (or when the queue empties).
ACK_EVERY = 64


def error_from_info(info: Any, where: str) -> BaseException:
    """The exception an error entry describes: its own type if it unpickles here, else RemoteError."""
    if type(info) is not tuple or len(info) != 4:
        return RemoteError("ProtocolError", f"malformed error entry from agent {where}", "")
    name, message, tb, data = (str(info[0]), str(info[1]), str(info[2]), info[3])
    return rebuild(name, message, tb, unpickled(data) if isinstance(data, bytes) else None)


def _pickle_fn(fn: Any) -> bytes:
    """cloudpickle's own rules: importable modules by reference (the agent's host must have
    them), ``__main__`` and modules registered with ``register_pickle_by_value`` by value."""
    import cloudpickle  # type: ignore[import-untyped]

    return cloudpickle.dumps(fn, protocol=5)  # type: ignore[no-any-return]


class RemoteExecutor(Executor):
    """One stage across the agents (and the local fallback). See the module docstring."""

    def __init__(self, backend: ZmqBackend, spec: StageSpec) -> None:
        self.backend = backend
        self.spec = spec
        self._limit = spec.buffer + spec.num_workers
        self.sid = next(backend.sids)
        self.local: Executor | None = None
        self._local_starting: asyncio.Task[None] | None = None
        self._failing: str | None = None  # fallback="error" and no agent left: why
        self._fail_timer: asyncio.TimerHandle | None = None
        self._ready_event = asyncio.Event()
        self._closed = False
        self._started = False  # until start() returns, it decides about fallbacks itself
        self._cands: list[LinkStage] = []  # ready LinkStages on alive agents (see _refresh)
        self._gen = any(w.kind.is_generator for w in spec.workers)
        self._reports: deque[tuple[int, Attempt, Any, LinkStage | None, int]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self.submitted = 0
        self.completed = 0
        self.stage_errors: dict[str, str] = {}

    # --- start -----------------------------------------------------------------------------

    async def start(self, spec: StageSpec, sink: OutcomeSink) -> None:
        self.spec = spec
        self.sink = sink
        self.loop = asyncio.get_running_loop()
        self.fn_blobs: dict[str, bytes] = {}
        fids: list[str] = []
        by_obj: dict[int, str] = {}
        for i, wf in enumerate(spec.workers):
            fid = by_obj.get(id(wf.fn))
            if fid is None:
                try:
                    data = _pickle_fn(wf.fn)
                except Exception as exc:
                    name = getattr(wf.fn, "__qualname__", None) or repr(wf.fn)
                    raise StageStartError(
                        spec.name,
                        f"its function {name} (worker {i}) cannot be pickled to send it to an agent: "
                        f"{type(exc).__name__}: {exc}",
                    ) from exc
                fid = P.fn_id(data)
                by_obj[id(wf.fn)] = fid
                self.fn_blobs[fid] = data
            fids.append(fid)
        hooks: list[str | None] = []
        for what, hook in (("setup", spec.setup), ("teardown", spec.teardown)):
            if hook is None:
                hooks.append(None)
                continue
            try:
                data = _pickle_fn(hook)
            except Exception as exc:
                raise StageStartError(
                    spec.name, f"its {what} cannot be pickled to send it to an agent: {type(exc).__name__}: {exc}"
                ) from exc
            fid = P.fn_id(data)
            hooks.append(fid)
            self.fn_blobs[fid] = data
        self.stage_fields: dict[str, Any] = {
            "sid": self.sid,
            "name": spec.name[: P.MAX_NAME],
            "kinds": [w.kind.value for w in spec.workers],
            "fns": fids,
            "fork": spec.is_fork,
            "timeout": spec.timeout,
            "retries": spec.retries,
            "buffer": spec.buffer,
            **({"hooks": hooks} if any(hooks) else {}),
        }
        backend = self.backend
        backend.executors[self.sid] = self
        alive = backend.alive()
        if not alive:
            await self._start_without_agents(backend.no_agent_reason or "no agent is alive")
            self._started = True
            return
        for link in alive:
            link.declare(self)
        deadline = self.loop.time() + STAGE_START_TIMEOUT_S
        while not self._ready_links():
            if self._all_declined():
                break
            left = deadline - self.loop.time()
            if left <= 0:
                break
            self._ready_event.clear()
            try:
                await asyncio.wait_for(self._ready_event.wait(), left)
            except asyncio.TimeoutError:
                break
        if self._ready_links():
            self._started = True
            return
        if self.stage_errors:
            raise StageStartError(spec.name, "; ".join(self.stage_errors.values()))
        await self._start_without_agents(
            f"no agent started it within {STAGE_START_TIMEOUT_S:g} s" if backend.alive() else "every agent died"
        )
        self._started = True

    def _ready_links(self) -> list[LinkStage]:
        out = []
        for link in self.backend.links:
            ls = link.stages.get(self.sid)
            if ls is not None and ls.ready and link.state == ALIVE and not link.draining:
                out.append(ls)
        return out

    def _all_declined(self) -> bool:
        """True when no agent that takes work can still start this stage."""
        for link in self.backend.alive():
            ls = link.stages.get(self.sid)
            if ls is None or ls.error is None:
                return False
        return True

    async def _start_without_agents(self, reason: str) -> None:
        if self.backend.fallback == "local":
            await self._start_local()
            return
        raise StageStartError(
            self.spec.name, f"{reason}; configure(fallback='local') would run it on this machine instead"
        )

    async def _start_local(self) -> None:
        if self.local is not None:
            return
        local = (await self.backend.local_backend()).executor(self.spec)
        try:
            await local.start(self.spec, self.sink)
        except BaseException:
            await asyncio.shield(local.aclose())
            raise
        if self._closed:
            await local.aclose()
            return
        self.local = local
        log.info("stage %r runs on the local %s backend", self.spec.name, type(local).__name__)

    # --- the contract ----------------------------------------------------------------------

    def _refresh(self) -> None:
        """Recompute the agents this stage can use now (after any link or stage change)."""
        self._cands = self._ready_links()

    def capacity(self) -> int:
        cap = 0
        held = 0
        for ls in self._cands:
            n = len(ls.out)
            held += n
            f = ls.window - n
            if f > 0:
                cap += f
        # Never beyond the engine's own bound for the stage (it holds at most this many anyway).
        room = self._limit - held
        if cap > room:
            cap = max(0, room)
        if self.local is not None:
            cap += self.local.capacity()
        elif self._failing is not None:
            cap += self.spec.buffer + self.spec.num_workers
        return cap

    def submit_one(self, attempt: Attempt) -> None:
        cands = self._cands
        if len(cands) == 1:  # the engine's hot path with one agent
            ls = cands[0]
            out = ls.out
            if ls.window > len(out):
                self.submitted += 1
                tid = next(self.backend.tids)
                out[tid] = attempt
                ls.to_send.append((tid, attempt))
                link = ls.link
                if not link.flush_scheduled:
                    link.schedule_flush()
                return
        self.submit((attempt,))

    def submit(self, attempts: Sequence[Attempt]) -> None:
        n = len(attempts)
        self.submitted += n
        cands = self._cands
        if len(cands) == 1:  # the hot path: one agent with room for all of them
            ls = cands[0]
            if ls.window - len(ls.out) >= n:
                out, to_send, tids = ls.out, ls.to_send, self.backend.tids
                for a in attempts:
                    tid = next(tids)
                    out[tid] = a
                    to_send.append((tid, a))
                link = ls.link
                if not link.flush_scheduled:
                    link.schedule_flush()
                return
        frees = [ls.window - len(ls.out) for ls in cands]
        windows = [max(1, ls.window) for ls in cands]
        local: list[Attempt] = []
        tids = self.backend.tids
        touched: set[AgentLink] = set()
        for a in attempts:
            # The agent with the largest share of its credit free (the idlest one: an agent
            # grants credit for its free workers), the most free credit among equals.
            best, share, most = -1, 0.0, 0
            for i, f in enumerate(frees):
                if f > 0:
                    r = f / windows[i]
                    if r > share or (r == share and f > most):
                        best, share, most = i, r, f
            if best < 0:
                local.append(a)
                continue
            frees[best] -= 1
            ls = cands[best]
            tid = next(tids)
            ls.out[tid] = a
            ls.to_send.append((tid, a))
            touched.add(ls.link)
        for link in touched:
            link.schedule_flush()
        if local:
            if self.local is not None:
                self.local.submit(local)
            elif self._failing is not None:
                why = self._failing
                self.loop.call_soon(self._fail_all, local, why)
            else:  # pragma: no cover - the engine never submits beyond capacity()
                raise RuntimeError(f"submit() got {n} attempts with capacity {self.capacity()}")

    def _fail_all(self, attempts: list[Attempt], why: str) -> None:
        where = tuple(link.where for link in self.backend.links)
        for a in attempts:
            self.completed += 1
            self.sink.error(a, WorkerLost(f"no agent can run stage {self.spec.name!r}: {why}", agents=where))

    def report_error(self, a: Attempt, exc: BaseException) -> None:
        """An attempt that failed before it left (unpicklable, too large)."""
        self.completed += 1
        if self._gen:
            self._queue(P.S_ERROR, a, exc, None)
        else:
            self.sink.error(a, exc)

    # --- what the agents say -----------------------------------------------------------------

    def on_results(self, ls: LinkStage, h: dict[str, Any], frames: list[Any]) -> None:
        n = h["n"]
        index = P.Index.parse(frames[1].buffer, n, len(frames) - 3, results=True)
        values = P.decode_values(index, frames[1:])
        old = ls.window
        ls.window = h["win"]
        out = ls.out
        link = ls.link
        sink = self.sink
        gen = self._gen
        where = link.where
        oks: list[Attempt] = []  # plain results: one ok_many after the loop (every slot freed first)
        ok_values: list[Any] = []
        for tid, status, v in zip(index.tid, index.a, values):
            if status == P.S_EMIT:
                a = out.get(tid)
                if a is None:
                    link.late += 1
                elif type(v) is P.Undecodable:
                    self._queue(P.S_ERROR, a, self._undecodable(v, "a yielded value"), ls)
                else:
                    self._queue(P.S_EMIT, a, v, ls)
                continue
            a = out.pop(tid, None)
            if a is None:
                link.late += 1  # first result wins: a lost-and-redispatched attempt's late answer
                continue
            self.completed += 1
            if status == P.S_OK:
                if type(v) is P.Undecodable:
                    status, v = P.S_ERROR, self._undecodable(v, "the result")
            elif status == P.S_LOST:
                v = where
            else:
                v = error_from_info(v, where)
                status = P.S_ERROR
            if gen:
                self._queue(status, a, v, ls)
            elif status == P.S_OK:
                oks.append(a)
                ok_values.append(v)
            elif status == P.S_ERROR:
                sink.error(a, v)
            else:
                sink.lost(a, v)
        if oks:
            sink.ok_many(oks, ok_values)
        if ls.window > old:
            self.capacity_grew()

    def _undecodable(self, v: Any, what: str) -> BaseException:
        exc = v.error
        err = TypeError(
            f"{what} sent back by agent for stage {self.spec.name!r} could not be unpickled here: "
            f"{type(exc).__name__}: {exc}"
        )
        err.__cause__ = exc
        return err

    def capacity_grew(self) -> None:
        if not self._closed:
            self.sink.capacity_changed()

    def on_stage_ready(self, ls: LinkStage) -> None:
        self._refresh()
        self._ready_event.set()
        if self._fail_timer is not None:
            self._fail_timer.cancel()
            self._fail_timer = None
        self._failing = None
        self.capacity_grew()

    def on_stage_failed(self, ls: LinkStage) -> None:
        msg = ls.error or "failed"
        self._refresh()
        self.stage_errors[ls.link.where] = msg
        log.warning("%s", msg)
        self._ready_event.set()
        if ls.out:
            out, ls.out = ls.out, {}
            self.on_link_lost(ls, list(out.values()))
        self.on_links_changed()

    def on_link_lost(self, ls: LinkStage, attempts: list[Attempt]) -> None:
        """The agent died with these attempts: make room elsewhere first, then report them lost."""
        self._refresh()
        self._ready_event.set()
        self.on_links_changed()
        for a in attempts:
            self.completed += 1
            if self._gen:
                self._queue(P.S_LOST, a, ls.link.where, None)
            else:
                self.sink.lost(a, ls.link.where)

    def on_links_changed(self) -> None:
        """Start the local fallback (or the failing clock) when no agent can run this stage any more."""
        self._refresh()
        self._ready_event.set()
        if self._closed or self.local is not None or self._local_starting is not None:
            return
        if not self._started:
            return
        if self._ready_links() or any(
            link.state == ALIVE
            and not link.draining
            and (link.stages.get(self.sid) is None or link.stages[self.sid].error is None)
            for link in self.backend.links
        ):
            return  # an agent runs it, or is (re)starting it
        if self.backend.fallback == "local":
            log.warning("no agent can run stage %r any more; it continues on the local machine", self.spec.name)
            self._local_starting = self.loop.create_task(self._fallback_now(), name=f"pypline-{self.spec.name}-local")
        elif self._failing is None and self._fail_timer is None:
            self._fail_timer = self.loop.call_later(self.backend.connect_timeout, self._start_failing)

    async def _fallback_now(self) -> None:
        try:
            await self._start_local()
        except Exception as exc:  # noqa: BLE001 - then the items fail instead of waiting forever
            log.error("the local fallback for stage %r could not start: %s", self.spec.name, exc)
            self._failing = f"the local fallback could not start: {exc}"
        self.capacity_grew()

    def _start_failing(self) -> None:
        self._fail_timer = None
        if self._ready_links() or self._closed:
            return
        states = ", ".join(f"{link.where} {link.state}" for link in self.backend.links)
        self._failing = f"every agent is gone ({states}) and fallback='error'"
        log.error("stage %r: %s; its waiting items fail", self.spec.name, self._failing)
        self.capacity_grew()

    # --- generator stages: reports in order, emits awaited -------------------------------------

    def _queue(self, status: int, a: Attempt, v: Any, ls: LinkStage | None) -> None:
        self._reports.append((status, a, v, ls, ls.link.epoch if ls is not None else 0))
        if self._drainer is None:
            self._drainer = self.loop.create_task(self._drain(), name=f"pypline-{self.spec.name}-reports")
        elif self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _drain(self) -> None:
        reports, sink = self._reports, self.sink
        acks: dict[tuple[AgentLink, int], int] = {}
        while True:
            if not reports:
                for (link, epoch), k in acks.items():
                    link.ack_emits(self.sid, k, epoch)
                acks.clear()
                self._wake = self.loop.create_future()
                await self._wake
                continue
            status, a, v, ls, epoch = reports.popleft()
            if status == P.S_EMIT:
                await sink.emit(a, v)
                assert ls is not None
                key = (ls.link, epoch)
                acks[key] = acks.get(key, 0) + 1
                if acks[key] >= ACK_EVERY:
                    ls.link.ack_emits(self.sid, acks.pop(key), epoch)
            elif status == P.S_OK:
                sink.ok(a, v)
            elif status == P.S_ERROR:
                sink.error(a, v)
            else:
                sink.lost(a, v)

    # --- close ---------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.backend.executors.pop(self.sid, None)
        if self._fail_timer is not None:
            self._fail_timer.cancel()
        tasks = [t for t in (self._drainer, self._local_starting) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self.backend.links:
            ls = link.stages.pop(self.sid, None)
            if ls is not None:
                ls.out.clear()
                ls.to_send = []
        if self.local is not None:
            await self.local.aclose()

    def statistics(self) -> ExecutorStatistics:
        agents: dict[str, dict[str, Any]] = {}
        for link in self.backend.links:
            ls = link.stages.get(self.sid)
            agents[link.where] = {
                "state": link.state,
                "workers": link.workers,
                "in_flight": len(ls.out) if ls is not None else 0,
                "credit_window": ls.window if ls is not None else 0,
                "free_credits": ls.free() if ls is not None else 0,
                "deaths": link.deaths,
                "late_results_dropped": link.late,
            }
        return ExecutorStatistics(
            backend="zmq",
            workers=sum(link.workers for link in self.backend.alive()),
            capacity=self.capacity(),
            submitted=self.submitted,
            completed=self.completed,
            details={"agents": agents, "local_fallback": self.local is not None},
        )
