"""pypline: async-first data pipelines with bounded buffers, retries and Result types.

The layers, each importing only the ones above it::

    pypline (this package)        the engine and public API; imports no backend
      util.py                     Result, Ok, Err and helpers
      _stage.py                   work_pool / mix_pool -> validated, frozen StageSpec
      _pipeline.py                Pipeline / Flow composition, run / run_sync / stream / iter
      _sync.py                    iter() and run_sync() from synchronous code (a private loop thread)
      _run.py                     one run: admission permits, stage runners, ordering, shutdown
      _wrap.py                    engine-side stand-ins in front of a backend's executor:
        _rate.py, _breaker.py,      rate limits, the circuit breaker, batch stages
        _batch.py
      _journal.py, _deadletter.py durable runs (resume from a journal), failures sent elsewhere
      executor.py                 the Executor contract backends implement (public)
      _registry.py                backend name -> Backend class, lazily, then entry points
      _config.py                  configure() and PYPLINE_* environment variables
      _stats.py, _progress.py     run statistics, bottleneck hint, live progress lines
      lowlevel.py, testing.py     for backend authors and for users' tests
    pypline.backends              asyncio (loop + threads), process, zmq; use only the public API
    pypline.worker_agent          the pypline-agent daemon

``import pypline`` imports no zmq, no click and no multiprocessing machinery.
"""

import os as _os
from typing import TYPE_CHECKING as _TYPE_CHECKING


def _map_checkout_folders() -> None:
    """In a source checkout, find ``pypline.backends`` and ``pypline.worker_agent`` beside us.

    The repository keeps ``backends/`` and ``worker_agent/`` next to ``pypline/``; installed,
    they become ``pypline.backends`` and ``pypline.worker_agent``. A script or
    ``python -m pytest`` run from the repository root imports this folder instead of the
    installed package (Python puts the script's folder first on ``sys.path``), so the two
    subpackages are looked up in the repository root too. An installed package, which has
    them inside, is left as it is.
    """
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    if _os.path.isdir(_os.path.join(here, "backends")):
        return
    if _os.path.isfile(_os.path.join(root, "backends", "__init__.py")) and _os.path.isfile(
        _os.path.join(root, "worker_agent", "__init__.py")
    ):
        __path__.append(root)


_map_checkout_folders()

from ._config import Settings, configure  # noqa: E402
from ._context import WorkerInfo, current_worker  # noqa: E402
from ._errors import ItemFailure, PipelineError, RemoteError, StageCancelled, StageStartError, WorkerDied, WorkerLost  # noqa: E402
from ._pipeline import Flow, Pipeline, PipelineStream  # noqa: E402
from ._sync import PipelineIterator  # noqa: E402
from ._stage import Stage, mix_pool, work_pool  # noqa: E402
from ._stats import RunStatistics, StageStatistics  # noqa: E402


if _TYPE_CHECKING:
    __version__: str
else:

    def __getattr__(name: str) -> str:
        """``pypline.__version__``: the installed distribution's version, read when first asked
        (pyproject.toml is the one place it is written; importlib.metadata is not cheap to import).
        Hidden from type checkers, which would otherwise take any misspelt name for a str."""
        if name != "__version__":
            raise AttributeError(f"module 'pypline' has no attribute {name!r}")
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("pypline-async")
        except PackageNotFoundError:  # imported from a source tree that was never installed
            value = "0+unknown"
        globals()["__version__"] = value
        return value

__all__ = [
    "Flow",
    "ItemFailure",
    "Pipeline",
    "PipelineError",
    "PipelineIterator",
    "PipelineStream",
    "RemoteError",
    "RunStatistics",
    "Settings",
    "Stage",
    "StageCancelled",
    "StageStartError",
    "StageStatistics",
    "WorkerDied",
    "WorkerInfo",
    "WorkerLost",
    "configure",
    "current_worker",
    "mix_pool",
    "work_pool",
]
