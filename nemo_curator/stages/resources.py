"""``Resources``: what one task of a stage needs (NeMo Curator 1.x's resource model).

On Dask, ``gpus`` becomes the task's ``GPU`` resource where the workers declare one (``dask
worker --resources GPU=1``, or ``dask cuda worker --resources GPU=1``): a fraction lets several
tasks share a GPU, up to the worker's threads. See ``nemo_curator.pipeline.DaskExecutor``.
"""
from __future__ import annotations

from dataclasses import dataclass

_FALLBACK_GPU_MEMORY_GB = 24.0


def _gpu_memory_gb() -> float:
    """Memory of this machine's first GPU in GB (24 when it cannot be read), for ``gpu_memory_gb``."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 1024**3
    except Exception:  # noqa: BLE001 - a broken CUDA install reads as "unknown"
        pass
    return _FALLBACK_GPU_MEMORY_GB


@dataclass
class Resources:
    """Resource needs of one task of a stage.

    Attributes:
        cpus: CPU cores (informative on Dask: a task takes one worker thread).
        gpu_memory_gb: GPU memory for a single-GPU stage; converted to a fraction ``gpus`` of
            this machine's first GPU (24 GB assumed when none is visible). Not with ``gpus``.
        gpus: GPUs per task; a fraction shares a GPU between tasks.
    """

    cpus: float = 1.0
    gpu_memory_gb: float = 0.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cpus", "gpu_memory_gb", "gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"Resources.{name} must be a number >= 0, got {value!r}")
        if self.gpus > 0 and self.gpu_memory_gb > 0:
            raise ValueError("pass gpus (GPUs per task) or gpu_memory_gb (memory of one GPU), not both")
        if self.gpu_memory_gb > 0:
            self.gpus = round(self.gpu_memory_gb / _gpu_memory_gb(), 2) or 0.01
            if self.gpus > 1:
                raise ValueError(f"gpu_memory_gb={self.gpu_memory_gb} is more than one GPU holds: pass gpus= instead")

    @property
    def requires_gpu(self) -> bool:
        return self.gpus > 0 or self.gpu_memory_gb > 0
