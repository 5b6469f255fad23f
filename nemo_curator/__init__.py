"""Image-text dataset curation on Dask: DALI + timm CLIP embeddings, aesthetic and NSFW scores."""
import dask

# Dask would otherwise convert object columns to Arrow strings when it builds a collection, turning
# each embedding (a numpy array per row) into its text form. Embedding columns must stay arrays.
dask.config.set({"dataframe.convert-string": False})

from nemo_curator._version import __version__  # noqa: E402
from nemo_curator.utils.distributed_utils import get_client  # noqa: E402

__all__ = ["__version__", "get_client"]
