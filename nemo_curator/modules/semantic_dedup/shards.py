"""Results of a global step brought back to the dataset's shards and joined to their rows by id.

A dedup step produces one row per sample in partitions grouped by cluster (or hash). Each result
row carries ``_part``, the index of the shard it came from; ``to_shard_partitions`` moves the
results so that partition ``i`` holds exactly shard ``i``'s rows (a range-partitioned shuffle on
``_part``), and ``attach`` joins them to the shard's metadata BY ID (never by position).
"""
from __future__ import annotations

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

from nemo_curator.modules.semantic_dedup.clustering import PART_COL
from nemo_curator.utils.arrow import pandas_like
from nemo_curator.utils.frames import object_columns, to_pandas


def to_shard_partitions(results: dd.DataFrame, n_shards: int) -> dd.DataFrame:
    """``results`` (with ``_part``) re-partitioned so that partition ``i`` holds the rows of shard ``i``
    (indexed by ``_part``); ``n_shards`` partitions, empty ones included."""
    with object_columns():
        return results.set_index(PART_COL, divisions=list(range(n_shards + 1)))


def persist_and_wait(df: dd.DataFrame) -> dd.DataFrame:
    """Compute ``df`` into worker memory now (errors surface here) and return the persisted collection."""
    (persisted,) = dask.persist(df)
    try:
        from distributed import default_client, wait

        default_client()
    except ValueError:  # no distributed client: dask.persist computed it in this process
        return persisted
    wait(persisted)
    return persisted


def attach(frame, results: pd.DataFrame, id_col: str, columns: dict[str, tuple], partition_info: dict | None = None):
    """``frame`` (one shard's metadata) with ``columns`` taken from ``results`` (the same shard's
    result rows, keyed by ``id_col``). ``columns``: ``{name: (fill value for rows without a result,
    dtype or None for the id column's dtype)}``. Returns a frame of ``frame``'s kind (pandas/cuDF).
    """
    pdf = to_pandas(frame)
    part = int(partition_info["number"]) if partition_info else None
    if len(results) and part is not None and not (results.index == part).all():
        raise RuntimeError(f"internal error: results of shards {sorted(set(results.index))} reached shard {part}")
    keys = pd.Index(results[id_col].astype(str))
    if not keys.is_unique:
        dup = keys[keys.duplicated()].unique()[:5].tolist()
        raise ValueError(f"ids {dup} appear more than once in shard {part} (column {id_col!r}): ids must be unique "
                         f"within a shard")
    where = keys.get_indexer(pdf[id_col].astype(str))
    found = where >= 0
    out = pdf.copy(deep=False)
    for name, (fill, dtype) in columns.items():
        values = results[name].to_numpy()
        picked = np.empty(len(pdf), dtype=object if dtype is None else dtype)
        picked[:] = fill
        picked[found] = values[where[found]]
        out[name] = pd.array(picked, dtype=pdf[id_col].dtype) if dtype is None else picked
    return pandas_like(out, frame)


def attached_meta(meta, id_col: str, columns: dict[str, tuple]):
    """Dask ``meta`` of ``attach``'s output."""
    pdf = to_pandas(meta).iloc[:0].copy()
    for name, (_, dtype) in columns.items():
        pdf[name] = pdf[id_col].iloc[:0] if dtype is None else np.zeros(0, dtype=dtype)
    return pandas_like(pdf, meta)


def attach_to_dataset(dataset, results: dd.DataFrame, columns: dict[str, tuple], lineage_step: str):
    """A new ``ImageTextPairDataset`` whose metadata gains ``columns`` from ``results`` (already in
    shard partitions, see ``to_shard_partitions``); one task per shard, lazily."""
    metadata = dataset.metadata
    if results.npartitions != metadata.npartitions:
        raise RuntimeError(f"internal error: {results.npartitions} result partitions for {metadata.npartitions} shards")
    with object_columns():
        new = metadata.map_partitions(attach, results.clear_divisions(), dataset.id_col, columns,
                                      meta=attached_meta(metadata._meta, dataset.id_col, columns), enforce_metadata=False)
    return dataset.with_metadata(new, lineage_step=lineage_step)
