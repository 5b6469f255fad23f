"""The stage API of NeMo Curator 1.x (``ProcessingStage`` and the image stages), run on Dask."""
from nemo_curator.stages.base import CompositeStage, NodeInfo, ProcessingStage, WorkerMetadata
from nemo_curator.stages.resources import Resources

__all__ = ["CompositeStage", "NodeInfo", "ProcessingStage", "Resources", "WorkerMetadata"]
