from nemo_curator.datasets.doc_dataset import DocumentDataset
from nemo_curator.datasets.image_text_pair_dataset import ImageTextPairDataset

__all__ = ["DocumentDataset", "ImageTextPairDataset"]
