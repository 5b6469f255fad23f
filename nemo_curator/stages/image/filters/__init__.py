"""Image filter stages."""
from nemo_curator.stages.image.filters.aesthetic_filter import ImageAestheticFilterStage
from nemo_curator.stages.image.filters.base import BaseFilterStage
from nemo_curator.stages.image.filters.nsfw_filter import ImageNSFWFilterStage

__all__ = ["BaseFilterStage", "ImageAestheticFilterStage", "ImageNSFWFilterStage"]
