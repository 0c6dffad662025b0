"""A fresh checkout works from its own root: scripts and ``python -m pytest`` there import the
checkout's ``pypline/`` (Python puts the script's folder first on ``sys.path``), and that
folder still finds ``pypline.backends`` and ``pypline.worker_agent`` beside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(120)


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("example", "key_line"),
    [("quickstart", "first outputs: [0, 2, 4, 6, 8]"), ("multi_host", "all results match a local run: True")],
)
def test_examples_run_from_the_checkout_root(example: str, key_line: str) -> None:
    """``python examples/X.py`` with the checkout root as working directory."""
    r = _run([f"examples/{example}.py"])
    assert r.returncode == 0 and key_line in r.stdout, r.stdout + r.stderr


def test_a_script_saved_in_the_checkout_root_runs() -> None:
    """The README's quick start saved as a file in the root (its folder shadows any installed
    pypline) runs, multi_proc stage included, and imports one copy of each module."""
    script = ROOT / f"_quickstart_{uuid.uuid4().hex[:8]}.py"
    shutil.copy(ROOT / "examples" / "quickstart.py", script)
    script.write_text(
        script.read_text()
        + "\nimport sys\nassert 'backends' not in sys.modules and 'worker_agent' not in sys.modules\n"
        + "import pypline.backends.process, pypline.worker_agent.cli\nprint('one copy: ok')\n"
    )
    try:
        r = _run([script.name])
    finally:
        script.unlink()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "first outputs: [0, 2, 4, 6, 8]" in r.stdout and "one copy: ok" in r.stdout


def test_python_m_pytest_from_the_checkout_root() -> None:
    """``python -m pytest`` from the root imports the backends through the checkout's pypline/."""
    r = _run(["-m", "pytest", "-q", "-p", "no:randomly", "tests/test_util.py", "tests/contract", "-k", "asyncio",
              "-o", "addopts=--import-mode=importlib -p no:cacheprovider"], timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout
