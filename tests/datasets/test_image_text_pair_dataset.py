"""ImageTextPairDataset: reading shards by name, id handling, errors naming files, atomic saves."""
import os
import shutil
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_curator.datasets import ImageTextPairDataset
from nemo_curator.utils.sample_data import make_sample_dataset, make_samples, write_shard


@pytest.fixture
def dataset_dir(tmp_path):
    make_sample_dataset(tmp_path, n_shards=3, samples_per_shard=4, sizes=[(64, 48)])
    return tmp_path


def test_one_partition_per_shard_paired_by_name(dataset_dir, client):
    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    assert ds.metadata.npartitions == 3
    assert [os.path.basename(t) for t in ds.tar_files] == ["00000.tar", "00001.tar", "00002.tar"]
    parts = ds.metadata.to_delayed()
    for part, tar in zip(parts, ds.tar_files):
        frame = part.compute()
        shard = int(os.path.basename(tar)[:5])
        assert all(int(k) // 10_000 == shard for k in frame["key"])  # rows of partition i belong to tar i


def test_shards_with_gaps_and_odd_names_pair_by_name(tmp_path, client):
    rng = np.random.default_rng(1)
    write_shard(tmp_path, "shard-b", make_samples(2, 200, rng, sizes=[(32, 32)]))
    write_shard(tmp_path, "00007", make_samples(3, 700, rng, sizes=[(32, 32)]))
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")
    sizes = {os.path.basename(t): len(p.compute()) for t, p in zip(ds.tar_files, ds.metadata.to_delayed())}
    assert sizes == {"00007.tar": 3, "shard-b.tar": 2}
    ds.save_metadata()
    assert len(pd.read_parquet(tmp_path / "shard-b.parquet")) == 2


def test_ids_are_strings_with_leading_zeros(tmp_path, client):
    rng = np.random.default_rng(2)
    write_shard(tmp_path, "00000", make_samples(3, 0, rng, sizes=[(32, 32)]))
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")
    keys = ds.metadata["key"].compute().tolist()
    assert keys == ["000000000", "000000001", "000000002"]
    # integer ids in the parquet are read as their decimal strings
    frame = pd.read_parquet(tmp_path / "00000.parquet")
    frame["num"] = np.arange(10, 13)
    frame.to_parquet(tmp_path / "00000.parquet", index=False)
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="num")
    assert ds.metadata["num"].compute().tolist() == ["10", "11", "12"]


def test_missing_folder_and_no_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageTextPairDataset.from_webdataset(str(tmp_path / "nope"), id_col="key")
    with pytest.raises(FileNotFoundError, match="no shards in"):
        ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")


def test_unpaired_files_are_named(dataset_dir):
    os.remove(dataset_dir / "00001.parquet")
    shutil.copy(dataset_dir / "00002.parquet", dataset_dir / "00009.parquet")
    with pytest.raises(FileNotFoundError) as err:
        ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    assert "tar without its parquet" in str(err.value) and "00001.tar" in str(err.value)
    assert "parquet without its tar" in str(err.value) and "00009.parquet" in str(err.value)


def test_absent_id_column_lists_columns(dataset_dir):
    with pytest.raises(KeyError) as err:
        ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="sample_id")
    assert "00000.parquet" in str(err.value) and "'caption'" in str(err.value)


def test_duplicate_ids_in_a_shard_name_the_file(dataset_dir, client):
    frame = pd.read_parquet(dataset_dir / "00001.parquet")
    frame.loc[1, "key"] = frame.loc[0, "key"]
    frame.to_parquet(dataset_dir / "00001.parquet", index=False)
    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    with pytest.raises(ValueError, match=r"00001.parquet: duplicate ids"):
        ds.metadata.compute()


def test_save_metadata_in_place_with_user_column_and_embeddings(dataset_dir, client):
    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    ds.metadata["keep"] = ds.metadata.caption.str.len() > 10
    ds.metadata["image_embedding"] = ds.metadata["key"].map(
        lambda k: np.full(3, int(k) / 7, dtype=np.float32), meta=("image_embedding", object))
    ds.save_metadata()
    for name in ["00000", "00001", "00002"]:
        table = pq.read_table(dataset_dir / f"{name}.parquet")
        assert table.schema.field("image_embedding").type == pa.list_(pa.float32())
        frame = table.to_pandas()
        for key, emb in zip(frame["key"], frame["image_embedding"]):
            np.testing.assert_array_equal(emb, np.full(3, int(key) / 7, dtype=np.float32))
        assert frame["keep"].dtype == bool
    assert not [p for p in os.listdir(dataset_dir) if p.endswith(".tmp")]
    again = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    assert again.metadata["keep"].compute().dtype == bool


