"""The scripts in examples/ run as a user runs them (fresh processes), on the session's LocalCluster:
curate.py through a scheduler file (the HPC path), custom_embedder.py through an address; the
Slurm script parses."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.utils.sample_data import make_sample_dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_curate_script_through_a_scheduler_file(client, tmp_path):
    """The Python side of examples/slurm: get_client(scheduler_file=...) on a running cluster."""
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({**client.scheduler_info(), "workers": {}}))  # as `dask scheduler --scheduler-file` writes it
    make_sample_dataset(tmp_path / "data", n_shards=2, samples_per_shard=4)
    result = run_example("curate.py", str(tmp_path / "data"), str(tmp_path / "curated"), "--smoke",
                         "--scheduler-file", str(scheduler_file), "--batch-size", "4", "--threads", "1")
    assert "SMOKE MODE" in result.stdout and "curated samples" in result.stdout
    scored = ImageTextPairDataset.from_webdataset(str(tmp_path / "data"), id_col="key").metadata.compute()
    assert scored.aesthetic_score.notna().all() and (scored.image_status == "ok").all()
    curated = ImageTextPairDataset.from_webdataset(str(tmp_path / "curated"), id_col="key").metadata.compute()
    assert 0 < len(curated) < len(scored)
    assert client.scheduler_info()["workers"]  # the script closed its client, not the cluster


def test_custom_embedder_scores_every_decodable_image(client, tmp_path):
    make_sample_dataset(tmp_path / "data", n_shards=1, samples_per_shard=5, image_formats=("jpg", "png"))
    result = run_example("custom_embedder.py", str(tmp_path / "data"), "--smoke",
                         "--scheduler-address", client.scheduler.address)
    assert "embedded 5 images" in result.stdout
    scored = ImageTextPairDataset.from_webdataset(str(tmp_path / "data"), id_col="key").metadata.compute()
    assert (scored.image_status == "ok").all() and scored.nsfw_score.between(0, 1).all()
    assert all(len(e) == 768 for e in scored.image_embedding)


def test_slurm_script_is_valid_bash_and_uses_a_scheduler_file():
    script = EXAMPLES / "slurm" / "curate.sbatch"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for needle in ("#SBATCH", "dask scheduler --scheduler-file", "dask cuda worker", "--scheduler-file",
                   "examples/curate.py"):
        assert needle in text
