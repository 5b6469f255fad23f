"""The classifier heads by name (``"aesthetic"``, ``"nsfw"``), for the command line, the demo and
scripts that pick heads from settings; random heads of the real layouts for smoke runs and tests."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from nemo_curator.image.classifiers.aesthetic import AestheticClassifier, AestheticMLP
from nemo_curator.image.classifiers.nsfw import NsfwClassifier, NsfwMLP
from nemo_curator.utils.constants import EMBEDDING_COLUMN, HEAD_NAMES

HEADS = {"aesthetic": (AestheticClassifier, AestheticMLP), "nsfw": (NsfwClassifier, NsfwMLP)}
assert tuple(HEADS) == HEAD_NAMES


def build_heads(names: Sequence[str] = HEAD_NAMES, paths: Mapping[str, str | None] | None = None,
                embedding_column: str = EMBEDDING_COLUMN) -> list:
    """Classifier heads by name, each with its local weights file from ``paths`` (None: cache/download)."""
    paths = dict(paths or {})
    unknown = [n for n in names if n not in HEADS]
    if unknown:
        raise ValueError(f"unknown head(s) {unknown}: choose from {sorted(HEADS)}")
    return [HEADS[n][0](embedding_column=embedding_column, model_path=paths.get(n)) for n in names]


def write_random_heads(folder: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write randomly initialised aesthetic and NSFW heads (the real layouts) to ``folder``.

    Returns ``{"aesthetic": path, "nsfw": path}`` for ``build_heads(..., paths=...)``. Their
    scores mean nothing: for smoke runs and tests only.
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    paths = {}
    for name, (_, module_class) in HEADS.items():
        paths[name] = str(folder / f"random_{name}_head.pth")
        torch.save(module_class().state_dict(), paths[name])
    return paths
