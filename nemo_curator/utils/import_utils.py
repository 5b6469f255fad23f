"""Lazy imports of optional (GPU-only) packages with an install hint when they are missing."""
from __future__ import annotations

import importlib

GPU_EXTRA_HINT = (
    "install the GPU extra: pip install 'nemo-curator-image[gpu]' "
    "(CUDA 13: see the README section 'GPU install')"
)


def gpu_only_import(module: str, feature: str):
    """Import ``module`` or raise ImportError naming ``feature`` and the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{feature} needs the package '{module}', which is not installed: {GPU_EXTRA_HINT}") from err
