"""LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor, Apache-2.0).

An MLP over L2-normalised CLIP ViT-L/14 image embeddings (768-d), trained on SAC + LAION-Logos +
AVA ratings: scores on the AVA 1-10 scale (most photos fall between 4 and 7).
"""
from __future__ import annotations

import os

from torch import nn

from nemo_curator.image.classifiers.base import PretrainedHeadClassifier, state_dict_shapes
from nemo_curator.utils.download import WeightsSpec


class AestheticMLP(nn.Module):
    """(N, 768) embeddings -> (N, 1) aesthetic score. Layers as in the original (no activations)."""

    def __init__(self, embedding_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embedding_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


AESTHETIC_WEIGHTS = WeightsSpec(
    name="aesthetic",
    description="LAION improved aesthetic predictor (ViT-L/14)",
    url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
    filename="sac+logos+ava1-l14-linearMSE.pth",
    sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
    shapes=state_dict_shapes(AestheticMLP),
)


class AestheticClassifier(PretrainedHeadClassifier):
    """Aesthetic score (float32, AVA 1-10 scale; common thresholds 5, 6, 6.5) per row.

    Args:
        embedding_column: column of 768-d L2-normalised CLIP ViT-L/14 image embeddings.
        pred_column: the column the scores go to.
        batch_size: rows per forward pass; -1 scores a whole partition at once.
        model_path: a local copy of ``sac+logos+ava1-l14-linearMSE.pth``; None downloads it once
            into ``$NEMO_CURATOR_HOME/weights`` (on the worker, when first needed).
    """

    weights = AESTHETIC_WEIGHTS
    module_class = AestheticMLP
    embedding_size = 768

    def __init__(self, embedding_column: str = "image_embedding", pred_column: str = "aesthetic_score",
                 batch_size: int = -1, model_path: str | os.PathLike | None = None):
        super().__init__("sac+logos+ava1-l14-linearMSE", embedding_column, pred_column, batch_size, model_path)
