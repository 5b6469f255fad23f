"""``ImageNSFWFilterStage``: LAION's NSFW probability per image; keep ``score < score_threshold``."""
from __future__ import annotations

from dataclasses import dataclass

from nemo_curator.image.classifiers import NsfwClassifier
from nemo_curator.image.model_dir import nsfw_file
from nemo_curator.stages.image.filters.base import BaseFilterStage
from nemo_curator.utils.constants import NSFW_COLUMN


@dataclass
class ImageNSFWFilterStage(BaseFilterStage):
    """Set ``nsfw_score`` (probability in [0, 1]; LAION's CLIP-based NSFW detector on the CLIP
    ViT-L/14 embedding) and keep the images with ``nsfw_score < score_threshold``.

    Weights: ``model_dir/laion/clip-autokeras-binary-nsfw/clip_autokeras_binary_nsfw.pth`` (1.x
    layout), the same head as ``nemo_curator.image.classifiers.NsfwClassifier``: same scores.
    ``weights_path`` is accepted for 1.x compatibility (1.x ignores it too).
    """

    weights_path: str | None = None
    name: str = "image_nsfw_filter"

    score_attribute = "nsfw_score"
    model_name = "nsfw"
    fingerprint_excludes = BaseFilterStage.fingerprint_excludes + ("weights_path",)

    def classifier(self) -> NsfwClassifier:
        return NsfwClassifier(pred_column=NSFW_COLUMN, batch_size=self.model_inference_batch_size,
                              model_path=nsfw_file(self.model_dir))

    def keep(self, score: float) -> bool:
        return score < self.score_threshold


__all__ = ["ImageNSFWFilterStage"]
