"""docs/examples/notebook.ipynb runs headless in a real IPython kernel (real time, a subprocess).

The execution test is skipped when the ``notebook`` extra (nbclient, ipykernel,
matplotlib) is not installed; the committed file is checked either way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "examples" / "notebook.ipynb"


def test_committed_notebook_has_no_outputs() -> None:
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == [], "clear the outputs before committing the notebook"
        assert cell["execution_count"] is None
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.timeout(120)
def test_notebook_runs_and_renders_the_stats_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MPLBACKEND", "Agg")  # inherited by the kernel: no GUI anywhere
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=60,  # per cell
        startup_timeout=60,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    started = time.monotonic()
    client.execute()  # raises CellExecutionError if a cell fails
    elapsed = time.monotonic() - started
    assert elapsed < 60, f"the notebook took {elapsed:.1f} s"

    outputs: list[Any] = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    html = [out.data["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert any("<caption>BatchStats</caption>" in h and "total_completed" in h for h in html), html
    assert any("image/png" in out.get("data", {}) for out in outputs), "the matplotlib figure was not rendered"
    stdout = "".join(out.text for out in outputs if out.output_type == "stream" and out.name == "stdout")
    assert "BatchStats(submitted=" in stdout  # print(await batcher.stats)
    assert "failed=0" in stdout
    assert "stopped" in stdout  # the stop cell stopped the batcher
    assert "['THE', 'MODEL', 'READS'" in stdout  # @batched: each call got its own result
    assert "decorator:" in stdout
