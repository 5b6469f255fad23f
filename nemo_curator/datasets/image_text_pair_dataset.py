"""ImageTextPairDataset: webdataset tar shards with one parquet of metadata per shard.

``metadata`` is a Dask DataFrame with ONE partition PER SHARD, in the order of ``shards``;
partition ``i`` holds the rows of ``shards[i]``. Operations of this toolkit keep that invariant
(they map partitions one to one); a user who repartitions ``metadata`` breaks it and gets a clear
error from the next operation.
"""
from __future__ import annotations

import dataclasses
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
import pyarrow.compute as pc

from nemo_curator.datasets.reshard import to_webdataset as _to_webdataset
from nemo_curator.utils.arrow import partition_to_arrow
from nemo_curator.utils.file_utils import read_parquet_schema, read_parquet_table, write_parquet_atomic
from nemo_curator.utils.frames import id_dtype, is_pandas, object_columns, to_cudf
from nemo_curator.utils.graphs import share_one_layer
from nemo_curator.utils.import_utils import gpu_only_import
from nemo_curator.utils.resume import (RESUME_KEY, UNTRACKED, LineageStep, file_identity, fingerprint, identities,
                                       lineage_keys,
                                       read_json)
from nemo_curator.utils.shard_job import ShardWork, commit_shard, run_shard_job
from nemo_curator.utils.stats import EmbedStats, MetadataShardStats, merge_stats, status_counts
from nemo_curator.utils.webdataset import Shard, find_shards

logger = logging.getLogger(__name__)

BACKENDS = ("pandas", "cudf")


