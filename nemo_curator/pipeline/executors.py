"""Executors: how a ``Pipeline``'s stages run. ``DaskExecutor`` runs them on a Dask cluster.

Plan (on the client): the leading stages that plan work (``runs_on_client``:
``FilePartitioningStage``) run here and make the file groups. ``setup_on_node`` of every other
stage runs here once (weights are found, taken from the caches or downloaded into ``model_dir``
before anything is submitted: a missing file fails at once, with one error naming it).

Work (on the cluster): ONE Dask task per file group runs all the remaining stages on one worker,
streaming (each batch passes through every stage before the next batch is decoded), so decoded
images never cross the network and a worker holds one batch per stage at a time. Each worker
process sets each stage up once per run (``setup``: models come from the worker cache, loaded once
per worker and configuration) and keeps it for the run's other tasks.

GPUs: a stage's ``resources.gpus`` (``num_gpus_per_worker``) becomes the task's Dask resource
``GPU`` (the largest of the stages of the chain: they run one after the other in the task) where
the workers declare that resource (``dask worker --resources GPU=1``, ``dask cuda worker
--resources GPU=1``): a fraction lets that many tasks share a GPU, up to the worker's threads.
On a cluster whose workers declare no GPU resource the tasks are submitted without one (never
waiting for a resource no worker has), with one log line saying whether the workers have GPUs.

Results: the tasks of the last stage, in file-group order, each with ``_stage_perf`` (every
stage's own seconds and counts for it). ``image_data`` is removed on the worker before a task is
returned (a pipeline over a million images must not bring their pixels to the client) unless
``config={"return_image_data": True}`` (then as numpy arrays). A pipeline that ends in
``ImageWriterStage`` returns one ``FileGroupTask`` per file group, writes its run summary
(``_run_summary.json``) beside the shards and, run again over the same input, skips the file
groups already written (``nemo_curator.utils.shard_job``).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from typing import Any, Sequence

import dask

from nemo_curator.stages.base import NodeInfo, ProcessingStage, WorkerMetadata
from nemo_curator.tasks import EmptyTask, ImageBatch, StagePerfStats, Task
from nemo_curator.utils.device import cuda_device_count
from nemo_curator.utils.progress import compute_with_progress
from nemo_curator.utils.resume import fingerprint, identities, unidentified_weights
from nemo_curator.utils.shard_job import ShardWork, commit_shard, run_shard_job

logger = logging.getLogger(__name__)

CONFIG_KEYS = ("return_image_data", "show_progress", "resume")
DEFAULT_CONFIG = {"return_image_data": False, "show_progress": True, "resume": True}


class BaseExecutor(ABC):
    """Runs a list of stages over initial tasks and returns the last stage's output tasks."""

    def __init__(self, config: dict[str, Any] | None = None, ignore_head_node: bool = False):
        self.config = dict(config or {})
        self.ignore_head_node = ignore_head_node

    @abstractmethod
    def execute(self, stages: Sequence[ProcessingStage], initial_tasks: Sequence[Task] | None = None) -> list[Task]:
        """Run ``stages`` over ``initial_tasks`` (default ``[EmptyTask()]``)."""


