"""``ImageAestheticFilterStage``: LAION's aesthetic score per image; keep ``score >= score_threshold``."""
from __future__ import annotations

from dataclasses import dataclass

from nemo_curator.image.model_dir import ModelDirAestheticClassifier, aesthetic_file
from nemo_curator.stages.image.filters.base import BaseFilterStage
from nemo_curator.utils.constants import AESTHETIC_COLUMN


@dataclass
class ImageAestheticFilterStage(BaseFilterStage):
    """Set ``aesthetic_score`` (AVA 1-10 scale; the LAION improved aesthetic predictor on the
    CLIP ViT-L/14 embedding) and keep the images with ``aesthetic_score >= score_threshold``.

    The default threshold 0.5 is 1.x's: it keeps nearly every image; 5, 6 and 6.5 are the usual
    cuts. Weights: ``model_dir/ttj/sac-logos-ava1-l14-linearMSE/model.safetensors`` (1.x layout),
    the same head as ``nemo_curator.image.classifiers.AestheticClassifier``: same scores.
    """

    name: str = "image_aesthetic_filter"  # the other fields and their defaults: BaseFilterStage's

    score_attribute = "aesthetic_score"
    model_name = "aesthetic"

    def classifier(self) -> ModelDirAestheticClassifier:
        return ModelDirAestheticClassifier(pred_column=AESTHETIC_COLUMN, batch_size=self.model_inference_batch_size,
                                           model_path=aesthetic_file(self.model_dir))

    def keep(self, score: float) -> bool:
        return score >= self.score_threshold


__all__ = ["ImageAestheticFilterStage"]