@dataclasses.dataclass(frozen=True)
class DatasetShard:
    """One shard of a dataset, as a record.

    Args:
        files: the shard's files (``NNNNN.tar``, ``.parquet``, ``.idx`` beside each other).
        metadata_file: the parquet its partition is read from: ``files.parquet``, or the file
            ``save_metadata`` wrote elsewhere (its ``NNNNN.stats.json`` describes the columns
            already computed; ``save_metadata`` carries it over).
        stats: the shard's statistics computed by pipeline steps and not written yet (a Dask
            Delayed dict), or None.
    """

    files: Shard
    metadata_file: str
    stats: Any = dataclasses.field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.files.name

    @property
    def tar(self) -> str:
        return self.files.tar


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
        metadata_files: the parquet each partition was read from (default: beside its tar).

    The shards are records (``shards``: ``DatasetShard``); ``tar_files``, ``metadata_files`` and
    ``shard_stats`` are read-only views of them. Operations return new datasets, except
    ``save_metadata``, which also points this dataset at the files it wrote (see there).
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
        tar_files = [os.fspath(t) for t in tar_files]
        stats = list(shard_stats) if shard_stats is not None else [None] * len(tar_files)
        parquets = ([os.fspath(p) for p in metadata_files] if metadata_files is not None
                    else [Shard.of_file(t).parquet for t in tar_files])
        if not len(stats) == len(parquets) == len(tar_files):
            raise ValueError(f"tar_files ({len(tar_files)}), shard_stats ({len(stats)}) and metadata_files "
                             f"({len(parquets)}) must have one entry per shard")
        shards = [DatasetShard(Shard.of_file(t), os.path.abspath(p), s) for t, p, s in zip(tar_files, parquets, stats)]
        self._set_state(os.fspath(path), metadata, shards, id_col, lineage)

    def _set_state(self, path: str, metadata: dd.DataFrame, shards: Sequence[DatasetShard], id_col: str,
                   lineage: Sequence[str]) -> None:
        self.path = path
        self.metadata = metadata
        self._shards = tuple(shards)
        self.id_col = id_col
        self.lineage = tuple(LineageStep.of(step) for step in lineage)
        self._tracked_token = dask.base.tokenize(metadata)
        self._check_alignment()

    @classmethod
    def _from_shards(cls, path: str, metadata: dd.DataFrame, shards: Sequence[DatasetShard], id_col: str,
                     lineage: Sequence[str]) -> "ImageTextPairDataset":
        dataset = cls.__new__(cls)
        dataset._set_state(path, metadata, shards, id_col, lineage)
        return dataset

    # -- the shards, and their legacy views -------------------------------------------------------
    @property
    def shards(self) -> tuple[DatasetShard, ...]:
        """The shards, in partition order."""
        return self._shards

    @property
    def tar_files(self) -> list[str]:
        """Path of each shard's tar, partition ``i`` ↔ ``tar_files[i]`` (a copy: read-only)."""
        return [s.tar for s in self._shards]

    @property
    def metadata_files(self) -> list[str]:
        """The parquet each partition is read from (a copy: read-only)."""
        return [s.metadata_file for s in self._shards]

    @property
    def shard_stats(self) -> list[Any]:
        """Each shard's pending statistics (Delayed dicts) or None (a copy: read-only)."""
        return [s.stats for s in self._shards]

    def metadata_file(self, i: int) -> str:
        """Absolute path of the parquet that partition ``i`` is read from (beside its tar unless
        the dataset was re-read from saved files)."""
        return self._shards[i].metadata_file

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_webdataset(cls, path: str, id_col: str | None = None, backend: str = "pandas",
                        id_field: str | None = None) -> "ImageTextPairDataset":
        """Open a folder of ``NNNNN.tar`` + ``NNNNN.parquet`` shards (lazily, one partition per shard).

        Ids are read as strings (leading zeros kept). Raises with the offending file named for: a
        missing folder, no shards, unpaired tar/parquet, ``id_col`` absent from a parquet, a file
        that is not parquet. Duplicate or null ids within a shard raise when that shard is read.
        ``backend="cudf"`` gives dask_cudf partitions (needs the ``gpu`` extra).
        ``id_field``: the legacy spelling of ``id_col`` (NeMo Curator's docs).
        """
        if id_field is not None:
            if id_col is not None and id_col != id_field:
                raise ValueError(f"id_field={id_field!r} is the legacy spelling of id_col={id_col!r}: pass one of them")
            id_col = id_field
        if id_col is None:
            raise TypeError("from_webdataset() needs id_col: the parquet column holding each sample's key "
                            "(img2dataset writes 'key')")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "cudf":
            gpu_only_import("cudf", "backend='cudf'")
            gpu_only_import("dask_cudf", "backend='cudf'")
        found = find_shards(path)
        metadata = _metadata_from_parquets([s.parquet for s in found], id_col, backend)
        shards = [DatasetShard(s, os.path.abspath(s.parquet)) for s in found]
        return cls._from_shards(os.fspath(path), metadata, shards, id_col,
                                (LineageStep("source", os.path.abspath(path), text=f"source={os.path.abspath(path)}"),))

    # ------------------------------------------------------------------------------------------
    def with_metadata(
        self,
        metadata: dd.DataFrame,
        lineage_step: str | None = None,
        shard_stats: Sequence[Any] | None = None,
    ) -> "ImageTextPairDataset":
        """A new dataset over the same shards with new metadata (one partition per shard)."""
        lineage = self.current_lineage() + ((LineageStep.of(lineage_step),) if lineage_step else ())
        shards = self._shards
        if shard_stats is not None:
            if len(shard_stats) != len(shards):
                raise ValueError(f"shard_stats has {len(shard_stats)} entries for {len(shards)} shards")
            shards = [dataclasses.replace(s, stats=st) for s, st in zip(shards, shard_stats)]
        return ImageTextPairDataset._from_shards(self.path, metadata, shards, self.id_col, lineage)

    def map_shards(
        self,
        func: Callable[..., Any],
        meta: pd.DataFrame,
        lineage_step: str,
        returns_stats: bool = False,
        name: str = "map-shards",
    ) -> "ImageTextPairDataset":
        """Apply ``func(partition, tar_path)`` to each shard lazily, one task per shard.

        ``func`` returns the new partition, or ``(partition, stats)`` when ``returns_stats`` (a dict
        or a stats record: merged into the shard's stats, see ``utils.stats.merge_stats``). The new
        dataset's metadata has ``meta``'s columns and keeps one partition per shard.
        """
        self._check_alignment()
        parts = self.metadata.to_delayed()
        new_parts, new_stats = [], []
        for part, shard in zip(parts, self._shards):
            token = dask.base.tokenize(name, LineageStep.of(lineage_step).key, part.key, shard.tar)
            result = dask.delayed(func, pure=True)(part, shard.tar, dask_key_name=f"{name}-{token}")
            if returns_stats:
                new_parts.append(result[0])
                new_stats.append(dask.delayed(merge_stats, pure=True)(shard.stats, result[1]))
            else:
                new_parts.append(result)
        # one graph layer for all shards: Dask culls a graph layer by layer against every key (O(shards²))
        shared = share_one_layer(new_parts + new_stats, name)
        new_parts, new_stats = shared[:len(new_parts)], shared[len(new_parts):]
        with object_columns():
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
        ``nemo_curator.utils.resume``) and computes only the others. A shard that no step of this
        pipeline computed stats for (e.g. scoring saved embeddings) keeps the stats stored with
        the parquet it was read from (embedding counts and seconds): ``carried_stats`` in the
        summary counts them. Returns the run summary (also written as ``_run_summary.json``).

        What it changes in this dataset: with ``columns=None`` (every column written), or when it
        rewrote the very files the dataset reads (in place), the dataset then reads its metadata
        from the written files, so that later steps (filters, ``to_webdataset``) do not compute the
        embeddings again: ``metadata`` becomes a new collection of the rows and columns written,
        ``metadata_files`` the written parquets, pending ``shard_stats`` are cleared (they are in
        the files now); the shards' tars are unchanged, and so is the lineage (a hand edit of the
        metadata stays in it as its ``untracked`` step), and any collection taken from
        ``metadata`` before. A subset of ``columns`` written elsewhere changes nothing.
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
        job = fingerprint({"operation": "save_metadata", "lineage": lineage_keys(lineage), "id_col": self.id_col,
                           "columns": written})
        # stored stats describe the rows of the parquet read: not after a hand edit (rows may be filtered)
        carry_stats = not any(getattr(step, "operation", None) == UNTRACKED for step in lineage)
        os.makedirs(out_dir, exist_ok=True)
        parts = self.metadata.to_delayed()
        carried = [0]
        works = []
        for part, shard in zip(parts, self._shards):
            out = shard.files.moved_to(out_dir)
            inputs = identities([os.path.abspath(shard.tar), shard.metadata_file])

            def make_task(part=part, shard=shard, out=out, inputs=inputs):
                stats = shard.stats
                if stats is None and carry_stats:
                    stats = stored_embed_stats(shard.metadata_file)
                    carried[0] += stats is not None
                return dask.delayed(_write_shard_metadata, pure=False)(part, out, columns, stats, job, inputs)

            works.append(ShardWork(out.name, out.stats, inputs, [out.parquet], make_task))
        summary = run_shard_job(works, job, out_dir, "save_metadata", resume=resume, show_progress=show_progress,
                                planned_extra=lambda: {"carried_stats": carried[0]})
        overwrote_source = any(os.path.abspath(s.files.moved_to(out_dir).parquet) == s.metadata_file for s in self._shards)
        if columns is None or overwrote_source:
            backend = "pandas" if is_pandas(self.metadata._meta) else "cudf"
            shards = [DatasetShard(s.files, os.path.abspath(s.files.moved_to(out_dir).parquet)) for s in self._shards]
            metadata = _metadata_from_parquets([s.metadata_file for s in shards], self.id_col, backend)
            self._set_state(self.path, metadata, shards, self.id_col, lineage)  # a hand edit stays in the lineage
        return summary

    def to_webdataset(self, path: str, filter_column: str, samples_per_shard: int = 10000, max_shards: int = 5,
                      old_id_col: str | None = None, overwrite: bool = False, show_progress: bool = True) -> dict:
        """Write the rows whose ``filter_column`` is True as new shards (see ``nemo_curator.datasets.reshard``)."""
        return _to_webdataset(self, path, filter_column, samples_per_shard=samples_per_shard, max_shards=max_shards,
                              old_id_col=old_id_col, overwrite=overwrite, show_progress=show_progress)

    def current_lineage(self) -> tuple[LineageStep, ...]:
        """The lineage, plus a step naming the hand edits of the metadata, if any
        (``untracked=<token>``): what the resume fingerprints and every later operation hold."""
        untracked = self.untracked_changes()
        step = LineageStep(UNTRACKED, untracked, text=f"untracked={untracked}") if untracked else None
        return self.lineage + ((step,) if step else ())

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
        if self.metadata.npartitions != len(self._shards):
            raise ValueError(
                f"metadata has {self.metadata.npartitions} partitions but the dataset has {len(self._shards)} shards: "
                "operations must keep one partition per shard (do not repartition `metadata`; filter rows instead)"
            )

    def __repr__(self) -> str:
        return (f"ImageTextPairDataset(path={self.path!r}, shards={len(self._shards)}, id_col={self.id_col!r}, "
                f"columns={list(self.metadata.columns)})")


