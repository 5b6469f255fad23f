"""``FilePartitioningStage``: list the input files and group them into ``FileGroupTask`` (1.x API).

It runs on the client (it only lists files); every group it makes becomes one Dask task that runs
all the following stages of the pipeline on one worker.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from nemo_curator.stages.base import ProcessingStage
from nemo_curator.stages.resources import Resources
from nemo_curator.tasks import EmptyTask, FileGroupTask

logger = logging.getLogger(__name__)

DEFAULT_FILE_EXTENSIONS = [".jsonl", ".json", ".parquet"]  # 1.x's default (images: pass [".tar"])
MAX_RECOMMENDED_BLOCKSIZE = 512 * 2**20


def parse_bytes(value: int | str) -> int:
    """``"512MB"`` / ``"1GiB"`` / ``1024`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"blocksize must be a size such as '256MB' or a number of bytes, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        from dask.utils import parse_bytes as dask_parse_bytes

        try:
            size = int(dask_parse_bytes(value))
        except (ValueError, TypeError) as err:
            raise ValueError(f"blocksize must be a size such as '256MB' or a number of bytes, got {value!r}") from err
    if size <= 0:
        raise ValueError(f"blocksize must be positive, got {value!r}")
    return size


@dataclass
class FilePartitioningStage(ProcessingStage[EmptyTask, FileGroupTask]):
    """Group the files under ``file_paths`` into ``FileGroupTask``.

    Args:
        file_paths: a folder (listed recursively), a file, or a list of them (folders in a list
            are listed without recursion, as in 1.x); local paths or fsspec URLs.
        files_per_partition: files per group. With neither this nor ``blocksize``: 1.
        blocksize: target bytes per group (``"256MB"`` or an int); files are then grouped by size.
            Not with ``files_per_partition``.
        file_extensions: suffixes to keep (case-insensitive); default ``[".jsonl", ".json",
            ".parquet"]`` as in 1.x: pass ``[".tar"]`` for webdataset shards.
        storage_options: fsspec options for remote paths.
        limit: at most this many groups.

    Files are sorted by path (by size with ``blocksize``); hidden files (``.name``, e.g. the
    temporaries of an interrupted write) are skipped. Each group's ``_metadata`` holds
    ``partition_index``, ``total_partitions`` and ``source_files``.
    """

    file_paths: str | list[str]
    files_per_partition: int | None = None
    blocksize: int | str | None = None
    file_extensions: list[str] | None = None
    storage_options: dict[str, Any] | None = None
    limit: int | None = None
    name: str = "file_partitioning"

    runs_on_client = True

    def __post_init__(self) -> None:
        if self.files_per_partition is not None and self.blocksize is not None:
            raise ValueError("pass files_per_partition or blocksize, not both")
        if self.files_per_partition is not None and (isinstance(self.files_per_partition, bool) or not isinstance(
                self.files_per_partition, int) or self.files_per_partition < 1):
            raise ValueError(f"files_per_partition must be a positive integer, got {self.files_per_partition!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0):
            raise ValueError(f"limit must be a non-negative integer or None, got {self.limit!r}")
        if not isinstance(self.file_paths, (str, os.PathLike, list, tuple)):
            raise TypeError(f"file_paths must be a path or a list of paths, got {type(self.file_paths).__name__}")
        if self.file_extensions is None:
            self.file_extensions = list(DEFAULT_FILE_EXTENSIONS)
        if isinstance(self.file_extensions, str):
            self.file_extensions = [self.file_extensions]
        if self.storage_options is None:
            self.storage_options = {}
        self._blocksize = parse_bytes(self.blocksize) if self.blocksize is not None else MAX_RECOMMENDED_BLOCKSIZE
        if self._blocksize > MAX_RECOMMENDED_BLOCKSIZE:
            logger.warning("blocksize %s is more than 512 MB: the groups may not fit a worker's memory", self.blocksize)
        self.resources = Resources(cpus=0.5)

    def num_workers(self) -> int | None:
        return 1

    def process(self, task: EmptyTask) -> list[FileGroupTask]:
        files = self.list_files()
        if not files:
            logger.warning("no files with extensions %s under %s", self.file_extensions, self.file_paths)
            return []
        if self.blocksize is not None:
            groups = _by_size(files, self._blocksize)
        else:
            size = self.files_per_partition or 1
            groups = [[p for p, _ in files[i:i + size]] for i in range(0, len(files), size)]
            sizes = dict(files)
            for group in groups:
                total = sum(sizes[p] for p in group)
                if total > self._blocksize and len(group) > 1:
                    logger.warning("a file group of %d files holds %d bytes, more than %d: lower files_per_partition",
                                   len(group), total, self._blocksize)
        if self.limit is not None and len(groups) > self.limit:
            logger.info("limit=%d: keeping %d of %d file groups", self.limit, self.limit, len(groups))
            groups = groups[: self.limit]
        dataset_name = _dataset_name(self.file_paths)
        tasks = [FileGroupTask(dataset_name=dataset_name, data=list(group), task_id=f"{i}",
                               _metadata={"partition_index": i, "total_partitions": len(groups),
                                          "source_files": list(group)})
                 for i, group in enumerate(groups)]
        logger.info("%d file groups from %d files under %s", len(tasks), len(files), self.file_paths)
        return tasks

    def list_files(self) -> list[tuple[str, int]]:
        """``(path, size)`` of the files to read, sorted by path (by size with ``blocksize``)."""
        extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in self.file_extensions)
        paths = [self.file_paths] if isinstance(self.file_paths, (str, os.PathLike)) else list(self.file_paths)
        found: dict[str, int] = {}
        for path in paths:
            fs, root = _filesystem(os.fspath(path), self.storage_options)
            if not fs.exists(root):
                raise FileNotFoundError(f"FilePartitioningStage: {path} does not exist: pass the folder of the shards")
            if fs.isdir(root):
                recursive = isinstance(self.file_paths, (str, os.PathLike))
                entries = fs.find(root, detail=True) if recursive else {
                    e["name"]: e for e in fs.ls(root, detail=True) if e.get("type") == "file"}
            else:
                entries = {root: fs.info(root)}
            for name, info in entries.items():
                base = name.rstrip("/").rsplit("/", 1)[-1]
                if base.startswith(".") or not base.lower().endswith(extensions):
                    continue
                found[_with_protocol(fs, name)] = int(info.get("size") or 0)
        items = sorted(found.items())
        if self.blocksize is not None:
            items.sort(key=lambda item: item[1])
        return items


def _filesystem(path: str, storage_options: dict):
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **storage_options)
    return fs, root


def _with_protocol(fs, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _by_size(files: list[tuple[str, int]], blocksize: int) -> list[list[str]]:
    groups, current, total = [], [], 0
    for path, size in files:
        if current and total + size > blocksize:
            groups.append(current)
            current, total = [], 0
        current.append(path)
        total += size
    if current:
        groups.append(current)
    return groups


def _dataset_name(file_paths) -> str:
    first = file_paths if isinstance(file_paths, (str, os.PathLike)) else (file_paths[0] if file_paths else "dataset")
    name = os.path.basename(os.path.normpath(os.fspath(first)))
    return name or "dataset"
