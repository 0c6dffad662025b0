"""A one-shot client for ``pypline-agent ping`` and ``status``: HELLO, PING, BYE.

::

    DEALER ──HELLO(role=cli)──► agent      versions checked on both sides
           ◄──HELLO_OK / ERROR──
           ──PING(detail)──────►
           ◄──PONG + status JSON──          sessions, stages, workers, credits, counters
           ──BYE───────────────►
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from pypline.backends.wire import protocol as P
from pypline.backends.wire.keys import load_client_keys

__all__ = ["ProbeError", "ProbeResult", "probe"]


class ProbeError(Exception):
    """The agent could not be asked (unreachable, refused, or it answered with an error)."""

    def __init__(self, message: str, *, unhealthy: bool = False) -> None:
        super().__init__(message)
        self.unhealthy = unhealthy


@dataclass
class ProbeResult:
    endpoint: str
    hello: dict[str, Any]
    pong: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)
    rtt_ms: float = 0.0

    @property
    def healthy(self) -> bool:
        return not self.pong.get("draining", False)


async def probe(
    endpoint: str,
    *,
    keys: str | os.PathLike[str] | None = None,
    timeout: float = 3.0,
    detail: bool = True,
) -> ProbeResult:
    """Ask the agent at ``endpoint`` who it is and how it is doing."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.linger = 0
        sock.routing_id = b"\x01" + uuid.uuid4().bytes[1:]
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME + P.FRAME_SLACK)
        monitor = None
        if keys is not None:
            k = load_client_keys(keys)
            sock.curve_serverkey = k.server_key(endpoint)
            sock.curve_secretkey = k.secret
            sock.curve_publickey = k.public
            monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            )
        sock.connect(endpoint)
        mine = P.local_versions()
        fields = {**mine, "hb": timeout, "hello": 1, "role": "cli"}
        t0 = time.perf_counter()
        try:
            # A DEALER with no connection at the moment (its handshake was just refused, say)
            # holds a send back: never longer than the probe's timeout.
            await asyncio.wait_for(sock.send_multipart([P.header(P.HELLO, **fields)]), timeout)
        except asyncio.TimeoutError:
            pass  # _expect reports why (a refused key) or that nothing answered
        hello = await _expect(sock, (P.HELLO_OK, P.ERROR), timeout, endpoint, monitor=monitor, keys=keys)
        if hello["t"] == P.ERROR:
            raise ProbeError(f"{endpoint} refused: {hello['message']}", unhealthy=True)
        problem = P.check_versions(mine, hello)
        if problem is not None:
            raise ProbeError(f"{endpoint}: {problem}", unhealthy=True)
        await sock.send_multipart([P.header(P.PING, seq=1, detail=detail)])
        frames: list[Any] = []
        pong = await _expect(sock, (P.PONG,), timeout, endpoint, frames)
        rtt = (time.perf_counter() - t0) * 1000
        status = json.loads(frames[1]) if len(frames) > 1 else {}
        try:
            sock.send_multipart([P.header(P.BYE, reason="probe done")], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        return ProbeResult(endpoint, hello, pong, status, rtt)
    finally:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)


async def _expect(
    sock: zmq.asyncio.Socket,
    types: tuple[str, ...],
    timeout: float,
    endpoint: str,
    out: list[Any] | None = None,
    *,
    monitor: zmq.asyncio.Socket | None = None,
    keys: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if monitor is not None and left > 0:
            poller = zmq.asyncio.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            ready = dict(await poller.poll(int(left * 1000) + 1))
            if monitor in ready:
                from zmq.utils.monitor import parse_monitor_message

                from pypline.backends.wire.keys import handshake_failure

                ev = parse_monitor_message(await monitor.recv_multipart())
                why = handshake_failure(int(ev["event"]), str(keys), endpoint)
                if why is not None:
                    raise ProbeError(f"{endpoint}: {why}")
                continue
            if sock not in ready:
                left = 0
        if left <= 0 or (monitor is None and not await sock.poll(int(left * 1000) + 1)):
            raise ProbeError(f"no answer from {endpoint} within {timeout:g} s (is an agent running there?)")
        frames = await sock.recv_multipart()
        try:
            h = P.parse_header(frames)
        except P.ProtocolError:
            continue
        if h["t"] in types:
            if out is not None:
                out[:] = frames
            return h


def run_probe(endpoint: str, **kw: Any) -> ProbeResult:
    """``probe`` from synchronous code (the CLI)."""
    return asyncio.run(probe(endpoint, **kw))
