"""``ImageReaderStage``: decode the images of webdataset tars into ``ImageBatch`` (1.x API).

Reading is done by ``nemo_curator.image.shard_reader.DaliShardReader`` (the reader of the legacy
embedder): DALI decodes on the worker's GPU ("mixed") or CPU, every image extension of
``image_extensions`` is read, and an image that cannot be decoded gets ``status="decode_failed"``
while the rest of its batch goes on. Unlike 1.x:

- ``image_id`` is the sample's webdataset key (1.x invents ``<tar>_<i:06d>``), and ``metadata``
  holds the sample's row of the shard parquet beside the tar plus its ``.txt`` and ``.json``;
- parquet rows without a sample, and samples without an image member, come out with
  ``status="missing_image"`` (nothing disappears silently);
- batches are produced one at a time and flow through the next stages before the next is
  decoded (1.x decodes a whole file group into memory first).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import InitVar, dataclass
from typing import Iterable, Iterator, Sequence

import pyarrow.parquet as pq

from nemo_curator.image.shard_reader import DaliShardReader
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import FileGroupTask, ImageBatch, ImageObject
from nemo_curator.utils.constants import DECODE_FAILED, DEFAULT_ID_COL, EXTRA_IN_TAR, MISSING_IMAGE, OK
from nemo_curator.utils.webdataset import (DEFAULT_IMAGE_EXTENSIONS, Shard, TarMember, iter_tar_samples,
                                           pick_image_member, read_member_bytes)

logger = logging.getLogger(__name__)

MEMBER_FIELDS = ("txt", "json")  # sample members copied into ImageObject.metadata


@dataclass
class ImageReaderStage(ProcessingStage[FileGroupTask, ImageBatch]):
    """Read the tars of each ``FileGroupTask`` into ``ImageBatch`` of ``dali_batch_size`` images.

    Args:
        dali_batch_size: images per DALI batch and per ``ImageBatch`` (the last of a file group
            may be smaller). ``task_batch_size`` and ``batch_size`` are older spellings of it.
        verbose: log one line per tar.
        num_threads: DALI CPU threads.
        num_gpus_per_worker: GPU share of one task (see ``ImageEmbeddingStage``).
        image_extensions: member extensions taken as a sample's image, in order of preference.
        id_col: the parquet column holding the sample keys (img2dataset: ``key``).

    Every sample of a tar becomes one ``ImageObject``; its ``image_data`` is the decoded (H, W, 3)
    uint8 RGB picture (numpy on a CPU worker, a CUDA tensor on a GPU worker).
    """

    dali_batch_size: int = 100
    verbose: bool = True
    num_threads: int = 8
    num_gpus_per_worker: float = 0.25
    name: str = "image_reader"
    image_extensions: Sequence[str] = DEFAULT_IMAGE_EXTENSIONS
    id_col: str = DEFAULT_ID_COL
    task_batch_size: InitVar[int | None] = None
    batch_size: InitVar[int | None] = None

    fingerprint_excludes = ("name", "verbose", "num_gpus_per_worker", "num_threads", "dali_batch_size")

    def __post_init__(self, task_batch_size: int | None, batch_size: int | None) -> None:
        given = {k: v for k, v in (("task_batch_size", task_batch_size), ("batch_size", batch_size)) if v is not None}
        for spelling, value in given.items():
            if self.dali_batch_size != 100 and value != self.dali_batch_size:
                raise ValueError(f"{spelling}={value} and dali_batch_size={self.dali_batch_size} name the same "
                                 f"setting (images per batch): pass one of them")
            self.dali_batch_size = value
        if len(set(given.values())) > 1:
            raise ValueError(f"{given} name the same setting (images per batch): pass one of them")
        if isinstance(self.dali_batch_size, bool) or not isinstance(self.dali_batch_size, int) or self.dali_batch_size < 1:
            raise ValueError(f"dali_batch_size must be a positive integer, got {self.dali_batch_size!r}")
        if isinstance(self.num_gpus_per_worker, bool) or not isinstance(self.num_gpus_per_worker, (int, float)) \
                or self.num_gpus_per_worker < 0:
            raise ValueError(f"num_gpus_per_worker must be a number >= 0, got {self.num_gpus_per_worker!r}")
        self.image_extensions = tuple(e.lower().lstrip(".") for e in self.image_extensions)
        self.batch_size = 1  # ProcessingStage's meaning: tasks per process_batch call
        self.resources = Resources(gpus=self.num_gpus_per_worker)
        # settings checked here, on the client; the DALI threads are validated by the reader
        self.shard_reader()

    def shard_reader(self) -> DaliShardReader:
        """The DALI reader: decoded pictures (no transform), on the worker's GPU or CPU."""
        return DaliShardReader(None, batch_size=self.dali_batch_size, num_threads=self.num_threads, device="auto",
                               image_extensions=self.image_extensions)

    def inputs(self) -> tuple[list[str], list[str]]:
        return [], []

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], ["image_data", "image_path", "image_id", "metadata"]

    # -- work -------------------------------------------------------------------------------------
    def process(self, task: FileGroupTask) -> list[ImageBatch]:
        """All the batches of one file group (the executor streams them with ``process_stream``)."""
        return list(self.process_stream([task]))

    def process_stream(self, tasks: Iterable[FileGroupTask]) -> Iterator[ImageBatch]:
        reader = self.shard_reader()
        for group in tasks:
            if not isinstance(group, FileGroupTask):
                raise TypeError(f"{self.name} reads FileGroupTask (from FilePartitioningStage), got {type(group).__name__}")
            # the writer names its output after source_files: the same on the client and the workers
            meta = {"source_files": list(group.data), **group._metadata, "id_col": self.id_col}
            pending: list[ImageObject] = []
            emitted = 0
            for tar_path in group.data:
                for obj in self.read_tar(tar_path, reader):
                    pending.append(obj)
                    if len(pending) == self.dali_batch_size:
                        yield self._batch(group, meta, pending, emitted)
                        emitted, pending = emitted + 1, []
            if pending or emitted == 0:  # a group always yields a batch, maybe empty: the writer sees every group
                yield self._batch(group, meta, pending, emitted)

    def _batch(self, group: FileGroupTask, meta: dict, objects: list[ImageObject], index: int) -> ImageBatch:
        counts = {s: sum(1 for o in objects if o.status == s) for s in (DECODE_FAILED, MISSING_IMAGE)}
        self._log_metrics({"images": len(objects), **counts})
        # the group's timings so far (the planning stage) go with its first batch only: summed over a
        # run's tasks, every stage then counts once
        return ImageBatch(dataset_name=group.dataset_name, data=objects, _metadata=dict(meta),
                          _stage_perf=list(group._stage_perf) if index == 0 else [], task_id=f"{group.task_id}_{index}")

    def read_tar(self, tar_path: str, reader: DaliShardReader | None = None) -> Iterator[ImageObject]:
        """The ``ImageObject`` of every sample of one tar (and of parquet rows without a sample)."""
        reader = reader or self.shard_reader()
        tar_path = os.fspath(tar_path)
        rows = _parquet_rows(Shard.of_file(tar_path).parquet if tar_path.endswith(".tar") else None, self.id_col)
        samples: dict[str, list[TarMember]] = {}
        for key, members in iter_tar_samples(tar_path):
            samples.setdefault(key, members)
        extras = _member_fields(tar_path, samples, rows)
        seen: set[str] = set()
        counts = {OK: 0, DECODE_FAILED: 0, MISSING_IMAGE: 0, EXTRA_IN_TAR: 0}

        def make(key: str, status: str, image_data=None, error: str | None = None, member: str | None = None):
            seen.add(key)
            counts[status] += 1
            metadata = {**rows.get(key, {}), **extras.get(key, {})}
            path = f"{tar_path}/{member}" if member else ""
            return ImageObject(image_path=path, image_id=key, metadata=metadata, image_data=image_data,
                               status=status, error=error, tar_path=tar_path)

        members_by_key = {key: _image_member_name(members, self.image_extensions) for key, members in samples.items()}
        for item in reader.read(tar_path):
            if item.status == EXTRA_IN_TAR:  # a key that repeats in the tar: its first sample is read
                counts[EXTRA_IN_TAR] += len(item.ids)
                logger.warning("%s: keys %s appear more than once; their first sample is read", tar_path, item.ids[:5])
                continue
            if item.batch is None:
                for key in item.ids:
                    yield make(key, item.status, error=item.error, member=members_by_key.get(key))
                continue
            for key, picture in zip(item.ids, item.batch):
                yield make(key, OK, _host_or_device(picture), member=members_by_key.get(key))
        for key in rows:
            if key not in seen:  # a parquet row whose sample is not in the tar
                yield make(key, MISSING_IMAGE, error=f"no sample {key!r} in {tar_path}")
        level = logging.INFO if self.verbose else logging.DEBUG
        logger.log(level, "%s: read %s", os.path.basename(tar_path), {k: v for k, v in counts.items() if v})


