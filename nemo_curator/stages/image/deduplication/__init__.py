"""Image deduplication stages."""
from nemo_curator.stages.image.deduplication.removal import ImageDuplicatesRemovalStage

__all__ = ["ImageDuplicatesRemovalStage"]
