"""Helpers for backend authors: what a worker needs around each call.

Backends import from ``pypline``, ``pypline.executor`` and this module only.
"""

from __future__ import annotations

from ._config import Settings, current_settings, effective_agents, effective_keys, normalize_endpoint
from ._context import WorkerInfo, set_worker_info, worker_context
from ._lifecycle import (
    SETUP_TIMEOUT_S,
    TEARDOWN_TIMEOUT_S,
    arun_setup,
    arun_teardown,
    run_setup,
    run_teardown,
    setup_failed,
)
from ._run import admission_bound
from ._stage import FnKind, StageSpec, WorkerFn, fn_kind
from ._stats import LATENCY_SAMPLE_EVERY

__all__ = [
    "LATENCY_SAMPLE_EVERY",
    "SETUP_TIMEOUT_S",
    "TEARDOWN_TIMEOUT_S",
    "arun_setup",
    "arun_teardown",
    "run_setup",
    "run_teardown",
    "setup_failed",
    "FnKind",
    "Settings",
    "StageSpec",
    "WorkerFn",
    "WorkerInfo",
    "admission_bound",
    "current_settings",
    "effective_agents",
    "effective_keys",
    "fn_kind",
    "normalize_endpoint",
    "set_worker_info",
    "worker_context",
]
