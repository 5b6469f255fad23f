"""ImageTextPairDataset: webdataset tar shards with one parquet of metadata per shard.

``metadata`` is a Dask DataFrame with ONE partition PER SHARD, in the order of ``tar_files``;
partition ``i`` holds the rows of ``tar_files[i]``. Operations of this toolkit keep that
invariant (they map partitions one to one); a user who repartitions ``metadata`` breaks it and
gets a clear error from the next operation.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from nemo_curator.image.status import DECODE_FAILED, EMBED_STATS_KEYS, MISSING_IMAGE, STATUS_COLUMN
from nemo_curator.utils.file_utils import remove_stale_temporaries, write_json_atomic, write_parquet_atomic
from nemo_curator.utils.import_utils import gpu_only_import
from nemo_curator.utils.progress import compute_with_progress
from nemo_curator.utils.resume import (RESUME_KEY, completed_stats, file_identity, fingerprint, identities, make_record,
                                       read_json)
from nemo_curator.utils.webdataset import PARQUET_SUFFIX, TAR_SUFFIX, Shard, find_shards

logger = logging.getLogger(__name__)

BACKENDS = ("pandas", "cudf")
STATS_SUFFIX = ".stats.json"
UNTRACKED_STEP = "untracked="  # lineage step of hand edits: "untracked=<Dask token>"
RUN_SUMMARY_NAME = "_run_summary.json"


class ImageTextPairDataset:
    """Image-text pairs stored as webdataset shards, with their metadata as a Dask DataFrame.

    Args:
        path: the dataset folder.
        metadata: Dask DataFrame, one partition per shard, aligned with ``tar_files``.
        tar_files: path of each shard's tar, partition ``i`` ↔ ``tar_files[i]``.
        id_col: the column holding each sample's key (the member name before the extension).
        shard_stats: optional per-shard Delayed dicts (from an embedder) merged into the stats files.
        lineage: description of every operation applied since loading; it fingerprints outputs
            so that a rerun of the same pipeline resumes instead of redoing finished shards.
        metadata_files: the parquet each partition was read from (its ``NNNNN.stats.json``
            describes the columns already computed; ``save_metadata`` carries it over).
    """

    def __init__(
        self,
        path: str,
        metadata: dd.DataFrame,
        tar_files: Sequence[str],
        id_col: str,
        shard_stats: Sequence[Any] | None = None,
        lineage: Sequence[str] = (),
        metadata_files: Sequence[str] | None = None,
    ):
        self.path = os.fspath(path)
        self.metadata = metadata
        self.tar_files = [os.fspath(t) for t in tar_files]
        self.id_col = id_col
        self.shard_stats = list(shard_stats) if shard_stats is not None else [None] * len(self.tar_files)
        self.lineage = tuple(lineage)
        self.metadata_files = [os.fspath(p) for p in metadata_files] if metadata_files is not None else None
        self._tracked_token = dask.base.tokenize(metadata)
        self._check_alignment()

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_webdataset(cls, path: str, id_col: str, backend: str = "pandas") -> "ImageTextPairDataset":
        """Open a folder of ``NNNNN.tar`` + ``NNNNN.parquet`` shards (lazily, one partition per shard).

        Ids are read as strings (leading zeros kept). Raises with the offending file named for: a
        missing folder, no shards, unpaired tar/parquet, ``id_col`` absent from a parquet.
        Duplicate or null ids within a shard raise when that shard is read.
        ``backend="cudf"`` gives dask_cudf partitions (needs the ``gpu`` extra).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "cudf":
            gpu_only_import("cudf", "backend='cudf'")
            gpu_only_import("dask_cudf", "backend='cudf'")
        shards = find_shards(path)
        metadata = _metadata_from_parquets([s.parquet for s in shards], id_col, backend)
        return cls(path, metadata, [s.tar for s in shards], id_col, lineage=(f"source={os.path.abspath(path)}",),
                   metadata_files=[s.parquet for s in shards])

    # ------------------------------------------------------------------------------------------
    def with_metadata(
        self,
        metadata: dd.DataFrame,
        lineage_step: str | None = None,
        shard_stats: Sequence[Any] | None = None,
    ) -> "ImageTextPairDataset":
        """A new dataset over the same shards with new metadata (one partition per shard)."""
        lineage = self.current_lineage() + ((lineage_step,) if lineage_step else ())
        stats = list(shard_stats) if shard_stats is not None else self.shard_stats
        return ImageTextPairDataset(self.path, metadata, self.tar_files, self.id_col, stats, lineage, self.metadata_files)

    def map_shards(
        self,
        func: Callable[..., Any],
        meta: pd.DataFrame,
        lineage_step: str,
        returns_stats: bool = False,
        name: str = "map-shards",
    ) -> "ImageTextPairDataset":
        """Apply ``func(partition, tar_path)`` to each shard lazily, one task per shard.

        ``func`` returns the new partition, or ``(partition, stats_dict)`` when ``returns_stats``.
        The new dataset's metadata has ``meta``'s columns and keeps one partition per shard.
        """
        self._check_alignment()
        parts = self.metadata.to_delayed()
        new_parts, new_stats = [], []
        for i, (part, tar) in enumerate(zip(parts, self.tar_files)):
            token = dask.base.tokenize(name, lineage_step, part.key, tar)
            result = dask.delayed(func, pure=True)(part, tar, dask_key_name=f"{name}-{token}")
            if returns_stats:
                new_parts.append(result[0])
                previous = self.shard_stats[i]
                new_stats.append(dask.delayed(_merge_stats, pure=True)(previous, result[1]))
            else:
                new_parts.append(result)
        metadata = dd.from_delayed(new_parts, meta=meta, verify_meta=False)
        return self.with_metadata(metadata, lineage_step, new_stats if returns_stats else None)

    # ------------------------------------------------------------------------------------------
    def save_metadata(self, path: str | None = None, columns: Sequence[str] | None = None, show_progress: bool = True,
                      resume: bool = True) -> dict:
        """Compute the metadata and write one parquet per shard, named after its tar.

        ``path=None`` rewrites the parquets in place (safely: each file is replaced atomically
        after its new content is complete). ``columns`` selects the columns to write; the id
        column is always written first. Beside each parquet, ``NNNNN.stats.json`` records the
        shard's rows, image-status counts, seconds and a completion marker; with ``resume=True``
        a rerun of the same pipeline skips the shards already written (see
        ``nemo_curator.utils.resume``) and computes only the others. With ``columns=None`` the
        dataset then reads its metadata from the written files, so later steps (filters,
        ``to_webdataset``) do not recompute embeddings. A shard that no step of this pipeline
        computed stats for (e.g. scoring saved embeddings) keeps the stats stored with the parquet
        it was read from (embedding counts and seconds): ``carried_stats`` in the summary counts
        them. Returns the run summary (also written as ``_run_summary.json``).
        """
        out_dir = os.path.abspath(os.fspath(path) if path is not None else self.path)
        self._check_alignment()
        if columns is not None:
            columns = [self.id_col] + [c for c in columns if c != self.id_col]
            missing = [c for c in columns if c not in self.metadata.columns]
            if missing:
                raise KeyError(f"save_metadata: columns {missing} are not in the metadata; present: {list(self.metadata.columns)}")
        written = list(columns) if columns is not None else list(self.metadata.columns)
        lineage = self.current_lineage()
        job = fingerprint({"operation": "save_metadata", "lineage": list(lineage), "id_col": self.id_col,
                           "columns": written})
        # stored stats describe the rows of the parquet read: not after a hand edit (rows may be filtered)
        carry_stats = not any(step.startswith(UNTRACKED_STEP) for step in lineage)
        os.makedirs(out_dir, exist_ok=True)
        parts = self.metadata.to_delayed()
        results: list[dict | None] = [None] * len(parts)
        tasks, todo, carried = [], [], 0
        for i, (part, tar, stats) in enumerate(zip(parts, self.tar_files, self.shard_stats)):
            shard = Shard.in_folder(out_dir, os.path.basename(tar)[: -len(TAR_SUFFIX)])
            inputs = identities([os.path.abspath(tar), self.metadata_file(i)])
            stats_path = shard.parquet[: -len(PARQUET_SUFFIX)] + STATS_SUFFIX
            done = completed_stats(stats_path, job, inputs) if resume else None
            if done is not None:
                results[i] = done
                continue
            remove_stale_temporaries(out_dir, [os.path.basename(shard.parquet), os.path.basename(stats_path)])
            if stats is None and carry_stats:
                stats = stored_embed_stats(self.metadata_file(i))
                carried += stats is not None
            tasks.append(dask.delayed(_write_shard_metadata, pure=False)(part, shard.parquet, columns, self.id_col, stats,
                                                                          job=job, inputs=inputs))
            todo.append(i)
        if len(todo) < len(parts):
            logger.info("save_metadata: %d of %d shards already written by this pipeline, skipped", len(parts) - len(todo), len(parts))
        started = time.time()
        for i, result in zip(todo, compute_with_progress(tasks, desc="save_metadata", show=show_progress)):
            results[i] = result
        summary = summarize_stats(results, seconds=time.time() - started, skipped=len(parts) - len(todo),
                                  operation="save_metadata", path=out_dir, carried_stats=carried)
        write_json_atomic(summary, os.path.join(out_dir, RUN_SUMMARY_NAME))
        logger.info("save_metadata: %s", {k: v for k, v in summary.items() if k != "shards"})
        if columns is None:
            # From now on the dataset reads what was just written: later steps (filtering,
            # to_webdataset) do not recompute the embeddings.
            backend = "pandas" if isinstance(self.metadata._meta, pd.DataFrame) else "cudf"
            parquets = [os.path.join(out_dir, os.path.basename(t)[: -len(TAR_SUFFIX)] + PARQUET_SUFFIX) for t in self.tar_files]
            self.lineage = lineage  # a hand edit stays in the lineage of what was written
            self.metadata = _metadata_from_parquets(parquets, self.id_col, backend)
            self.metadata_files = parquets
            self._tracked_token = dask.base.tokenize(self.metadata)
            self.shard_stats = [None] * len(self.tar_files)
        return summary

    def to_webdataset(self, path: str, filter_column: str, samples_per_shard: int = 10000, max_shards: int = 5,
                      old_id_col: str | None = None, **kwargs) -> dict:
        """Write the rows whose ``filter_column`` is True as new shards (see ``nemo_curator.datasets.reshard``)."""
        from nemo_curator.datasets.reshard import to_webdataset

        return to_webdataset(self, path, filter_column, samples_per_shard=samples_per_shard, max_shards=max_shards,
                             old_id_col=old_id_col, **kwargs)

    def metadata_file(self, i: int) -> str:
        """Absolute path of the parquet that partition ``i`` is read from (beside its tar unless
        the dataset was re-read from saved files)."""
        tar = self.tar_files[i]
        path = self.metadata_files[i] if self.metadata_files is not None else tar[: -len(TAR_SUFFIX)] + PARQUET_SUFFIX
        return os.path.abspath(path)

    def current_lineage(self) -> tuple[str, ...]:
        """The lineage, plus a step naming the hand edits of the metadata, if any
        (``untracked=<token>``): what the resume fingerprints and every later operation hold."""
        untracked = self.untracked_changes()
        return self.lineage + ((f"{UNTRACKED_STEP}{untracked}",) if untracked else ())

    def untracked_changes(self) -> str | None:
        """Dask's token of the metadata when it changed outside the dataset's own operations
        (``dataset.metadata["x"] = ...``), else None. Part of the resume fingerprints: such a
        change is not in the lineage, and a rerun with another expression must not skip shards.
        The token is deterministic across processes for the same expression; where Dask cannot
        tokenize an argument deterministically, every rerun redoes the shards (never skips wrongly)."""
        token = dask.base.tokenize(self.metadata)
        return None if token == self._tracked_token else token

    # ------------------------------------------------------------------------------------------
    def _check_alignment(self) -> None:
        if self.metadata.npartitions != len(self.tar_files):
            raise ValueError(
                f"metadata has {self.metadata.npartitions} partitions but the dataset has {len(self.tar_files)} shards: "
                "operations must keep one partition per shard (do not repartition `metadata`; filter rows instead)"
            )
        if len(self.shard_stats) != len(self.tar_files):
            raise ValueError("internal error: shard_stats is not aligned with tar_files")

    def __repr__(self) -> str:
        return (f"ImageTextPairDataset(path={self.path!r}, shards={len(self.tar_files)}, id_col={self.id_col!r}, "
                f"columns={list(self.metadata.columns)})")


