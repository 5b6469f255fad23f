"""``to_webdataset``: write the kept rows of a dataset as new shards, in parallel and resumable.

Plan (on the client, small): one task per input shard counts its rows whose ``filter_column`` is
True (only the id and filter columns travel back). The kept rows, in input-shard order and in
each shard's row order, are cut into output shards of ``samples_per_shard``; output shard ``o``
is a list of pieces ``(input shard, start, stop)`` over kept-row positions.

Work (on the cluster): per input shard that feeds an unfinished output shard, one task filters
its partition and one scans its tar's headers for the kept ids (offsets, no bytes). Then ONE TASK
PER OUTPUT SHARD seeks and reads each kept member's bytes from the input tars, one member at a
time, and writes ``NNNNN.tar`` + ``NNNNN.idx`` (DALI index v1.2) + ``NNNNN.parquet`` +
``NNNNN.stats.json`` (last: the completion marker, see ``nemo_curator.utils.resume``), each file
atomically. Memory per task: one member's bytes, the metadata rows of its output shard and the
(offset, size) of the kept members of its input shards; never a whole tar.

New ids: ``f"{shard:0{max_shards}d}{index:0{index_digits}d}"`` with
``index_digits = len(str(samples_per_shard - 1))``: output shard 3, sample 17, with
``max_shards=5, samples_per_shard=10000`` is ``"000030017"``. ``index`` counts the samples
actually written to the shard (a kept row whose sample is missing from its tar is skipped and
takes no index), so the ids of a shard are contiguous from 0.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from typing import Sequence

import dask
import numpy as np
import pandas as pd

from nemo_curator.utils.arrow import partition_to_arrow
from nemo_curator.utils.file_utils import atomic_write, write_json_atomic, write_parquet_atomic
from nemo_curator.utils.frames import to_pandas
from nemo_curator.utils.graphs import share_one_layer
from nemo_curator.utils.progress import compute_with_progress
from nemo_curator.utils.resume import file_identity, fingerprint, identities, lineage_keys, read_json
from nemo_curator.utils.shard_job import ShardWork, commit_shard, run_shard_job, write_summary
from nemo_curator.utils.stats import RUN_SUMMARY_NAME, ReshardShardStats, status_counts, summarize_stats
from nemo_curator.utils.webdataset import Shard, TarMember, TarWriter, iter_tar_samples, read_member_bytes, shard_name

logger = logging.getLogger(__name__)

JOB_FILE_NAME = "_to_webdataset_job.json"
JSON_ID_FIELDS = ("key", "id")  # besides id_col, fields of a sample's .json that may hold its id
_OUTPUT_FILE_RE = re.compile(r"^[^.].*(\.tar|\.parquet|\.idx|\.stats\.json)$")

Piece = tuple[int, int, int]  # (input shard index, start, stop) over that shard's kept rows


def to_webdataset(dataset, path: str, filter_column: str, samples_per_shard: int = 10000, max_shards: int = 5,
                  old_id_col: str | None = None, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Write the rows of ``dataset`` whose ``filter_column`` is True (null/NaN: dropped) as new shards.

    Every member of a kept sample is copied byte for byte, except its ``.json`` whose id field is
    rewritten to the new id (see the module docstring for the id scheme); ``old_id_col`` (if
    given) receives the old id, in the parquet and in the ``.json``. A folder that already holds
    shards raises FileExistsError unless they were written by this same job (then the finished
    output shards are skipped: resume) or ``overwrite=True`` (its shard files are deleted first).
    Returns the run summary, also written to ``<path>/_run_summary.json``.
    """
    out_dir = os.path.abspath(os.fspath(path))
    metadata, id_col = dataset.metadata, dataset.id_col
    _validate(dataset, out_dir, filter_column, samples_per_shard, max_shards, old_id_col)
    existing = _output_files(out_dir)
    previous_job = read_json(os.path.join(out_dir, JOB_FILE_NAME))
    if existing and not overwrite and previous_job is None:
        raise FileExistsError(_exists_message(out_dir, existing, "that were not written by to_webdataset"))

    started = time.time()
    parts = metadata[[id_col, filter_column]].to_delayed()
    summaries = compute_with_progress([dask.delayed(_kept_summary, pure=True)(p, filter_column, id_col) for p in parts],
                                      desc="to_webdataset: count kept rows", show=show_progress)
    kept_counts = [s["kept"] for s in summaries]
    plan = plan_output_shards(kept_counts, samples_per_shard)
    if len(plan) > 10**max_shards:
        raise ValueError(f"to_webdataset: {sum(kept_counts)} kept samples at samples_per_shard={samples_per_shard} "
                         f"make {len(plan)} output shards, more than max_shards={max_shards} digits can number "
                         f"({10**max_shards}); raise max_shards to {len(str(len(plan) - 1))} or samples_per_shard "
                         f"to {math.ceil(sum(kept_counts) / 10**max_shards)}")

    inputs = [_input_identity(shard.tar, shard.metadata_file, s) for shard, s in zip(dataset.shards, summaries)]
    params = {"filter_column": filter_column, "samples_per_shard": samples_per_shard, "max_shards": max_shards,
              "old_id_col": old_id_col}
    job = fingerprint({"operation": "to_webdataset", "lineage": lineage_keys(dataset.current_lineage()), "id_col": id_col,
                       "columns": list(metadata.columns), **params, "inputs": inputs})
    if existing and not overwrite and previous_job.get("job") != job:
        raise FileExistsError(_exists_message(out_dir, existing, "written by a different to_webdataset job (another "
                                              "pipeline, filter, parameters or input files)"))
    if overwrite:
        for name in existing + [JOB_FILE_NAME, RUN_SUMMARY_NAME]:
            if os.path.exists(os.path.join(out_dir, name)):
                os.unlink(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic({"job": job, "lineage": lineage_keys(dataset.current_lineage()), **params, "output_shards": len(plan)},
                      os.path.join(out_dir, JOB_FILE_NAME))

    input_table = [{"shard": shard.name, "rows": s["rows"], "kept": s["kept"]} for shard, s in zip(dataset.shards, summaries)]
    extra = {"path": out_dir, **params, "rows_in": sum(s["rows"] for s in summaries), "rows_kept": sum(kept_counts),
             "inputs": input_table}
    if not plan:
        message = (f"to_webdataset: no row of {len(parts)} input shards has {filter_column!r} True; "
                   f"no shard written to {out_dir}")
        warnings.warn(message, stacklevel=2)
        logger.warning(message)
        summary = summarize_stats([], seconds=time.time() - started, operation="to_webdataset", **extra)
        write_summary(summary, out_dir)
        return summary

    works = _output_works(dataset, out_dir, plan, job, filter_column, max_shards, samples_per_shard, old_id_col)
    return run_shard_job(works, job, out_dir, "to_webdataset", show_progress=show_progress, started=started,
                         **{k: v for k, v in extra.items() if k != "path"})


def _validate(dataset, out_dir: str, filter_column: str, samples_per_shard: int, max_shards: int,
              old_id_col: str | None) -> None:
    dataset._check_alignment()
    columns = list(dataset.metadata.columns)
    if filter_column not in columns:
        raise KeyError(f"to_webdataset: filter_column {filter_column!r} is not in the metadata (columns {columns}); "
                       f"add it first, e.g. dataset.metadata[{filter_column!r}] = dataset.metadata.aesthetic_score > 6")
    if filter_column == dataset.id_col:
        raise ValueError(f"to_webdataset: filter_column {filter_column!r} is the id column; pass a boolean column")
    for name, value in (("samples_per_shard", samples_per_shard), ("max_shards", max_shards)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"to_webdataset: {name} must be a positive integer, got {value!r}")
    if old_id_col is not None and old_id_col == dataset.id_col:
        raise ValueError(f"to_webdataset: old_id_col {old_id_col!r} is the id column that receives the new ids; "
                         "pass another name (e.g. 'old_key') or None")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"to_webdataset: {out_dir} exists and is not a folder; pass a folder path")
    folders = {os.path.dirname(os.path.abspath(path)) for shard in dataset.shards for path in (shard.tar, shard.metadata_file)}
    sources = {os.path.realpath(folder) for folder in folders}  # a realpath per folder, not per file
    if os.path.realpath(out_dir) in sources | {os.path.realpath(dataset.path)}:
        raise ValueError(f"to_webdataset: {out_dir} holds the input shards or the metadata they are read from; "
                         f"write the new shards to another folder")