class DaskExecutor(BaseExecutor):
    """Run a pipeline on Dask (see the module docstring for the model).

    Args:
        config: ``return_image_data`` (False: returned images carry no pixels), ``show_progress``
            (True: a progress bar per pipeline run), ``resume`` (True: a run that ends in a
            writer skips the file groups it already wrote).
        client: the ``distributed.Client`` to use; default the one connected in this process,
            else a new local cluster (``nemo_curator.get_client(cluster_type="auto")``: GPU workers
            when this machine has a GPU).
    """

    def __init__(self, config: dict[str, Any] | None = None, client=None, ignore_head_node: bool = False):
        super().__init__(config, ignore_head_node)
        unknown = sorted(set(self.config) - set(CONFIG_KEYS) - set(_IGNORED_1X_KEYS))
        if unknown:
            raise ValueError(f"unknown executor config keys {unknown}: DaskExecutor takes {list(CONFIG_KEYS)}")
        self.client = client

    def option(self, key: str):
        return self.config.get(key, DEFAULT_CONFIG[key])

    def execute(self, stages: Sequence[ProcessingStage], initial_tasks: Sequence[Task] | None = None,
                pipeline_name: str = "pipeline") -> list[Task]:
        stages = list(stages)
        if not stages:
            raise ValueError("the pipeline has no stages: add_stage() at least one")
        tasks: list[Task] = list(initial_tasks) if initial_tasks else [EmptyTask()]
        n_client = 0
        while n_client < len(stages) and getattr(stages[n_client], "runs_on_client", False):
            n_client += 1
        for stage in stages[:n_client]:
            tasks = _run_on_client(stage, tasks)
        chain = stages[n_client:]
        if not chain:
            return tasks
        if not tasks:
            logger.warning("%s: no input (the stages before %s produced no task): nothing to run", pipeline_name,
                           chain[0].name)
            return []
        for i, task in enumerate(tasks):
            task.task_id = task.task_id or str(i)
        for stage in chain:
            stage.setup_on_node(NodeInfo(node_id="client"), None)
        client = self.client or current_or_new_client(chain)
        resources = task_resources(client, chain)
        run = _Chain(chain, run_id=uuid.uuid4().hex, return_image_data=bool(self.option("return_image_data")))
        started = time.time()
        sink = chain[-1]
        with client.as_current():  # the progress and shard-job helpers compute on the current client
            if callable(getattr(sink, "resume_plan", None)) and callable(getattr(sink, "task_from_stats", None)):
                results = self._run_with_resume(run, tasks, resources, pipeline_name, started)
            else:
                results = self._run(run, tasks, resources, pipeline_name)
        _log_timings(pipeline_name, results, time.time() - started)
        return results

    def _submit(self, run: "_Chain", task: Task, resources: dict | None, commit: "_Commit | None" = None):
        with dask.annotate(resources=resources) if resources else _nothing():
            return dask.delayed(_run_chain, pure=False)(run, task, commit,
                                                        dask_key_name=f"stages-{task.task_id}-{uuid.uuid4().hex[:8]}")

    def _run(self, run: "_Chain", tasks: list[Task], resources, pipeline_name: str) -> list[Task]:
        delayed = [self._submit(run, task, resources) for task in tasks]
        outputs = compute_with_progress(delayed, desc=pipeline_name, unit="file group",
                                        show=bool(self.option("show_progress")))
        return [out for group in outputs for out in group]

    def _run_with_resume(self, run: "_Chain", tasks: list[Task], resources, pipeline_name: str,
                         started: float) -> list[Task]:
        sink = run.stages[-1]
        stage_prints = [stage.fingerprint() for stage in run.stages]
        if any(p.get("weights") is None for p in stage_prints):
            stage_prints.append({"unidentified": unidentified_weights()})  # random weights: never resumed
        job = fingerprint({"operation": "stage_pipeline", "version": 1, "stages": stage_prints})
        works = []
        for task in tasks:
            plan = sink.resume_plan(task)
            inputs = identities(plan.inputs)

            def make_task(task=task, plan=plan, inputs=inputs):
                return self._submit(run, task, resources, _Commit(plan.stats_path, job, inputs))

            works.append(ShardWork(plan.name, plan.stats_path, inputs, [], make_task))
        summary = run_shard_job(works, job, sink.output_dir, pipeline_name, resume=bool(self.option("resume")),
                                show_progress=bool(self.option("show_progress")), started=started,
                                pipeline=pipeline_name, stages=[s.name for s in run.stages],
                                images_per_tar=getattr(sink, "images_per_tar", None))
        skipped = summary["shards_skipped"]
        if skipped:
            logger.info("%s: %d of %d file groups were already written by this pipeline: skipped", pipeline_name,
                        skipped, len(works))
        return [sink.task_from_stats(stats, dataset_name=getattr(task, "dataset_name", "images"))
                for task, stats in zip(tasks, summary["shards"])]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------------------------------------
