"""Image reader and writer stages."""
from nemo_curator.stages.image.io.image_reader import ImageReaderStage
from nemo_curator.stages.image.io.image_writer import ImageWriterStage

__all__ = ["ImageReaderStage", "ImageWriterStage"]
