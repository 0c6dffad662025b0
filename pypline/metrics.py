"""Per-stage metrics of a running pipeline, for Prometheus (``pip install 'pypline-async[metrics]'``).

How the numbers flow::

    run(on_stats=exporter) --every stats_interval--> exporter(RunStatistics)   (keeps the latest)
    Prometheus scrape --> prometheus_client --> exporter.collect() --> metric families

``StageMetrics`` is an ``on_stats`` callback and a ``prometheus_client`` collector at once. It
keeps only the latest snapshot of each pipeline it was given (by ``pipeline=`` label), so it
costs nothing per item. The names mirror the agent's ``pypline_agent_stage_*`` families::

    from prometheus_client import start_http_server, REGISTRY
    from pypline.metrics import StageMetrics

    metrics = StageMetrics(pipeline="crawl")
    REGISTRY.register(metrics)
    start_http_server(9464)
    await pipeline.run(on_stats=metrics, stats_interval=1.0)

``import pypline`` does not import this module; this module imports ``prometheus_client``
only when scraped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from ._stats import RunStatistics

__all__ = ["StageMetrics"]

# (metric suffix, StageStatistics field, kind, help): one row per exported number.
_STAGE_FIELDS = (
    ("received", "received", "counter", "Items the stage received."),
    ("succeeded", "succeeded", "counter", "Items the stage passed on."),
    ("failed", "failed", "counter", "Items that failed for good at the stage."),
    ("attempts", "attempts", "counter", "Attempts started, retries included."),
    ("retries", "retries", "counter", "Attempts after a failure."),
    ("lost", "lost", "counter", "Attempts lost with a worker or an agent (re-dispatched)."),
    ("queue_depth", "queue_depth", "gauge", "Items the stage holds now (queued, running, retrying)."),
    ("capacity", "capacity", "gauge", "buffer + workers: the most the stage may hold."),
    ("utilisation", "utilisation", "gauge", "Share of the time its workers were busy (sampled)."),
)


class StageMetrics:
    """An ``on_stats`` callback that exports the latest snapshot as ``pypline_stage_*`` metrics."""

    def __init__(self, pipeline: str = "pipeline") -> None:
        self.pipeline = pipeline
        self._latest: RunStatistics | None = None
        self._lock = threading.Lock()  # on_stats runs on the loop, collect() on the HTTP thread

    def __call__(self, stats: RunStatistics) -> None:
        with self._lock:
            self._latest = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            stats = self._latest
        if stats is None:
            return
        run = [
            ("pypline_run_pulled", CounterMetricFamily, "Items read from the source.", stats.pulled),
            ("pypline_run_delivered", CounterMetricFamily, "Outputs delivered.", stats.delivered),
            ("pypline_run_failed", CounterMetricFamily, "Items failed for good.", stats.failed),
            ("pypline_run_finished", GaugeMetricFamily, "1 once the run has finished.", int(stats.finished)),
        ]
        for name, kind, help_text, value in run:
            family = kind(name, help_text, labels=["pipeline"])
            family.add_metric([self.pipeline], value)
            yield family
        for suffix, attr, kind_name, help_text in _STAGE_FIELDS:
            kind = CounterMetricFamily if kind_name == "counter" else GaugeMetricFamily
            family = kind(f"pypline_stage_{suffix}", help_text, labels=["pipeline", "stage", "backend"])
            for stage in stats.stages:
                value = getattr(stage, attr)
                if value is not None:
                    family.add_metric([self.pipeline, stage.name, stage.backend], value)
            yield family