# 1.x executor names: they run on Dask here
_IGNORED_1X_KEYS = ("logging_interval", "ignore_failures", "max_workers_per_stage", "execution_mode",
                    "cpu_allocation_percentage", "autoscale_interval_s")


class _OneXExecutor(DaskExecutor):
    _backend = ""

    def __init__(self, config: dict[str, Any] | None = None, ignore_head_node: bool = False, **_ignored: Any):
        config = dict(config or {})
        ignored = sorted(k for k in config if k not in CONFIG_KEYS)
        warnings.warn(f"{type(self).__name__}: this toolkit runs NeMo Curator's stage API on Dask, not on "
                      f"{self._backend}; running on Dask (leave executor=None to say so)"
                      + (f"; config keys {ignored} have no Dask meaning and are ignored" if ignored else ""),
                      UserWarning, stacklevel=2)
        super().__init__({k: v for k, v in config.items() if k in CONFIG_KEYS}, ignore_head_node=ignore_head_node)


class XennaExecutor(_OneXExecutor):
    """NeMo Curator 1.x's default executor name: runs on Dask here, with a warning."""

    _backend = "Cosmos-Xenna/Ray"


class RayDataExecutor(_OneXExecutor):
    """NeMo Curator 1.x's Ray Data executor name: runs on Dask here, with a warning."""

    _backend = "Ray Data"


class RayActorPoolExecutor(_OneXExecutor):
    """NeMo Curator 1.x's Ray actor pool executor name: runs on Dask here, with a warning."""

    _backend = "Ray actor pools"


# ----------------------------------------------------------------------------------------------
# Client, resources
def current_or_new_client(stages: Sequence[ProcessingStage] = ()):
    """The Dask client connected in this process, else a new local cluster's (logged).

    From a script that calls this at its top level without ``if __name__ == "__main__":``
    (as the docs' snippets are written), Dask's worker processes would import the script again
    and run the pipeline in each of them: the cluster's workers are then threads of this process
    (one line says so); under the guard, in a notebook or at a prompt, worker processes
    (``get_client(cluster_type="auto")``).
    """
    try:
        from distributed import get_client as connected

        return connected()
    except ValueError:
        pass
    from nemo_curator.utils.distributed_utils import get_client

    if called_from_unguarded_script():
        from distributed import Client, LocalCluster

        gpus = cuda_device_count()
        shares = [s.resources.gpus for s in stages if getattr(s, "resources", None) and s.resources.gpus > 0]
        threads = max(1, round(1 / min(shares))) if gpus and shares else 1
        logger.warning("pipeline.run() is called at the top level of a script without `if __name__ == "
                       "\"__main__\":`: starting the Dask workers as %d thread(s) of this process (worker processes "
                       "would run the script again); put the code under that guard for worker processes", threads)
        cluster = LocalCluster(n_workers=1, threads_per_worker=threads, processes=False,
                               resources={"GPU": gpus} if gpus else None, dashboard_address=":0")
        return Client(cluster)
    client = get_client(cluster_type="auto")
    logger.info("started a local Dask cluster for the pipeline (%s); it stays up for later runs", client)
    return client


def called_from_unguarded_script() -> bool:
    """Whether the running ``__main__`` is a script file and this call comes from its top-level
    code outside an ``if __name__ == "__main__":`` block."""
    import ast
    import sys

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or not path or not os.path.isfile(path):
        return False
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:
        return False
    line = frame.f_lineno
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return False
    for node in tree.body:
        if isinstance(node, ast.If) and _is_main_guard(node.test) and node.lineno <= line <= (node.end_lineno or line):
            return False
    return True


