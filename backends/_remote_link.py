"""One agent as the client sees it: a DEALER, its handshake, liveness and credit state.

::

            HELLO (seq n) ──► agent           every retry is a new seq; only the
      CONNECTING ◄── HELLO_OK (seq n)         answer to the latest one counts
          │ versions checked here too          ERROR VERSION_MISMATCH ─► FAILED (for the run)
          ▼
        ALIVE ── STAGE / FUNC for every stage ──► STAGE_OK: the stage has a window here
          │      TASKS ◄─► RESULTS (reader task), PING every heartbeat_timeout/4
          │ silent for heartbeat_timeout, PONG from another instance, BYE, NO_SESSION
          ▼
        DEAD: every attempt in flight here is reported lost (the engine re-dispatches it,
              counting max_lost); its stages' windows are void; HELLO again with back-off.
              Late RESULTS for those attempts find no entry and are dropped (counted).

One long-lived reader task per socket (a pending ``recv`` is never cancelled while
the socket is in use) and one ticker task for heartbeats and HELLO retries. All
sends are non-blocking: credits bound what can be outstanding, so a full pipe is a
protocol bug, handled as a dead agent.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import zmq
import zmq.asyncio
from .wire import protocol as P
from .wire.sockets import recv_now, send_now

from pypline.executor import Attempt

if TYPE_CHECKING:
    from .wire.keys import ClientKeys

    from .remote import RemoteExecutor, ZmqBackend

log = logging.getLogger("pypline.backends.remote")

CONNECTING = "connecting"
ALIVE = "alive"
DEAD = "dead"
FAILED = "failed"
CLOSED = "closed"

#: HELLO retry back-off while an agent does not answer: first retry after this, doubling.
HELLO_RETRY_S = 0.25
#: ...up to this. Long enough not to spam a dead host, short enough to notice a restart.
HELLO_RETRY_MAX_S = 4.0


def where_of(endpoint: str) -> str:
    """``host:port`` (or the ipc path) of an endpoint, as WorkerLost names agents."""
    return endpoint.split("://", 1)[-1]


class LinkStage:
    """One stage on one agent: its credit window and the attempts in flight there."""

    __slots__ = ("epoch", "error", "ex", "link", "out", "ready", "sid", "to_send", "window")

    def __init__(self, link: AgentLink, ex: RemoteExecutor) -> None:
        self.link = link
        self.ex = ex
        self.sid = ex.sid
        self.ready = False
        self.error: str | None = None
        self.window = 0
        self.out: dict[int, Attempt] = {}  # tid -> attempt, sent or about to be
        self.to_send: list[tuple[int, Attempt]] = []
        self.epoch = link.epoch

    def free(self) -> int:
        return self.window - len(self.out) if self.ready else 0


class AgentLink:
    """The client's connection to one agent. See the module docstring."""

    def __init__(self, backend: ZmqBackend, endpoint: str, keys: ClientKeys | None) -> None:
        self.backend = backend
        self.endpoint = endpoint
        self.where = where_of(endpoint)
        self.keys = keys
        self.state = CONNECTING
        self.instance: str | None = None
        self.host = "?"
        self.workers = 0
        self.max_msg = P.DEFAULT_MAX_MSG
        self.error: str | None = None
        self.known_fns: set[str] = set()
        self.stages: dict[int, LinkStage] = {}
        self.epoch = 0  # counts sessions (HELLO_OKs); acks of an older session are not sent
        self.hello_seq = 0
        self.ping_seq = 0
        self.last_rx = 0.0
        self.next_hello = 0.0
        self.backoff = HELLO_RETRY_S
        self.resolved = asyncio.Event()  # the first handshake succeeded or failed for good
        self.enc = P.Encoder()
        self.flush_scheduled = False
        self.late = 0
        self.unhandled = 0  # messages that made handling fail unexpectedly (dropped)
        self.deaths = 0
        self.draining = False  # the agent announced DRAIN: results still come, no new work goes
        self.sock: zmq.asyncio.Socket | None = None
        self.tasks: list[asyncio.Task[Any]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, ctx: zmq.asyncio.Context) -> None:
        loop = asyncio.get_running_loop()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.routing_id = b"\x01" + uuid.uuid4().bytes[1:]  # a routing id must not start with 0
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME + P.FRAME_SLACK)  # per frame: big ones come in pieces
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(HELLO_RETRY_MAX_S * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 6000)
        monitor = None
        if self.keys is not None:
            from .wire.keys import KeyError_

            try:
                sock.curve_serverkey = self.keys.server_key(self.endpoint)
            except KeyError_ as exc:
                sock.close(linger=0)
                self._fail(str(exc))
                return
            sock.curve_secretkey = self.keys.secret
            sock.curve_publickey = self.keys.public
            monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            )
        sock.connect(self.endpoint)
        self.sock = sock
        self.started_at = time.monotonic()
        self._hello()
        self.tasks.append(loop.create_task(self._reader(sock), name=f"pypline-zmq-reader-{self.where}"))
        self.tasks.append(loop.create_task(self._ticker(), name=f"pypline-zmq-ticker-{self.where}"))
        if monitor is not None:
            self.tasks.append(loop.create_task(self._watch_handshakes(monitor), name=f"pypline-zmq-keys-{self.where}"))
        for t in self.tasks:
            t.add_done_callback(self._task_ended)

    def _fail(self, why: str) -> None:
        """This agent cannot be used in this run (a key problem): say why, at once."""
        self.die(why)
        self.state = FAILED
        self.error = f"agent {self.where}: {why}"
        log.error("%s", self.error)
        self.resolved.set()
        self.backend.link_changed(self)

    async def _watch_handshakes(self, monitor: zmq.asyncio.Socket) -> None:
        """A failed CURVE handshake is reported as what it is (our key refused, or the agent's
        key not the pinned one), not as an agent that does not answer."""
        from zmq.utils.monitor import parse_monitor_message

        from .wire.keys import handshake_failure

        assert self.keys is not None
        try:
            while True:
                ev = parse_monitor_message(await monitor.recv_multipart())
                why = handshake_failure(int(ev["event"]), self.keys.directory, self.endpoint)
                if why is not None and self.state != FAILED:
                    self._fail(why)
        finally:
            monitor.close(linger=0)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        """The reader and the ticker live as long as the link: one that ends early means this
        agent can no longer be heard (or timed), so the link fails for good, loudly, and what
        was in flight there goes elsewhere instead of waiting forever."""
        if task.cancelled() or self.state in (CLOSED, FAILED):
            return
        exc = task.exception()
        why = f"{task.get_name()} stopped ({type(exc).__name__}: {exc})" if exc else f"{task.get_name()} stopped"
        log.error("agent %s: %s; no more work goes there in this run", self.where, why, exc_info=exc)
        self.die(why)
        self.state = FAILED
        self.error = f"agent {self.where}: {why}"
        self.resolved.set()
        self.backend.link_changed(self)

    async def aclose(self) -> None:
        if self.state == CLOSED:
            return
        if self.state == ALIVE:
            self._send([P.header(P.BYE, reason="run finished")])
        self.state = CLOSED
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []
        if self.sock is not None:
            if self.keys is not None:
                self.sock.disable_monitor()
            self.sock.close(linger=0)
            self.sock = None

    # --- sending -----------------------------------------------------------------------------

    def _send(self, frames: list[Any]) -> bool:
        sock = self.sock
        if sock is None:
            return False
        try:
            send_now(sock, frames)
        except zmq.ZMQError as exc:
            if self.state == ALIVE:
                self.die(f"cannot send to it ({exc})")
            return False
        return True

    def _hello(self) -> None:
        self.hello_seq += 1
        now = time.monotonic()
        self.next_hello = now + self.backoff
        self.backoff = min(self.backoff * 2, HELLO_RETRY_MAX_S)
        fields: dict[str, Any] = P.local_versions()
        self._send([P.header(P.HELLO, hb=self.backend.heartbeat_timeout, hello=self.hello_seq, **fields)])

    def declare(self, ex: RemoteExecutor) -> None:
        """Ask the agent to run ``ex``'s stage (shipping functions it does not have yet)."""
        ls = LinkStage(self, ex)
        self.stages[ex.sid] = ls
        for fid, data in ex.fn_blobs.items():
            if fid not in self.known_fns:
                self._send(P.message(P.FUNC, [data], fn=fid))
                self.known_fns.add(fid)
        self._send([P.header(P.STAGE, **ex.stage_fields)])

    def schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send every stage's assigned attempts, in batches. Runs once per loop tick."""
        self.flush_scheduled = False
        failed: list[tuple[LinkStage, Attempt, BaseException]] = []
        limit = self.max_msg
        for ls in list(self.stages.values()):
            if not ls.to_send:
                continue
            batch, ls.to_send = ls.to_send, []
            enc = self.enc
            for tid, a in batch:
                if len(enc) >= P.MAX_BATCH_ITEMS or enc.nbytes >= P.BATCH_BYTES:
                    self._send_tasks(ls, enc)
                before = enc.nbytes
                w = a.worker
                if not enc.add(tid, a.number, -1 if w is None else w, a.item):
                    exc = enc.failure
                    err: BaseException = TypeError(
                        f"an item of type {type(a.item).__qualname__} cannot be pickled to send it to agent "
                        f"{self.where} for stage {ls.ex.spec.name!r}: {type(exc).__name__}: {exc}"
                    )
                    err.__cause__ = exc
                    failed.append((ls, a, err))
                elif enc.nbytes - before > limit:
                    size = enc.nbytes - before
                    enc.pop_last(before)
                    failed.append(
                        (
                            ls,
                            a,
                            P.MessageTooLarge(
                                f"an item of stage {ls.ex.spec.name!r} is {size / 2**20:.1f} MiB pickled; agent {self.where} "
                                f"accepts at most {limit / 2**20:.1f} MiB per item (pypline-agent serve --max-message)"
                            ),
                        )
                    )
                else:
                    continue
                ls.out.pop(tid, None)
            if len(enc):
                self._send_tasks(ls, enc)
        for ls, a, err in failed:
            ls.ex.report_error(a, err)

    def _send_tasks(self, ls: LinkStage, enc: P.Encoder) -> None:
        n, frames = enc.finish()
        self._send(P.message(P.TASKS, frames, sid=ls.sid, n=n))

    def ack_emits(self, sid: int, n: int, epoch: int) -> None:
        if epoch == self.epoch and self.state == ALIVE:
            self._send([P.header(P.CREDIT, sid=sid, ack=n)])

    # --- receiving ---------------------------------------------------------------------------

    async def _reader(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            self._handle(frames)
            for _ in range(256):  # what is already queued, without a loop round trip
                try:
                    frames = recv_now(sock)
                except zmq.Again:
                    break
                self._handle(frames)

    def _handle(self, frames: list[Any]) -> None:
        """Handle one message from the agent. One the link cannot handle (whatever the
        reason) is dropped and logged, and the agent is taken for gone: its answers cannot
        be trusted, and its attempts are re-dispatched rather than waited for."""
        try:
            self._dispatch(frames)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the reader
            self.unhandled += 1
            log.error("agent %s: dropped a message that could not be handled: %s: %.200s",
                      self.where, type(exc).__name__, exc, exc_info=exc)
            if self.state == ALIVE:
                self.die(f"a message from it could not be handled ({type(exc).__name__})")

    def _dispatch(self, frames: list[Any]) -> None:
        try:
            h = P.parse_header(frames)
            if h["nf"] and sum(len(f) for f in frames) > P.CLIENT_MAX_MSG + P.MSG_SLACK:
                raise P.ProtocolError("a message larger than a client accepts")
            frames = P.joined(h, frames)
        except P.ProtocolError as exc:
            log.warning("dropped a malformed message from agent %s: %s", self.where, exc)
            if self.state == ALIVE:
                self.die(f"it sent a malformed message ({exc})")
            return
        t = h["t"]
        state = self.state
        if t == P.HELLO_OK or (t == P.ERROR and "hello" in h):
            if h.get("hello") == self.hello_seq and state in (CONNECTING, DEAD):
                self._on_hello_reply(h)
            return
        if state != ALIVE:
            if t == P.RESULTS:
                self.late += h["n"]
            return
        self.last_rx = time.monotonic()
        try:
            if t == P.RESULTS:
                ls = self.stages.get(h["sid"])
                if ls is None:
                    self.late += h["n"]
                    return
                ls.ex.on_results(ls, h, frames)
            elif t == P.PONG:
                if h["instance"] != self.instance:
                    self.die(f"it restarted (instance {h['instance'][:8]}, was {str(self.instance)[:8]})")
            elif t == P.STAGE_OK:
                ls = self.stages.get(h["sid"])
                if ls is not None and not ls.ready:
                    ls.ready = True
                    ls.window = h["win"]
                    ls.ex.on_stage_ready(ls)
            elif t == P.CREDIT:
                ls = self.stages.get(h["sid"])
                if ls is not None and ls.ready and "win" in h:
                    grew = h["win"] > ls.window
                    ls.window = h["win"]
                    if grew:
                        ls.ex.capacity_grew()
            elif t == P.NEED_FUNC:
                ls = self.stages.get(h["sid"])
                if ls is not None:
                    for f in h["fns"]:
                        self.known_fns.discard(f)
                    self.declare(ls.ex)
            elif t == P.ERROR:
                self._on_error(h)
            elif t == P.DRAIN:
                log.info("agent %s is draining: no new work goes there", self.where)
                self.draining = True
                for ls in self.stages.values():
                    ls.window = 0
                self.backend.link_changed(self)
            elif t == P.BYE:
                self.die(f"it said goodbye ({h.get('reason', 'no reason')})")
        except P.ProtocolError as exc:
            # Its answers cannot be read: treat it as gone, so nothing waits on it forever.
            self.die(f"it sent a malformed {t} ({exc})")

    def _on_hello_reply(self, h: dict[str, Any]) -> None:
        if h["t"] == P.ERROR:
            self.error = f"agent {self.where}: {h['message']}"
            if h["code"] == P.E_VERSION:
                log.error("%s", self.error)
                self.state = FAILED
                self.resolved.set()
                self.backend.link_changed(self)
            else:  # draining: not available now (keep asking, with back-off), so do not hold up the run
                self.resolved.set()
            return
        problem = P.check_versions(P.local_versions(), h)
        if problem is not None:
            self.error = f"agent {self.where}: {problem}"
            log.error("%s", self.error)
            self.state = FAILED
            self.resolved.set()
            self.backend.link_changed(self)
            return
        new_instance = self.instance is not None and h["instance"] != self.instance
        if new_instance or self.instance is None:
            self.known_fns = set()
        self.instance = h["instance"]
        self.host = h.get("host", "?")
        self.workers = h["workers"]
        self.max_msg = h["max_msg"]
        self.state = ALIVE
        self.draining = False
        self.error = None
        self.epoch += 1
        self.last_rx = time.monotonic()
        self.backoff = HELLO_RETRY_S
        if self.deaths:
            log.info("agent %s is back (instance %s)", self.where, self.instance[:8])
        self.resolved.set()
        self.stages = {}
        self.backend.link_changed(self)

    def _on_error(self, h: dict[str, Any]) -> None:
        code = h["code"]
        if code == P.E_NO_SESSION:
            self.die("it does not know this session (restarted, or it expired us)")
        elif code == P.E_STAGE and "sid" in h:
            ls = self.stages.get(h["sid"])
            if ls is not None:
                ls.error = h["message"]
                ls.ready = False
                ls.ex.on_stage_failed(ls)
        else:
            log.warning("agent %s reported %s: %s", self.where, code, h["message"])

    # --- liveness ----------------------------------------------------------------------------

    def die(self, why: str) -> None:
        """Declare the agent dead: everything in flight there is lost; try HELLO again later."""
        if self.state != ALIVE:
            return
        self.state = DEAD
        self.deaths += 1
        stages, self.stages = self.stages, {}
        n = sum(len(ls.out) for ls in stages.values())
        log.warning("agent %s declared dead: %s; %d attempt(s) in flight there re-dispatched", self.where, why, n)
        self.next_hello = time.monotonic()
        self.backoff = HELLO_RETRY_S
        for ls in stages.values():
            ls.ready = False
            ls.window = 0
            out, ls.out = ls.out, {}
            ls.to_send = []
            ls.ex.on_link_lost(ls, list(out.values()))
        self.backend.link_changed(self)

    async def _ticker(self) -> None:
        hb = self.backend.heartbeat_timeout
        interval = max(0.02, hb / 4)
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - last > interval + hb / 2:
                # Our own loop was stalled: the agent's silence is not its fault.
                self.last_rx = now
            last = now
            if self.state == ALIVE:
                if now - self.last_rx > hb:
                    self.die(f"no message from it for {now - self.last_rx:.1f} s (heartbeat_timeout={hb:g})")
                else:
                    self.ping_seq += 1
                    self._send([P.header(P.PING, seq=self.ping_seq)])
            elif self.state in (CONNECTING, DEAD):
                timed_out = self.state == CONNECTING and now - self.started_at > self.backend.connect_timeout
                if timed_out and not self.resolved.is_set():
                    self.error = self.error or (
                        f"agent {self.endpoint}: no answer within connect_timeout="
                        f"{self.backend.connect_timeout:g} s (is it running, and do the keys match?)"
                    )
                    self.resolved.set()
                    self.backend.link_changed(self)
                if now >= self.next_hello:
                    self._hello()
