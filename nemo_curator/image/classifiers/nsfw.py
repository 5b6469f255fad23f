"""LAION CLIP-based NSFW detector for ViT-L/14 (LAION-AI/CLIP-based-NSFW-Detector, MIT).

The original is a Keras (autokeras) model; this is the PyTorch layout of the community port: a
feature normalisation followed by an MLP with a sigmoid, giving a probability in [0, 1].
"""
from __future__ import annotations

import os

import torch
from torch import nn

from nemo_curator.image.classifiers.base import PretrainedHeadClassifier, state_dict_shapes
from nemo_curator.utils.download import WeightsSpec


class Normalization(nn.Module):
    """Keras ``Normalization``: (x - mean) / sqrt(variance), per feature; buffers of shape (D,)."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("variance", torch.ones(size))

    def forward(self, x):
        return (x - self.mean) / self.variance.sqrt()


class NsfwMLP(nn.Module):
    """(N, 768) embeddings -> (N, 1) NSFW probability: norm, 64, 512, 256 (ReLU), 1 (sigmoid)."""

    def __init__(self, embedding_size: int = 768):
        super().__init__()
        self.norm = Normalization(embedding_size)
        self.linear_1 = nn.Linear(embedding_size, 64)
        self.linear_2 = nn.Linear(64, 512)
        self.linear_3 = nn.Linear(512, 256)
        self.linear_4 = nn.Linear(256, 1)

    def forward(self, x):
        x = self.norm(x)
        for layer in (self.linear_1, self.linear_2, self.linear_3):
            x = torch.relu(layer(x))
        return torch.sigmoid(self.linear_4(x))


NSFW_WEIGHTS = WeightsSpec(
    name="nsfw",
    description="LAION CLIP-based NSFW detector (ViT-L/14)",
    url="https://github.com/LAION-AI/CLIP-based-NSFW-Detector/files/10250461/clip_autokeras_binary_nsfw.zip",
    filename="clip_autokeras_binary_nsfw.pth",
    sha256="16914bb77739553a819864dd8146f03f8a5c3fe7af93cc68b2e96dcdb9cc81f9",
    shapes=state_dict_shapes(NsfwMLP),
    archive_member="clip_autokeras_binary_nsfw.pth",
)


class NsfwClassifier(PretrainedHeadClassifier):
    """NSFW probability (float32 in [0, 1]; common threshold 0.5: keep rows below it) per row.

    Args:
        embedding_column: column of 768-d L2-normalised CLIP ViT-L/14 image embeddings.
        pred_column: the column the scores go to.
        batch_size: rows per forward pass; -1 scores a whole partition at once.
        model_path: a local ``clip_autokeras_binary_nsfw.pth`` (or the upstream zip holding it);
            None downloads it once into ``$NEMO_CURATOR_HOME/weights`` (on the worker, when first needed).
    """

    weights = NSFW_WEIGHTS
    module_class = NsfwMLP
    embedding_size = 768

    def __init__(self, embedding_column: str = "image_embedding", pred_column: str = "nsfw_score",
                 batch_size: int = -1, model_path: str | os.PathLike | None = None):
        super().__init__("clip_autokeras_binary_nsfw", embedding_column, pred_column, batch_size, model_path)
