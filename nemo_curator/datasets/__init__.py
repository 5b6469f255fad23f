from nemo_curator.datasets.image_text_pair_dataset import ImageTextPairDataset

__all__ = ["ImageTextPairDataset"]
