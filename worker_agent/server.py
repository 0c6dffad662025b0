"""The agent: one ROUTER socket serving ``multi_proc`` stages to remote pipelines.

::

    clients (one DEALER each) ──tcp/ipc, CURVE+ZAP when --keys──► ROUTER (bind)
                                                                    │ reader task: recv, then
                                                                    │ drain what is queued
                                                                    ▼
       parse_header (JSON, checked completely) ── bad ──► logged, counted, dropped
              │ HELLO: versions checked ─► Session (keyed by routing id) ─► HELLO_OK / ERROR
              │ anything else from an unknown routing id ─► counted, dropped (+ ERROR NO_SESSION)
              ▼
       Session: FUNC (cached by content hash, agent-wide) · STAGE ─► StageHost with a local
       executor (process backend, or asyncio) · TASKS ─► StageHost · CREDIT (emit acks) ·
       PING ─► PONG · BYE ─► session closed
              ▼
       ticker: expires sessions silent for their ttl (a stalled agent loop blames nobody)
       SIGTERM: drain (DRAIN to every session, queued tasks back as lost, running ones get
       --drain-timeout to finish, the rest back as lost, BYE, exit 0). A second signal: exit now.

**What is unpickled, and when.** Headers are JSON. Payloads (functions, items) are
unpickled in this process only for a session that completed HELLO on a connection
that completed the CURVE handshake and ZAP authorisation when the agent has keys;
an unauthenticated peer never gets a frame to this code at all. Unpickling here
(option (a) in ``PROTOCOL.md``) lets the agent host the engine's own executors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from pypline.executor import Backend

from pypline.backends.wire import protocol as P
from .metrics import MetricsServer
from .pool import SinkProxy
from .security import ServerKeys, ZapServer, is_local_endpoint
from .session import Session, StageHost, Task
from pypline.backends.wire.sockets import recv_now, send_now
from .stages import StageStarter

__all__ = ["Agent", "AgentConfig", "ConfigError"]

log = logging.getLogger("pypline.agent")

#: How often the ticker checks session liveness. Small next to any sensible ttl.
TICK_S = 0.25

#: ROUTER send high-water mark, in messages. Credits bound what a client can have
#: outstanding, so this is never reached in a correct exchange; it exists so a
#: broken peer cannot make the agent buffer without limit (send errors are counted).
SNDHWM = 100_000

#: A peer that sends this many malformed messages in a row is no longer logged at
#: WARNING (only counted), so a fuzzer or a broken client cannot flood the log.
LOG_FIRST = 10


#: Default of ``serve --max-memory``: bytes of received tasks the agent holds at once.
DEFAULT_MAX_MEMORY = 1024 * 1024 * 1024

#: Longest an item batch (or a stage's functions) may take to unpickle, in a thread,
#: before its items fail (or the stage fails to start) with TimeoutError.
DECODE_DEADLINE_S = 30.0

#: Refused connections logged per peer address before only every 1000th is.
REFUSALS_LOGGED = 3

#: How many ended sessions' routing ids are remembered, to tell their late messages
#: (routine after a partition) from a stranger's (a security event).
ENDED_SESSIONS_KEPT = 4096

#: serve()'s status when one of the agent's own tasks (the socket reader, the ticker, the
#: monitor) stopped for a reason nobody handled (EX_SOFTWARE): a supervisor restarts it.
EXIT_INTERNAL = 70


def off_loop(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """``fn(*args)`` in a daemon thread of its own; a future of its result on this loop.

    For unpickling a client's payload: however long it takes (a slow import, a slow
    ``__reduce__``), the loop keeps serving every session, and a call that never ends
    cannot hold up the agent's exit (no pool joins the thread)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def run() -> None:
        try:
            result = (True, fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the loop as the future's exception
            result = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *result)
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            pass

    threading.Thread(target=run, name="pypline-agent-unpickle", daemon=True).start()
    return fut


class ConfigError(Exception):
    """The agent cannot start with this configuration (the operator's set-up is at fault)."""


