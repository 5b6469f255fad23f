"""Image-text dataset curation on Dask: DALI + timm CLIP embeddings, aesthetic and NSFW scores,
deduplication on the embeddings."""
from nemo_curator._version import __version__
from nemo_curator.utils.distributed_utils import get_client

# The deduplication classes of NeMo Curator 0.x's top level, imported when first used (they bring
# faiss and torch; `import nemo_curator` stays light).
_DEDUP = ("ClusteringModel", "SemanticClusterLevelDedup", "SemanticDeduplicator", "ExactDeduplicator")

__all__ = ["__version__", "get_client", *_DEDUP]


def __getattr__(name):
    if name in _DEDUP:
        from nemo_curator.modules import semantic_dedup

        return getattr(semantic_dedup, name)
    raise AttributeError(f"module 'nemo_curator' has no attribute {name!r}")
