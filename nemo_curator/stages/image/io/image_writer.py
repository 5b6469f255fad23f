"""``ImageWriterStage``: write the images that reach it as webdataset shards with parquets (1.x API).

What it writes, per file group (all the batches of one ``FileGroupTask``):

- tars of exactly ``images_per_tar`` samples (the group's last tar may be shorter), named
  ``images-<hash of the group's files>-<NNNNNN>.tar``; each sample's members are copied byte for
  byte from its source tar (the image as it was encoded, its ``.txt``, ``.json`` and any other
  member; 1.x re-encodes the decoded pixels to JPEG and drops the rest);
- beside each tar ``.parquet`` (the sample's row of the source parquet, the id column, and
  ``image_embedding``, ``image_status``, ``aesthetic_score``, ``nsfw_score`` where stages set
  them) and ``.idx`` (a DALI index): the output is a dataset that
  ``ImageTextPairDataset.from_webdataset(output_dir, id_col=...)`` opens;
- ``images-<hash>.stats.json``: what was written, with the completion marker. A rerun of the same
  pipeline over the same input skips the file groups already written (resume; see
  ``nemo_curator.utils.shard_job``), and redoes the others after deleting what an interrupted run
  left of them. A file group none of whose images reach the writer gets one empty shard, so that
  a rerun knows it is done.

Images whose ``status`` is not "ok" (they failed to decode, or have no image member) are not
written; they are counted. Every file appears atomically.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.image.io.image_reader import MEMBER_FIELDS  # metadata keys taken from members
from nemo_curator.tasks import FileGroupTask, ImageBatch, ImageObject, StagePerfStats, sum_stage_perf
from nemo_curator.utils.arrow import partition_to_arrow
from nemo_curator.utils.constants import (AESTHETIC_COLUMN, DEFAULT_ID_COL, EMBEDDING_COLUMN, NSFW_COLUMN, OK,
                                          STATUS_COLUMN)
from nemo_curator.utils.file_utils import atomic_write, write_parquet_atomic
from nemo_curator.utils.resume import RESUME_KEY, read_json
from nemo_curator.utils.webdataset import (INDEX_SUFFIX, PARQUET_SUFFIX, STATS_SUFFIX, TAR_SUFFIX, Shard, TarMember,
                                           TarWriter, iter_tar_samples, read_member_bytes)

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class GroupPlan:
    """Where one file group's output goes: its name prefix, stats file and input files."""

    name: str
    stats_path: str
    inputs: tuple[str, ...]  # the group's files and the parquets beside its tars (what resume compares)
    sources: tuple[str, ...] = ()  # the group's files


