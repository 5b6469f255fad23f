from nemo_curator.image.embedders.base import ImageEmbedder
from nemo_curator.image.embedders.timm import TimmImageEmbedder

__all__ = ["ImageEmbedder", "TimmImageEmbedder"]
