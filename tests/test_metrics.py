"""Prometheus metrics: the agent's ``serve --metrics`` and the client's ``pypline.metrics.StageMetrics``.

Both are served by ``prometheus_client`` (the ``metrics`` extra); these tests scrape them for
real over loopback and parse the text with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from pypline import Pipeline, work_pool
from pypline.util import is_err, unwrap

prometheus_client = pytest.importorskip("prometheus_client")  # in the test extra: runs in CI
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def _get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, over loopback only."""
    assert urllib.parse.urlsplit(url).hostname == "127.0.0.1"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_agent_metrics_endpoint(arun: Any, agents: Any, use_agents: Any) -> None:
    """``serve --metrics 127.0.0.1:0``: a scrape gives the agent's numbers, counting the
    tasks a pipeline sent; junk on the port does not hurt it; the port closes with the agent."""

    def identity(x: int) -> int:  # nested: shipped to the agent by value
        return x

    agent = agents("--metrics", "127.0.0.1:0")
    url = re.search(r" metrics=(http://\S+)", agent.log()).group(1)  # type: ignore[union-attr]
    use_agents(agent)
    assert unwrap(arun((Pipeline(range(7)) >> work_pool(identity, multi_proc=True)).run())) == list(range(7))

    status, ctype, body = _get(url)
    assert status == 200 and ctype.startswith("text/plain")
    samples = _samples(body)
    assert samples[("pypline_agent_workers", ())] == 2
    assert samples[("pypline_agent_events_total", (("event", "tasks"),))] >= 7
    assert samples[("pypline_agent_draining", ())] == 0
    assert any(name == "pypline_agent_info" for name, _ in samples)

    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:  # junk, then hang up
        s.sendall(b"\x00\x01 not http\r\n\r\n")
        s.recv(100)
    assert _get(url)[0] == 200  # still serving

    agent.kill()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2).close()


def test_agent_families_keep_labels_and_exact_counts() -> None:
    """Label values with quotes, backslashes and newlines survive the round trip; a big
    counter stays exact; bad ``--metrics`` addresses name what was given."""
    from prometheus_client import CollectorRegistry, generate_latest

    from pypline.worker_agent.metrics import families, parse_address

    status = {
        "instance": "abc", "host": "h", "backend": "process", "versions": {"pypline": "0.1.0"},
        "workers": 4, "free": 3, "draining": False, "warm_executors": 0,
        "counters": {"tasks": 12_345_678_901},
        "sessions": [{"session": 'cli "one"', "stages": [
            {"name": "a\\b\nc", "running": 1, "queued": 2, "received": 3, "completed": 2},
        ]}],
    }

    class Static:
        def collect(self) -> Any:
            return families(status)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Static())  # type: ignore[arg-type]
    samples = _samples(generate_latest(registry).decode())
    assert samples[("pypline_agent_events_total", (("event", "tasks"),))] == 12_345_678_901
    assert samples[("pypline_agent_stage_queued", (("session", 'cli "one"'), ("stage", "a\\b\nc")))] == 2
    assert samples[("pypline_agent_free_workers", ())] == 3
    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", ":9464", "host:port", "h:70000"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_address(bad)


def test_metrics_option_rejects_a_bad_address() -> None:
    """``serve --metrics nonsense`` is a usage error (exit 2) naming the option and the form."""
    from click.testing import CliRunner

    from pypline.worker_agent.cli import main

    r = CliRunner().invoke(main, ["serve", "--metrics", "nonsense"])
    assert r.exit_code == 2 and "--metrics" in r.output and "HOST:PORT" in r.output


def test_client_stage_metrics_export_the_runs_numbers() -> None:
    """``StageMetrics`` as ``on_stats``: after a run with one failing item, a scrape of the
    client's own HTTP endpoint shows each stage's counters and the run's totals."""
    from prometheus_client import CollectorRegistry, start_http_server

    from pypline.metrics import StageMetrics

    @work_pool(retries=2)
    def half(x: int) -> int:
        if x == 3:
            raise ValueError("three")
        return x // 2

    metrics = StageMetrics(pipeline="demo")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]
    assert list(metrics.collect()) == []  # nothing to say before the first snapshot

    result = (Pipeline(range(10)) >> half).run_sync(on_stats=metrics, stats_interval=0.01)
    assert is_err(result)
    server, thread = start_http_server(0, "127.0.0.1", registry=registry)
    try:
        status, _, body = _get(f"http://127.0.0.1:{server.socket.getsockname()[1]}/metrics")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert status == 200
    samples = _samples(body)
    stage = (("backend", "asyncio"), ("pipeline", "demo"), ("stage", "half"))
    assert samples[("pypline_stage_received_total", stage)] == 10
    assert samples[("pypline_stage_succeeded_total", stage)] == 9
    assert samples[("pypline_stage_failed_total", stage)] == 1
    assert samples[("pypline_stage_retries_total", stage)] == 1
    assert samples[("pypline_run_delivered_total", (("pipeline", "demo"),))] == 9
    assert samples[("pypline_run_finished", (("pipeline", "demo"),))] == 1
    assert not [t for t in threading.enumerate() if t is thread and t.is_alive()]


def test_metrics_without_prometheus_client_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the ``metrics`` extra, ``serve --metrics`` stops at once (exit 3) with the
    install line, before binding anything."""
    import sys

    from click.testing import CliRunner

    from pypline.worker_agent.cli import main

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # an import of it now fails
    r = CliRunner().invoke(main, ["serve", "--metrics", "127.0.0.1:0"])
    assert r.exit_code == 3 and "pip install 'pypline-async[metrics]'" in r.output