@dataclass
class ImageWriterStage(ProcessingStage[ImageBatch, FileGroupTask]):
    """Write the images of each file group as tars of ``images_per_tar`` samples with parquets.

    Args:
        output_dir: the folder of the new shards (created).
        images_per_tar: samples per tar, across the batches of a file group.
        verbose: log every tar written.
        deterministic_name: name the files after the group's input files (a rerun writes the same
            names); False adds a random part per run (1.x: uuid names).
        remove_image_data: accepted for 1.x compatibility: the writer emits ``FileGroupTask``
            (the written paths), never pixels.

    Emits one ``FileGroupTask`` per file group: ``data`` the written tars then parquets,
    ``_metadata`` with ``num_images`` and the group's statistics (``writer_stats``).
    """

    output_dir: str
    images_per_tar: int = 1000
    verbose: bool = False
    deterministic_name: bool = True
    remove_image_data: bool = False
    name: str = "image_writer"

    fingerprint_excludes = ("name", "verbose", "remove_image_data")

    def __post_init__(self) -> None:
        if isinstance(self.images_per_tar, bool) or not isinstance(self.images_per_tar, int) or self.images_per_tar < 1:
            raise ValueError(f"images_per_tar must be a positive integer, got {self.images_per_tar!r}")
        self.output_dir = os.path.abspath(os.fspath(self.output_dir))
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise NotADirectoryError(f"output_dir {self.output_dir} exists and is not a folder")
        os.makedirs(self.output_dir, exist_ok=True)

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    # -- resume -----------------------------------------------------------------------------------
    def resume_plan(self, task) -> GroupPlan:
        """The output name, stats file and input files of the file group ``task`` (a
        ``FileGroupTask``, or any task whose ``_metadata`` has ``source_files``)."""
        sources = _source_files(task)
        name = "images-" + hashlib.sha256("|".join(sorted(sources)).encode()).hexdigest()[:12]
        inputs = list(sources)
        for path in sources:
            if path.endswith(TAR_SUFFIX) and os.path.isfile(Shard.of_file(path).parquet):
                inputs.append(Shard.of_file(path).parquet)
        return GroupPlan(name, os.path.join(self.output_dir, name + STATS_SUFFIX), tuple(inputs), tuple(sources))

    def task_from_stats(self, stats: dict, dataset_name: str = "images") -> FileGroupTask:
        """The ``FileGroupTask`` this stage emits for a group, rebuilt from the group's stats
        (what a resumed run returns for a group written before)."""
        meta = {k: v for k, v in stats.items() if k not in ("stage_perf", RESUME_KEY)}
        return FileGroupTask(dataset_name=dataset_name, data=list(meta.get("tars", [])) + list(meta.get("parquets", [])),
                             _metadata={"source_files": list(meta.get("source_files", [])),
                                        "output_dir": self.output_dir, "images_per_tar": self.images_per_tar,
                                        "num_images": int(meta.get("images_written", 0)), "writer_stats": meta},
                             _stage_perf=[StagePerfStats.from_dict(p) for p in stats.get("stage_perf", [])],
                             task_id=str(meta.get("group", "")))

    # -- work -------------------------------------------------------------------------------------
    def process(self, task: ImageBatch) -> FileGroupTask:
        """Write one batch as a file group of its own (the executor streams a group's batches)."""
        return next(iter(self.process_stream([task])))

    def process_stream(self, tasks: Iterable[ImageBatch]) -> Iterator[FileGroupTask]:
        group: _GroupWriter | None = None
        perfs: dict[int, StagePerfStats] = {}  # batches of a group share the group's earlier entries: count them once
        try:
            for batch in tasks:
                if not isinstance(batch, ImageBatch):
                    raise TypeError(f"{self.name} writes ImageBatch, got {type(batch).__name__}")
                if group is None:
                    group = _GroupWriter(self, batch)
                perfs.update((id(p), p) for p in batch._stage_perf)
                group.add(batch.data)
            if group is None:
                return
            out = group.finish()
        except BaseException:
            if group is not None:
                group.abort()
            raise
        out._stage_perf = sum_stage_perf(perfs.values())
        self._log_metrics({"written": out._metadata["num_images"], "not_written": out._metadata["writer_stats"]["not_written"]})
        yield out


def _source_files(task) -> list[str]:
    sources = (getattr(task, "_metadata", None) or {}).get("source_files")
    if not sources and isinstance(task, FileGroupTask):
        sources = task.data
    if not sources and isinstance(task, ImageBatch):  # batches made by hand: the images' own sources
        sources = sorted({o.tar_path or o.image_path for o in task.data}) or [task.task_id or "batch"]
    return [os.path.abspath(os.fspath(p)) if "://" not in str(p) else str(p) for p in sources]


