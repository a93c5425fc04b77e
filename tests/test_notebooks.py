"""The quickstart notebook runs headless, end to end, and shows its plot and metrics."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _cells_tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]


def _text(cell) -> str:
    """Everything a code cell printed or returned as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_notebook_is_saved_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the quickstart has no code cells"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
        "clear the notebook's outputs before committing it"
    )


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # One extra cell, in this copy only, to check which interpreter ran the notebook.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    # The kernel is a child process: it inherits this environment. The kernelspec 'python3'
    # runs "python -m ipykernel_launcher", which jupyter_client maps to sys.executable, so the
    # notebook runs in the same interpreter (and venv) as the tests.
    monkeypatch.setenv("LMM_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: one thread is fastest
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError (with the cell's traceback) if a cell fails

    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors, errors

    (loss_cell,) = _cells_tagged(nb, "loss-curve")
    assert any("image/png" in o.get("data", {}) for o in loss_cell.outputs), (
        "the loss curve was not drawn"
    )

    (metrics_cell,) = _cells_tagged(nb, "metrics")
    printed = _text(metrics_cell)
    assert "pope_random" in printed and "short_answer" in printed and "accuracy" in printed, printed

    assert _text(nb.cells[-1]).strip() == sys.executable, (
        "the kernel did not run in this venv's python"
    )

    # Everything the notebook wrote went below the overridden WORKDIR, not into the repo.
    work = tmp_path / "work"
    assert (work / "data" / "manifest.json").is_file()
    assert list(work.glob("logs/quickstart/version_*/metrics.csv"))
    assert list(work.glob("logs/quickstart/version_*/metrics.json"))