def test_save_metadata_columns_and_other_path(dataset_dir, tmp_path_factory, client):
    out = tmp_path_factory.mktemp("out")
    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    ds.save_metadata(path=str(out), columns=["caption"])
    frame = pd.read_parquet(out / "00001.parquet")
    assert list(frame.columns) == ["key", "caption"] and len(frame) == 4
    with pytest.raises(KeyError, match="not in the metadata"):
        ds.save_metadata(path=str(out), columns=["nope"])


def test_failed_save_leaves_previous_file_intact(dataset_dir, client):
    before_failing = (dataset_dir / "00001.parquet").read_bytes()
    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")

    def explode(frame):
        if len(frame) and frame["key"].iloc[0].startswith("00001"):
            raise RuntimeError("boom")
        return frame

    ds = ds.with_metadata(ds.metadata.map_partitions(explode, meta=ds.metadata._meta))
    with pytest.raises(RuntimeError, match="boom"):
        ds.save_metadata(show_progress=False)
    # writes already running finish (atomically) after the error: wait for them, then check
    deadline = time.time() + 10
    while [p for p in os.listdir(dataset_dir) if p.endswith(".tmp")] and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in os.listdir(dataset_dir) if p.endswith(".tmp")]
    assert (dataset_dir / "00001.parquet").read_bytes() == before_failing
    assert pq.read_table(dataset_dir / "00000.parquet").num_rows == 4


def test_repartitioned_metadata_is_rejected(dataset_dir):
    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    with pytest.raises(ValueError, match="one partition per shard"):
        ds.with_metadata(ds.metadata.repartition(npartitions=1))


