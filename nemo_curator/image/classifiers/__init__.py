"""Classifier heads over image embeddings: aesthetic score and NSFW probability."""
from nemo_curator.image.classifiers.aesthetic import AestheticClassifier, AestheticMLP
from nemo_curator.image.classifiers.base import ImageClassifier, PretrainedHeadClassifier
from nemo_curator.image.classifiers.nsfw import NsfwClassifier, NsfwMLP

__all__ = ["AestheticClassifier", "AestheticMLP", "ImageClassifier", "NsfwClassifier", "NsfwMLP",
           "PretrainedHeadClassifier"]
