"""examples/notebook.ipynb runs in a real Jupyter kernel (nbclient), and progress=True draws
in the cell's output there: a display that the run updates in place."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebook.ipynb"


@pytest.mark.timeout(300)
def test_notebook_runs_and_shows_progress(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    def outputs(i: int) -> list[dict]:  # type: ignore[type-arg]
        return [o for o in nb.cells[i].outputs]

    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    progress = [o for o in outputs(2) if o.output_type == "display_data"]
    assert len(progress) == 1, outputs(2)  # one display, updated in place (not one output per redraw)
    text = progress[0]["data"]["text/plain"]
    assert "fetch" in text and "square" in text and "200/200 done" in text
    assert "done: 200 delivered, 0 failed" in text
    assert "<pre>" in progress[0]["data"]["text/html"]
    result = [o for o in outputs(2) if o.output_type == "execute_result"]
    assert result[0]["data"]["text/plain"] == "[0, 1, 4, 9, 16]"
    assert any("run_sync: 200 outputs" in o.get("text", "") for o in outputs(3))
    assert [o for o in outputs(4) if o.output_type == "execute_result"][0]["data"]["text/plain"] == "[0, 1, 4]"
