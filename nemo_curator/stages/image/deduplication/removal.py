"""``ImageDuplicatesRemovalStage``: drop the images whose id is listed in removal parquets (1.x API).

The parquets are what ``nemo_curator.modules.semantic_dedup.write_removal_parquets`` writes (a
string column ``id`` of the images to remove). They are read once per worker process and kept
(cached by the folder's files, their sizes and mtimes: a new removal list is read again).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nemo_curator.stages.base import NodeInfo, ProcessingStage, WorkerMetadata
from nemo_curator.tasks import ImageBatch
from nemo_curator.utils.distributed_utils import load_object_on_worker
from nemo_curator.utils.resume import identities

logger = logging.getLogger(__name__)


# Files and folders that start with these are not removal lists (the dedup step's working tables,
# the lists of other eps values, temporaries), as pyarrow datasets and Hive skip them.
_HIDDEN = ("_", ".")


@dataclass
class ImageDuplicatesRemovalStage(ProcessingStage[ImageBatch, ImageBatch]):
    """Remove the images whose ``image_id`` is in ``removal_parquets_dir``'s parquets.

    Args:
        removal_parquets_dir: a folder of ``*.parquet`` files (searched recursively; files and
            folders whose names start with ``_`` or ``.`` skipped) with a column
            ``duplicate_id_field`` of ids to remove.
        duplicate_id_field: that column (``id``, what the dedup step writes).
        verbose: log each batch's counts.
        num_workers_per_node: accepted for 1.x compatibility (a Xenna setting; unused on Dask).

    Ids are compared as strings. A folder without parquet files is an error (a wrong path
    would otherwise remove nothing, silently).
    """

    removal_parquets_dir: str
    duplicate_id_field: str = "id"
    verbose: bool = False
    num_workers_per_node: int | None = None
    name: str = "image_dedup_filter"

    fingerprint_excludes = ("name", "verbose", "num_workers_per_node")

    def __post_init__(self) -> None:
        self.removal_parquets_dir = os.path.abspath(os.fspath(self.removal_parquets_dir))
        self._ids: frozenset[str] | None = None

    def inputs(self) -> tuple[list[str], list[str]]:
        return ["data"], ["image_id"]

    def outputs(self) -> tuple[list[str], list[str]]:
        return ["data"], []

    def parquet_files(self) -> list[str]:
        if not os.path.isdir(self.removal_parquets_dir):
            raise FileNotFoundError(f"removal_parquets_dir {self.removal_parquets_dir} does not exist: pass the folder "
                                    f"the dedup step wrote its removal parquets to")
        files = []
        for root, folders, names in os.walk(self.removal_parquets_dir):
            folders[:] = [f for f in folders if not f.startswith(_HIDDEN)]  # Hive's rule, as pyarrow datasets read
            files += [os.path.join(root, n) for n in names if n.endswith(".parquet") and not n.startswith(_HIDDEN)]
        files.sort()
        if not files:
            raise FileNotFoundError(f"no parquet files in {self.removal_parquets_dir}: pass the folder the dedup step "
                                    f"wrote its removal parquets to")
        return files

    def setup_on_node(self, node_info: NodeInfo | None = None, worker_metadata: WorkerMetadata | None = None) -> None:
        self.parquet_files()  # a wrong folder fails on the client, before anything runs

    def setup(self, worker_metadata: WorkerMetadata | None = None) -> None:
        files = self.parquet_files()
        key = ("nemo_curator.removal_ids", self.duplicate_id_field, repr(sorted(identities(files).items())))
        self._ids = load_object_on_worker(key, lambda: _read_ids(files, self.duplicate_id_field))
        if self.verbose:
            logger.info("%s: %d ids to remove from %s", self.name, len(self._ids), self.removal_parquets_dir)

    def weights_identity(self) -> dict | None:
        return {"removal_files": identities(self.parquet_files())}

    def process(self, task: ImageBatch) -> ImageBatch:
        if self._ids is None:
            self.setup()
        kept = [obj for obj in task.data if str(obj.image_id) not in self._ids]
        removed = len(task.data) - len(kept)
        self._log_metrics({"kept": len(kept), "removed": removed})
        if self.verbose:
            logger.info("%s: kept %d of %d images, removed %d", self.name, len(kept), len(task.data), removed)
        return ImageBatch(dataset_name=task.dataset_name, data=kept, _metadata=dict(task._metadata),
                          _stage_perf=list(task._stage_perf), task_id=task.task_id)

    def xenna_stage_spec(self) -> dict[str, Any]:
        return {} if self.num_workers_per_node is None else {"num_workers_per_node": self.num_workers_per_node}


def _read_ids(files: list[str], field: str) -> frozenset[str]:
    ids: set[str] = set()
    for path in files:
        schema = pq.read_schema(path)
        if field not in schema.names:
            if pq.ParquetFile(path).metadata.num_rows == 0:
                continue  # an empty file of a shard with nothing to remove may have any schema
            raise KeyError(f"{path} has no column {field!r} (columns {schema.names}): pass duplicate_id_field= the "
                           f"column of the ids to remove")
        column = pq.read_table(path, columns=[field], use_threads=False).column(field)
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            column = column.cast(pa.string())
        ids.update(v for v in column.to_pylist() if v is not None)
    return frozenset(ids)
