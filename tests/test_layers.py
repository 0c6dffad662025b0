"""One-way layers, checked on the source: engine <- backends <- agent.

::

    pypline/        (pypline)               the engine: imports neither layer below
    backends/       (pypline.backends)      may import the engine's public modules
    worker_agent/   (pypline.worker_agent)  may import both, the backends' public modules only

Every import statement (also inside functions) of every module is checked: none climbs
up a layer, none names a private module (``_x``) of another layer, none takes a private
name (``from m import _x``) from another module, and none imports ``backends`` or
``worker_agent`` by their folder names (that would load a second copy of every module).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: folder -> (import name, layer)
FOLDERS = {"pypline": ("pypline", 0), "backends": ("pypline.backends", 1), "worker_agent": ("pypline.worker_agent", 2)}


def _layer(module: str) -> int:
    if module == "pypline.worker_agent" or module.startswith("pypline.worker_agent."):
        return 2
    if module == "pypline.backends" or module.startswith("pypline.backends."):
        return 1
    return 0


def _package_of(module: str) -> str:
    for name in ("pypline.worker_agent", "pypline.backends", "pypline"):
        if module == name or module.startswith(name + "."):
            return name
    return module


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """What breaks the layering in ``source``, the text of module ``module``."""
    found: list[str] = []
    here = _layer(module)
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        targets: list[tuple[str, list[str]]] = []
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [(target, [a.name for a in node.names])]
        for target, names in targets:
            top = target.split(".")[0]
            if top in ("backends", "worker_agent"):
                found.append(f"{module}: imports {target!r} by its folder name")
                continue
            if top != "pypline":
                continue
            if _layer(target) > here:
                found.append(f"{module}: imports {target} (a layer above)")
            if _package_of(target) != _package_of(module) and any(p.startswith("_") for p in target.split(".")[1:]):
                found.append(f"{module}: imports the private module {target} of another layer")
            for name in names:
                # ``from .x import _y`` where x is a module: a private name of another module.
                # (``from . import _x`` imports a module of the same package: allowed.)
                dunder = name.startswith("__") and name.endswith("__")  # __version__ is public
                if name.startswith("_") and not dunder and not (isinstance(node, ast.ImportFrom) and node.module is None):
                    found.append(f"{module}: takes the private name {name} from {target}")
    return found


def _modules() -> list[tuple[Path, str, bool]]:
    out = []
    for folder, (name, _) in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out.append((path, ".".join([name, *parts]), path.name == "__init__.py"))
    return out


def test_the_tree_keeps_its_layers() -> None:
    """No module of the three layers breaks the rules above."""
    found = [v for path, module, pkg in _modules() for v in violations(path.read_text(), module, pkg)]
    assert found == []
    assert len(_modules()) > 30  # the walk really saw the tree


@pytest.mark.parametrize(
    ("module", "source"),
    [  # each line is one the layering allowed before this test existed
        ("pypline.backends._remote_link", "from pypline.worker_agent import protocol as P"),
        ("pypline.backends._remote_link", "from pypline.worker_agent.sockets import recv_now, send_now"),
        ("pypline.backends.remote", "def open():\n    from pypline.worker_agent.security import load_client_keys"),
        ("pypline.backends._remote_executor", "from pypline.worker_agent import protocol as P"),
        ("pypline.backends.process", "from ._procworker import _INLINE_TYPES, BLOB"),
        ("pypline.backends._batch_wire", "from ._procpool import _importable, _modules_of"),
        ("pypline._run", "from ._stage_runner import StageRunner, _Env, _Inbox, _wait_for_space"),
        ("pypline._run", "from pypline.backends.local import AsyncioBackend"),
        ("pypline.worker_agent.server", "from pypline._run import Run"),
        ("pypline.worker_agent.stages", "from pypline.backends._procpool import WorkerProc"),
        ("pypline.backends.local", "import backends.process"),
    ],
)
def test_each_known_breach_is_caught(module: str, source: str) -> None:
    """The checker flags every kind of breach the tree once had."""
    assert violations(source, module)


def test_allowed_imports_pass() -> None:
    """Within a layer private modules are fine; public names of the layers above are fine."""
    ok = [
        ("pypline._run", "from ._stage_runner import StageRunner, Envelope"),
        ("pypline.backends.process", "from ._procworker import INLINE_TYPES\nfrom pypline.executor import Attempt"),
        ("pypline.worker_agent.server", "from pypline.backends.wire import protocol as P\nfrom . import _x"),
        ("pypline.backends.wire.protocol", "from .codec import pack"),
    ]
    for module, source in ok:
        assert violations(source, module) == [], (module, source)
