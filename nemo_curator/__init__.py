"""Image-text dataset curation on Dask: DALI + timm CLIP embeddings, aesthetic and NSFW scores."""
from nemo_curator._version import __version__
from nemo_curator.utils.distributed_utils import get_client

__all__ = ["__version__", "get_client"]
