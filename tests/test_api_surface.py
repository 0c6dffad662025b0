"""The public surface, the layering rules and configure()."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from typing import Any

import pytest

import pypline
from pypline import configure
from pypline._config import Settings, current_settings, effective_agents, effective_keys

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset() -> Any:
    configure()
    yield
    configure()


def test_exact_public_exports() -> None:
    """pypline exports exactly the curated names (a new public name is a deliberate decision)."""
    assert sorted(pypline.__all__) == sorted(
        [
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
   )
    import pypline.util as util

    assert sorted(util.__all__) == ["Err", "Ok", "Result", "is_err", "is_ok", "unwrap", "unwrap_err", "unwrap_or"]


def test_spec_import_lines_work() -> None:
    """The documented import lines all resolve."""
    from pypline import ItemFailure, PipelineError, RemoteError, WorkerDied, WorkerLost  # noqa: F401
    from pypline import Pipeline, configure, current_worker, mix_pool, work_pool  # noqa: F401
    from pypline.util import Err, Ok, Result, is_err, is_ok, unwrap, unwrap_err  # noqa: F401


def test_import_is_light_and_backends_not_top_level() -> None:
    """`import pypline` loads no zmq, click or multiprocessing; no top-level `backends` module exists."""
    code = (
        "import sys, pypline, pypline.util;"
        "bad = [m for m in ('zmq', 'click', 'multiprocessing', 'cloudpickle', 'pypline.backends', 'backends') if m in sys.modules];"
        "print(bad)"
   )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert "backends" not in sys.modules


def test_py_typed_is_shipped() -> None:
    """The package is marked typed."""
    assert (pathlib.Path(pypline.__file__).parent / "py.typed").exists()


def test_configure_sets_only_given_options_and_returns_previous() -> None:
    """configure() changes only what it is given and returns the settings before the call."""
    prev = configure(max_lost=5)
    assert prev == Settings()
    prev2 = configure(connect_timeout=1.5, agents=["tcp://127.0.0.1:5555"])
    assert prev2.max_lost == 5 and prev2.connect_timeout == 5.0
    now = current_settings()
    assert (now.max_lost, now.connect_timeout, now.agents) == (5, 1.5, ("tcp://127.0.0.1:5555",))
    configure()
    assert current_settings() == Settings()


@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"max_lost": -1}, ValueError, "max_lost"),
        ({"max_lost": 1.5}, TypeError, "max_lost"),
        ({"connect_timeout": 0}, ValueError, "connect_timeout"),
        ({"heartbeat_timeout": "3"}, TypeError, "heartbeat_timeout"),
        ({"fallback": "maybe"}, ValueError, "fallback"),
        ({"agents": "tcp://127.0.0.1:1"}, TypeError, "agents"),
        ({"keys": 3}, TypeError, "keys"),
    ],
)
def test_configure_rejects_bad_values(kwargs: dict[str, Any], exc: type[Exception], word: str) -> None:
    """A bad option value is a clear error naming the option."""
    with pytest.raises(exc, match=word):
        configure(**kwargs)


def test_configure_unknown_option_is_type_error() -> None:
    """Unknown options are a TypeError."""
    with pytest.raises(TypeError):
        configure(agentz=[])  # type: ignore[call-arg]


def test_environment_applies_only_where_configure_has_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """PYPLINE_AGENTS/PYPLINE_KEYS are read at use time and lose to configure()."""
    monkeypatch.setenv("PYPLINE_AGENTS", "tcp://127.0.0.2:5555, tcp://127.0.0.3:5555")
    monkeypatch.setenv("PYPLINE_KEYS", "/tmp/keys")
    assert effective_agents(current_settings()) == ("tcp://127.0.0.2:5555", "tcp://127.0.0.3:5555")
    assert effective_keys(current_settings()) == "/tmp/keys"
    configure(agents=[], keys="/etc/k")
    assert effective_agents(current_settings()) == ()
    assert effective_keys(current_settings()) == "/etc/k"


def test_registry_lists_known_and_resolves_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown names list the known backends; third-party entry points resolve lazily."""
    from pypline import _registry
    from pypline.executor import Backend

    with pytest.raises(ValueError, match="known backends: .*asyncio.*process.*zmq"):
        _registry.load_backend("nope")
    monkeypatch.setattr(_registry, "_entry_points", lambda: {"mine": "pypline.testing:MockBackend"})
    assert "mine" in _registry.known_backends()
    cls = _registry.load_backend("mine")
    assert issubclass(cls, Backend) and cls.__name__ == "MockBackend"
    monkeypatch.setattr(_registry, "_entry_points", lambda: {"broken": "no_such_module_xyz:Thing"})
    with pytest.raises(ImportError, match="broken"):
        _registry.load_backend("broken")
    monkeypatch.setattr(_registry, "_entry_points", lambda: {"notabackend": "pypline.util:Ok"})
    with pytest.raises(TypeError, match="not a pypline.executor.Backend"):
        _registry.load_backend("notabackend")


