"""examples/stage_pipeline.py runs as a user runs it (a fresh process), on the session's cluster."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.utils.sample_data import make_sample_dataset

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "stage_pipeline.py"


def test_stage_pipeline_example_in_smoke_mode(client, tmp_path):
    make_sample_dataset(tmp_path / "data", n_shards=2, samples_per_shard=5)
    args = [sys.executable, str(EXAMPLE), str(tmp_path / "data"), str(tmp_path / "curated"), "--smoke",
            "--threads", "1", "--images-per-tar", "2", "--scheduler-address", client.scheduler.address]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SMOKE MODE" in done.stdout and "image_writer:" in done.stdout
    kept = int(done.stdout.split("kept ")[1].split(" of ")[0])
    assert 0 < kept < 10
    curated = ImageTextPairDataset.from_webdataset(str(tmp_path / "curated"), id_col="key").metadata.compute()
    assert len(curated) == kept and curated.aesthetic_score.notna().all() and curated.nsfw_score.notna().all()
    summary = json.loads((tmp_path / "curated" / "_run_summary.json").read_text())
    assert summary["shards_written"] == 2 and summary["totals"]["images_written"] == kept
    assert client.scheduler_info()["workers"]  # the script closed its client, not the cluster
