"""to_webdataset on a real LocalCluster with real tars and parquets: byte-exact copies, new ids,
DALI-readable indexes, filtered-out and missing samples, empty results, existing folders."""
from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.datasets.reshard import (JOB_FILE_NAME, kept_mask, new_sample_id, plan_output_shards,
                                           rewrite_json_id)
from nemo_curator.image.status import DECODE_FAILED, MISSING_IMAGE, OK, STATUS_COLUMN
from nemo_curator.utils.sample_data import make_samples, write_shard

SAMPLES_PER_SHARD = 4
MAX_SHARDS = 3


# ----------------------------------------------------------------------------------------------
# Pure helpers
def test_plan_output_shards_cuts_kept_rows_across_inputs():
    assert plan_output_shards([3, 0, 4], 5) == [[(0, 0, 3), (2, 0, 2)], [(2, 2, 4)]]
    assert plan_output_shards([0, 0], 5) == []
    assert plan_output_shards([10], 5) == [[(0, 0, 5)], [(0, 5, 10)]]
    assert plan_output_shards([1, 1, 1], 1) == [[(0, 0, 1)], [(1, 0, 1)], [(2, 0, 1)]]


def test_new_sample_id_pads_shard_and_index():
    assert new_sample_id(3, 17, 5, 10000) == "000030017"
    assert new_sample_id(0, 0, 2, 1) == "000"
    assert new_sample_id(12, 99, 2, 100) == "1299"


def test_kept_mask_keeps_only_true():
    values = pd.Series([True, False, None, np.nan, 1.0, "True"], dtype=object)
    assert kept_mask(values).tolist() == [True, False, False, False, True, False]
    assert kept_mask(pd.Series([True, pd.NA, False], dtype="boolean")).tolist() == [True, False, False]
    assert kept_mask(pd.Series([0.0, np.nan, 1.0])).tolist() == [False, False, True]


def test_rewrite_json_id_replaces_the_field_that_held_the_old_id():
    out = json.loads(rewrite_json_id(b'{"key": "a1", "id": 7, "caption": "x"}', "a1", "000", "key", "old"))
    assert out == {"key": "000", "id": 7, "caption": "x", "old": "a1"}
    out = json.loads(rewrite_json_id(b'{"id": "a1", "caption": "x"}', "a1", "000", "sample_id", None))
    assert out == {"id": "000", "caption": "x"}
    out = json.loads(rewrite_json_id(b'{"caption": "x"}', "a1", "000", "key", None))
    assert out == {"caption": "x", "key": "000"}
    assert rewrite_json_id(b"not json", "a1", "000", "key", None) is None
    assert rewrite_json_id(b"[1, 2]", "a1", "000", "key", None) is None


# ----------------------------------------------------------------------------------------------
# A dataset with every case: extra members, png, a filtered-out shard, a corrupt image,
# a kept row without sample, null filter values, an embedding column.
def build_dataset(folder) -> tuple[ImageTextPairDataset, dict[str, dict[str, bytes]]]:
    """4 input shards; returns the dataset and {old key: {ext: bytes}} of every input sample."""
    rng = np.random.default_rng(0)
    keeps = {0: [True, False, True, None, True], 1: [False, False, False], 2: [True, None, True, True], 3: [True] * 3}
    members: dict[str, dict[str, bytes]] = {}
    for s, keep in keeps.items():
        samples = make_samples(len(keep), s * 10_000, rng, sizes=[(32, 24)],
                               image_formats=("png",) if s == 3 else ("jpg",))
        for i, (sample, k) in enumerate(zip(samples, keep)):
            status = OK
            if s == 0 and i == 2:
                sample.members["cls"] = b"7"
            if s == 2 and i == 0:
                sample.members["jpg"], status = b"\xff\xd8 not a jpeg", DECODE_FAILED
            sample.row.update(keep=k, score=float(i), image_embedding=np.full(3, i, np.float32), **{STATUS_COLUMN: status})
            members[sample.key] = dict(sample.members)
        extra = []
        if s == 2:  # a kept row whose sample is not in the tar
            extra = [dict(key="000029999", caption="gone", url="u", keep=True, score=9.0,
                          image_embedding=np.zeros(3, np.float32), **{STATUS_COLUMN: MISSING_IMAGE})]
        write_shard(folder, f"{s:05d}", samples, extra_rows=extra)
    return ImageTextPairDataset.from_webdataset(folder, id_col="key"), members