def _exists_message(out_dir: str, existing: list[str], why: str) -> str:
    shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
    return (f"to_webdataset: {out_dir} already holds shard files ({shown}) {why}; pass overwrite=True to delete "
            f"them first, or write to another folder")


def _output_files(out_dir: str) -> list[str]:
    """Names of the shard files (tar, parquet, idx, stats) in ``out_dir`` (none if it is absent)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(n for n in os.listdir(out_dir) if _OUTPUT_FILE_RE.match(n))


def _input_identity(tar: str, parquet: str, summary: dict) -> dict:
    """What the job fingerprint knows of one input shard: its files and the ids it keeps."""
    tar = os.path.abspath(tar)
    return {"tar": tar, "tar_file": file_identity(tar), "parquet_file": file_identity(parquet), **summary}


# ----------------------------------------------------------------------------------------------
# Planning (pure)
def plan_output_shards(kept_counts: Sequence[int], samples_per_shard: int) -> list[list[Piece]]:
    """Cut the kept rows (input shards in order) into output shards of at most ``samples_per_shard``.

    Returns, per output shard, its pieces ``(input shard index, start, stop)`` over kept-row
    positions; input shards that keep nothing appear in no piece.
    ``plan_output_shards([3, 0, 4], 5) == [[(0, 0, 3), (2, 0, 2)], [(2, 2, 4)]]``.
    """
    plan: list[list[Piece]] = []
    current: list[Piece] = []
    room = samples_per_shard
    for i, count in enumerate(kept_counts):
        start = 0
        while start < count:
            take = min(room, count - start)
            current.append((i, start, start + take))
            start += take
            room -= take
            if room == 0:
                plan.append(current)
                current, room = [], samples_per_shard
    if current:
        plan.append(current)
    return plan


def new_sample_id(shard: int, index: int, max_shards: int, samples_per_shard: int) -> str:
    """The id of the ``index``-th sample of output shard ``shard``: ``new_sample_id(3, 17, 5, 10000) == "000030017"``."""
    return f"{shard:0{max_shards}d}{index:0{len(str(samples_per_shard - 1))}d}"


def kept_mask(values: pd.Series) -> np.ndarray:
    """Boolean array, True where the value is True (bool, nullable boolean, 1); null/NaN and anything else: False."""
    return values.eq(True).fillna(False).astype(bool).to_numpy()


def rewrite_json_id(data: bytes, old_id: str, new_id: str, id_col: str, old_id_col: str | None) -> bytes | None:
    """A sample's ``.json`` with its id replaced by ``new_id``, or None when it is not a JSON object.

    The fields among ``id_col``, "key" and "id" whose value is ``old_id`` get ``new_id`` (if none
    holds it, ``id_col`` is added); ``old_id_col`` (if given) is set to ``old_id``.
    """
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    fields = [f for f in dict.fromkeys((id_col,) + JSON_ID_FIELDS) if f in obj and str(obj[f]) == old_id]
    for field in fields or [id_col]:
        obj[field] = new_id
    if old_id_col:
        obj[old_id_col] = old_id
    return json.dumps(obj, ensure_ascii=False).encode()


# ----------------------------------------------------------------------------------------------
# Cluster tasks
def _kept_summary(frame, filter_column: str, id_col: str) -> dict:
    """``{"rows", "kept", "kept_ids_sha256"}`` of one partition (the hash fingerprints the selection)."""
    frame = to_pandas(frame)
    ids = frame[id_col][kept_mask(frame[filter_column])]
    digest = hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()
    return {"rows": int(len(frame)), "kept": int(len(ids)), "kept_ids_sha256": digest}


def _kept_rows(frame, filter_column: str) -> pd.DataFrame:
    frame = to_pandas(frame)
    return frame[kept_mask(frame[filter_column])].reset_index(drop=True)


def _read_piece(frame, tar_path: str, filter_column: str, id_col: str, start: int, stop: int) -> tuple[pd.DataFrame, dict]:
    """The kept rows ``start:stop`` of one input shard and where their samples lie in its tar."""
    rows = _kept_rows(frame, filter_column).iloc[start:stop]
    return rows, _locate_samples(tar_path, rows, id_col)


def _locate_samples(tar_path: str, kept: pd.DataFrame, id_col: str) -> dict:
    """Where the samples of ``kept`` lie in ``tar_path``: ``{"members": {id: [TarMember]}, "duplicate_keys": n}``.

    Reads tar headers only; samples whose id is not in ``kept`` are not recorded. A key that
    appears again later in the tar keeps its first group (the repeat is counted in ``duplicate_keys``).
    """
    wanted = set(kept[id_col].astype(str))
    members: dict[str, list[TarMember]] = {}
    duplicates = 0
    for key, group in iter_tar_samples(tar_path):
        if key in wanted:
            if key in members:
                duplicates += 1
            else:
                members[key] = group
    return {"members": members, "duplicate_keys": duplicates}


def _output_works(dataset, out_dir: str, plan: list[list[Piece]], job: str, filter_column: str, max_shards: int,
                  samples_per_shard: int, old_id_col: str | None) -> list[ShardWork]:
    """One ``ShardWork`` per output shard, built only for output shards that are not complete.
    Its task gathers one task per piece (``_read_piece``: the kept rows of an input shard and
    their members' offsets), which the workers run in parallel; an input shard that feeds two
    output shards is read by each of them (a second parquet read and header scan, at most one
    per output shard, where sharing it would cost every piece a task of its own)."""
    parts = dataset.metadata.to_delayed()
    built: dict = {}  # (input, start, stop) -> its piece, over one graph layer shared by every output shard

    def all_pieces() -> dict:
        # one share_one_layer call for all the pieces: dask.delayed culls the graph of its arguments
        # layer by layer (O(pieces²) with a layer per piece), and a call per output shard would
        # copy the whole upstream graph into each output shard's layer (O(outputs x inputs))
        if not built:
            keys = [(i, start, stop) for pieces in plan for i, start, stop in pieces]
            pieces = [dask.delayed(_read_piece, pure=True)(parts[i], dataset.shards[i].tar, filter_column,
                                                           dataset.id_col, start, stop) for i, start, stop in keys]
            built.update(zip(keys, share_one_layer(pieces, "read-pieces")))
        return built

    def make_task(o: int, pieces: list[Piece], shard: Shard, inputs: dict):
        shared = all_pieces()
        args = [(dataset.shards[i].tar, start, stop, shared[(i, start, stop)]) for i, start, stop in pieces]
        return dask.delayed(_write_output_shard, pure=False)(args, o, shard, dataset.id_col, old_id_col, max_shards,
                                                             samples_per_shard, job, inputs)

    works = []
    for o, pieces in enumerate(plan):
        shard = Shard.in_folder(out_dir, shard_name(o, max_shards))
        inputs = identities([os.path.abspath(dataset.shards[i].tar) for i, _, _ in pieces])
        works.append(ShardWork(shard.name, shard.stats, inputs, [shard.tar, shard.idx, shard.parquet],
                               lambda o=o, pieces=pieces, shard=shard, inputs=inputs: make_task(o, pieces, shard, inputs)))
    return works


def _write_output_shard(pieces, index: int, shard: Shard, id_col: str, old_id_col: str | None,
                        max_shards: int, samples_per_shard: int, job: str, inputs: dict) -> dict:
    """Write one output shard from its pieces ``(tar, start, stop, (rows, located))``; return its stats.

    Members are read one at a time (seek + read) and written in row order; the parquet gets one
    row per written sample. Files: tar, idx, parquet, then the stats file (completion marker).
    """
    started = time.time()
    stats = ReshardShardStats(shard=shard.name)
    frames, new_ids, old_ids = [], [], []
    with atomic_write(shard.tar) as out:
        writer = TarWriter(out)
        for tar_path, _, _, (rows, located) in pieces:
            stats.samples_in += len(rows)
            stats.duplicate_keys += located["duplicate_keys"]
            written = np.zeros(len(rows), dtype=bool)
            with open(tar_path, "rb") as src:
                for pos, old_id in enumerate(rows[id_col].astype(str)):
                    members = located["members"].get(old_id)
                    if members is None:
                        stats.missing_sample += 1
                        continue
                    new_id = new_sample_id(index, len(new_ids), max_shards, samples_per_shard)
                    for member in members:
                        data = read_member_bytes(src, member)
                        if member.ext == "json":
                            rewritten = rewrite_json_id(data, old_id, new_id, id_col, old_id_col)
                            if rewritten is None:
                                stats.json_unreadable += 1
                            else:
                                stats.json_rewritten += 1
                                data = rewritten
                        writer.add(f"{new_id}{member.name[len(old_id):]}", data)
                        stats.members_written += 1
                    written[pos] = True
                    new_ids.append(new_id)
                    old_ids.append(old_id)
            frames.append(rows[written])
        writer.close()
    with atomic_write(shard.idx, "w") as f:
        f.write("\n".join(writer.index_lines()) + "\n")
    table = pd.concat(frames, ignore_index=True)
    table[id_col] = pd.array(new_ids, dtype=table[id_col].dtype)
    if old_id_col:
        table[old_id_col] = pd.array(old_ids, dtype=table[id_col].dtype)
    write_parquet_atomic(partition_to_arrow(table), shard.parquet)
    stats.samples_written = len(new_ids)
    if stats.missing_sample:
        logger.warning("to_webdataset: %d kept rows of output shard %s have no sample in their tar (skipped)",
                       stats.missing_sample, shard.name)
    stats.status_counts = status_counts(table)
    stats.bytes_written = os.path.getsize(shard.tar)
    stats.inputs = [{"tar": t, "start": a, "stop": b} for t, a, b, _ in pieces]
    stats.seconds = round(time.time() - started, 4)
    return commit_shard(stats.to_dict(), shard.stats, job, inputs, [shard.tar, shard.idx, shard.parquet])
