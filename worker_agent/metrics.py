"""``serve --metrics HOST:PORT``: the agent's numbers for Prometheus, served by ``prometheus_client``.

How a scrape flows::

    Prometheus --GET /metrics--> prometheus_client's HTTP thread
        -> AgentCollector.collect()                       (that thread)
            -> snapshot hop onto the agent's event loop   (run_coroutine_threadsafe)
                -> Agent.status()                         (the loop: no shared state is read off it)
        <- metric families, rendered by prometheus_client

The HTTP server is ``prometheus_client``'s own (an optional dependency: ``pip install
'pypline-async[metrics]'``); this module only turns one ``Agent.status()`` snapshot into
metric families:

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
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("pypline.agent")

# A scrape waits at most this long for the event loop to hand over a snapshot: long
# enough for a loop that is busy with a burst of messages, short enough that a
# wedged loop shows up as a failed scrape (an alert) instead of a hung scraper.
SNAPSHOT_TIMEOUT_S = 5.0

INSTALL_HINT = "serve --metrics needs prometheus_client: pip install 'pypline-async[metrics]'"


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


def families(status: dict[str, Any]) -> Iterator[Any]:
    """The metric families for one ``Agent.status()`` snapshot."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

    yield InfoMetricFamily(
        "pypline_agent",
        "The agent's identity.",
        value={
            "instance": str(status["instance"]),
            "host": str(status["host"]),
            "backend": str(status["backend"]),
            "pypline": str(status["versions"].get("pypline", "?")),
        },
    )
    for name, help_text, value in (
        ("pypline_agent_workers", "Worker processes per stage (serve --workers).", status["workers"]),
        ("pypline_agent_free_workers", "Workers not busy right now.", status["free"]),
        ("pypline_agent_draining", "1 while draining after SIGTERM.", 1 if status["draining"] else 0),
        ("pypline_agent_sessions", "Open client sessions.", len(status["sessions"])),
        ("pypline_agent_warm_executors", "Idle stage executors kept warm for reuse.", status["warm_executors"]),
    ):
        yield GaugeMetricFamily(name, help_text, value=value)
    events = CounterMetricFamily("pypline_agent_events", "What the agent counted since it started.", labels=["event"])
    for key, value in sorted(status["counters"].items()):
        events.add_metric([key], value)
    yield events
    stages = [(s["session"], st) for s in status["sessions"] for st in s["stages"]]
    for key, kind, help_text in (
        ("running", GaugeMetricFamily, "Items running, per stage of each session."),
        ("queued", GaugeMetricFamily, "Items queued at the agent, per stage."),
        ("received", CounterMetricFamily, "Items received, per stage."),
        ("completed", CounterMetricFamily, "Items finished, per stage."),
    ):
        family = kind(f"pypline_agent_stage_{key}", help_text, labels=["session", "stage"])
        for session, stage in stages:
            family.add_metric([str(session), str(stage["name"])], stage[key])
        yield family


class _AgentCollector:
    """A ``prometheus_client`` collector that reads the agent's status on its event loop."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], loop: asyncio.AbstractEventLoop) -> None:
        self.snapshot = snapshot
        self.loop = loop

    def collect(self) -> Iterator[Any]:
        async def snap() -> dict[str, Any]:
            return self.snapshot()

        status = asyncio.run_coroutine_threadsafe(snap(), self.loop).result(SNAPSHOT_TIMEOUT_S)
        yield from families(status)


class MetricsServer:
    """``prometheus_client``'s HTTP server for one agent; ``snapshot`` runs on the agent's loop."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot
        self.address: tuple[str, int] | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    async def start(self, host: str, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise OSError(INSTALL_HINT) from None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_AgentCollector(self.snapshot, asyncio.get_running_loop()))
        self._server, self._thread = start_http_server(port, host, registry=registry)
        sockname = self._server.socket.getsockname()
        self.address = (sockname[0], sockname[1])

    @property
    def url(self) -> str:
        assert self.address is not None
        host = self.address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.address[1]}/metrics"

    async def aclose(self) -> None:
        """Stop serving and join the server thread (off the loop: a scrape in progress may need the loop)."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None:
            return

        def stop() -> None:
            server.shutdown()
            server.server_close()
            if thread is not None:
                thread.join()

        await asyncio.to_thread(stop)