def read_tar(path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def read_with_dali(tar: str, idx: str, n: int) -> list[tuple[bytes, bytes]]:
    """(image bytes, txt bytes) of the ``n`` samples DALI reads from ``tar`` with ``idx``."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)
    def pipe():
        image, text = fn.readers.webdataset(paths=[tar], index_paths=[idx], ext=["jpg;png", "txt"],
                                            missing_component_behavior="error")
        return image, text

    p = pipe()
    p.build()
    images, texts = p.run()
    return [(bytes(np.array(images.at(i))), bytes(np.array(texts.at(i)))) for i in range(n)]


def test_to_webdataset_copies_kept_samples_byte_exact(client, tmp_path):
    dataset, inputs = build_dataset(tmp_path / "in")
    out = tmp_path / "out"
    summary = dataset.to_webdataset(str(out), "keep", samples_per_shard=SAMPLES_PER_SHARD, max_shards=MAX_SHARDS,
                                    old_id_col="old_key", show_progress=False)

    # kept rows in input order: shard 0 → 3, shard 1 → 0, shard 2 → 4 (one without sample), shard 3 → 3
    assert [s["kept"] for s in summary["inputs"]] == [3, 0, 4, 3]
    assert summary["rows_in"] == 16 and summary["rows_kept"] == 10
    assert summary["shards_total"] == 3 and summary["shards_written"] == 3 and summary["shards_skipped"] == 0
    assert summary["totals"]["samples_written"] == 9 and summary["totals"]["missing_sample"] == 1
    assert summary["totals"][DECODE_FAILED] == 1
    assert json.loads((out / "_run_summary.json").read_text())["totals"] == summary["totals"]

    expected_old = ["000000000", "000000002", "000000004", "000020000",
                    "000020002", "000020003", "000030000", "000030001", "000030002"]  # 000029999 has no sample
    frames = [pq.read_table(out / f"{o:03d}.parquet") for o in range(3)]
    table = pa.concat_tables(frames)
    assert table.column("old_key").to_pylist() == expected_old
    assert table.schema.field("image_embedding").type == pa.list_(pa.float32())
    assert table.column_names[0] == "key" and set(table.column_names) == {"key", "caption", "url", "keep", "score",
                                                                          "image_embedding", STATUS_COLUMN, "old_key"}
    # ids: shard then index, contiguous within a shard (the missing sample takes no index)
    assert [f.column("key").to_pylist() for f in frames] == [
        ["0000", "0001", "0002", "0003"], ["0010", "0011", "0012"], ["0020", "0021"]]
    source = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "in").glob("*.parquet"))]).set_index("key")
    written = table.to_pandas().set_index("old_key")
    for col in ("caption", "url", "score", STATUS_COLUMN):
        assert written[col].tolist() == source.loc[expected_old, col].tolist()
    assert [list(e) for e in written["image_embedding"]] == [list(e) for e in source.loc[expected_old, "image_embedding"]]

    # every member of every kept sample, bytes unchanged except the id inside .json
    for o, frame in enumerate(frames):
        old_of = dict(zip(frame.column("key").to_pylist(), frame.column("old_key").to_pylist()))
        got: dict[str, dict[str, bytes]] = {}
        for name, data in read_tar(out / f"{o:03d}.tar"):
            key, ext = name.split(".", 1)
            got.setdefault(key, {})[ext] = data
        assert list(got) == list(old_of)
        for new, old in old_of.items():
            assert set(got[new]) == set(inputs[old])
            for ext, data in got[new].items():
                if ext == "json":
                    assert json.loads(data) == {**json.loads(inputs[old][ext]), "key": new, "old_key": old}
                else:
                    assert data == inputs[old][ext], (new, old, ext)
        stats = json.loads((out / f"{o:03d}.stats.json").read_text())
        assert stats["samples_written"] == len(old_of) and stats["resume"]["job"]

    # the DALI index v1.2 points at the right bytes: DALI reads them back
    decoded = read_with_dali(str(out / "002.tar"), str(out / "002.idx"), 2)
    assert decoded == [(inputs[o]["png"], inputs[o]["txt"]) for o in expected_old[7:]]
    decoded = read_with_dali(str(out / "000.tar"), str(out / "000.idx"), 4)
    assert decoded == [(inputs[o]["jpg"], inputs[o]["txt"]) for o in expected_old[:4]]

    # the output is a dataset again
    again = ImageTextPairDataset.from_webdataset(str(out), id_col="key")
    assert len(again.tar_files) == 3 and len(again.metadata.compute()) == 9


def test_to_webdataset_rerun_resumes_and_other_jobs_need_overwrite(client, tmp_path):
    dataset, _ = build_dataset(tmp_path / "in")
    out = str(tmp_path / "out")
    args = dict(samples_per_shard=SAMPLES_PER_SHARD, max_shards=MAX_SHARDS, show_progress=False)
    first = dataset.to_webdataset(out, "keep", **args)
    tars = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.endswith(".tar")}

    again = dataset.to_webdataset(out, "keep", **args)  # the same job: every shard is skipped
    assert again["shards_skipped"] == 3 and again["shards_written"] == 0
    assert again["totals"]["samples_written"] == first["totals"]["samples_written"]
    assert tars == {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in tars}

    dataset.metadata["keep_all"] = dataset.metadata["score"] >= 0
    with pytest.raises(FileExistsError, match="different to_webdataset job.*overwrite=True"):
        dataset.to_webdataset(out, "keep_all", **args)
    with pytest.raises(FileExistsError, match="different to_webdataset job"):
        dataset.to_webdataset(out, "keep", old_id_col="old", **args)

    open(os.path.join(out, "077.tar"), "wb").close()  # a stale shard of another run: removed by overwrite
    summary = dataset.to_webdataset(out, "keep_all", overwrite=True, **args)
    assert summary["rows_kept"] == 16 and summary["shards_written"] == 4
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == ["000.tar", "001.tar", "002.tar", "003.tar"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "00000.tar").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not written by to_webdataset"):
        dataset.to_webdataset(str(foreign), "keep", **args)


def test_to_webdataset_empty_result_and_bad_arguments(client, tmp_path):
    dataset, _ = build_dataset(tmp_path / "in")
    dataset.metadata["none"] = dataset.metadata["score"] < 0
    with pytest.warns(UserWarning, match="no row of 4 input shards"):
        summary = dataset.to_webdataset(str(tmp_path / "empty"), "none", show_progress=False)
    assert summary["shards_total"] == 0 and summary["rows_kept"] == 0 and summary["totals"] == {}
    assert sorted(os.listdir(tmp_path / "empty")) == ["_run_summary.json", JOB_FILE_NAME]

    dataset.metadata["all"] = dataset.metadata["score"] >= 0
    with pytest.raises(ValueError, match="make 16 output shards, more than max_shards=1 .*raise max_shards to 2"):
        dataset.to_webdataset(str(tmp_path / "many"), "all", samples_per_shard=1, max_shards=1, show_progress=False)
    assert not (tmp_path / "many").exists()
    with pytest.raises(KeyError, match="filter_column 'nope'"):
        dataset.to_webdataset(str(tmp_path / "x"), "nope")
    with pytest.raises(ValueError, match="holds the input shards"):
        dataset.to_webdataset(str(tmp_path / "in"), "keep")
    with pytest.raises(ValueError, match="samples_per_shard must be a positive integer"):
        dataset.to_webdataset(str(tmp_path / "x"), "keep", samples_per_shard=0)
    with pytest.raises(ValueError, match="old_id_col 'key' is the id column"):
        dataset.to_webdataset(str(tmp_path / "x"), "keep", old_id_col="key")


def test_the_folder_the_metadata_is_read_from_is_never_an_output(tmp_path, client):
    from nemo_curator.utils.sample_data import make_sample_dataset

    make_sample_dataset(tmp_path / "in", n_shards=2, samples_per_shard=2, sizes=[(16, 16)])
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path / "in"), id_col="key")
    ds.save_metadata(str(tmp_path / "meta"), show_progress=False)  # the dataset now reads meta/
    ds.metadata["keep"] = True
    with pytest.raises(ValueError, match="metadata they are read from"):
        ds.to_webdataset(str(tmp_path / "meta"), "keep", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "meta").glob("*.parquet")) == ["00000.parquet", "00001.parquet"]


def test_an_output_shard_of_many_pieces_costs_the_client_linear_time(tmp_path, monkeypatch, client):
    """``dask.delayed`` culls the graph of its arguments layer by layer against every key: an
    output shard made of 10,000 one-layer pieces cost the client O(pieces²) (13 s of planning at
    10,000 one-sample shards, 6 s without). The keys Dask's cull walks stay linear in the pieces."""
    import dask._task_spec

    from nemo_curator.utils.sample_data import make_sample_dataset

    walked, cull = [], dask._task_spec.cull
    monkeypatch.setattr(dask._task_spec, "cull", lambda dsk, keys: walked.append(len(keys)) or cull(dsk, keys))
    for n in (8, 32):
        make_sample_dataset(tmp_path / f"in{n}", n_shards=n, samples_per_shard=1, sizes=[(8, 8)])
        ds = ImageTextPairDataset.from_webdataset(str(tmp_path / f"in{n}"), id_col="key")
        ds.metadata["keep"] = ds.metadata["key"].str.len() > 0
        walked.clear()
        summary = ds.to_webdataset(str(tmp_path / f"out{n}"), "keep", samples_per_shard=100, show_progress=False)
        assert summary["rows_kept"] == n and summary["shards_total"] == 1
        assert sum(walked) <= 4 * n, (n, sum(walked))  # was n² + 2n


def test_many_output_shards_cost_the_client_linear_time(tmp_path, monkeypatch, client):
    """The pieces of every output shard share one graph layer, built once: built per output shard,
    each output shard's layer copied the whole upstream graph (every input shard's metadata task),
    O(outputs x inputs). The keys Dask's cull walks and the tasks copied stay linear in the shards."""
    import dask._task_spec

    from nemo_curator.datasets import reshard
    from nemo_curator.utils import graphs
    from nemo_curator.utils.sample_data import make_sample_dataset

    walked, copied, cull = [], [], dask._task_spec.cull
    monkeypatch.setattr(dask._task_spec, "cull", lambda dsk, keys: walked.append(len(keys)) or cull(dsk, keys))

    def measured(delayeds, name):
        shared = graphs.share_one_layer(delayeds, name)
        copied.append(len(shared[0].__dask_graph__().layers[shared[0]._layer]))
        return shared

    monkeypatch.setattr(reshard, "share_one_layer", measured)
    for n in (10, 40):
        make_sample_dataset(tmp_path / f"in{n}", n_shards=n, samples_per_shard=2, sizes=[(8, 8)])
        ds = ImageTextPairDataset.from_webdataset(str(tmp_path / f"in{n}"), id_col="key")
        ds.metadata["keep"] = ds.metadata["key"].str.len() > 0
        walked.clear(), copied.clear()
        summary = ds.to_webdataset(str(tmp_path / f"out{n}"), "keep", samples_per_shard=4, show_progress=False)
        assert summary["shards_total"] == n // 2 and summary["rows_kept"] == 2 * n
        assert len(copied) == 1 and copied[0] <= 3 * n, copied  # the n pieces (and the metadata's n tasks), once
        assert sum(walked) <= 6 * n, (n, sum(walked))