def test_cudf_backend_without_cudf_names_the_extra(dataset_dir):
    pytest.importorskip("torch")
    try:
        import cudf  # noqa: F401
        pytest.skip("cudf is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"\[gpu\]"):
        ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key", backend="cudf")


@pytest.mark.gpu
def test_cudf_backend_reads_and_saves(dataset_dir):
    pytest.importorskip("dask_cudf")
    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key", backend="cudf")
    assert type(ds.metadata.partitions[0].compute()).__module__.startswith("cudf")
    ds.save_metadata()
    assert len(pd.read_parquet(dataset_dir / "00000.parquet")) == 4


def test_embedding_rows_of_one_matrix_reach_arrow_without_a_copy():
    from nemo_curator.utils.arrow import partition_to_arrow

    matrix = np.arange(12, dtype=np.float32).reshape(4, 3)
    rows = [matrix[0], None, matrix[2], matrix[3]]
    table = partition_to_arrow(pd.DataFrame({"key": list("abcd"), "emb": rows}))
    column = table.column("emb").chunk(0)
    assert column.values.buffers()[1].address == matrix.ctypes.data  # the matrix itself
    assert column.to_pylist() == [[0, 1, 2], None, [6, 7, 8], [9, 10, 11]]
    assert column.offsets.to_pylist() == [0, 3, 6, 9, 12]  # the null row spans unused values: valid Arrow
    compact = partition_to_arrow(pd.DataFrame({"emb": rows}), compact_nulls=True).column("emb").chunk(0)
    assert compact.offsets.to_pylist() == [0, 3, 3, 6, 9] and compact.to_pylist() == column.to_pylist()  # for cuDF
    shuffled = partition_to_arrow(pd.DataFrame({"emb": [matrix[3], matrix[0], None, [1.5, 2.5]]}))
    assert shuffled.column("emb").to_pylist() == [[9, 10, 11], [0, 1, 2], None, [1.5, 2.5]]


def test_parquet_of_embeddings_in_bounded_row_groups_without_dictionary(tmp_path):
    from nemo_curator.utils.file_utils import ROW_GROUP_BYTES, write_parquet_atomic

    n = 4000
    emb = np.random.default_rng(0).random((n, 768), dtype=np.float32)
    frame = pd.DataFrame({"key": [f"{i:05d}" for i in range(n)], "caption": ["same"] * n, "emb": list(emb),
                          "tags": [["a", "b"]] * n})
    from nemo_curator.utils.arrow import partition_to_arrow

    write_parquet_atomic(partition_to_arrow(frame), tmp_path / "x.parquet")
    meta = pq.ParquetFile(tmp_path / "x.parquet").metadata
    assert meta.num_row_groups >= 2  # 12 MB of embeddings: never one group buffered whole
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    assert max(g.total_byte_size for g in groups) < 2 * ROW_GROUP_BYTES
    columns = {groups[0].column(c).path_in_schema: groups[0].column(c) for c in range(groups[0].num_columns)}
    assert not any("DICTIONARY" in e for e in columns["emb.list.element"].encodings)
    assert any("DICTIONARY" in e for e in columns["caption"].encodings)
    assert any("DICTIONARY" in e for e in columns["tags.list.element"].encodings)  # nested, not floats: kept
    back = pd.read_parquet(tmp_path / "x.parquet")
    np.testing.assert_array_equal(np.stack(back["emb"].to_numpy()), emb)


def test_a_file_that_is_not_parquet_is_named(dataset_dir, client):
    (dataset_dir / "00001.parquet").write_bytes(b"these bytes are not a parquet file" * 10)
    with pytest.raises(ValueError, match=r"00001\.parquet is not a readable parquet file"):
        ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    from nemo_curator.datasets.image_text_pair_dataset import read_shard_metadata

    with pytest.raises(ValueError, match=r"00001\.parquet is not a readable parquet file"):
        read_shard_metadata(str(dataset_dir / "00001.parquet"), "key", ["key"])


def test_legacy_id_field_spelling(dataset_dir, client):
    legacy = ImageTextPairDataset.from_webdataset(path=str(dataset_dir), id_field="key")
    assert legacy.id_col == "key" and len(legacy.metadata.compute()) == 12
    with pytest.raises(ValueError, match="legacy spelling"):
        ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key", id_field="caption")
    with pytest.raises(TypeError, match="needs id_col"):
        ImageTextPairDataset.from_webdataset(str(dataset_dir))


def test_shards_are_records_and_the_legacy_lists_are_read_only_views(dataset_dir, client):
    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    assert [s.name for s in ds.shards] == ["00000", "00001", "00002"]
    assert ds.tar_files == [s.tar for s in ds.shards] and ds.metadata_files == [s.metadata_file for s in ds.shards]
    assert ds.shard_stats == [None] * 3
    ds.tar_files.append("elsewhere.tar")  # a copy: the dataset does not change
    assert len(ds.tar_files) == 3
    with pytest.raises(AttributeError):
        ds.tar_files = []
    legacy = ImageTextPairDataset(str(dataset_dir), ds.metadata, ds.tar_files, "key")  # the 0.x constructor
    assert legacy.metadata_files == ds.metadata_files


def test_save_metadata_points_the_dataset_at_what_it_wrote_and_only_then(dataset_dir, tmp_path_factory, client):
    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    before = (ds.metadata, ds.metadata_files, ds.lineage)
    ds.save_metadata(str(tmp_path_factory.mktemp("some")), columns=["caption"], show_progress=False)
    assert (ds.metadata, ds.metadata_files, ds.lineage) == before  # a subset of columns: nothing changes
    out = tmp_path_factory.mktemp("all")
    ds.save_metadata(str(out), show_progress=False)
    assert ds.metadata_files == [str(out / f"{i:05d}.parquet") for i in range(3)]
    assert ds.tar_files == [str(dataset_dir / f"{i:05d}.tar") for i in range(3)] and ds.lineage == before[2]
    assert ds.metadata is not before[0] and list(ds.metadata.columns) == list(before[0].columns)
    pd.testing.assert_frame_equal(ds.metadata.compute(), before[0].compute())


def test_importing_the_package_leaves_dask_configuration_alone():
    import subprocess
    import sys

    code = ("import dask; before = dask.config.get('dataframe.convert-string', 'unset'); "
            "import nemo_curator, nemo_curator.datasets, nemo_curator.image.embedders, nemo_curator.report; "
            "print(before == dask.config.get('dataframe.convert-string', 'unset'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_embedding_arrays_stay_arrays_through_user_steps(dataset_dir, client):
    """Dask's string conversion is off only where the package builds collections: a user's own
    step on the metadata keeps an array column as arrays."""
    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    meta = ds.metadata._meta.assign(vec=pd.Series([], dtype=object))
    with_vectors = ds.map_shards(lambda frame, tar: frame.assign(vec=[np.ones(3, np.float32)] * len(frame)),
                                 meta=meta, lineage_step="vectors")
    with_vectors.metadata["n"] = with_vectors.metadata["caption"].str.len()  # a hand edit, outside the package
    frame = with_vectors.metadata.compute()
    assert isinstance(frame["vec"].iloc[0], np.ndarray) and frame["vec"].iloc[0].dtype == np.float32


def test_a_subset_saved_in_place_is_what_the_dataset_then_reads(dataset_dir, client):
    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    ds.save_metadata(columns=["caption"], show_progress=False)  # in place: the other columns are gone from disk
    assert list(ds.metadata.columns) == ["key", "caption"]
    assert ds.metadata.compute()["caption"].notna().all()


def test_shard_records_compare_without_their_pending_stats(dataset_dir):
    import dask

    ds = ImageTextPairDataset.from_webdataset(str(dataset_dir), id_col="key")
    pending = ds.with_metadata(ds.metadata, shard_stats=[dask.delayed({"x": i}) for i in range(3)])
    assert pending.shards == ds.shards  # the Delayed stats are not compared (and do not raise)


def _stats_of_shard(frame, tar):
    return frame.assign(n=len(frame)), {"rows_seen": len(frame)}


def test_map_shards_builds_one_graph_layer_for_all_shards(tmp_path, monkeypatch, client):
    """Dask culls a graph layer by layer against every key: with a layer per shard (one per
    ``dask.delayed`` call) saving 10,000 shards took the client minutes, 100,000 hours. Two steps
    over 12 shards: every partition and stats object shares one graph of one layer, and turning
    the metadata back into Delayed objects (what ``save_metadata`` does) culls it once."""
    import dask._task_spec

    make_sample_dataset(tmp_path, n_shards=12, samples_per_shard=1, sizes=[(8, 8)])
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")
    meta = ds.metadata._meta.assign(n=np.int64(0))
    once = ds.map_shards(_stats_of_shard, meta=meta, lineage_step="one", returns_stats=True)
    twice = once.map_shards(_stats_of_shard, meta=meta, lineage_step="two", returns_stats=True)
    graphs = {id(s.dask) for s in twice.shard_stats}
    assert len(graphs) == 1 and len(twice.shard_stats[0].dask.layers) == 1
    calls, cull = [], dask._task_spec.cull
    monkeypatch.setattr(dask._task_spec, "cull", lambda *a, **k: calls.append(1) or cull(*a, **k))
    parts = twice.metadata.to_delayed()
    assert len(calls) == 1
    out = tmp_path / "saved"
    summary = twice.save_metadata(path=str(out), show_progress=False)
    assert summary["shards_written"] == 12 and summary["totals"]["rows_seen"] == 12
    assert len(parts) == 12 and twice.metadata.compute()["n"].tolist() == [1] * 12


def test_schemas_of_many_shards_are_read_in_chunks_and_united(tmp_path, monkeypatch, client):
    """The footers are read a chunk of files per thread task (a future per file cost the client
    more than the reads at 100,000 shards); the union is the same: a column typed in a later
    chunk replaces its all-null type, a column of one shard only is there, the first shard
    without the id column is named."""
    import nemo_curator.datasets.image_text_pair_dataset as module

    monkeypatch.setattr(module, "SCHEMA_CHUNK", 2)
    for s in range(5):
        frame = pd.DataFrame({"key": [f"{s}0"], "score": [None if s < 3 else 0.5]})
        if s == 4:
            frame["extra"] = ["x"]
        write_shard(tmp_path, f"{s:05d}", [], extra_rows=frame.to_dict("records"))
    ds = ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")
    assert list(ds.metadata.columns) == ["key", "score", "extra"]
    assert str(ds.metadata.dtypes["score"]) == "float64"
    frame = ds.metadata.compute()
    assert frame["extra"].tolist()[-1] == "x" and frame["score"].tolist()[-1] == 0.5
    pq.write_table(pa.table({"other": ["a"]}), tmp_path / "00003.parquet")
    with pytest.raises(KeyError, match="00003.parquet"):
        ImageTextPairDataset.from_webdataset(str(tmp_path), id_col="key")
