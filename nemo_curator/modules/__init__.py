"""Dataset-level operations built on the image layer (deduplication)."""
from nemo_curator.modules.semantic_dedup import (ClusteringModel, ExactDeduplicator, SemanticClusterLevelDedup,
                                                 SemanticDeduplicator)

__all__ = ["ClusteringModel", "ExactDeduplicator", "SemanticClusterLevelDedup", "SemanticDeduplicator"]
