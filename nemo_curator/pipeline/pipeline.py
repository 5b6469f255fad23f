"""``Pipeline``: stages composed by the user and run by an executor (NeMo Curator 1.x's API).

    pipeline = Pipeline(name="aesthetic_filtering")
    pipeline.add_stage(FilePartitioningStage(file_paths="/data/shards", files_per_partition=1,
                                             file_extensions=[".tar"]))
    pipeline.add_stage(ImageReaderStage(dali_batch_size=100))
    pipeline.add_stage(ImageEmbeddingStage(model_dir="/models"))
    pipeline.add_stage(ImageAestheticFilterStage(model_dir="/models", score_threshold=5.0))
    results = pipeline.run()          # on the connected Dask client, else a new local cluster

See ``nemo_curator.pipeline.executors`` for how it runs on Dask and docs/stages.md for the stages.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

from nemo_curator.pipeline.executors import BaseExecutor, DaskExecutor
from nemo_curator.stages.base import CompositeStage, ProcessingStage
from nemo_curator.tasks import StagePerfStats, Task, sum_stage_perf

logger = logging.getLogger(__name__)


class Pipeline:
    """An ordered list of stages.

    Args:
        name: the pipeline's name (progress bar, logs, run summary).
        description: free text (``describe()``).
        stages: initial stages.
        config: executor settings used when ``run`` builds the executor (``DaskExecutor``'s
            ``config``: ``return_image_data``, ``show_progress``, ``resume``).
    """

    def __init__(self, name: str, description: str | None = None, stages: Sequence[ProcessingStage] | None = None,
                 config: dict[str, Any] | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name
        self.description = description
        self.stages: list[ProcessingStage] = []
        self.config = dict(config or {})
        for stage in stages or []:
            self.add_stage(stage)

    def add_stage(self, stage: ProcessingStage) -> "Pipeline":
        """Append a stage; returns the pipeline (for chaining)."""
        if not isinstance(stage, ProcessingStage):
            raise TypeError(f"add_stage() takes a ProcessingStage (e.g. ImageReaderStage(...)), got "
                            f"{type(stage).__name__}")
        self.stages.append(stage)
        logger.debug("added stage %r to pipeline %r", stage.name, self.name)
        return self

    def build(self) -> list[ProcessingStage]:
        """The stages to execute: composite stages replaced by the stages they stand for."""
        if not self.stages:
            raise ValueError(f"pipeline {self.name!r} has no stages: add_stage() at least one")
        out: list[ProcessingStage] = []
        for stage in self.stages:
            if isinstance(stage, CompositeStage):
                parts = stage.decompose()
                if any(isinstance(p, CompositeStage) for p in parts):
                    raise TypeError(f"composite stage {stage.name!r} decomposes into another composite stage: "
                                    f"nesting is not supported")
                out.extend(parts)
            else:
                out.append(stage)
        return out

    def run(self, executor: BaseExecutor | None = None, initial_tasks: Sequence[Task] | None = None) -> list[Task]:
        """Run the stages and return the last stage's output tasks (a list).

        ``executor`` None (default): ``DaskExecutor(config=self.config)`` on the Dask client
        connected in this process, else on a new local cluster. NeMo Curator 1.x's executors
        (``XennaExecutor()``, ...) run on Dask too, with a warning. ``initial_tasks``: the tasks
        the first stage receives (default one ``EmptyTask``).
        """
        if executor is None:
            executor = DaskExecutor(config=self.config)
        elif isinstance(executor, type) and issubclass(executor, BaseExecutor):
            executor = executor(self.config)
        if not isinstance(executor, BaseExecutor):
            raise TypeError(f"executor must be a nemo_curator.pipeline executor (or None: Dask), got "
                            f"{type(executor).__name__}: leave executor=None to run on Dask")
        stages = self.build()
        if isinstance(executor, DaskExecutor):
            return executor.execute(stages, initial_tasks, pipeline_name=self.name)
        return executor.execute(stages, initial_tasks)

    def describe(self) -> str:
        """A description of the stages: resources, batch size, inputs and outputs."""
        lines = [f"Pipeline: {self.name}", f"Description: {self.description or 'No description provided'}",
                 f"Stages: {len(self.stages)}", ""]
        for i, stage in enumerate(self.stages, start=1):
            lines.append(f"Stage {i}: {stage.name} ({type(stage).__name__})")
            res = stage.resources
            lines.append(f"  Resources: {res.cpus} CPUs" + (f", {res.gpus} GPUs" if res.requires_gpu else ""))
            lines.append(f"  Batch size: {stage.batch_size}")
            for label, (attrs, data) in (("Inputs", stage.inputs()), ("Outputs", stage.outputs())):
                if attrs or data:
                    lines.append(f"  {label}: {', '.join(attrs + data)}")
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        stages = ", ".join(f"{s.name}({type(s).__name__})" for s in self.stages)
        return f"Pipeline(name={self.name!r}, stages=[{stages}])"


def stage_timings(tasks: Sequence[Task]) -> dict[str, StagePerfStats]:
    """``{stage name: StagePerfStats}`` summed over ``tasks`` (what ``Pipeline.run`` returned):
    each stage's worker seconds, items and custom metrics for the whole run."""
    totals: dict[str, StagePerfStats] = {}
    for task in tasks:
        for perf in sum_stage_perf(task._stage_perf):
            totals[perf.stage_name] = totals[perf.stage_name] + perf if perf.stage_name in totals else perf
    return totals
