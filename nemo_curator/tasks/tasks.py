"""``Task``: what flows between the stages of a ``Pipeline`` (NeMo Curator 1.x's task model).

A task is a batch of data of one modality (``data``) with the per-stage timings it gathered on
its way (``_stage_perf``) and free-form metadata (``_metadata``). Tasks are plain dataclasses:
they travel between Dask processes by pickle.
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Generic, Iterable, TypeVar

T = TypeVar("T")


@dataclass
class StagePerfStats:
    """Time one stage spent on the items of one task.

    Attributes:
        stage_name: the stage's ``name``.
        process_time: seconds of worker time in the stage for these items (its own time: the
            stages before it in the same Dask task are not counted).
        actor_idle_time: always 0 here (1.x's Ray actors wait between tasks; Dask tasks do not).
        input_data_size_mb: 0 here (kept for 1.x compatibility).
        num_items_processed: items (images, files) the stage emitted for this task.
        custom_metrics: stage-specific counts (e.g. ``decode_failed``, ``filtered``).
    """

    stage_name: str
    process_time: float = 0.0
    actor_idle_time: float = 0.0
    input_data_size_mb: float = 0.0
    num_items_processed: int = 0
    custom_metrics: dict[str, float] = field(default_factory=dict)

    def __add__(self, other: "StagePerfStats") -> "StagePerfStats":
        keys = set(self.custom_metrics) | set(other.custom_metrics)
        return StagePerfStats(
            stage_name=self.stage_name,
            process_time=self.process_time + other.process_time,
            actor_idle_time=self.actor_idle_time + other.actor_idle_time,
            input_data_size_mb=self.input_data_size_mb + other.input_data_size_mb,
            num_items_processed=self.num_items_processed + other.num_items_processed,
            custom_metrics={k: self.custom_metrics.get(k, 0.0) + other.custom_metrics.get(k, 0.0) for k in keys},
        )

    def __radd__(self, other):
        if other == 0:
            return self
        if not isinstance(other, StagePerfStats):
            raise TypeError(f"cannot add {type(other).__name__} to StagePerfStats")
        return self.__add__(other)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "StagePerfStats":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def items(self) -> list[tuple[str, float]]:
        """``(metric, value)`` pairs, custom metrics as ``custom.<name>`` (as 1.x gives them)."""
        out = self.to_dict()
        out.pop("stage_name")
        custom = out.pop("custom_metrics")
        out.update({f"custom.{k}": v for k, v in custom.items()})
        return list(out.items())


def sum_stage_perf(perfs: Iterable[StagePerfStats]) -> list[StagePerfStats]:
    """Per-stage totals of ``perfs``, one ``StagePerfStats`` per stage name, in first-seen order."""
    totals: dict[str, StagePerfStats] = {}
    for perf in perfs:
        totals[perf.stage_name] = totals[perf.stage_name] + perf if perf.stage_name in totals else \
            dataclasses.replace(perf, custom_metrics=dict(perf.custom_metrics))
    return list(totals.values())


@dataclass
class Task(ABC, Generic[T]):
    """A batch of data flowing through the stages of a pipeline.

    Attributes:
        dataset_name: name of the dataset this task belongs to.
        data: the payload (modality-specific).
        _stage_perf: per-stage timings (``StagePerfStats``) gathered so far, in stage order.
        _metadata: free-form metadata carried alongside the task.
        task_id: an identifier the executor assigns (``"<group>_<i>"``); settable for 1.0-style code.
    """

    dataset_name: str
    data: T
    _stage_perf: list[StagePerfStats] = field(default_factory=list)
    _metadata: dict[str, Any] = field(default_factory=dict)
    task_id: str = ""

    def __post_init__(self) -> None:
        self.validate()

    @property
    @abstractmethod
    def num_items(self) -> int:
        """The number of items (images, files) in this task."""

    @abstractmethod
    def validate(self) -> bool:
        """Check the task's data; True when it is usable."""

    def add_stage_perf(self, perf_stats: StagePerfStats) -> None:
        self._stage_perf.append(perf_stats)

    def stage_perf_totals(self) -> dict[str, StagePerfStats]:
        """``{stage name: StagePerfStats}`` of this task, summed per stage."""
        return {p.stage_name: p for p in sum_stage_perf(self._stage_perf)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task_id={self.task_id!r}, dataset_name={self.dataset_name!r}, items={self.num_items})"


@dataclass
class EmptyTask(Task[None]):
    """The task a pipeline starts from when no initial tasks are given (id ``"0"``)."""

    dataset_name: str = "empty"
    data: None = None
    task_id: str = "0"

    @property
    def num_items(self) -> int:
        return 0

    def validate(self) -> bool:
        return True