# ----------------------------------------------------------------------------------------------
# Reading
def _metadata_from_parquets(parquet_paths: Sequence[str], id_col: str, backend: str = "pandas") -> dd.DataFrame:
    """A lazy Dask DataFrame with one partition per parquet, columns = the union of their schemas."""
    meta = _empty_frame(_union_schema(parquet_paths, id_col), id_col)
    if backend == "cudf":
        meta = _to_cudf(meta)
    return dd.from_map(
        read_shard_metadata,
        list(parquet_paths),
        id_col=id_col,
        columns=list(meta.columns),
        backend=backend,
        meta=meta,
        label="read-shard-metadata",
        enforce_metadata=False,
    )


def _union_schema(parquet_paths: Sequence[str], id_col: str) -> pa.Schema:
    """Union of the parquet schemas (footers read in parallel); the id column typed as string.

    Raises KeyError naming the first file that lacks ``id_col``.
    """
    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(pq.read_schema, parquet_paths))
    for path, schema in zip(parquet_paths, schemas):
        if id_col not in schema.names:
            raise KeyError(f"id column {id_col!r} is not in {path}; its columns are {schema.names}. "
                           f"Pass id_col= the column that holds each sample's key")
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for field in schema:
            if field.name not in fields or pa.types.is_null(fields[field.name].type):
                fields[field.name] = field
    fields[id_col] = pa.field(id_col, pa.string())
    ordered = [id_col] + [n for n in fields if n != id_col]
    return pa.schema([fields[n].remove_metadata() for n in ordered])


