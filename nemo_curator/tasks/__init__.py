"""The task types of the stage API (NeMo Curator 1.x): what flows between pipeline stages."""
from nemo_curator.tasks.file_group import FileGroupTask
from nemo_curator.tasks.image import ImageBatch, ImageObject
from nemo_curator.tasks.tasks import EmptyTask, StagePerfStats, Task, sum_stage_perf

__all__ = ["EmptyTask", "FileGroupTask", "ImageBatch", "ImageObject", "StagePerfStats", "Task", "sum_stage_perf"]
