"""``FileGroupTask``: a group of files for a reader stage (what ``FilePartitioningStage`` emits)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from nemo_curator.tasks.tasks import Task


@dataclass
class FileGroupTask(Task[list[str]]):
    """Paths of files to read together (one Dask task runs all the stages on one group).

    Attributes:
        data: the file paths.
        reader_config: reader settings (kept for 1.x compatibility; unused by the image reader).
        _metadata: ``partition_index``, ``total_partitions`` and ``source_files`` (the group's
            files, which the writer uses for deterministic names) as ``FilePartitioningStage``
            writes them; the writer adds what it wrote.
    """

    data: list[str] = field(default_factory=list)
    reader_config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return len(self.data)

    def validate(self) -> bool:
        if not isinstance(self.data, list):
            raise TypeError(f"FileGroupTask.data must be a list of paths, got {type(self.data).__name__}")
        return len(self.data) > 0

    def get_deterministic_id(self) -> str:
        """A content id: the hash of the sorted paths (stable when files are added elsewhere)."""
        return hashlib.sha256("|".join(sorted(self.data)).encode()).hexdigest()[:16]