def _empty_frame(schema: pa.Schema, id_col: str) -> pd.DataFrame:
    frame = schema.empty_table().to_pandas()
    frame[id_col] = frame[id_col].astype(_id_dtype())
    return frame


def _id_dtype():
    return pd.StringDtype() if pd.__version__ < "3" else "str"


def read_shard_metadata(parquet_path: str, id_col: str, columns: Sequence[str], backend: str = "pandas"):
    """Read one shard's parquet as a DataFrame with ``columns`` (absent ones filled with nulls).

    The id column is cast to string without reformatting (leading zeros kept; integer ids keep
    their decimal form). Raises ValueError naming the file for null or duplicate ids.
    """
    # one thread: a worker reads one shard per task, and Arrow's thread pool would only add
    # memory (10 MB more RSS for a 10,000-row shard, benchmark 4), not speed
    table = pq.read_table(parquet_path, use_threads=False)
    if id_col not in table.column_names:
        raise KeyError(f"id column {id_col!r} is not in {parquet_path}; its columns are {table.column_names}")
    ids = table.column(id_col)
    if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
        table = table.set_column(table.column_names.index(id_col), id_col, ids.cast(pa.string()))
    frame = table.to_pandas()
    frame[id_col] = frame[id_col].astype(_id_dtype())
    if frame[id_col].isna().any():
        rows = list(np.flatnonzero(frame[id_col].isna().to_numpy())[:5])
        raise ValueError(f"{parquet_path}: {frame[id_col].isna().sum()} rows have no id in column {id_col!r} "
                         f"(first row positions {rows}); every row needs the key of its sample")
    dup = frame[id_col][frame[id_col].duplicated()]
    if len(dup):
        raise ValueError(f"{parquet_path}: duplicate ids in column {id_col!r}: {sorted(set(dup))[:10]}; "
                         "ids must be unique within a shard")
    for col in columns:
        if col not in frame.columns:
            frame[col] = None
    frame = frame[list(columns)]
    if backend == "cudf":
        return _to_cudf(frame)
    return frame