def _is_main_guard(test) -> bool:
    import ast

    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


def task_resources(client, stages: Sequence[ProcessingStage]) -> dict[str, float] | None:
    """The Dask resources of one task of ``stages`` on ``client``'s cluster (see the module docstring)."""
    wanted = max((s.resources.gpus for s in stages if getattr(s, "resources", None)), default=0.0)
    if wanted <= 0:
        return None
    workers = client.scheduler_info(n_workers=-1)["workers"]
    declared = [float((w.get("resources") or {}).get("GPU", 0)) for w in workers.values()]
    if any(d > 0 for d in declared):
        amount = min(wanted, max(declared))
        if amount < wanted:
            logger.warning("the stages ask for %g GPU per task but no worker declares more than %g: asking for %g",
                           wanted, max(declared), amount)
        return {"GPU": amount}
    try:
        gpus = sum(client.run(cuda_device_count).values())
    except Exception:  # noqa: BLE001 - a worker that cannot answer counts as having none
        gpus = 0
    if gpus:
        logger.info("the workers see %d GPU(s) but declare no 'GPU' resource: the stages run on them one task per "
                    "worker thread, without the num_gpus_per_worker=%g share (start the workers with "
                    "`--resources GPU=1` to apply it)", gpus, wanted)
    else:
        logger.info("no worker of the cluster has a GPU: the stages run on the CPU (num_gpus_per_worker=%g does not "
                    "apply)", wanted)
    return None


# ----------------------------------------------------------------------------------------------
# On the client
def _run_on_client(stage: ProcessingStage, tasks: list[Task]) -> list[Task]:
    stage.setup_on_node(NodeInfo(node_id="client"), None)
    stage.setup(None)
    try:
        started = time.perf_counter()
        out = list(stage.process_stream(tasks))
        seconds = time.perf_counter() - started
    finally:
        stage.teardown()
    metrics = stage._consume_custom_metrics()
    for task in out:
        task.add_stage_perf(StagePerfStats(stage.name, process_time=seconds / max(len(out), 1),
                                           num_items_processed=task.num_items, custom_metrics=dict(metrics)))
    return out


def _log_timings(name: str, results: list[Task], seconds: float) -> None:
    totals: dict[str, StagePerfStats] = {}
    for task in results:
        for stage, perf in task.stage_perf_totals().items():
            totals[stage] = totals[stage] + perf if stage in totals else perf
    parts = [f"{stage} {perf.process_time:.2f} s" for stage, perf in totals.items()]
    logger.info("%s: %d output tasks in %.1f s; worker time per stage: %s", name, len(results), seconds,
                ", ".join(parts) or "none")


# ----------------------------------------------------------------------------------------------
# On the workers
class _Chain:
    """The stages of one run, as the Dask tasks receive them (settings only)."""

    def __init__(self, stages: Sequence[ProcessingStage], run_id: str, return_image_data: bool):
        self.stages = list(stages)
        self.run_id = run_id
        self.return_image_data = return_image_data


class _Commit:
    """For a pipeline that ends in a writer: write the group's stats with the completion marker."""

    def __init__(self, stats_path: str, job: str, inputs: dict):
        self.stats_path, self.job, self.inputs = stats_path, job, inputs

    def __call__(self, outputs: list[Task]) -> dict:
        if len(outputs) != 1:
            raise RuntimeError(f"the writer emitted {len(outputs)} tasks for one file group; expected 1")
        out = outputs[0]
        stats = dict(out._metadata.get("writer_stats") or {})
        stats["stage_perf"] = [p.to_dict() for p in out._stage_perf]
        written = stats.get("tars", []) + stats.get("parquets", []) + stats.get("index_files", [])
        return commit_shard(stats, self.stats_path, self.job, self.inputs, written)


_SETUP_LOCK = threading.Lock()
_SET_UP: dict[str, Any] = {"run": None, "stages": {}, "locks": {}}  # this process's set-up stages of the current run


