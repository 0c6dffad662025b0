"""``serve --metrics HOST:PORT``: the agent's numbers for Prometheus, over plain HTTP.

``GET /metrics`` answers with the text exposition format (version 0.0.4), built from
the same snapshot as ``pypline-agent status`` (``Agent.status()``):

- ``pypline_agent_info{instance, host, backend, pypline}``: always 1
- ``pypline_agent_workers``, ``pypline_agent_free_workers``, ``pypline_agent_draining``,
  ``pypline_agent_sessions``, ``pypline_agent_warm_executors``: gauges
- ``pypline_agent_events_total{event}``: the agent's counters (tasks received,
  sessions opened and expired, malformed messages, refused peers, ...)
- ``pypline_agent_stage_{running,queued}{session, stage}``: gauges per stage
  of each open session; ``pypline_agent_stage_{received,completed}_total``: its
  counters (they end with the session)

The endpoint is read-only and unauthenticated, like any Prometheus exporter: it
shows counts and the names of stages and sessions, never items, peers or users.
Anything but ``GET /metrics`` gets 404; a request must arrive within
``REQUEST_TIMEOUT_S`` and fit in ``MAX_REQUEST`` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger("pypline.agent")

REQUEST_TIMEOUT_S = 5.0
MAX_REQUEST = 8192
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0 picks a free one) -> (host, port)."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"the port in {text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"the port in {text!r} is out of range 0-65535")
    return host, port


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, Any], float]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]
    return lines


def render(status: dict[str, Any]) -> str:
    """The exposition text for one ``Agent.status()`` snapshot."""
    info = {
        "instance": status["instance"],
        "host": status["host"],
        "backend": status["backend"],
        "pypline": status["versions"].get("pypline", "?"),
    }
    stages = [(s["session"], st) for s in status["sessions"] for st in s["stages"]]

    def per_stage(key: str) -> list[tuple[dict[str, Any], float]]:
        return [({"session": sess, "stage": st["name"]}, st[key]) for sess, st in stages]

    out: list[str] = []
    out += _family("pypline_agent_info", "gauge", "The agent's identity (always 1).", [(info, 1)])
    out += _family("pypline_agent_workers", "gauge", "Worker processes per stage (serve --workers).",
                   [({}, status["workers"])])
    out += _family("pypline_agent_free_workers", "gauge", "Workers not busy right now.", [({}, status["free"])])
    out += _family("pypline_agent_draining", "gauge", "1 while draining after SIGTERM.",
                   [({}, 1 if status["draining"] else 0)])
    out += _family("pypline_agent_sessions", "gauge", "Open client sessions.", [({}, len(status["sessions"]))])
    out += _family("pypline_agent_warm_executors", "gauge", "Idle stage executors kept warm for reuse.",
                   [({}, status["warm_executors"])])
    out += _family("pypline_agent_events_total", "counter", "What the agent counted since it started.",
                   [({"event": k}, v) for k, v in sorted(status["counters"].items())])
    out += _family("pypline_agent_stage_running", "gauge", "Items running, per stage of each session.",
                   per_stage("running"))
    out += _family("pypline_agent_stage_queued", "gauge", "Items queued at the agent, per stage.", per_stage("queued"))
    out += _family("pypline_agent_stage_received_total", "counter", "Items received, per stage.",
                   per_stage("received"))
    out += _family("pypline_agent_stage_completed_total", "counter", "Items finished, per stage.",
                   per_stage("completed"))
    return "\n".join(out) + "\n"


class MetricsServer:
    """The HTTP listener; ``snapshot`` is called once per scrape, on the event loop."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST)
        sockname = self.server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])

    @property
    def url(self) -> str:
        assert self.address is not None
        host = self.address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.address[1]}/metrics"

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) == 3 and parts[0] == b"GET" and parts[1].split(b"?", 1)[0] == b"/metrics":
                try:
                    body = render(self.snapshot()).encode()
                except Exception:  # a broken snapshot must not take the agent down
                    log.exception("metrics: building the snapshot failed")
                    status, body, ctype = b"500 Internal Server Error", b"error\n", b"text/plain"
                else:
                    status, ctype = b"200 OK", CONTENT_TYPE.encode()
            else:
                status, body, ctype = b"404 Not Found", b"only GET /metrics here\n", b"text/plain"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
