"""ImageDuplicatesRemovalStage: images whose id is listed in the removal parquets are dropped."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nemo_curator.pipeline import Pipeline, stage_timings
from nemo_curator.stages.file_partitioning import FilePartitioningStage
from nemo_curator.stages.image.deduplication.removal import ImageDuplicatesRemovalStage
from nemo_curator.stages.image.io.image_reader import ImageReaderStage
from nemo_curator.tasks import ImageBatch, ImageObject
from nemo_curator.utils.sample_data import make_sample_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dedup_data")
    make_sample_dataset(folder, n_shards=2, samples_per_shard=4)
    return folder


def removal_dir(folder, ids_per_file: list[list[str]]):
    folder.mkdir(parents=True, exist_ok=True)
    for i, ids in enumerate(ids_per_file):
        pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "duplicate_of": pa.array(["x"] * len(ids))}),
                       folder / f"{i:05d}.parquet")
    return folder


def test_listed_ids_are_removed_in_a_pipeline(client, data, tmp_path):
    removal = removal_dir(tmp_path / "duplicates", [["000000001", "000000003"], ["000010000"], []])
    (removal / "nested").mkdir()
    pq.write_table(pa.table({"id": ["000010002"]}), removal / "nested" / "more.parquet")
    pq.write_table(pa.table({"other": pa.array([], pa.int64())}), removal / "empty_any_schema.parquet")
    results = Pipeline("dedup", stages=[
        FilePartitioningStage(file_paths=str(data), file_extensions=[".tar"]),
        ImageReaderStage(num_threads=1),
        ImageDuplicatesRemovalStage(removal_parquets_dir=str(removal), verbose=True),
    ]).run()
    kept = sorted(o.image_id for r in results for o in r.data)
    assert kept == ["000000000", "000000002", "000010001", "000010003"]
    assert stage_timings(results)["image_dedup_filter"].custom_metrics == {"kept": 4.0, "removed": 4.0}


def test_ids_compare_as_strings_and_the_field_is_configurable(tmp_path):
    folder = tmp_path / "ints"
    folder.mkdir()
    pq.write_table(pa.table({"image": pa.array([7, 9], pa.int64())}), folder / "a.parquet")
    stage = ImageDuplicatesRemovalStage(removal_parquets_dir=str(folder), duplicate_id_field="image")
    batch = ImageBatch(dataset_name="d", data=[ImageObject(image_id=str(i)) for i in range(10)])
    assert [o.image_id for o in stage.process(batch).data] == ["0", "1", "2", "3", "4", "5", "6", "8"]
    with pytest.raises(KeyError, match="no column 'id'"):
        ImageDuplicatesRemovalStage(removal_parquets_dir=str(folder)).process(batch)


def test_a_wrong_folder_fails_before_anything_runs(client, data, tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "nope", "does not exist"), (tmp_path / "empty", "no parquet files")):
        pipeline = Pipeline("dedup", stages=[FilePartitioningStage(file_paths=str(data), file_extensions=[".tar"]),
                                             ImageReaderStage(num_threads=1),
                                             ImageDuplicatesRemovalStage(removal_parquets_dir=str(folder))])
        with pytest.raises(FileNotFoundError, match=message):
            pipeline.run()