def _to_cudf(frame: pd.DataFrame):
    cudf = gpu_only_import("cudf", "backend='cudf'")
    return cudf.from_pandas(frame)


# ----------------------------------------------------------------------------------------------
# Writing
def partition_to_arrow(frame, compact_nulls: bool = False) -> pa.Table:
    """Convert a partition (pandas or cuDF) to Arrow; columns of float arrays become list<float32>.

    ``compact_nulls``: null lists take no values (for libcudf, which mishandles null lists over
    non-empty ranges; Arrow and parquet accept them), at the cost of a copy when there are nulls."""
    if not isinstance(frame, pd.DataFrame):
        frame = frame.to_pandas()
    arrays, names = [], []
    for name in frame.columns:
        col = frame[name]
        if col.dtype == object and _holds_float_arrays(col):
            arrays.append(_float_list_array(col, compact_nulls))
        else:
            arrays.append(pa.Array.from_pandas(col))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def _float_list_array(col: pd.Series, compact_nulls: bool = False) -> pa.ListArray:
    """Object column of float arrays (or None/NaN) -> list<float32>.

    When the arrays are the rows of one (n, D) float32 matrix, each at its own row (what
    ``ImageEmbedder`` produces), Arrow gets the matrix itself: no copy (a null row then spans
    its D unused values, unless ``compact_nulls``). Otherwise one copy."""
    values = col.tolist()
    matrix, present = _rows_of_one_matrix(values)
    if matrix is not None and compact_nulls and not present.all():
        matrix = None
    if matrix is not None:
        offsets = np.arange(len(values) + 1, dtype=np.int64) * matrix.shape[1]
        flat = matrix.reshape(-1)
    else:
        present = np.array([not _is_null(v) for v in values], dtype=bool)
        rows = [np.asarray(v, dtype=np.float32).reshape(-1) for v, p in zip(values, present) if p]
        lengths = np.zeros(len(values), dtype=np.int64)
        lengths[np.flatnonzero(present)] = [len(r) for r in rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.concatenate(rows) if rows else np.zeros(0, np.float32)
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(f"column {col.name!r} holds {offsets[-1]:,} floats in one partition, more than an Arrow list "
                         f"column can address (2**31 - 1): write smaller shards")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat), mask=pa.array(~present))


