"""``ImageObject`` and ``ImageBatch``: images with their metadata, embeddings and scores."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemo_curator.tasks.tasks import Task
from nemo_curator.utils.constants import OK


@dataclass
class ImageObject:
    """One image of a webdataset sample, with what the stages computed for it.

    Attributes:
        image_path: where the image bytes are: ``<tar path>/<member name>`` for a tar member
            (``tar_path`` says which tar), or a plain image file.
        image_id: the sample's webdataset key (the member name before its extension).
        metadata: the sample's row of the shard parquet (``<name>.parquet`` beside the tar, when
            there is one), plus ``"txt"`` (the ``.txt`` member, text) and ``"json"`` (the ``.json``
            member, parsed) where the sample has them and the parquet has no column of that name.
        image_data: the decoded picture, (H, W, 3) uint8 RGB: a numpy array on CPU workers, a
            CUDA torch tensor on GPU workers (decoded there, never copied to the host); None
            after a stage removed it, where the image failed, and in the tasks a pipeline returns
            (unless asked for: see ``DaskExecutor``).
        embedding: the L2-normalised CLIP ViT-L/14 image embedding, (768,) float32 numpy.
        aesthetic_score: AVA 1-10 scale (LAION improved aesthetic predictor).
        nsfw_score: probability in [0, 1] (LAION CLIP-based NSFW detector).
        status: ``"ok"``, ``"decode_failed"`` (the member exists but could not be decoded) or
            ``"missing_image"`` (a parquet row or a sample without an image member).
        error: the decoder's message for ``decode_failed``.
        tar_path: the tar holding the sample ("" for an image that is no tar member).
    """

    image_path: str = ""
    image_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    image_data: Any = None
    embedding: Any = None
    aesthetic_score: float | None = None
    nsfw_score: float | None = None
    status: str = OK
    error: str | None = None
    tar_path: str = ""


@dataclass
class ImageBatch(Task[list[ImageObject]]):
    """A batch of ``ImageObject`` (the reader emits ``dali_batch_size`` of them per batch)."""

    data: list[ImageObject] = field(default_factory=list)

    @property
    def num_items(self) -> int:
        return len(self.data)

    def validate(self) -> bool:
        if not isinstance(self.data, list):
            raise TypeError(f"ImageBatch.data must be a list of ImageObject, got {type(self.data).__name__}")
        return True
