"""The stage API's ``Pipeline`` (NeMo Curator 1.x), run on Dask."""
from nemo_curator.pipeline.executors import (BaseExecutor, DaskExecutor, RayActorPoolExecutor, RayDataExecutor,
                                             XennaExecutor)
from nemo_curator.pipeline.pipeline import Pipeline, stage_timings

__all__ = ["BaseExecutor", "DaskExecutor", "Pipeline", "RayActorPoolExecutor", "RayDataExecutor", "XennaExecutor",
           "stage_timings"]