# ----------------------------------------------------------------------------------------------
# Reading
def _metadata_from_parquets(parquet_paths: Sequence[str], id_col: str, backend: str = "pandas") -> dd.DataFrame:
    """A lazy Dask DataFrame with one partition per parquet, columns = the union of their schemas."""
    meta = _empty_frame(_union_schema(parquet_paths, id_col), id_col)
    if backend == "cudf":
        meta = to_cudf(meta)
    with object_columns():
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

    Raises KeyError naming the first file that lacks ``id_col``, ValueError naming a file that is
    not parquet.
    """
    paths = list(parquet_paths)
    chunks = [paths[i:i + SCHEMA_CHUNK] for i in range(0, len(paths), SCHEMA_CHUNK)]
    schemas: dict[str, pa.Schema] = {}  # the distinct ones, in order of first appearance
    with ThreadPoolExecutor(max_workers=16) as pool:
        for distinct, lacking in pool.map(_distinct_schemas, chunks, [id_col] * len(chunks)):
            if lacking is not None:
                path, schema = lacking
                raise KeyError(f"id column {id_col!r} is not in {path}; its columns are {schema.names}. "
                               f"Pass id_col= the column that holds each sample's key")
            for key, schema in distinct.items():
                schemas.setdefault(key, schema)
    schemas = list(schemas.values())
    fields: dict[str, pa.Field] = {}
    for schema in schemas:
        for field in schema:
            if field.name not in fields or pa.types.is_null(fields[field.name].type):
                fields[field.name] = field
    fields[id_col] = pa.field(id_col, pa.string())
    ordered = [id_col] + [n for n in fields if n != id_col]
    return pa.schema([fields[n].remove_metadata() for n in ordered])


# footers read per thread task: a future per file cost the client more than the read (100,000 shards)
SCHEMA_CHUNK = 256


def _distinct_schemas(paths: Sequence[str], id_col: str) -> tuple[dict, tuple | None]:
    """The distinct schemas of ``paths`` (keyed by their text without the file metadata, which
    holds e.g. pandas' row count), and ``(path, schema)`` of the first file that lacks ``id_col``."""
    distinct: dict[str, pa.Schema] = {}
    for path in paths:
        schema = read_parquet_schema(path)
        if id_col not in schema.names:
            return distinct, (path, schema)
        distinct.setdefault(schema.remove_metadata().to_string(), schema)
    return distinct, None


def _empty_frame(schema: pa.Schema, id_col: str) -> pd.DataFrame:
    frame = schema.empty_table().to_pandas()
    frame[id_col] = frame[id_col].astype(id_dtype())
    return frame


def read_shard_metadata(parquet_path: str, id_col: str, columns: Sequence[str], backend: str = "pandas"):
    """Read one shard's parquet as a DataFrame with ``columns`` (absent ones filled with nulls).

    The id column is cast to string without reformatting (leading zeros kept; integer ids keep
    their decimal form). Raises ValueError naming the file for null or duplicate ids, or for a
    file that is not parquet.
    """
    # one thread: Arrow's thread pool added 10 MB of RSS for a 10,000-row shard (benchmark 4), no speed;
    # only the columns asked for (a filter's count pass does not read the embeddings) and the ids
    table = read_parquet_table(parquet_path, [id_col] + [c for c in columns if c != id_col], only_present=True)
    if id_col not in table.column_names:
        raise KeyError(f"id column {id_col!r} is not in {parquet_path}; its columns are "
                       f"{read_parquet_schema(parquet_path).names}")
    ids = table.column(id_col)
    if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
        ids = ids.cast(pa.string())
        table = table.set_column(table.column_names.index(id_col), id_col, ids)
    # the checks run on the Arrow column (a few µs); pandas only builds the messages
    if ids.null_count:
        rows = list(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[:5])
        raise ValueError(f"{parquet_path}: {ids.null_count} rows have no id in column {id_col!r} "
                         f"(first row positions {rows}); every row needs the key of its sample")
    if pc.count_distinct(ids).as_py() != len(ids):
        as_series = pd.Series(ids.to_pylist())
        dup = as_series[as_series.duplicated()]
        raise ValueError(f"{parquet_path}: duplicate ids in column {id_col!r}: {sorted(set(dup))[:10]}; "
                         "ids must be unique within a shard")
    present = set(table.column_names)
    frame = table.select([c for c in columns if c in present]).to_pandas()
    if id_col in frame.columns and frame[id_col].dtype != id_dtype():
        frame[id_col] = frame[id_col].astype(id_dtype())
    if len(frame.columns) < len(columns):
        for col in columns:
            if col not in present:
                frame[col] = None
        frame = frame[list(columns)]
    if backend == "cudf":
        return to_cudf(frame)
    return frame


# ----------------------------------------------------------------------------------------------
# Writing (cluster task)
def _write_shard_metadata(frame, out: Shard, columns, stats: dict | None, job: str, inputs: dict) -> dict:
    """Write one shard's metadata atomically, then its stats file with the completion marker;
    return the stats dict."""
    started = time.time()
    if columns is not None:
        frame = frame[list(columns)]
    write_parquet_atomic(partition_to_arrow(frame), out.parquet)
    record = MetadataShardStats(shard=out.name, rows=int(len(frame)), status_counts=status_counts(frame),
                                write_seconds=round(time.time() - started, 4))
    return commit_shard({**(stats or {}), **record.to_dict()}, out.stats, job, inputs, [out.parquet])


def stored_embed_stats(parquet_path: str) -> dict | None:
    """The embedder's stats (``EmbedStats`` fields) stored beside ``parquet_path`` in
    ``NNNNN.stats.json``, when they describe this very file (its completion marker records the
    file's size and mtime); else None."""
    stats = read_json(Shard.of_file(parquet_path).stats)
    record = (stats or {}).get(RESUME_KEY)
    embed = EmbedStats.from_dict(stats)
    if not isinstance(record, dict) or embed is None:
        return None
    name = os.path.basename(parquet_path)  # by name: a folder copied with its mtimes (cp -p, rsync -a) keeps its stats
    recorded = [ident for path, ident in (record.get("outputs") or {}).items() if os.path.basename(path) == name]
    if len(recorded) != 1 or recorded[0] != file_identity(parquet_path):
        return None
    return embed.to_dict()
