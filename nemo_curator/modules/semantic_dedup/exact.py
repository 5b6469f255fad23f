"""Exact duplicates: images whose bytes are identical, found by their SHA-256.

``ExactDeduplicator()(dataset)`` flags them like the semantic form: ``duplicate_of`` (the id of
the copy kept) and the bool keep column (``is_unique``). The hash is img2dataset's ``sha256``
column when the metadata has it (hex digest of the image bytes), else computed from each
shard's tar (the sample's image member, first of ``image_extensions``); rows whose hash is null
in the column are computed from the tar too, and the column is filled in. Of each group of
identical images the first in dataset order (shard order, then row order) is kept. Rows with no
image are kept.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Sequence

import numpy as np
import pandas as pd

from nemo_curator.utils.constants import HASH_COLUMN
from nemo_curator.modules.semantic_dedup.clustering import PART_COL
from nemo_curator.modules.semantic_dedup.deduplicator import DEFAULT_KEEP_COLUMN, DUPLICATE_OF_COL
from nemo_curator.modules.semantic_dedup.shards import attach_to_dataset, persist_and_wait, to_shard_partitions
from nemo_curator.utils.frames import object_columns, to_pandas
from nemo_curator.utils.webdataset import (DEFAULT_IMAGE_EXTENSIONS, iter_tar_samples, pick_image_member,
                                           read_member_bytes)

logger = logging.getLogger(__name__)

DEFAULT_HASH_COLUMN = HASH_COLUMN
ROW_COL = "_row"  # row position within its shard: dataset order breaks ties


class ExactDeduplicator:
    """Flag byte-identical images (see the module docstring).

    Args:
        hash_column: the column of hex SHA-256 digests (img2dataset's ``sha256``); written when absent.
        keep_column: name of the bool column added (True: keep).
        image_extensions: member extensions taken as the image, in order of preference.
    """

    def __init__(self, hash_column: str = DEFAULT_HASH_COLUMN, keep_column: str = DEFAULT_KEEP_COLUMN,
                 image_extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS):
        if keep_column in (DUPLICATE_OF_COL, hash_column):
            raise ValueError(f"keep_column cannot be {keep_column!r}: that column is written too")
        self.hash_column = hash_column
        self.keep_column = keep_column
        self.image_extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        if not self.image_extensions:
            raise ValueError("image_extensions must name at least one extension, e.g. ('jpg', 'png')")
        self.summary: dict = {}

    def lineage_step(self) -> str:
        return (f"exact_dedup:hash_column={self.hash_column},keep_column={self.keep_column},"
                f"image_extensions={','.join(self.image_extensions)}")

    def __call__(self, dataset):
        """Flag the exact duplicates of ``dataset`` (an ``ImageTextPairDataset``); returns the new dataset.

        Computes now: hashes per shard (reading the tars only for rows without a hash), a shuffle
        on the hash, and the results back to the shards (in worker memory); the returned metadata
        joins them to each shard lazily.
        """
        metadata, id_col = dataset.metadata, dataset.id_col
        has_column = self.hash_column in metadata.columns
        with object_columns():
            hashes = metadata.map_partitions(
                hash_partition, id_col, self.hash_column if has_column else None, list(dataset.tar_files),
                self.image_extensions, meta=_hash_meta(id_col), enforce_metadata=False)
            grouped = hashes.shuffle(on="_hash", npartitions=max(1, metadata.npartitions))
            flagged = grouped.map_partitions(flag_partition, id_col, meta=_flag_meta(id_col), enforce_metadata=False)
        results = persist_and_wait(to_shard_partitions(flagged, metadata.npartitions))
        removed = int((~results["keep"]).sum().compute())
        hashed = int(len(results))
        self.summary = {"hashed": hashed, "removed": removed, "hash_column_present": has_column}
        logger.info("exact dedup: %s", self.summary)
        columns = {DUPLICATE_OF_COL: (None, None), self.keep_column: (True, bool), self.hash_column: (None, object)}
        renamed = results.rename(columns={"keep": self.keep_column, "_hash": self.hash_column})
        return attach_to_dataset(dataset, renamed, columns, self.lineage_step())


def sha256_of_images(tar_path: str, ids: set[str], image_extensions: Sequence[str]) -> dict[str, str]:
    """``{id: hex sha256 of its image bytes}`` for the wanted ids that have an image in ``tar_path``."""
    found: dict[str, str] = {}
    with open(tar_path, "rb") as f:
        for key, members in iter_tar_samples(tar_path):
            if key in ids and key not in found:
                member = pick_image_member(members, image_extensions)
                if member is not None:
                    found[key] = hashlib.sha256(read_member_bytes(f, member)).hexdigest()
    return found


def hash_partition(frame, id_col: str, hash_column: str | None, tar_files: list[str],
                   image_extensions: Sequence[str], partition_info: dict | None = None) -> pd.DataFrame:
    """``_part``, ``_row``, ``id_col``, ``_hash`` for the rows of one shard that have an image hash."""
    part = int(partition_info["number"]) if partition_info else 0
    pdf = to_pandas(frame)
    ids = pdf[id_col].astype(str).to_numpy(dtype=object)
    digests = np.full(len(pdf), None, dtype=object)
    if hash_column is not None:
        given = pdf[hash_column]
        present = given.notna().to_numpy()
        digests[present] = [str(h).strip().lower() for h in given[present]]
    missing = {ids[i] for i in np.flatnonzero(pd.isna(digests))}
    if missing:
        computed = sha256_of_images(tar_files[part], missing, image_extensions)
        for i in np.flatnonzero(pd.isna(digests)):
            digests[i] = computed.get(ids[i])
    rows = np.flatnonzero(~pd.isna(digests))
    return pd.DataFrame({PART_COL: np.full(len(rows), part, np.int32), ROW_COL: rows.astype(np.int64),
                         id_col: ids[rows], "_hash": digests[rows]})


def flag_partition(frame: pd.DataFrame, id_col: str) -> pd.DataFrame:
    """Within each hash, the first row in dataset order is kept; the others point to it."""
    ordered = frame.sort_values(["_hash", PART_COL, ROW_COL], kind="stable", ignore_index=True)
    first = ~ordered["_hash"].duplicated()
    kept_id = ordered[id_col].where(first).ffill()  # sorted by hash: a group's first row precedes the others
    duplicate_of = np.where(first.to_numpy(), None, kept_id.to_numpy(dtype=object))
    return pd.DataFrame({PART_COL: ordered[PART_COL].to_numpy(), id_col: ordered[id_col].to_numpy(dtype=object),
                         "_hash": ordered["_hash"].to_numpy(dtype=object), DUPLICATE_OF_COL: duplicate_of,
                         "keep": first.to_numpy()})


def _hash_meta(id_col: str) -> pd.DataFrame:
    return pd.DataFrame({PART_COL: np.zeros(0, np.int32), ROW_COL: np.zeros(0, np.int64),
                         id_col: pd.Series([], dtype=object), "_hash": pd.Series([], dtype=object)})


def _flag_meta(id_col: str) -> pd.DataFrame:
    return pd.DataFrame({PART_COL: np.zeros(0, np.int32), id_col: pd.Series([], dtype=object),
                         "_hash": pd.Series([], dtype=object), DUPLICATE_OF_COL: pd.Series([], dtype=object),
                         "keep": np.zeros(0, bool)})
