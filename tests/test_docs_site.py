"""The documentation site's API reference names every public name of every public module.

(`mkdocs build --strict` in CI checks that each reference resolves and every link
lands; this test checks that nothing public is left out of the reference.)
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API = (ROOT / "docs" / "reference" / "api.md").read_text()

# Public modules and the names each one exports.
MODULES = [
    "pypline",
    "pypline.util",
    "pypline.executor",
    "pypline.testing",
    "pypline.lowlevel",
    "pypline.metrics",
    "pypline.backends.local",
    "pypline.backends.process",
    "pypline.backends.remote",
]
# Executor classes that are one backend's implementation detail: reached through their Backend.
NOT_DOCUMENTED_ALONE = {"AsyncioExecutor", "ProcessExecutor", "RemoteExecutor"}


def documented() -> set[str]:
    """Last components of every ``::: a.b.C`` line and of every ``members: [...]`` list."""
    names = {line.split()[-1].rsplit(".", 1)[-1] for line in API.splitlines() if line.startswith("::: ")}
    for members in re.findall(r"members: \[(.*?)\]", API):
        names.update(m.strip() for m in members.split(","))
    return names


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_is_in_the_api_reference(module: str) -> None:
    exported = set(importlib.import_module(module).__all__) - NOT_DOCUMENTED_ALONE
    missing = sorted(exported - documented())
    assert not missing, f"{module} exports {missing}, which docs/reference/api.md does not show"


def test_engine_backends_are_in_the_api_reference() -> None:
    assert {"DaskBackend", "RayBackend"} <= documented()


def test_docs_cite_no_section_of_an_outside_file() -> None:
    """No page points at a numbered section of a file that is not in the project."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted(ROOT.glob("backends/**/*.md"))]
    for page in pages:
        text = page.read_text()
        assert "§" not in text, page
        assert "SPEC.md" not in text and "../shared" not in text, page
