"""``ProcessingStage``: one step of a ``Pipeline`` (NeMo Curator 1.x's stage API), run on Dask.

A stage turns input tasks into output tasks: ``process(task)`` returns a task, a list of tasks,
or None (the task is dropped). The Dask executor runs every stage of one file group in ONE Dask
task, streaming: ``process_stream`` hands each output of one stage to the next before the first
asks for more, so at most one batch of decoded images per stage is in memory at a time. A stage
that needs the whole stream of a file group (the writer packs tars across batches) overrides
``process_stream``.

Lifecycle on a Dask worker: the stage object arrives with its settings only; ``setup_on_node``
then ``setup`` run once per worker process and stage configuration (the set-up object is cached
there, see ``nemo_curator.pipeline.executors.clear_stage_cache``), and it then runs the tasks of
all the worker's threads: keep per-task state in local variables, not on ``self``. Models are
loaded through ``nemo_curator.utils.distributed_utils.load_object_on_worker`` (once per worker,
keyed by their whole configuration). ``setup_on_node`` also runs on the client before anything is
submitted, so that missing weights fail at once, with one clear error.
"""
from __future__ import annotations

import copy
import dataclasses
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Iterable, Iterator, TypeVar

from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import Task

X = TypeVar("X", bound=Task)
Y = TypeVar("Y", bound=Task)

_METRICS = threading.local()  # per thread: {id(stage): {metric: value}} (stage objects are shared by threads)


@dataclass
class NodeInfo:
    """Where ``setup_on_node`` runs: ``node_id`` is the host name ("client" on the client)."""

    node_id: str = ""


@dataclass
class WorkerMetadata:
    """The worker a stage is set up on: its Dask address; ``allocation`` is unused on Dask."""

    worker_id: str = ""
    allocation: Any = None


class ProcessingStage(ABC, Generic[X, Y]):
    """Base class of all stages.

    Class attributes (override them in a subclass, or per instance with ``with_``):
        name: the stage's name (in timings and logs).
        resources: ``Resources`` one task of the stage needs (``gpus`` becomes a Dask resource).
        batch_size: tasks per ``process_batch`` call (1: ``process`` is called per task).
        runs_on_client: the stage plans work (lists files) and runs on the client, before any
            Dask task: ``FilePartitioningStage``.
        fingerprint_excludes: dataclass fields that do not change a stage's outputs (left out of
            the resume fingerprint, see ``fingerprint``).
    """

    name: ClassVar[str] = "ProcessingStage"
    resources: ClassVar[Resources] = Resources(cpus=1.0)
    batch_size: ClassVar[int] = 1
    runs_on_client: ClassVar[bool] = False
    fingerprint_excludes: ClassVar[tuple[str, ...]] = ("name", "verbose", "num_gpus_per_worker", "num_threads")

    # -- the work ---------------------------------------------------------------------------------
    @abstractmethod
    def process(self, task: X) -> Y | list[Y] | None:
        """Process one task: a task (1 to 1), a list of tasks (1 to many), or None (dropped)."""

    def process_batch(self, tasks: list[X]) -> list[Y]:
        """Process ``batch_size`` tasks at once; the default calls ``process`` on each."""
        out: list[Y] = []
        for task in tasks:
            out.extend(_as_list(self.process(task)))
        return out

    def process_stream(self, tasks: Iterable[X]) -> Iterator[Y]:
        """The outputs of this stage for a stream of input tasks, produced lazily.

        The default groups ``batch_size`` tasks for ``process_batch`` (when the stage overrides
        it) or calls ``process`` per task. Override it for work across tasks (the writer)."""
        if self.supports_batch_processing() and self.batch_size > 1:
            pending: list[X] = []
            for task in tasks:
                pending.append(task)
                if len(pending) == self.batch_size:
                    yield from self.process_batch(pending)
                    pending = []
            if pending:
                yield from self.process_batch(pending)
            return
        for task in tasks:
            yield from _as_list(self.process(task))

    def supports_batch_processing(self) -> bool:
        return type(self).process_batch is not ProcessingStage.process_batch

    # -- lifecycle --------------------------------------------------------------------------------
    def setup_on_node(self, node_info: NodeInfo | None = None, worker_metadata: WorkerMetadata | None = None) -> None:
        """Prepare the machine (download weights into ``model_dir``); runs on the client first,
        then once per worker process before its first task. Must be safe to run concurrently."""

    def setup(self, worker_metadata: WorkerMetadata | None = None) -> None:
        """Prepare this stage object (load models) once per worker process."""

    def teardown(self) -> None:
        """Release what ``setup`` took; runs on the client-side stages after a run (worker-side
        stages stay set up, with their models, for the next run)."""

    # -- description ------------------------------------------------------------------------------
    def inputs(self) -> tuple[list[str], list[str]]:
        """(task attributes, data attributes) this stage reads."""
        return [], []

    def outputs(self) -> tuple[list[str], list[str]]:
        """(task attributes, data attributes) this stage writes."""
        return [], []

    def num_workers(self) -> int | None:
        return None

    def xenna_stage_spec(self) -> dict[str, Any]:
        return {}

    def ray_stage_spec(self) -> dict[str, Any]:
        return {}

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "resources": self.resources, "batch_size": self.batch_size,
                "supports_batch_processing": self.supports_batch_processing()}

    def weights_identity(self) -> dict | None:
        """What identifies the weights this stage reads (file sizes and mtimes), or None for
        weights without one (random): outputs of such a run are never resumed by another."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes this stage's outputs: its class, its dataclass fields but
        ``fingerprint_excludes``, and ``weights_identity()``. Written outputs are resumed only by
        a pipeline whose stages have the same fingerprints."""
        cls = type(self)
        fields = {}
        if dataclasses.is_dataclass(self):
            fields = {f.name: repr(getattr(self, f.name)) for f in dataclasses.fields(self)
                      if f.name not in self.fingerprint_excludes}
        return {"class": f"{cls.__module__}.{cls.__qualname__}", "fields": fields, "weights": self.weights_identity()}

    def with_(self, name: str | None = None, resources: Resources | None = None, batch_size: int | None = None,
              **_ignored: Any) -> "ProcessingStage":
        """A copy of this stage with another name, resources or batch size (1.x's ``with_``; its
        Ray- and Xenna-specific arguments are accepted and ignored)."""
        new = copy.deepcopy(self)
        if name is not None:
            new.name = name
        if resources is not None:
            new.resources = resources
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
            new.batch_size = batch_size
        return new

    # -- per-task metrics -------------------------------------------------------------------------
    def _log_metrics(self, metrics: dict[str, float]) -> None:
        """Record counts for the task being produced; they are attached to its ``StagePerfStats``."""
        store = _METRICS.__dict__.setdefault("by_stage", {}).setdefault(id(self), {})
        for key, value in metrics.items():
            store[key] = store.get(key, 0.0) + float(value)

    def _consume_custom_metrics(self) -> dict[str, float]:
        return _METRICS.__dict__.setdefault("by_stage", {}).pop(id(self), {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class CompositeStage(ProcessingStage[X, Y], ABC):
    """A stage that stands for several: ``Pipeline.build`` replaces it by ``decompose()``."""

    @abstractmethod
    def decompose(self) -> list[ProcessingStage]:
        """The stages this one stands for, in order."""

    def process(self, task: X) -> Y | list[Y] | None:
        raise RuntimeError(f"composite stage {self.name!r} is decomposed by Pipeline.build() and never runs itself")


def _as_list(result) -> list:
    if result is None:
        return []
    return list(result) if isinstance(result, list) else [result]
