"""The walkthrough notebook runs top to bottom in smoke mode (tiny random model and heads, offline),
on the session's LocalCluster (through DASK_SCHEDULER_ADDRESS, the variable Dask itself reads)."""
from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "curation_walkthrough.ipynb"


def run_notebook(tmp_path, monkeypatch, timeout: int, **env: str):
    """Execute the notebook in a kernel with ``env`` set (its output folder under ``tmp_path``);
    return (its outputs, their text). Fails on any cell's error."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for key, value in {"NEMO_CURATOR_WORKDIR": str(tmp_path / "work"), "PYTHONWARNINGS": "ignore", **env}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs, "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def test_walkthrough_notebook_executes_in_smoke_mode(client, tmp_path, monkeypatch):
    outputs, text = run_notebook(tmp_path, monkeypatch, 300, NEMO_CURATOR_SMOKE="1",
                                 DASK_SCHEDULER_ADDRESS=client.scheduler.address)
    assert "SMOKE MODE" in text and "samples in" in text and "the stage API kept" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the histograms and the grid of kept and dropped images
    work = tmp_path / "work"
    assert (work / "report" / "report.png").is_file() and (work / "kept_and_dropped.png").is_file()
    assert sorted(p.name for p in (work / "curated").glob("*.tar"))


def test_walkthrough_notebook_executes_with_the_real_model_even_when_nothing_is_kept(tmp_path, monkeypatch,
                                                                                   offline_weights):
    """Real mode: ViT-L/14 (random weights from an offline Hugging Face cache) and the heads from
    $NEMO_CURATOR_HOME, on a cluster the notebook starts itself; a cut above the AVA scale keeps nothing."""
    monkeypatch.delenv("NEMO_CURATOR_SMOKE", raising=False)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    _, text = run_notebook(tmp_path, monkeypatch, 900, NEMO_CURATOR_AESTHETIC_THRESHOLD="11", **offline_weights)
    assert "real model and heads" in text and "SMOKE MODE" not in text
    assert "0 samples in 0 shards" in text
    assert not list((tmp_path / "work" / "curated").glob("*.tar"))
