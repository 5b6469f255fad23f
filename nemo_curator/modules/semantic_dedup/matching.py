"""Within one cluster: rank the rows, find each row's most similar earlier row, decide what goes.

SemDeDup's rule (as NeMo Curator 0.9): the rows of a cluster are ranked by ``which_to_keep``,

- ``"hard"``: decreasing distance to the centroid (outliers first: the farthest row of a group is kept),
- ``"easy"``: increasing distance (the most typical row of a group is kept),
- ``"random"``: a random permutation (seeded, independent of the order rows arrive in),

with ties broken by id; the distance is the cosine distance (``sim_metric="cosine"``) or the L2
distance (``"l2"``) to the centroid. A row is removed when its cosine similarity to some row ranked
before it is at least ``1 - eps``; the first row of every group of near-duplicates is kept.
"""
from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from nemo_curator.utils.constants import SIM_METRICS, WHICH_TO_KEEP
from nemo_curator.modules.semantic_dedup.arrays import bytes_to_rows
from nemo_curator.modules.semantic_dedup.clustering import (COSINE_DIST_TO_CENT_COL, EMB_COL, L2_DIST_TO_CENT_COL,
                                                            NEAREST_CENT_COL)
from nemo_curator.modules.semantic_dedup.kernel import max_similarity_to_earlier

LEGACY_RANDOM_SEED = 42  # NeMo Curator 0.9 shuffles clusters with random_state=42


def check_choices(which_to_keep: str, sim_metric: str) -> None:
    """Raise ValueError unless ``which_to_keep`` and ``sim_metric`` are known values."""
    if which_to_keep not in WHICH_TO_KEEP:
        raise ValueError(f"which_to_keep must be one of {WHICH_TO_KEEP}, got {which_to_keep!r}: 'hard' keeps the row "
                         f"farthest from the centroid, 'easy' the closest, 'random' a random one")
    if sim_metric not in SIM_METRICS:
        raise ValueError(f"Invalid similarity metric: {sim_metric!r}. Only cosine and l2 are supported.")


def check_eps(eps) -> float:
    """``eps`` as a float; raise ValueError unless ``0 < eps < 1`` (a row goes at similarity >= 1 - eps)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)):
        raise TypeError(f"eps must be a number between 0 and 1 (e.g. 0.01), got {type(eps).__name__} {eps!r}")
    if not 0 < float(eps) < 1:
        raise ValueError(f"eps must lie strictly between 0 and 1 (rows with cosine similarity >= 1 - eps are "
                         f"duplicates; 0.01 is typical), got {eps!r}")
    return float(eps)


def similarity_threshold(eps: float) -> np.float32:
    """The similarity at and above which a row is a duplicate: ``float32(1 - eps)``."""
    return np.float32(1.0 - eps)


def distance_column(sim_metric: str) -> str:
    return COSINE_DIST_TO_CENT_COL if sim_metric == "cosine" else L2_DIST_TO_CENT_COL


def rank_cluster(frame: pd.DataFrame, id_col: str, which_to_keep: str, sim_metric: str, seed: int) -> pd.DataFrame:
    """The rows of one cluster in rank order (index reset): the first row of a duplicate group is kept."""
    dist = distance_column(sim_metric)
    if which_to_keep == "random":
        ordered = frame.sort_values(id_col, kind="stable", ignore_index=True)
        cluster = int(ordered[NEAREST_CENT_COL].iloc[0]) if NEAREST_CENT_COL in ordered.columns and len(ordered) else 0
        rng = np.random.default_rng([seed, cluster, zlib.crc32(b"semdedup-random")])
        return ordered.iloc[rng.permutation(len(ordered))].reset_index(drop=True)
    ascending = which_to_keep == "easy"
    return frame.sort_values([dist, id_col], ascending=ascending, kind="stable", ignore_index=True)


def match_cluster(ranked: pd.DataFrame, block_size: int, embeddings: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(max_sim, argmax)`` of the ranked rows (see ``kernel.max_similarity_to_earlier``); the
    embeddings come from ``_emb`` unless given as an ``(n, d)`` array in rank order."""
    X = bytes_to_rows(ranked[EMB_COL]) if embeddings is None else embeddings
    return max_similarity_to_earlier(X, block_size)


def resolve_duplicates(max_sim: np.ndarray, argmax: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, kept_in_place)`` for ranked rows: ``keep`` ``(n,)`` bool (``max_sim < 1 - eps``) and,
    for each removed row, the position of the KEPT row it stands for (its most similar earlier row,
    followed to a kept one when that row is removed too); ``-1`` for kept rows."""
    keep = ~(max_sim >= similarity_threshold(eps))
    root = np.where(keep, -1, argmax)
    for j in np.flatnonzero(~keep):  # argmax[j] < j: earlier rows are resolved first
        if root[root[j]] != -1:
            root[j] = root[root[j]]
    return keep, root