def _host_or_device(picture):
    """A decoded picture as the stages keep it: numpy on the CPU, the CUDA tensor on a GPU."""
    return picture.numpy() if picture.device.type == "cpu" else picture


def _image_member_name(members: list[TarMember], extensions: Sequence[str]) -> str | None:
    member = pick_image_member(members, extensions)
    return member.name if member else None


def _parquet_rows(parquet_path: str | None, id_col: str) -> dict[str, dict]:
    """``{key: row}`` of the shard parquet (empty when there is none; first row of a repeated key)."""
    if not parquet_path or not os.path.isfile(parquet_path):
        return {}
    try:
        table = pq.read_table(parquet_path, use_threads=False)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{parquet_path} is not a readable parquet file ({type(err).__name__}: {err}): restore it, "
                         f"or move it away to read the tar without metadata") from err
    if id_col not in table.column_names:
        logger.warning("%s has no column %r (columns %s): its rows are not attached; pass id_col= to ImageReaderStage",
                       parquet_path, id_col, table.column_names)
        return {}
    rows: dict[str, dict] = {}
    for row in table.to_pylist():
        key = row.get(id_col)
        if key is None:
            continue
        rows.setdefault(str(key), row)
    return rows


def _member_fields(tar_path: str, samples: dict[str, list[TarMember]], rows: dict[str, dict]) -> dict[str, dict]:
    """``{key: {"txt": str, "json": object}}`` from the samples' ``.txt``/``.json`` members
    (a parquet column of the same name wins)."""
    out: dict[str, dict] = {}
    with open(tar_path, "rb") as f:
        for key, members in samples.items():
            fields = {}
            row = rows.get(key, {})
            for member in members:
                if member.ext not in MEMBER_FIELDS or member.ext in row or member.ext in fields:
                    continue
                text = read_member_bytes(f, member).decode("utf-8", errors="replace")
                if member.ext == "json":
                    try:
                        fields["json"] = json.loads(text)
                    except ValueError:
                        logger.warning("%s: %s is not valid JSON; kept as text", tar_path, member.name)
                        fields["json"] = text
                else:
                    fields["txt"] = text
            if fields:
                out[key] = fields
    return out
