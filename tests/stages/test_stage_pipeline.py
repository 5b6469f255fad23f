"""The stage API's Pipeline on Dask: the docs' code as pasted (in a notebook-like namespace on the
session's cluster, and as a plain script with no cluster at all), the older reader spelling, GPU
shares as Dask resources, the 1.x executor names, timings, and no pixels back at the client."""
from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import numpy as np
import pytest

from nemo_curator.pipeline import DaskExecutor, Pipeline, XennaExecutor, stage_timings
from nemo_curator.pipeline.executors import called_from_unguarded_script, task_resources
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.file_partitioning import FilePartitioningStage
from nemo_curator.stages.image.embedders.clip_embedder import ImageEmbeddingStage
from nemo_curator.stages.image.io.image_reader import ImageReaderStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import EmptyTask, FileGroupTask, ImageBatch
from nemo_curator.utils.distributed_utils import cached_keys
from nemo_curator.utils.sample_data import make_sample_dataset
from stage_fixtures import issue_code, tiny_model_dir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tar_dataset")
    make_sample_dataset(folder, n_shards=3, samples_per_shard=4, image_formats=("jpg", "png", "webp"))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_checkpoint):
    return tiny_model_dir(tmp_path_factory.mktemp("models"), tiny_checkpoint)


def run_pasted(code: str) -> list:
    namespace = {"__name__": "__main__"}
    exec(compile(code, "<docs>", "exec"), namespace)  # noqa: S102 - the docs' own code
    return namespace["results"]


def test_the_docs_code_runs_as_pasted_on_the_connected_client(client, data, model_dir):
    results = run_pasted(issue_code(data, model_dir))
    assert all(isinstance(r, ImageBatch) for r in results)
    objects = [o for r in results for o in r.data]
    assert objects and all(o.aesthetic_score >= 0.5 for o in objects)  # the filter's cut: real heads score ~4-6
    assert all(o.embedding.shape == (768,) and abs(np.linalg.norm(o.embedding) - 1) < 1e-5 for o in objects)
    assert all(o.image_data is None for o in objects)  # no pixels brought to the client
    assert sorted(o.image_id for o in objects) == sorted(f"{s * 10000 + i:09d}" for s in range(3) for i in range(4))
    timings = stage_timings(results)
    assert list(timings) == ["file_partitioning", "image_reader", "image_embedding", "image_aesthetic_filter"]
    assert timings["image_reader"].num_items_processed == 12 and timings["image_embedding"].process_time > 0
    assert timings["image_aesthetic_filter"].custom_metrics["kept"] == len(objects)


def test_the_other_pages_batch_size_spelling_runs_too(client, data, model_dir):
    results = run_pasted(issue_code(data, model_dir, reader="pipeline.add_stage(ImageReaderStage(batch_size=100, "
                                                             "num_gpus_per_worker=0.25))"))
    assert sum(r.num_items for r in results) == 12
    # two runs, one CLIP model per worker process: cached under its whole configuration and weights
    keys = client.run(lambda: [k for k in cached_keys() if "_ClipEmbedder" in repr(k) and str(model_dir) in repr(k)])
    assert all(len(k) == 1 for k in keys.values()) and any(keys.values())
    assert all(("precision", "auto") in k[0] and ("device", "cpu") in k[0] for k in keys.values() if k)