def _rows_of_one_matrix(values: list) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(matrix, present)`` when the non-null values are rows of one C-contiguous (len(values), D)
    float32 block of memory, each value at its own row r (a view, not a copy); else ``(None, None)``."""
    n, present, owner, start, row_bytes = len(values), np.zeros(len(values), dtype=bool), None, 0, 0
    for r, v in enumerate(values):
        if _is_null(v):
            continue
        if not (isinstance(v, np.ndarray) and v.dtype == np.float32 and v.ndim == 1 and v.strides == (4,)
                and isinstance(v.base, np.ndarray)):
            return None, None
        address = v.__array_interface__["data"][0]
        if owner is None:
            owner, row_bytes = v.base, v.nbytes
            start = address - r * row_bytes
        if v.base is not owner or v.nbytes != row_bytes or address != start + r * row_bytes:
            return None, None
        present[r] = True
    if owner is None or not owner.flags.c_contiguous:
        return None, None
    owner_start = owner.__array_interface__["data"][0]
    first = start - owner_start
    if first < 0 or first + n * row_bytes > owner.nbytes:
        return None, None
    block = owner.reshape(-1).view(np.uint8)[first: first + n * row_bytes].view(np.float32)
    return block.reshape(n, row_bytes // 4), present


def _is_null(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _holds_float_arrays(col: pd.Series) -> bool:
    for v in col:
        if _is_null(v):
            continue
        return isinstance(v, (np.ndarray, list)) and np.asarray(v).dtype.kind == "f"
    return False


def _write_shard_metadata(frame, parquet_path: str, columns, id_col: str, stats: dict | None,
                          job: str | None = None, inputs: dict | None = None) -> dict:
    """Write one shard's metadata atomically, then its stats file (the completion marker when
    ``job`` is given: see ``nemo_curator.utils.resume``); return the stats dict."""
    started = time.time()
    if columns is not None:
        frame = frame[list(columns)]
    write_parquet_atomic(partition_to_arrow(frame), parquet_path)
    shard_stats = dict(stats or {})
    shard_stats.update(shard=os.path.basename(parquet_path)[: -len(PARQUET_SUFFIX)], rows=int(len(frame)),
                       **status_counts(frame), write_seconds=round(time.time() - started, 4))
    if job is not None:
        shard_stats[RESUME_KEY] = make_record(job, inputs or {}, [parquet_path])
    write_json_atomic(shard_stats, parquet_path[: -len(PARQUET_SUFFIX)] + STATS_SUFFIX)
    return shard_stats


def stored_embed_stats(parquet_path: str) -> dict | None:
    """The embedder's stats (``EMBED_STATS_KEYS``) stored beside ``parquet_path`` in
    ``NNNNN.stats.json``, when they describe this very file (its completion marker records the
    file's size and mtime); else None."""
    stats = read_json(parquet_path[: -len(PARQUET_SUFFIX)] + STATS_SUFFIX)
    record = (stats or {}).get(RESUME_KEY)
    if not isinstance(record, dict) or "embedded" not in stats:
        return None
    name = os.path.basename(parquet_path)  # by name: a folder copied with its mtimes (cp -p, rsync -a) keeps its stats
    recorded = [ident for path, ident in (record.get("outputs") or {}).items() if os.path.basename(path) == name]
    if len(recorded) != 1 or recorded[0] != file_identity(parquet_path):
        return None
    return {k: v for k, v in stats.items() if k in EMBED_STATS_KEYS}


def status_counts(frame) -> dict[str, int]:
    """``{"decode_failed": n, "missing_image": n}`` from the ``image_status`` column ({} without it)."""
    if STATUS_COLUMN not in frame.columns:
        return {}
    status = frame[STATUS_COLUMN]
    return {s: int((status == s).sum()) for s in (DECODE_FAILED, MISSING_IMAGE)}


def _merge_stats(previous: dict | None, new: dict | None) -> dict:
    merged = dict(previous or {})
    for key, value in (new or {}).items():
        if isinstance(value, (int, float)) and isinstance(merged.get(key), (int, float)) and key.endswith("seconds"):
            merged[key] = merged[key] + value
        else:
            merged[key] = value
    return merged


def summarize_stats(shard_stats: Sequence[dict], seconds: float, skipped: int = 0, **extra) -> dict:
    """The run summary: numeric per-shard counters summed under ``totals`` (rates ``*_per_second``,
    strings and resume records left out), ``shards_written`` (computed now), ``shards_skipped``
    (already complete, their stored stats included) and each shard's stats under ``shards``.
    ``extra`` keys are added as they are; ``seconds`` is this run's wall time.
    """
    totals: dict[str, float] = {}
    for stats in shard_stats:
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not key.endswith("_per_second"):
                totals[key] = totals.get(key, 0) + value
    for key in [k for k in totals if k.endswith("seconds")]:
        totals[key] = round(totals[key], 4)
    return {**extra, "shards_total": len(shard_stats), "shards_written": len(shard_stats) - skipped,
            "shards_skipped": skipped, "seconds": round(seconds, 3), "totals": totals,
            "shards": [{k: v for k, v in stats.items() if k != RESUME_KEY} for stats in shard_stats]}
