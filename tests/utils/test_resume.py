"""Resume after a crash: completion markers, runs killed with SIGKILL and rerun, a worker killed
mid-task. Real LocalClusters, real tar and parquet files."""
from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.utils.file_utils import remove_stale_temporaries
from nemo_curator.utils.resume import completed_stats, fingerprint, identities, make_record
from nemo_curator.utils.sample_data import make_sample_dataset

N_SHARDS = 6
SAMPLES = 4
STEP = "score=len(caption) v1"  # the lineage step of `scored`, whatever its delay or log folder


# ----------------------------------------------------------------------------------------------
# The pipeline under test (module level: the subprocess and the workers import it from here)
def score_step(frame: pd.DataFrame, tar: str, delay: float = 0.0, log_dir: str | None = None) -> pd.DataFrame:
    """Add ``score`` (float caption length); log one file per execution in ``log_dir``; sleep ``delay`` s."""
    if log_dir:
        Path(log_dir).mkdir(exist_ok=True)
        Path(log_dir, f"{os.path.basename(tar)}.{os.getpid()}.{time.time_ns()}").touch()
    time.sleep(delay)
    return frame.assign(score=frame["caption"].str.len().astype("float64"))


def exit_once(frame: pd.DataFrame, tar: str, marker_dir: str, victim: str) -> pd.DataFrame:
    """``score_step``, but the first run on shard ``victim`` kills its worker process (os._exit)."""
    marker = Path(marker_dir, victim + ".killed")
    if os.path.basename(tar) == victim and not marker.exists():
        marker.touch()
        os._exit(1)
    return score_step(frame, tar)


def scored(dataset: ImageTextPairDataset, func=score_step, **kwargs) -> ImageTextPairDataset:
    meta = dataset.metadata._meta.assign(score=pd.Series([], dtype="float64"))
    return dataset.map_shards(functools.partial(func, **kwargs), meta=meta, lineage_step=STEP)


def run_job(kind: str, src: str, out: str, delay: float, log_dir: str | None = None) -> dict:
    """The job a user would run: score, then save in place (``kind="save"``) or reshard (``"reshard"``)."""
    dataset = scored(ImageTextPairDataset.from_webdataset(src, id_col="key"), delay=delay, log_dir=log_dir)
    if kind == "save":
        return dataset.save_metadata(show_progress=False)
    dataset.metadata["keep"] = dataset.metadata["score"] > 20
    return dataset.to_webdataset(out, "keep", samples_per_shard=3, max_shards=3, show_progress=False)


SCRIPT = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_resume import run_job
from nemo_curator import get_client

