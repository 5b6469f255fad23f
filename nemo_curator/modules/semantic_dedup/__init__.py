"""Deduplication on the embeddings: SemDeDup (semantic) and exact (image-byte hash).

The NeMo Curator 0.9 calls (``ClusteringModel``, ``SemanticClusterLevelDedup``) and the
image-native form (``SemanticDeduplicator``, ``ExactDeduplicator``); see docs/dedup.md.
"""
from nemo_curator.modules.semantic_dedup.clusteringmodel import ClusteringModel
from nemo_curator.modules.semantic_dedup.deduplicator import SemanticDeduplicator, write_removal_parquets
from nemo_curator.modules.semantic_dedup.exact import ExactDeduplicator
from nemo_curator.modules.semantic_dedup.report import DedupReport, dedup_report
from nemo_curator.modules.semantic_dedup.semanticclusterleveldedup import SemanticClusterLevelDedup

__all__ = ["ClusteringModel", "DedupReport", "ExactDeduplicator", "SemanticClusterLevelDedup", "SemanticDeduplicator",
           "dedup_report", "write_removal_parquets"]