def test_installed_entry_point_for_asyncio() -> None:
    """The asyncio backend is registered under the entry-point group pypline.backends."""
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="pypline.backends")}
    assert "asyncio" in names


def test_configure_restores_a_snapshot() -> None:
    """configure(previous) puts back exactly what an earlier call returned, unset options included."""
    before = configure(agents=["tcp://127.0.0.1:5555"], max_lost=7)
    configure(keys="/k")
    configure(before)
    assert current_settings() == Settings()
    with pytest.raises(TypeError, match="Settings snapshot"):
        configure({"max_lost": 1})  # type: ignore[arg-type]


def test_stage_exposes_its_configuration() -> None:
    """A Stage reads back its validated configuration."""
    from pypline import mix_pool, work_pool

    @work_pool(num_workers=3, buffer=7, retries=2, timeout=1.5, backoff=0.25, retry_on=KeyError, name="s")
    async def f(x: int) -> int:
        return x

    assert (f.num_workers, f.buffer, f.retries, f.timeout, f.backoff, f.retry_on, f.name) == (
        3, 7, 2, 1.5, 0.25, (KeyError,), "s"
   )
    assert f.workers == (f.__wrapped__,) * 3 and not f.multi_proc and f.fork_merge is None

    @mix_pool(fork_merge=sum)
    def m() -> list[Any]:
        return [abs, round]

    assert m.workers == (abs, round) and m.num_workers == 2 and m.fork_merge is sum


def test_errors_survive_pickling() -> None:
    """Every pypline error crosses a process boundary with its fields intact."""
    import pickle

    from pypline import ItemFailure, PipelineError, RemoteError, StageStartError, WorkerDied, WorkerLost

    f = ItemFailure(3, "s", {"k": 1}, ValueError("v"), 2, 3)
    g = pickle.loads(pickle.dumps(f))
    assert (g.index, g.stage, g.item, g.attempts, g.max_attempts, str(g.error)) == (3, "s", {"k": 1}, 2, 3, "v")
    p = pickle.loads(pickle.dumps(PipelineError(failures=[f], outputs=[1], cause=KeyError("c"))))
    assert p.outputs == [1] and p.failures[0].index == 3 and isinstance(p.cause, KeyError)
    r = pickle.loads(pickle.dumps(RemoteError("T", "m", "tb")))
    assert (r.type_name, r.message, r.traceback_text) == ("T", "m", "tb")
    d = pickle.loads(pickle.dumps(WorkerDied("died", exitcode=3, signal=9)))
    assert (d.exitcode, d.signal) == (3, 9)
    lost = pickle.loads(pickle.dumps(WorkerLost("lost", agents=("a:1",))))
    assert lost.agents == ("a:1",)
    s = pickle.loads(pickle.dumps(StageStartError("st", "why")))
    assert s.stage == "st" and "why" in str(s)


def test_item_failure_reads_well() -> None:
    """str(ItemFailure) names stage, item, attempts out of the maximum, and the error."""
    from pypline import ItemFailure, RemoteError

    f = ItemFailure(17, "validate", -3, ValueError("Negative values not allowed"), 3, 3)
    assert str(f) == "stage 'validate' failed item #17 (-3) after 3/3 attempts: ValueError: Negative values not allowed"
    remote = ItemFailure(2, "s", "x", RemoteError("Boom", "bad", "Traceback ...\nBoom: bad\n"), 1, 1)
    assert "remote traceback" in str(remote) and "Boom: bad" in str(remote)


def test_version_comes_from_the_distribution() -> None:
    """``pypline.__version__`` is the installed ``pypline-async`` distribution's version (one
    source: pyproject.toml), and the agent's ``--version`` says the same."""
    from importlib.metadata import version

    from click.testing import CliRunner

    from pypline.worker_agent.cli import main

    assert pypline.__version__ == version("pypline-async") != "0+unknown"
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and pypline.__version__ in r.output
    with pytest.raises(AttributeError):
        pypline.no_such_name  # noqa: B018