@dataclass(frozen=True)
class AgentConfig:
    bind: str = "tcp://127.0.0.1:5555"
    workers: int = os.cpu_count() or 1
    keys: ServerKeys | None = None
    insecure: bool = False
    drain_timeout: float = 30.0
    backend: str = "process"
    max_msg: int = P.DEFAULT_MAX_MSG
    max_memory: int = DEFAULT_MAX_MEMORY  # bytes of tasks held, all sessions together (session.py)
    metrics: tuple[str, int] | None = None  # (host, port) for GET /metrics (metrics.py); None: off


def _make_backend(name: str) -> tuple[str, Callable[[], Backend]]:
    if name == "process":
        from pypline.backends.process import ProcessBackend

        return "process", ProcessBackend
    from pypline.backends.local import AsyncioBackend

    return "asyncio", AsyncioBackend


def _raw_values() -> Callable[[Any, bool], Any]:
    from pypline.backends.process import RawValue

    return RawValue


class Agent:
    """The daemon's state. ``await Agent(config).serve()`` runs until drained."""

    def __init__(self, config: AgentConfig) -> None:
        if config.keys is None and not config.insecure and not is_local_endpoint(config.bind):
            raise ConfigError(
                f"refusing to bind {config.bind} without CURVE keys: anyone who can reach it could run code here. "
                "Create keys with `pypline-agent keygen DIR` and pass --keys DIR "
                "(or --insecure on a trusted network)"
            )
        self.config = config
        self.instance = uuid.uuid4().hex
        self.backend_name, factory = _make_backend(config.backend)
        self.backend: Backend = factory()  # one local backend for the agent's life: opened in serve()
        #: How a big bytes/bytearray item is handed to the backend: the process backend
        #: takes the received frame's memory as it is (one copy, into the worker's shared
        #: memory); others get a bytes/bytearray copy.
        self._raw: Callable[[Any, bool], Any] | None = _raw_values() if self.backend_name == "process" else None
        self.sessions: dict[bytes, Session] = {}
        self.held_bytes = 0  # wire bytes of every task queued or running here (the memory budget)
        self.stages = StageStarter(self)
        self.draining = False
        self.counters: dict[str, int] = {
            "malformed": 0,
            "handler_errors": 0,
            "unhelloed": 0,
            "stale": 0,
            "refused": 0,
            "version_mismatch": 0,
            "wrong_user": 0,
            "send_failed": 0,
            "sessions_expired": 0,
            "sessions": 0,
            "tasks": 0,
        }
        self._logged: dict[str, int] = {}
        #: Routing ids of recently ended sessions (bounded): their late traffic is "stale".
        self._ended: OrderedDict[bytes, None] = OrderedDict()
        self._refusals: OrderedDict[str, int] = OrderedDict()  # refused connections per peer address
        self._closing: set[asyncio.Task[Any]] = set()
        self._progress: asyncio.Event | None = None
        self._stop: asyncio.Future[int] | None = None
        self._signals = 0
        self.endpoint = config.bind
        #: Largest item or result: --max-message, and never more than a client accepts.
        self.max_item = min(config.max_msg, P.CLIENT_MAX_MSG)
        self.hostname = socket.gethostname()
        self.metrics: MetricsServer | None = None  # serve --metrics, while serving

    # --- running ---------------------------------------------------------------------------

    async def serve(self, ready: Callable[[Agent], None] | None = None) -> int:
        """Bind, serve until drained or stopped; returns the process exit status."""
        loop = asyncio.get_running_loop()
        self._progress = asyncio.Event()
        self._stop = loop.create_future()
        ctx = zmq.asyncio.Context()
        auth = None
        sock = ctx.socket(zmq.ROUTER)
        monitor = None
        backend_open = False
        tasks: list[asyncio.Task[Any]] = []
        try:
            sock.linger = 0
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            sock.setsockopt(zmq.SNDHWM, SNDHWM)
            sock.setsockopt(zmq.RCVHWM, SNDHWM)
            # Per frame (big payloads come in pieces): also all an unauthenticated peer can make
            # libzmq buffer per connection, until the handshake times out (HANDSHAKE_IVL).
            sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME + P.FRAME_SLACK)
            sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
            sock.setsockopt(zmq.HEARTBEAT_TTL, 6000)
            keys = self.config.keys
            if keys is not None:
                auth = ZapServer(ctx, keys.clients, lambda peer, why: loop.call_soon_threadsafe(self._refused, peer, why))
                auth.start()
                sock.curve_secretkey = keys.secret
                sock.curve_publickey = keys.public
                sock.curve_server = True
                sock.zap_domain = b"pypline"
            monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_SUCCEEDED
                | zmq.EVENT_DISCONNECTED
            )
            try:
                sock.bind(self.config.bind)
            except zmq.ZMQError as exc:
                raise ConfigError(f"cannot bind {self.config.bind}: {exc}") from exc
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self.sock = sock
            if self.config.insecure and keys is None and not is_local_endpoint(self.endpoint):
                log.warning(
                    "!!! INSECURE: serving %s WITHOUT authentication. Anyone who can reach this address can run "
                    "arbitrary code as user %s on this host. Use --keys DIR instead. !!!",
                    self.endpoint,
                    _username(),
                )
            if self.config.metrics is not None:
                metrics = MetricsServer(self.status)
                try:
                    await metrics.start(*self.config.metrics)
                except OSError as exc:
                    host, port = self.config.metrics
                    raise ConfigError(f"cannot listen for metrics on {host}:{port}: {exc}") from exc
                self.metrics = metrics
            await self.backend.open()
            backend_open = True
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
            tasks.append(loop.create_task(self._reader(sock), name="pypline-agent-reader"))
            tasks.append(loop.create_task(self._ticker(), name="pypline-agent-ticker"))
            tasks.append(loop.create_task(self._monitor(monitor), name="pypline-agent-monitor"))
            for t in tasks:
                t.add_done_callback(self._essential_task_ended)
            log.info(
                "serving %s: %d workers per stage, %s backend, %s, instance %s",
                self.endpoint,
                self.config.workers,
                self.backend_name,
                f"CURVE keys ({len(keys.clients.current())} client keys)" if keys else "no authentication",
                self.instance,
            )
            if self.metrics is not None:
                log.info("metrics at %s (read-only, no authentication)", self.metrics.url)
            if ready is not None:
                ready(self)
            return await self._stop
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.remove_signal_handler(sig)
                except Exception:  # noqa: BLE001, S110 - not installed
                    pass
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close_all_sessions()
            if self.metrics is not None:
                await self.metrics.aclose()
            if backend_open:
                try:
                    await self.backend.aclose()
                except Exception:
                    log.exception("closing the %s backend failed", self.backend_name)
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(linger=0)
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            ctx.term()

    def _essential_task_ended(self, task: asyncio.Task[Any]) -> None:
        """The reader, ticker and monitor run for the agent's whole life: one that ends
        early leaves the agent deaf or blind, so the agent stops, non-zero and loudly."""
        if task.cancelled() or self._stop is None or self._stop.done():
            return
        exc = task.exception()
        log.critical(
            "%s stopped (%s); the agent exits with status %d so that its supervisor restarts it",
            task.get_name(),
            f"{type(exc).__name__}: {exc}" if exc is not None else "it returned",
            EXIT_INTERNAL,
            exc_info=exc,
        )
        self.stop(EXIT_INTERNAL)

    def stop(self, status: int = 0) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(status)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal (%s): exiting now without draining", signal.Signals(sig).name)
            self.stop(1)
            return
        log.info("%s: draining (at most %g s)", signal.Signals(sig).name, self.config.drain_timeout)
        t = asyncio.get_running_loop().create_task(self.drain(), name="pypline-agent-drain")
        self._closing.add(t)
        t.add_done_callback(self._closing.discard)

    async def drain(self) -> None:
        """Stop taking work, let running tasks finish, hand back the rest as lost, say BYE, stop."""
        self.draining = True
        deadline = time.monotonic() + self.config.drain_timeout
        returned = 0
        for s in list(self.sessions.values()):
            s.send(P.header(P.DRAIN, deadline=self.config.drain_timeout))
            for h in s.stages.values():
                returned += h.return_queued()
        if returned:
            log.info("drain: handed %d queued task(s) back to their clients", returned)
        assert self._progress is not None
        while any(h.running for s in self.sessions.values() for h in s.stages.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), min(left, TICK_S))
            except asyncio.TimeoutError:
                pass
        lost = 0
        for s in list(self.sessions.values()):
            for h in s.stages.values():
                h.flush()
                lost += h.abandon_running()
            s.send(P.header(P.BYE, reason="agent drained"))
        if lost:
            log.warning(
                "drain: %d task(s) still running after %g s handed back as lost", lost, self.config.drain_timeout
            )
        log.info("drained; exiting")
        self.stop(0)

    def reported(self) -> None:
        """A stage host made a report (drain waits on this)."""
        if self.draining and self._progress is not None:
            self._progress.set()

    async def _close_all_sessions(self) -> None:
        self.draining = True  # nothing is parked from now on
        sessions = list(self.sessions.values())
        self.sessions.clear()
        await asyncio.gather(*(s.aclose() for s in sessions), return_exceptions=True)
        while self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
        await self.stages.aclose_parked()

    def _close_session(self, s: Session, why: str) -> None:
        if self.sessions.get(s.rid) is s:
            del self.sessions[s.rid]
        self._ended[s.rid] = None
        self._ended.move_to_end(s.rid)
        while len(self._ended) > ENDED_SESSIONS_KEPT:
            self._ended.popitem(last=False)
        log.info("session %s (%s) closed: %s", s.name, s.peer, why)
        t = asyncio.get_running_loop().create_task(s.aclose(), name=f"pypline-agent-close-{s.name}")
        self._closing.add(t)
        t.add_done_callback(self._closing.discard)

    def spawn(self, coro: Any, name: str) -> None:
        """Run ``coro`` as a task the agent waits for at shutdown."""
        t = asyncio.get_running_loop().create_task(coro, name=name)
        self._closing.add(t)
        t.add_done_callback(self._closing.discard)

    def park(self, key: Any, ex: Any, proxy: SinkProxy) -> None:
        """Keep an idle executor for the next identical stage (``pool.py``)."""
        self.stages.park(key, ex, proxy)

    # --- socket I/O ------------------------------------------------------------------------

    async def _reader(self, sock: zmq.asyncio.Socket) -> None:
        """The one reader of the ROUTER: never cancelled mid-message except at shutdown."""
        while True:
            frames = await sock.recv_multipart(copy=False)
            self._handle(frames)
            for _ in range(256):  # take what is already queued without a loop round trip
                try:
                    frames = recv_now(sock)
                except zmq.Again:
                    break
                self._handle(frames)

    def send(self, session: Session, frames: list[Any]) -> None:
        try:
            send_now(self.sock, frames)
        except zmq.ZMQError as exc:
            self.counters["send_failed"] += 1
            # EHOSTUNREACH: the client is gone; EAGAIN: it stopped reading far beyond its credits.
            self._warn("send_failed", f"cannot send to session {session.name} ({exc}); closing it")
            if not session.closed:
                session.closed = True
                self._close_session(session, f"send failed: {exc}")

    def _reply(self, rid: bytes, *frames: Any) -> None:
        try:
            send_now(self.sock, [rid, *frames])
        except zmq.ZMQError:
            self.counters["send_failed"] += 1

    def _warn(self, kind: str, message: str) -> None:
        n = self._logged.get(kind, 0) + 1
        self._logged[kind] = n
        if n <= LOG_FIRST or n % 1000 == 0:
            log.warning(
                "%s%s", message, f" (#{n}; further ones are counted, logged every 1000th)" if n == LOG_FIRST else ""
            )

    def _refused(self, peer: str, why: str) -> None:
        """A connection whose key was refused (from the ZAP thread): counted; logged with the
        peer's address, the first REFUSALS_LOGGED per peer and then every 1000th."""
        self.counters["refused"] += 1
        n = self._refusals.pop(peer, 0) + 1
        self._refusals[peer] = n  # most recent last
        while len(self._refusals) > ENDED_SESSIONS_KEPT:
            self._refusals.popitem(last=False)
        if n <= REFUSALS_LOGGED or n % 1000 == 0:
            log.warning(
                "refused a connection from %s: %s%s",
                peer,
                why,
                f" (#{n} from this peer; further ones are counted, logged every 1000th)" if n == REFUSALS_LOGGED else "",
            )

    def _drop(self, kind: str, rid: bytes, why: str) -> None:
        self.counters[kind] += 1
        self._warn(kind, f"dropped a message from {rid.hex()[:8]}: {why}")

    def _handle(self, frames: list[Any]) -> None:
        """Handle one message. Whatever it holds, the reader goes on to the next one: a
        message that makes handling fail unexpectedly is dropped, counted and logged."""
        try:
            self._dispatch(frames)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the reader
            self.counters["handler_errors"] += 1
            n = self._logged.get("handler_errors", 0) + 1
            self._logged["handler_errors"] = n
            if n <= LOG_FIRST or n % 1000 == 0:
                log.error("dropped a message that could not be handled: %s: %.200s", type(exc).__name__, exc,
                          exc_info=exc)

    def _dispatch(self, frames: list[Any]) -> None:
        if len(frames) < 2:
            self.counters["malformed"] += 1
            return
        rid = frames[0].bytes
        body = frames[1:]
        try:
            h = P.parse_header(body)
            if h["nf"] and sum(len(f) for f in body) > self.config.max_msg + P.MSG_SLACK:
                raise P.ProtocolError(f"a message larger than --max-message ({self.config.max_msg >> 20} MiB)")
            body = P.joined(h, body)
        except P.ProtocolError as exc:
            self._drop("malformed", rid, str(exc))
            return
        t = h["t"]
        try:
            if t == P.HELLO:
                self._on_hello(rid, h, body)
                return
            s = self.sessions.get(rid)
            if s is None:
                if rid in self._ended or self.config.keys is not None:
                    # A client whose session ended here (expired in a partition, closed by
                    # a repeated HELLO, lost in a restart of this agent: with keys, the peer
                    # passed authentication) still talking: routine, not a security event.
                    self.counters["stale"] += 1
                    log.debug("message %s from %s for a session that has ended", t, rid.hex()[:8])
                else:
                    self._drop("unhelloed", rid, f"{t} before HELLO")
                if t in (P.TASKS, P.PING, P.STAGE, P.FUNC):
                    self._reply(rid, P.header(P.ERROR, code=P.E_NO_SESSION, message="no session: send HELLO first"))
                return
            if self.config.keys is not None and _user(body[0]) != s.user:
                self._drop("wrong_user", rid, "message from another CURVE key than the session's")
                return
            if self.config.keys is not None and not self.config.keys.clients.admits(s.user):
                s.closed = True
                self._close_session(s, "its client key was revoked")
                self._refused(s.peer, f"the key of session {s.name} was revoked")
                return
            s.last_seen = time.monotonic()
            if t == P.TASKS:
                self._on_tasks(s, h, body)
            elif t == P.PING:
                self._on_ping(s, h)
            elif t == P.CREDIT:
                host = s.stages.get(h["sid"])
                if host is not None and "ack" in h:
                    host.ack_emits(h["ack"])
            elif t == P.FUNC:
                self.stages.on_func(h, body)
            elif t == P.STAGE:
                self.stages.on_stage(s, h)
            elif t == P.BYE:
                s.closed = True
                self._close_session(s, "client said BYE")
            else:
                self._drop("malformed", rid, f"{t} is not a client message")
        except P.ProtocolError as exc:
            self._drop("malformed", rid, str(exc))

    # --- messages ----------------------------------------------------------------------------

    def _on_hello(self, rid: bytes, h: dict[str, Any], body: list[Any]) -> None:
        mine = P.local_versions()
        problem = P.check_versions(h, mine)
        if problem is not None:
            self.counters["version_mismatch"] += 1
            log.warning("refused HELLO from %s: %s", _peer(body[0]), problem)
            self._reply(rid, P.header(P.ERROR, code=P.E_VERSION, message=problem, hello=h["hello"]))
            return
        if self.draining:
            self._reply(rid, P.header(P.ERROR, code=P.E_DRAINING, message="agent is draining", hello=h["hello"]))
            return
        user = _user(body[0]) if self.config.keys is not None else None
        if self.config.keys is not None and not self.config.keys.clients.admits(user):
            self._refused(_peer(body[0]), "HELLO with a revoked key")
            return
        old = self.sessions.get(rid)
        if old is not None and old.user != user:
            self._drop("wrong_user", rid, "HELLO for a session that belongs to another CURVE key")
            return
        old = self.sessions.pop(rid, None)
        if old is not None:
            old.closed = True
            self._close_session(old, "the client said HELLO again (it had given up on this session)")
        if h["python"][3] != mine["python"][3] or h.get("platform") != mine["platform"]:
            log.info(
                "client %s runs %s on %s (agent: %s on %s)",
                _peer(body[0]),
                P.describe_versions(h),
                h.get("platform"),
                P.describe_versions(mine),
                mine["platform"],
            )
        s = Session(self, rid, h, user, _peer(body[0]))
        self.sessions[rid] = s
        self.counters["sessions"] += 1
        log.info("session %s from %s%s (%s)", s.name, s.peer, f" key {user[:8]}..." if user else "", s.role)
        self._reply(
            rid,
            P.header(
                P.HELLO_OK,
                instance=self.instance,
                workers=self.config.workers,
                backend=self.backend_name,
                max_msg=self.max_item,
                hello=h["hello"],
                host=self.hostname,
                **mine,
            ),
        )

    # --- tasks and pings -------------------------------------------------------------------

    def _on_tasks(self, s: Session, h: dict[str, Any], body: list[Any]) -> None:
        host = s.stages.get(h["sid"])
        if host is None or not host.started:
            raise P.ProtocolError(f"TASKS for stage {h['sid']} which is not running here")
        n = h["n"]
        index = P.Index.parse(body[1].buffer, n, len(body) - 3, results=False)
        self.counters["tasks"] += n
        per_task = sum(len(f) for f in body[2:]) // n + 1
        if P.ENC_BLOB not in index.enc:  # builtins and raw bytes only: nothing slow to unpickle
            self._accept(host, index, P.decode_values(index, body[1:], self._raw), per_task)
            return
        # Arbitrary objects: unpickled in a thread, so that a slow import or __reduce__ in one
        # client's items never stops this loop (every session's heartbeats), with a deadline.
        self.spawn(self._decode_off_loop(host, index, body, per_task), f"pypline-agent-decode-{s.name}")

    async def _decode_off_loop(self, host: StageHost, index: P.Index, body: list[Any], per_task: int) -> None:
        job = off_loop(P.decode_values, index, body[1:], self._raw)
        try:
            values = await asyncio.wait_for(job, DECODE_DEADLINE_S)
        except asyncio.TimeoutError:
            err = TimeoutError(
                f"items of stage {host.spec.name!r} took more than {DECODE_DEADLINE_S:g} s to unpickle on agent "
                f"{self.hostname}; they are failed (the unpickling goes on in a thread until it ends)"
            )
            log.warning("session %s: %s", host.session.name, err)
            for tid in index.tid:
                host.fail_now(tid, err)
            return
        except P.ProtocolError as exc:
            self._drop("malformed", host.session.rid, str(exc))
            return
        self._accept(host, index, values, per_task)

    def _accept(self, host: StageHost, index: P.Index, values: list[Any], per_task: int) -> None:
        tasks: list[Task] = []
        nw = host.spec.num_workers
        for tid, number, w, v in zip(index.tid, index.a, index.w, values):
            if type(v) is P.Undecodable:
                err = TypeError(
                    f"an item of stage {host.spec.name!r} could not be unpickled on agent {self.hostname}: "
                    f"{type(v.error).__name__}: {v.error}"
                )
                host.fail_now(tid, err)
                continue
            tasks.append(Task(v, w if 0 <= w < nw else None, number, tid, per_task))
        if tasks:
            host.accept(tasks)

    def _on_ping(self, s: Session, h: dict[str, Any]) -> None:
        frames: list[Any] = []
        if h.get("detail"):
            import json

            frames.append(json.dumps(self.status()).encode())
        s.send(
            P.header(
                P.PONG,
                len(frames),
                seq=h["seq"],
                instance=self.instance,
                inflight=s.inflight(),
                capacity=self.free_capacity(),
                workers=self.config.workers,
                draining=self.draining,
            ),
            *frames,
        )

    # --- liveness --------------------------------------------------------------------------

    async def _ticker(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            if now - last > 2 * TICK_S + 0.5:
                # This loop was stalled (SIGSTOP, a swapped-out host, a long call): the
                # silence was ours, not the clients'. Their messages are queued; start over.
                log.info("event loop was stalled for %.1f s; session timers restarted", now - last - TICK_S)
                for s in self.sessions.values():
                    s.last_seen = now
            last = now
            self.stages.expire(now)
            for s in list(self.sessions.values()):
                if now - s.last_seen > s.ttl:
                    self.counters["sessions_expired"] += 1
                    s.closed = True
                    self._close_session(s, f"expired: silent for {now - s.last_seen:.1f} s (ttl {s.ttl:.1f} s)")

    async def _monitor(self, monitor: zmq.asyncio.Socket) -> None:
        from zmq.utils.monitor import parse_monitor_message

        # Refused keys are reported by the ZAP handler, with the peer's address (_refused);
        # these are handshakes that failed before it was asked (libzmq gives no peer address).
        refusals: dict[int, str] = {
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
            zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (protocol or security mechanism mismatch)",
        }
        while True:
            msg = await monitor.recv_multipart()
            try:
                ev = parse_monitor_message(msg)
            except Exception:  # noqa: BLE001, S112
                continue
            event = int(ev["event"])
            if event in refusals:
                self.counters["refused"] += 1
                self._warn("refused", f"refused a connection on {ev['endpoint']!r}: {refusals[event]}")
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                log.debug("connection accepted on %r", ev["endpoint"])
            elif event == zmq.EVENT_DISCONNECTED:
                log.debug("connection closed on %r", ev["endpoint"])

    # --- status ----------------------------------------------------------------------------

    def free_capacity(self) -> int:
        """Workers not busy: configured workers minus the busiest-possible use by running tasks."""
        if self.draining:
            return 0
        busy = sum(min(len(h.running), h.spec.num_workers) for s in self.sessions.values() for h in s.stages.values())
        return max(0, self.config.workers - busy)

    def status(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "endpoint": self.endpoint,
            "host": self.hostname,
            "pid": os.getpid(),
            "workers": self.config.workers,
            "backend": self.backend_name,
            "secure": self.config.keys is not None,
            "draining": self.draining,
            "free": self.free_capacity(),
            "held_bytes": self.held_bytes,
            "max_memory": self.config.max_memory,
            "warm_executors": len(self.stages.pool),
            "warm_reused": self.stages.pool.reused,
            "versions": P.local_versions(),
            "counters": dict(self.counters),
            "sessions": [s.statistics() for s in self.sessions.values() if s.role != "cli"],
        }


def _user(frame: Any) -> str | None:
    try:
        return frame.get("User-Id")  # type: ignore[no-any-return]
    except Exception:  # noqa: BLE001 - no ZAP user id on this connection
        return None


def _peer(frame: Any) -> str:
    try:
        return str(frame.get("Peer-Address"))
    except Exception:  # noqa: BLE001
        return "?"


def _username() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001
        return str(os.getuid())