class _GroupWriter:
    """Writes the batches of one file group: tars of ``images_per_tar`` members, parquet and idx beside."""

    def __init__(self, stage: ImageWriterStage, first: ImageBatch):
        self.stage = stage
        self.started = time.time()
        self.plan = stage.resume_plan(first)
        self.meta = dict(first._metadata)
        self.dataset_name = first.dataset_name
        self.id_col = self.meta.get("id_col", DEFAULT_ID_COL)
        self.prefix = self.plan.name if stage.deterministic_name else f"{self.plan.name}-{uuid.uuid4().hex[:8]}"
        self._remove_previous_outputs()
        self.sources: dict[str, _SourceTar] = {}
        self.shard: _OpenShard | None = None
        self.written: list[Shard] = []
        self.keys_in_shard: set[str] = set()
        self.counts = {"images_in": 0, "images_written": 0, "not_written": 0, "duplicate_id": 0, "reencoded": 0,
                       "bytes_written": 0}
        self.status_counts: dict[str, int] = {}

    def _remove_previous_outputs(self) -> None:
        """Delete what an earlier run wrote for this group (its stats list it; deterministic names
        share the prefix), and the temporaries an interrupted run left."""
        folder = self.stage.output_dir
        old = read_json(self.plan.stats_path) or {}
        doomed = {os.path.basename(p) for key in ("tars", "parquets", "index_files") for p in old.get(key, [])}
        for entry in os.listdir(folder):
            if entry.startswith(self.plan.name + "-") and entry.endswith((TAR_SUFFIX, PARQUET_SUFFIX, INDEX_SUFFIX)):
                doomed.add(entry)
        doomed.update(e for e in os.listdir(folder) if e.startswith("." + self.plan.name) and e.endswith(".tmp"))
        for entry in doomed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, entry))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.plan.stats_path)  # the old marker no longer describes the folder

    def add(self, objects: list[ImageObject]) -> None:
        for obj in objects:
            self.counts["images_in"] += 1
            if obj.status != OK:
                self.counts["not_written"] += 1
                self.status_counts[obj.status] = self.status_counts.get(obj.status, 0) + 1
                continue
            members = self._members(obj)
            if members is None:
                self.counts["not_written"] += 1
                continue
            if self.shard is None:
                self.shard = _OpenShard(Shard.in_folder(self.stage.output_dir,
                                                        f"{self.prefix}-{len(self.written):06d}"))
                self.keys_in_shard = set()
            if obj.image_id in self.keys_in_shard:
                self.counts["duplicate_id"] += 1
                self.counts["not_written"] += 1
                logger.warning("%s: id %s appears twice in one output tar: the second is not written",
                               self.stage.name, obj.image_id)
                continue
            self.keys_in_shard.add(obj.image_id)
            for name, data in members:
                self.shard.writer.add(name, data)
                self.counts["bytes_written"] += len(data)
            self.shard.rows.append(self._row(obj))
            self.counts["images_written"] += 1
            if len(self.shard.rows) == self.stage.images_per_tar:
                self._close_shard()

    def _members(self, obj: ImageObject) -> list[tuple[str, bytes]] | None:
        """The sample's members to copy: from its source tar, else its image file, else its pixels
        encoded as PNG (lossless), else None (nothing to write)."""
        if obj.tar_path:
            source = self.sources.get(obj.tar_path)
            if source is None:
                source = self.sources[obj.tar_path] = _SourceTar(obj.tar_path)
            members = source.members(obj.image_id)
            if members:
                return members
            logger.warning("%s: sample %s is not in %s any more: not written", self.stage.name, obj.image_id, obj.tar_path)
            return None
        if obj.image_path and os.path.isfile(obj.image_path):
            ext = os.path.splitext(obj.image_path)[1].lower() or ".jpg"
            with open(obj.image_path, "rb") as f:
                return [(f"{obj.image_id}{ext}", f.read())]
        if obj.image_data is not None:
            self.counts["reencoded"] += 1
            return [(f"{obj.image_id}.png", _png(obj.image_data))]
        logger.warning("%s: %s has neither a source nor pixels: not written", self.stage.name, obj.image_id)
        return None

    def _row(self, obj: ImageObject) -> dict[str, Any]:
        source_columns = self.sources[obj.tar_path].columns if obj.tar_path in self.sources else set()
        row = {k: v for k, v in obj.metadata.items() if k not in MEMBER_FIELDS or k in source_columns}
        row[self.id_col] = str(obj.image_id)
        row[STATUS_COLUMN] = obj.status
        if obj.embedding is not None:
            row[EMBEDDING_COLUMN] = np.asarray(obj.embedding, dtype=np.float32)
        if obj.aesthetic_score is not None:
            row[AESTHETIC_COLUMN] = obj.aesthetic_score
        if obj.nsfw_score is not None:
            row[NSFW_COLUMN] = obj.nsfw_score
        return row

    def _close_shard(self) -> None:
        shard, self.shard = self.shard, None
        shard.close(self.id_col)
        self.written.append(shard.files)
        if self.stage.verbose:
            logger.info("%s: wrote %s (%d images)", self.stage.name, shard.files.tar, len(shard.rows))

    def finish(self) -> FileGroupTask:
        if self.shard is not None:
            self._close_shard()
        if not self.written:  # nothing reached the writer: one empty shard marks the group done
            self.shard = _OpenShard(Shard.in_folder(self.stage.output_dir, f"{self.prefix}-{0:06d}"))
            self._close_shard()
        for source in self.sources.values():
            source.close()
        stats = {"group": self.plan.name, "source_files": list(self.plan.sources), **self.counts,
                 "tars_written": len(self.written),
                 **{f"status_{k}": v for k, v in self.status_counts.items()},
                 "tars": [s.tar for s in self.written], "parquets": [s.parquet for s in self.written],
                 "index_files": [s.idx for s in self.written], "write_seconds": round(time.time() - self.started, 4)}
        return FileGroupTask(dataset_name=self.dataset_name, data=stats["tars"] + stats["parquets"],
                             _metadata={"source_files": list(self.plan.sources), "output_dir": self.stage.output_dir,
                                        "images_per_tar": self.stage.images_per_tar,
                                        "num_images": self.counts["images_written"], "writer_stats": stats},
                             task_id=self.plan.name)

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
            self.shard = None
        for source in self.sources.values():
            source.close()


