"""pypline: async-first data pipelines with bounded buffers, retries and Result types.

The layers, each importing only the ones above it::

    pypline (this package)        the engine and public API; imports no backend
      util.py                     Result, Ok, Err and helpers
      _stage.py                   work_pool / mix_pool -> validated, frozen StageSpec
      _pipeline.py                Pipeline / Flow composition, run / run_sync / stream
      _run.py                     one run: admission permits, stage runners, ordering, shutdown
      executor.py                 the Executor contract backends implement (public)
      _registry.py                backend name -> Backend class, lazily, then entry points
      _config.py                  configure() and PYPLINE_* environment variables
      _stats.py, _progress.py     run statistics, bottleneck hint, live progress lines
      lowlevel.py, testing.py     for backend authors and for users' tests
    pypline.backends              asyncio (loop + threads), process, zmq; use only the public API
    pypline.worker_agent          the pypline-agent daemon

``import pypline`` imports no zmq, no click and no multiprocessing machinery.
"""

from ._config import Settings, configure
from ._context import WorkerInfo, current_worker
from ._errors import ItemFailure, PipelineError, RemoteError, StageCancelled, StageStartError, WorkerDied, WorkerLost
from ._pipeline import Flow, Pipeline, PipelineStream
from ._stage import Stage, mix_pool, work_pool
from ._stats import RunStatistics, StageStatistics

__version__ = "0.1.0"

__all__ = [
    "Flow",
    "ItemFailure",
    "Pipeline",
    "PipelineError",
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