def clear_stage_cache() -> None:
    """Forget the set-up stages of this worker process (their ``teardown`` is called); the models
    stay in ``load_object_on_worker``'s cache (``clear_worker_cache`` frees them)."""
    with _SETUP_LOCK:
        stages = list(_SET_UP["stages"].values())
        _SET_UP.update(run=None, stages={}, locks={})
    for stage in stages:
        try:
            stage.teardown()
        except Exception:  # noqa: BLE001 - teardown of a finished run must not fail the next one
            logger.exception("teardown of %s failed", stage)


def _set_up(run: _Chain, index: int) -> ProcessingStage:
    """Stage ``index`` of ``run``, set up once per worker process and run."""
    with _SETUP_LOCK:
        if _SET_UP["run"] != run.run_id:
            previous = list(_SET_UP["stages"].values())
            _SET_UP.update(run=run.run_id, stages={}, locks={})
        else:
            previous = []
        lock = _SET_UP["locks"].setdefault(index, threading.Lock())
    for stage in previous:  # the stages of an earlier run: 1.x tears its actors down at the end of a run
        try:
            stage.teardown()
        except Exception:  # noqa: BLE001
            logger.exception("teardown of %s failed", stage)
    with lock:
        stage = _SET_UP["stages"].get(index)
        if stage is None:
            stage = run.stages[index]
            worker = _worker_metadata()
            stage.setup_on_node(NodeInfo(node_id=socket.gethostname()), worker)
            stage.setup(worker)
            with _SETUP_LOCK:
                if _SET_UP["run"] == run.run_id:
                    _SET_UP["stages"][index] = stage
        return stage


def _worker_metadata() -> WorkerMetadata:
    try:
        from distributed import get_worker

        return WorkerMetadata(worker_id=get_worker().address)
    except ValueError:
        return WorkerMetadata(worker_id=f"pid-{os.getpid()}")


class _TimedStage:
    """A stage's output stream, recording for each output the stage's own seconds (the time its
    generator ran, less the time spent in the stages before it) and its custom metrics."""

    def __init__(self, stage: ProcessingStage, upstream, upstream_timer: "_TimedStage | None"):
        self.stage = stage
        self.upstream_timer = upstream_timer
        self.inclusive = 0.0
        self._last_inclusive = 0.0
        self._last_upstream = 0.0
        self._stream = iter(stage.process_stream(upstream))

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            out = next(self._stream)
        finally:
            self.inclusive += time.perf_counter() - started
        upstream = self.upstream_timer.inclusive if self.upstream_timer else 0.0
        own = (self.inclusive - self._last_inclusive) - (upstream - self._last_upstream)
        self._last_inclusive, self._last_upstream = self.inclusive, upstream
        out.add_stage_perf(StagePerfStats(self.stage.name, process_time=max(own, 0.0),
                                          num_items_processed=out.num_items,
                                          custom_metrics=self.stage._consume_custom_metrics()))
        return out


def _run_chain(run: _Chain, task: Task, commit: _Commit | None):
    """The Dask task of one file group: every stage of ``run`` over ``task``, streaming."""
    stream, timer = iter([task]), None
    for index in range(len(run.stages)):
        timer = _TimedStage(_set_up(run, index), stream, timer)
        stream = timer
    outputs = [_for_the_client(out, run.return_image_data) for out in stream]
    return commit(outputs) if commit is not None else outputs


def _for_the_client(task: Task, keep_pixels: bool) -> Task:
    """A task as it leaves the worker: no pixels unless asked (then numpy, not CUDA tensors)."""
    if isinstance(task, ImageBatch):
        for obj in task.data:
            if obj.image_data is None:
                continue
            if not keep_pixels:
                obj.image_data = None
            elif hasattr(obj.image_data, "cpu"):
                obj.image_data = obj.image_data.cpu().numpy()
    return task