if __name__ == "__main__":
    client = get_client(cluster_type="cpu", n_workers=1, threads_per_worker=1, dashboard_address=":0")
    run_job(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
"""


def run_and_kill(tmp_path: Path, args: list[str], marker_dir: Path, n_markers: int) -> set[str]:
    """Run ``run_job(*args)`` in a new process group, SIGKILL the whole group as soon as
    ``n_markers`` stats files exist in ``marker_dir``; return the names of those present then."""
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 120
        while len(list(marker_dir.glob("*.stats.json"))) < n_markers:
            assert proc.poll() is None, f"the job ended before it was killed:\n{log_path.read_text()[-3000:]}"
            assert time.time() < deadline, "no shard completed in time"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the script, its scheduler and its worker processes
        proc.wait()
    for _ in range(200):  # until every process of the group is gone (nothing writes any more)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    return {p.name for p in marker_dir.glob("*.stats.json")}


def strip_volatile(stats: dict) -> dict:
    """Stats without timings and resume records (which name the folder and file times)."""
    return {k: v for k, v in stats.items() if not k.endswith("seconds") and k != "resume"}


# ----------------------------------------------------------------------------------------------
def test_completed_stats_checks_job_inputs_and_outputs(tmp_path):
    inp, out, stats_path = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "out.stats.json"
    inp.write_bytes(b"input")
    inputs = identities([str(inp)])
    out.write_bytes(b"output")
    stats_path.write_text(json.dumps({"rows": 3, "resume": make_record("job-a", inputs, [str(out)])}))
    assert completed_stats(stats_path, "job-a", inputs)["rows"] == 3
    assert completed_stats(stats_path, "job-b", inputs) is None  # another pipeline
    out.write_bytes(b"edited output")
    assert completed_stats(stats_path, "job-a", inputs) is None  # output changed since
    out.write_bytes(b"output")
    os.utime(out, ns=(0, json.loads(stats_path.read_text())["resume"]["outputs"][str(out)]["mtime_ns"]))
    assert completed_stats(stats_path, "job-a", inputs) is not None
    inp.write_bytes(b"other input")
    assert completed_stats(stats_path, "job-a", identities([str(inp)])) is None  # input changed
    assert completed_stats(tmp_path / "absent.json", "job-a", inputs) is None

    # in place: the input IS the output the job wrote
    before = identities([str(out)])
    out.write_bytes(b"rewritten in place")
    stats_path.write_text(json.dumps({"resume": make_record("job-a", before, [str(out)])}))
    assert completed_stats(stats_path, "job-a", identities([str(out)])) is not None
    assert fingerprint({"a": (1, 2), "b": None}) == fingerprint({"b": None, "a": [1, 2]})


def test_remove_stale_temporaries_only_named_files(tmp_path):
    for name in (".00001.tar.ab12cd_x.tmp", ".00001.parquet.zz99.tmp", ".00002.tar.ab12cd_x.tmp", "00001.tar"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path, ["00001.tar", "00001.parquet"]) == 2
    assert sorted(os.listdir(tmp_path)) == [".00002.tar.ab12cd_x.tmp", "00001.tar"]


def test_save_metadata_skips_finished_shards_of_the_same_pipeline_only(client, tmp_path):
    make_sample_dataset(tmp_path / "in", n_shards=3, samples_per_shard=3, sizes=[(16, 16)])
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    first = scored(ImageTextPairDataset.from_webdataset(src, id_col="key")).save_metadata(out, show_progress=False)
    assert first["shards_written"] == 3 and first["totals"]["rows"] == 9
    assert json.loads(Path(out, "00001.stats.json").read_text())["rows"] == 3

    again = scored(ImageTextPairDataset.from_webdataset(src, id_col="key")).save_metadata(out, show_progress=False)
    assert again["shards_skipped"] == 3 and again["totals"]["rows"] == 9
    assert [strip_volatile(s) for s in again["shards"]] == [strip_volatile(s) for s in first["shards"]]

    base = ImageTextPairDataset.from_webdataset(src, id_col="key")
    changed = base.map_shards(functools.partial(score_step), meta=scored(base).metadata._meta, lineage_step="score v2")
    assert changed.save_metadata(out, show_progress=False)["shards_written"] == 3  # another pipeline: redone
    assert base.save_metadata(out, columns=["caption"], show_progress=False)["shards_written"] == 3  # other columns
    assert base.save_metadata(out, columns=["caption"], show_progress=False)["shards_skipped"] == 3
    assert base.save_metadata(out, columns=["caption"], resume=False, show_progress=False)["shards_written"] == 3
    os.utime(os.path.join(src, "00002.tar"))  # an input touched since: that shard only is redone
    assert base.save_metadata(out, columns=["caption"], show_progress=False)["shards_written"] == 1


def test_a_column_set_by_hand_is_part_of_the_job(client, tmp_path):
    make_sample_dataset(tmp_path / "in", n_shards=3, samples_per_shard=3, sizes=[(16, 16)])
    src, out = str(tmp_path / "in"), str(tmp_path / "out")

    def save(min_length: int) -> dict:
        dataset = ImageTextPairDataset.from_webdataset(src, id_col="key")
        assert dataset.untracked_changes() is None
        dataset.metadata["long"] = dataset.metadata["caption"].str.len() > min_length
        assert dataset.untracked_changes() is not None
        return dataset.save_metadata(out, show_progress=False)

    assert save(5)["shards_written"] == 3
    assert pd.read_parquet(os.path.join(out, "00000.parquet"))["long"].all()
    assert save(5)["shards_skipped"] == 3  # the same expression: resumed
    assert save(10_000)["shards_written"] == 3  # another threshold: not mistaken for the same job
    assert not pd.read_parquet(os.path.join(out, "00000.parquet"))["long"].any()


def test_a_hand_edit_stays_in_the_job_after_later_steps_and_saves(client, tmp_path):
    make_sample_dataset(tmp_path / "in", n_shards=2, samples_per_shard=3, sizes=[(16, 16)])
    src = str(tmp_path / "in")

    def edited(value: int) -> ImageTextPairDataset:
        dataset = ImageTextPairDataset.from_webdataset(src, id_col="key")
        dataset.metadata["x"] = value
        return dataset

    def x_in(folder) -> set:
        return set(pd.read_parquet(os.path.join(folder, "00000.parquet"))["x"])

    # a tracked step after the edit
    for value, written in ((1, 2), (1, 0), (2, 2)):
        summary = scored(edited(value)).save_metadata(str(tmp_path / "after_step"), show_progress=False)
        assert summary["shards_written"] == written and x_in(tmp_path / "after_step") == {value}
    # a save, whose files the dataset then reads, before another save
    for value, written in ((1, 2), (1, 0), (2, 2)):
        dataset = edited(value)
        dataset.save_metadata(str(tmp_path / f"first{value}"), show_progress=False)
        summary = dataset.save_metadata(str(tmp_path / "second"), show_progress=False)
        assert summary["shards_written"] == written and x_in(tmp_path / "second") == {value}


def fake_embed(frame: pd.DataFrame, tar: str):
    """Stands for an embedder: a column, and embedder stats for the shard."""
    return frame.assign(emb_len=frame["caption"].str.len()), {"embedded": len(frame), "samples_in": len(frame),
                                                               "embed_seconds": 0.25}


def test_stored_embedding_stats_are_carried_only_to_the_same_rows(client, tmp_path):
    make_sample_dataset(tmp_path / "in", n_shards=2, samples_per_shard=4, sizes=[(16, 16)])
    src = str(tmp_path / "in")
    base = ImageTextPairDataset.from_webdataset(src, id_col="key")
    meta = base.metadata._meta.assign(emb_len=pd.Series([], dtype="int64"))
    base.map_shards(fake_embed, meta=meta, lineage_step="fake embed", returns_stats=True).save_metadata(show_progress=False)

    rescored = ImageTextPairDataset.from_webdataset(src, id_col="key").save_metadata(str(tmp_path / "copy"), show_progress=False)
    assert rescored["carried_stats"] == 2 and rescored["totals"]["embedded"] == 8
    assert rescored["totals"]["embed_seconds"] == 0.5 and "write_seconds" in rescored["shards"][0]

    filtered = ImageTextPairDataset.from_webdataset(src, id_col="key")
    filtered.metadata = filtered.metadata[filtered.metadata["key"].str[-1] == "0"]  # rows dropped by hand
    summary = filtered.save_metadata(str(tmp_path / "filtered"), show_progress=False)
    assert summary["carried_stats"] == 0 and "embedded" not in summary["totals"]

    dataset = ImageTextPairDataset.from_webdataset(src, id_col="key")
    dataset.metadata["keep"] = True
    dataset.to_webdataset(str(tmp_path / "curated"), "keep", samples_per_shard=3, show_progress=False)
    resharded = ImageTextPairDataset.from_webdataset(str(tmp_path / "curated"), id_col="key")
    summary = resharded.save_metadata(str(tmp_path / "curated_copy"), show_progress=False)
    assert summary["carried_stats"] == 0 and "samples_written" not in summary["totals"]


def test_save_metadata_in_place_killed_then_rerun_matches_uninterrupted_run(client, tmp_path):
    src, ref = tmp_path / "in", tmp_path / "ref"
    make_sample_dataset(src, n_shards=N_SHARDS, samples_per_shard=SAMPLES, sizes=[(16, 16)])
    shutil.copytree(src, ref)
    finished = run_and_kill(tmp_path, ["save", str(src), "-", "0.4"], src, n_markers=2)
    assert 2 <= len(finished) < N_SHARDS, finished

    log_dir = tmp_path / "rerun-log"
    summary = run_job("save", str(src), "-", 0.0, str(log_dir))
    assert summary["shards_skipped"] == len(finished) and summary["shards_written"] == N_SHARDS - len(finished)
    redone = sorted(p.name.split(".")[0] for p in log_dir.iterdir())
    assert redone == sorted({f"{i:05d}" for i in range(N_SHARDS)} - {n.split(".")[0] for n in finished})

    expected = run_job("save", str(ref), "-", 0.0)
    assert [strip_volatile(s) for s in summary["shards"]] == [strip_volatile(s) for s in expected["shards"]]
    for i in range(N_SHARDS):
        got, want = pq.read_table(src / f"{i:05d}.parquet"), pq.read_table(ref / f"{i:05d}.parquet")
        assert got.equals(want) and got.num_rows == SAMPLES and got.column_names[-1] == "score"
    assert not list(src.glob(".*.tmp"))


def test_to_webdataset_killed_then_rerun_matches_uninterrupted_run(client, tmp_path):
    src, out, ref = tmp_path / "in", tmp_path / "out", tmp_path / "ref"
    make_sample_dataset(src, n_shards=N_SHARDS, samples_per_shard=SAMPLES, sizes=[(16, 16)])
    finished = run_and_kill(tmp_path, ["reshard", str(src), str(out), "0.3"], out, n_markers=2)
    expected = run_job("reshard", str(src), str(ref), 0.0)
    assert 2 <= len(finished) < expected["shards_total"], (finished, expected["shards_total"])
    kept_mtimes = {n: os.stat(out / n).st_mtime_ns for n in finished}

    summary = run_job("reshard", str(src), str(out), 0.0)
    assert summary["shards_skipped"] == len(finished) and summary["shards_total"] == expected["shards_total"]
    assert kept_mtimes == {n: os.stat(out / n).st_mtime_ns for n in finished}  # finished shards not rewritten
    assert [strip_volatile(s) for s in summary["shards"]] == [strip_volatile(s) for s in expected["shards"]]
    names = sorted(os.listdir(ref))
    assert sorted(os.listdir(out)) == names  # nothing missing, nothing extra (no temporaries left)
    for name in names:
        if name.endswith((".tar", ".idx", ".parquet")):
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert summary["totals"]["samples_written"] == expected["totals"]["samples_written"] == summary["rows_kept"]


def test_worker_killed_mid_task_is_retried(client, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    make_sample_dataset(src, n_shards=3, samples_per_shard=3, sizes=[(16, 16)])
    workers_before = set(client.scheduler_info()["workers"])
    dataset = scored(ImageTextPairDataset.from_webdataset(str(src), id_col="key"), func=exit_once,
                     marker_dir=str(tmp_path), victim="00001.tar")
    summary = dataset.save_metadata(str(out), show_progress=False)

    assert (tmp_path / "00001.tar.killed").exists()  # the worker did die on that shard
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the dead worker
    assert set(client.scheduler_info()["workers"]) != workers_before
    assert summary["shards_written"] == 3 and summary["totals"]["rows"] == 9
    for i in range(3):
        source = pd.read_parquet(src / f"{i:05d}.parquet")
        got = pd.read_parquet(out / f"{i:05d}.parquet")
        assert got["key"].tolist() == source["key"].tolist()
        assert got["score"].tolist() == source["caption"].str.len().astype(float).tolist()


def test_lineage_steps_with_other_weights_are_other_steps(tmp_path):
    import pickle

    import dask

    from nemo_curator.utils.resume import LineageStep

    a = LineageStep("embed", "cfg", identity="{'size': 1}")
    b = LineageStep("embed", "cfg", identity="{'size': 2}")
    assert str(a) == str(b) and a != b and hash(a) != hash(b)
    make_sample_dataset(tmp_path, n_shards=1, samples_per_shard=2, sizes=[(16, 16)])
    base = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")
    meta = base.metadata._meta
    tasks = [base.map_shards(lambda frame, tar: frame, meta=meta, lineage_step=step) for step in (a, b)]
    assert dask.base.tokenize(tasks[0].metadata) != dask.base.tokenize(tasks[1].metadata)  # other tasks, other keys
    assert pickle.loads(pickle.dumps(a)) == a and pickle.loads(pickle.dumps(a)).identity == a.identity
    plain = LineageStep("filter", "keep=x > 1")
    assert plain == "filter:keep=x > 1" and LineageStep.of("my step") == "my step"