def test_the_docs_code_runs_as_a_plain_script_without_a_cluster(tmp_path, data, model_dir):
    """Top level, no `if __name__ == "__main__":`, nothing connected: the workers are threads of the
    script (worker processes would run it again); the same script under the guard gets processes."""
    script = tmp_path / "aesthetic.py"
    script.write_text(issue_code(data, model_dir) + "print('kept', sum(r.num_items for r in results))\n"
                      "from distributed import get_client\nprint('processes', get_client().cluster.processes)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kept 12" in done.stdout and "processes False" in done.stdout
    assert "without `if __name__" in done.stderr


def test_unguarded_top_level_calls_are_told_apart_from_guarded_ones(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("from nemo_curator.pipeline.executors import called_from_unguarded_script as f\n"
                      "print('top', f())\n"
                      "def main():\n    print('in main', f())\n"
                      "if __name__ == '__main__':\n    print('guarded', f())\n    main()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:3] == ["top True", "guarded False", "in main False"], done.stderr
    assert called_from_unguarded_script() is False  # pytest's own main is guarded


class RecordResources(ProcessingStage[ImageBatch, ImageBatch]):
    """A user stage that records, on the worker, the Dask resources its task holds."""

    name = "record_resources"

    def __init__(self, gpus: float):
        self.resources = Resources(gpus=gpus)

    def process(self, task):
        from distributed import get_worker
        from distributed.worker import thread_state

        held = get_worker().state.tasks[thread_state.key].resource_restrictions
        task._metadata["resources"] = dict(held or {})
        return task


def test_gpu_shares_never_wait_for_a_gpu_no_worker_has(client, data, model_dir, caplog):
    pipeline = Pipeline("cpu_only")
    pipeline.add_stage(FilePartitioningStage(file_paths=str(data), file_extensions=[".tar"], limit=1))
    pipeline.add_stage(ImageReaderStage(num_gpus_per_worker=0.25, num_threads=1))
    pipeline.add_stage(RecordResources(gpus=0.5))
    with caplog.at_level(logging.INFO, logger="nemo_curator.pipeline.executors"):
        results = pipeline.run()
    assert results[0]._metadata["resources"] == {}
    lines = [r.getMessage() for r in caplog.records if "GPU" in r.getMessage()]
    assert len(lines) == 1 and "no worker of the cluster has a GPU" in lines[0]


def test_gpu_shares_are_dask_resources_where_workers_declare_gpus(data, model_dir):
    """A cluster whose worker declares GPU=1 (as `dask cuda worker --resources GPU=1` does): the
    chain's task holds the largest share of its stages, a fraction of the GPU."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, resources={"GPU": 1},
                      dashboard_address=":0") as cluster, Client(cluster, set_as_default=False) as gpu_client:
        assert task_resources(gpu_client, [ImageReaderStage(num_gpus_per_worker=0.25), RecordResources(0.5)]) == \
            {"GPU": 0.5}
        assert task_resources(gpu_client, [RecordResources(3)]) == {"GPU": 1}  # capped to what a worker has
        pipeline = Pipeline("gpu_share")
        pipeline.add_stage(FilePartitioningStage(file_paths=str(data), file_extensions=[".tar"]))
        pipeline.add_stage(ImageReaderStage(num_gpus_per_worker=0.25, num_threads=1))
        pipeline.add_stage(RecordResources(gpus=0.25))
        results = pipeline.run(DaskExecutor(client=gpu_client))
    assert [r._metadata["resources"] for r in results] == [{"GPU": 0.25}] * 3


def test_1x_executor_names_run_on_dask_with_one_warning(client, data):
    pipeline = Pipeline("files", stages=[FilePartitioningStage(file_paths=str(data), file_extensions=[".tar"]),
                                         ImageReaderStage(num_threads=1)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        executor = XennaExecutor(config={"logging_interval": 60})
    assert len(caught) == 1 and "runs NeMo Curator's stage API on Dask" in str(caught[0].message)
    assert "logging_interval" in str(caught[0].message)
    assert sum(r.num_items for r in pipeline.run(executor)) == 12
    with pytest.raises(TypeError, match="leave executor=None"):
        pipeline.run(executor="xenna")


def test_image_data_comes_back_only_when_asked(client, data):
    stages = [FilePartitioningStage(file_paths=str(data), file_extensions=[".tar"], limit=1),
              ImageReaderStage(dali_batch_size=3, num_threads=1)]
    default = Pipeline("pixels", stages=stages).run()
    assert [r.num_items for r in default] == [3, 1]
    assert all(o.image_data is None for r in default for o in r.data)
    asked = Pipeline("pixels", stages=stages, config={"return_image_data": True}).run()
    pictures = [o.image_data for r in asked for o in r.data]
    assert all(isinstance(p, np.ndarray) and p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3
               for p in pictures)


def test_stages_of_a_file_group_run_in_one_task_on_one_worker(client, data):
    class WhereAmI(ProcessingStage[ImageBatch, ImageBatch]):
        name = "where"

        def process(self, task):
            from distributed import get_worker
            from distributed.worker import thread_state

            task._metadata["where"] = (get_worker().address, thread_state.key)
            return task

    results = Pipeline("where", stages=[FilePartitioningStage(file_paths=str(data), file_extensions=[".tar"]),
                                        ImageReaderStage(dali_batch_size=2, num_threads=1), WhereAmI()]).run()
    by_group = {}
    for r in results:
        by_group.setdefault(r.task_id.rsplit("_", 1)[0], set()).add(r._metadata["where"])
    assert len(by_group) == 3 and all(len(places) == 1 for places in by_group.values())


def test_initial_tasks_and_argument_errors(client, data, tmp_path):
    tars = sorted(str(p) for p in data.glob("*.tar"))
    results = Pipeline("initial").add_stage(ImageReaderStage(num_threads=1)).run(
        initial_tasks=[FileGroupTask(dataset_name="d", data=tars[:2])])
    assert sum(r.num_items for r in results) == 8
    with pytest.raises(TypeError, match="ProcessingStage"):
        Pipeline("bad").add_stage("not a stage")
    with pytest.raises(ValueError, match="no stages"):
        Pipeline("empty").run()
    with pytest.raises(ValueError, match="name the same setting"):
        ImageReaderStage(dali_batch_size=10, batch_size=20)
    with pytest.raises(ValueError, match="positive integer"):
        ImageReaderStage(task_batch_size=0)
    with pytest.raises(ValueError, match="files_per_partition or blocksize"):
        FilePartitioningStage(file_paths=str(data), files_per_partition=1, blocksize="1MB")
    assert ImageReaderStage(task_batch_size=7).dali_batch_size == 7 and ImageReaderStage(batch_size=9).dali_batch_size == 9
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Pipeline("nothing", stages=[FilePartitioningStage(file_paths=str(empty), file_extensions=[".tar"]),
                                       ImageReaderStage()]).run() == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Pipeline("missing", stages=[FilePartitioningStage(file_paths=str(tmp_path / "nope"))]).run()


def test_file_partitioning_groups_like_1x(data, tmp_path):
    tars = sorted(str(p) for p in data.glob("*.tar"))
    (data / ".00009.tar.1234.tmp").write_bytes(b"")  # an interrupted write's temporary: never listed
    groups = FilePartitioningStage(file_paths=str(data), files_per_partition=2, file_extensions=[".tar"]).process(
        EmptyTask())
    assert [g.data for g in groups] == [tars[:2], tars[2:]]
    assert groups[1]._metadata == {"partition_index": 1, "total_partitions": 2, "source_files": tars[2:]}
    assert groups[0].dataset_name == data.name
    assert len(FilePartitioningStage(file_paths=str(data), file_extensions=[".tar"], limit=2).process(EmptyTask())) == 2
    by_size = FilePartitioningStage(file_paths=tars, blocksize=1, file_extensions=[".TAR"]).process(EmptyTask())
    assert sorted(p for g in by_size for p in g.data) == tars and all(len(g.data) == 1 for g in by_size)
    parquets = FilePartitioningStage(file_paths=str(data)).process(EmptyTask())  # 1.x's default extensions
    assert all(p.endswith(".parquet") for g in parquets for p in g.data)
    (data / ".00009.tar.1234.tmp").unlink()


def test_describe_and_stage_api():
    stage = ImageEmbeddingStage(model_dir="/m", num_gpus_per_worker=0.5)
    assert stage.resources.gpus == 0.5 and stage.name == "image_embedding"
    renamed = stage.with_(name="clip", batch_size=2)
    assert renamed.name == "clip" and renamed.batch_size == 2 and stage.name == "image_embedding"
    text = Pipeline("p", description="d", stages=[ImageReaderStage(), stage]).describe()
    assert "Stage 2: image_embedding (ImageEmbeddingStage)" in text and "0.5 GPUs" in text
    with pytest.raises(ValueError, match="num_gpus_per_worker"):
        ImageEmbeddingStage(num_gpus_per_worker=-1)
    with pytest.raises(ValueError, match="unknown executor config"):
        DaskExecutor(config={"retrun_image_data": True})
