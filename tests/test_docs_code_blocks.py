"""Every ```python block in README.md and docs/*.md runs, as written, in a fresh interpreter.

A block runs with one prelude (``import asyncio`` and pypline's documented import lines),
so a page may show a fragment without repeating them; top-level ``await`` is allowed (as
in a notebook). A block that cannot run here is marked right above it with
``<!-- not-run: the reason -->``; the test lists those, and there must be few.

A page whose blocks build on each other (a tutorial) says so with
``<!-- code blocks: one session -->``: its blocks then run in order in one interpreter.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*not-run:\s*(?P<why>.*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S)

PRELUDE = """\
import asyncio, ast, sys
from pypline import *
from pypline.util import *
"""

RUNNER = """\
import ast, asyncio, sys
code = sys.stdin.read()
obj = compile(code, sys.argv[1], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
result = eval(obj, {"__name__": "__main__"})
if asyncio.iscoroutine(result):
    asyncio.run(result)
"""


ONE_SESSION = "<!-- code blocks: one session -->"


def _blocks() -> list[tuple[str, str, str | None]]:
    out = []
    for page in PAGES:
        text = page.read_text()
        blocks = []
        for m in BLOCK.finditer(text):
            line = text[: m.start("code")].count("\n")
            blocks.append((f"{page.relative_to(ROOT)}:{line}", m.group("code"), m.group("why")))
        if ONE_SESSION in text and blocks:
            run = [(w, c) for w, c, why in blocks if why is None]
            code = "".join(f"# --- {w}\n{c}" for w, c in run)
            out.append((f"{page.relative_to(ROOT)}:{run[0][0].rsplit(':', 1)[1]}", code, None))
            out.extend(b for b in blocks if b[2] is not None)
        else:
            out.extend(blocks)
    return out


BLOCKS = _blocks()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("where", "code"), [(w, c) for w, c, why in BLOCKS if why is None], ids=lambda v: v if ":" in v else "")
def test_block_runs(where: str, code: str, tmp_path: Path) -> None:
    """The block exits 0 (its asserts hold) in a fresh interpreter, in an empty folder."""
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, where],
        input=PRELUDE + code,
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"{where} failed:\n{proc.stdout}\n{proc.stderr}"


def test_few_blocks_are_not_run() -> None:
    """Blocks marked not-run say why, and are a small minority."""
    skipped = [(w, why) for w, _, why in BLOCKS if why is not None]
    assert all(why for _, why in skipped)
    assert len(skipped) * 3 <= len(BLOCKS), skipped


def test_one_session_pages_run_all_their_blocks() -> None:
    """A tutorial page's blocks are all in its one run, in page order."""
    for page in PAGES:
        text = page.read_text()
        if ONE_SESSION not in text:
            continue
        runs = [c for w, c, why in BLOCKS if why is None and w.startswith(f"{page.relative_to(ROOT)}:")]
        assert len(runs) == 1
        expected = [m.group("code") for m in BLOCK.finditer(text) if m.group("why") is None]
        assert [part for part in expected if part in runs[0]] == expected
        assert runs[0].index(expected[-1]) > runs[0].index(expected[0]) or len(expected) == 1
