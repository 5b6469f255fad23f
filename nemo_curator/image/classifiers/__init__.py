"""Classifier heads over image embeddings: aesthetic score and NSFW probability."""
from nemo_curator.image.classifiers.aesthetic import AestheticClassifier, AestheticMLP
from nemo_curator.image.classifiers.base import ImageClassifier, PretrainedHeadClassifier
from nemo_curator.image.classifiers.nsfw import NsfwClassifier, NsfwMLP
from nemo_curator.image.classifiers.registry import HEADS, build_heads, write_random_heads

__all__ = ["HEADS", "AestheticClassifier", "AestheticMLP", "ImageClassifier", "NsfwClassifier", "NsfwMLP",
           "PretrainedHeadClassifier", "build_heads", "write_random_heads"]
