"""A script that runs a multi_proc pipeline at module level, with no ``__main__`` guard, works:
worker processes are fresh interpreters that never import the script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """\
from pypline import Pipeline, work_pool
print("module body", flush=True)

def square(x):
    return x * x

stage = work_pool(multi_proc=True, num_workers=2)(square)
print((Pipeline(range(6)) >> stage).run_sync(executor="process").unwrap())
"""


@pytest.mark.timeout(120)
def test_script_without_main_guard(tmp_path: Path) -> None:
    script = tmp_path / "no_guard.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["module body", "[0, 1, 4, 9, 16, 25]"]  # the body ran once
