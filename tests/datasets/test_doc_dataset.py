"""DocumentDataset: the 0.9 container, its parquet reading and atomic writing."""
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_curator.datasets.doc_dataset import DocumentDataset


@pytest.fixture
def frame():
    rng = np.random.default_rng(0)
    return pd.DataFrame({"id": [f"{i:04d}" for i in range(12)], "group": np.arange(12) % 3,
                         "embedding": list(rng.standard_normal((12, 8)).astype(np.float32))})


def test_parquet_round_trip_keeps_embeddings_as_arrays(frame, tmp_path, client):
    ds = DocumentDataset.from_pandas(frame, npartitions=3)
    assert len(ds) == 12 and ds.df.npartitions == 3
    ds.to_parquet(str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["part.0.parquet", "part.1.parquet", "part.2.parquet"]
    assert pq.read_schema(tmp_path / "out" / "part.0.parquet").field("embedding").type == pa.list_(pa.float32())
    back = DocumentDataset.read_parquet(str(tmp_path / "out")).to_pandas().sort_values("id").reset_index(drop=True)
    assert isinstance(back["embedding"].iloc[0], np.ndarray)  # not Dask's string conversion of an array
    np.testing.assert_array_equal(np.stack(back["embedding"]), np.stack(frame["embedding"]))


def test_partition_on_writes_hive_folders_without_the_column(frame, tmp_path, client):
    DocumentDataset.from_pandas(frame, npartitions=2).to_parquet(str(tmp_path / "out"), partition_on="group")
    assert sorted(os.listdir(tmp_path / "out")) == ["group=0", "group=1", "group=2"]
    part = pd.read_parquet(tmp_path / "out" / "group=1" / "part.0.parquet")
    assert "group" not in part.columns and set(part["id"]) <= set(frame.loc[frame.group == 1, "id"])


def test_read_parquet_files_per_partition_filename_and_columns(frame, tmp_path, client):
    for i in range(4):
        frame.iloc[3 * i: 3 * i + 3].to_parquet(tmp_path / f"f{i}.parquet", index=False)
    (tmp_path / "_hidden.parquet").write_bytes(b"not parquet")  # skipped: hidden from readers
    ds = DocumentDataset.read_parquet(str(tmp_path), files_per_partition=2, add_filename=True, columns=["id"])
    assert ds.df.npartitions == 2
    out = ds.to_pandas()
    assert list(out.columns) == ["id", "file_name"] and out["file_name"].tolist()[:3] == ["f0.parquet"] * 3
    named = DocumentDataset.read_parquet([str(tmp_path / "f1.parquet")], add_filename="source").to_pandas()
    assert set(named["source"]) == {"f1.parquet"} and len(named) == 3
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DocumentDataset.read_parquet(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no parquet files in"):
        DocumentDataset.read_parquet(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="backend must be"):
        DocumentDataset.read_parquet(str(tmp_path / "f0.parquet"), backend="polars")