class _SourceTar:
    """An input tar: its samples' members (read from the headers once) and an open handle."""

    def __init__(self, path: str):
        self.path = path
        self.index: dict[str, list[TarMember]] = {}
        for key, members in iter_tar_samples(path):
            self.index.setdefault(key, members)
        self.file = open(path, "rb")
        parquet = Shard.of_file(path).parquet if path.endswith(TAR_SUFFIX) else None
        self.columns = set(pq.read_schema(parquet).names) if parquet and os.path.isfile(parquet) else set()

    def members(self, key: str) -> list[tuple[str, bytes]] | None:
        members = self.index.get(key)
        if not members:
            return None
        return [(m.name, read_member_bytes(self.file, m)) for m in members]

    def close(self) -> None:
        self.file.close()


class _OpenShard:
    """A tar being written (atomically: it appears under its name when closed) and its rows."""

    def __init__(self, files: Shard):
        self.files = files
        self._stack = contextlib.ExitStack()
        self._file = self._stack.enter_context(atomic_write(files.tar))
        self.writer = TarWriter(self._file)
        self.rows: list[dict] = []

    def close(self, id_col: str) -> None:
        self.writer.close()
        self._stack.close()  # the tar appears complete
        frame = pd.DataFrame(self.rows) if self.rows else pd.DataFrame({id_col: pd.Series([], dtype=str)})
        ordered = [id_col] + [c for c in frame.columns if c != id_col]
        frame = frame[ordered]
        for column in (AESTHETIC_COLUMN, NSFW_COLUMN):
            if column in frame.columns:
                frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(np.float32)
        write_parquet_atomic(partition_to_arrow(frame), self.files.parquet)
        with atomic_write(self.files.idx, "w") as f:
            f.write("\n".join(self.writer.index_lines()) + "\n")

    def abort(self) -> None:
        try:
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)  # removes the temporary
        except RuntimeError:
            pass


def _png(image_data) -> bytes:
    from PIL import Image

    array = image_data.cpu().numpy() if hasattr(image_data, "cpu") else np.asarray(image_data)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = ["GroupPlan", "ImageWriterStage"]
