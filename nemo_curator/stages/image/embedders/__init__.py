"""Image embedding stages."""
from nemo_curator.stages.image.embedders.clip_embedder import ImageEmbeddingStage

__all__ = ["ImageEmbeddingStage"]
