"""Planted near-duplicates on the unit sphere: test and benchmark data with a known answer.

Rows are drawn around ``n_topics`` random topic directions (as real embeddings cluster), and a
fraction of them are replaced by groups of near-copies of one base row: member =
``normalize(base + sigma * g / sqrt(d))`` with ``g`` standard normal, so two members have cosine
similarity about ``1 / (1 + sigma**2)``. ``sigma = 0`` gives exact copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Planted:
    """``embeddings`` ``(n, d)`` float32 unit rows; ``group`` ``(n,)`` int64: the planted group of
    each row (``-1`` for a row with no planted duplicate); ``ids``: ``(n,)`` str ids ``"%09d"``."""

    embeddings: np.ndarray
    group: np.ndarray
    ids: np.ndarray


def planted_embeddings(n: int, dim: int = 768, n_topics: int = 50, duplicate_fraction: float = 0.2,
                       group_sizes: tuple[int, int] = (2, 5), sigma: tuple[float, float] = (0.02, 0.06),
                       topic_spread: float = 1.3, exact_fraction: float = 0.0, seed: int = 0,
                       chunk: int = 65536) -> Planted:
    """``n`` rows of which about ``duplicate_fraction`` belong to planted groups of
    ``group_sizes[0]..group_sizes[1]`` rows; each group's noise ``sigma`` is uniform in ``sigma``.

    ``topic_spread``: a base row is ``normalize(topic + topic_spread * g / sqrt(d))`` (cosine about
    0.6 to its topic at 1.3). ``exact_fraction`` of the groups are exact copies (``sigma = 0``).
    Rows are in random order. Built in chunks of ``chunk`` rows, so
    memory is the output plus one chunk.
    """
    rng = np.random.default_rng(seed)
    topics = _unit(rng.standard_normal((n_topics, dim)).astype(np.float32))
    sizes, total = [], 0
    target = int(round(n * duplicate_fraction))
    while total < target:
        size = int(rng.integers(group_sizes[0], group_sizes[1] + 1))
        size = min(size, target - total) if target - total >= group_sizes[0] else 0
        if size == 0:
            break
        sizes.append(size)
        total += size
    n_singles = n - total
    n_bases = n_singles + len(sizes)
    order = rng.permutation(n)
    X = np.empty((n, dim), np.float32)
    group = np.full(n, -1, np.int64)
    out = 0
    for start in range(0, n_bases, chunk):
        count = min(chunk, n_bases - start)
        topic = rng.integers(0, n_topics, count)
        base = _unit(topics[topic] + topic_spread * rng.standard_normal((count, dim)).astype(np.float32) / np.sqrt(dim))
        for b in range(count):
            index = start + b
            if index < n_singles:
                X[order[out]] = base[b]
                out += 1
                continue
            g = index - n_singles
            s = 0.0 if rng.random() < exact_fraction else float(rng.uniform(*sigma))
            members = base[b][None, :] + s * rng.standard_normal((sizes[g], dim)).astype(np.float32) / np.sqrt(dim)
            rows = order[out: out + sizes[g]]
            X[rows] = _unit(members) if s > 0 else base[b]
            group[rows] = g
            out += sizes[g]
    ids = np.array([f"{i:09d}" for i in range(n)], dtype=object)
    return Planted(X, group, ids)


def _unit(X: np.ndarray) -> np.ndarray:
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
