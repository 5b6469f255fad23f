"""Shared material of the stage-API tests: the docs' code as pasted, and model dirs in 1.x's layout
made from the session's tiny checkpoint (plain functions; each test module wraps them in fixtures)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nemo_curator.image.model_dir import (VIT_L14, aesthetic_file, clip_transformers_dir, nsfw_file,
                                          timm_to_transformers_clip, transformers_clip_config)

SHARED_WEIGHTS = Path(os.environ.get("NEMO_CURATOR_SHARED", Path(__file__).resolve().parents[3] / "shared")) / "weights"
AESTHETIC_PTH = "sac+logos+ava1-l14-linearMSE.pth"
NSFW_PTH = "clip_autokeras_binary_nsfw.pth"
TINY_VISION = {**VIT_L14, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256}

# The aesthetic-filter page of NeMo Curator's 1.x docs, verbatim (issue 13).
ISSUE_CODE = '''from nemo_curator.pipeline import Pipeline
from nemo_curator.stages.file_partitioning import FilePartitioningStage
from nemo_curator.stages.image.io.image_reader import ImageReaderStage
from nemo_curator.stages.image.embedders.clip_embedder import ImageEmbeddingStage
from nemo_curator.stages.image.filters.aesthetic_filter import ImageAestheticFilterStage

# Create pipeline
pipeline = Pipeline(name="aesthetic_filtering", description="Filter images by aesthetic quality")

# Stage 1: Partition tar files
pipeline.add_stage(FilePartitioningStage(
    file_paths="/path/to/tar_dataset",
    files_per_partition=1,
    file_extensions=[".tar"],
))

# Stage 2: Read images
pipeline.add_stage(ImageReaderStage(
    task_batch_size=100,
    num_gpus_per_worker=0.25,
))

# Stage 3: Generate CLIP embeddings
pipeline.add_stage(ImageEmbeddingStage(
    model_dir="/path/to/models",
    model_inference_batch_size=32,
    num_gpus_per_worker=0.25,
))

# Stage 4: Apply aesthetic filtering
pipeline.add_stage(ImageAestheticFilterStage(
    model_dir="/path/to/models",
    score_threshold=0.5,
    model_inference_batch_size=32,
    num_gpus_per_worker=0.25,
))

# Run the pipeline (uses XennaExecutor by default)
results = pipeline.run()
'''
OTHER_PAGE_READER = '''pipeline.add_stage(ImageReaderStage(batch_size=100, num_gpus_per_worker=0.25))'''


def issue_code(tar_dataset, model_dir, reader: str | None = None) -> str:
    """The docs' code with local paths; ``reader``: the other page's reader line instead."""
    code = ISSUE_CODE.replace("/path/to/tar_dataset", str(tar_dataset)).replace("/path/to/models", str(model_dir))
    if reader is not None:
        start = code.index("pipeline.add_stage(ImageReaderStage(")
        end = code.index("))", start) + 2
        code = code[:start] + reader + code[end:]
    return code


def write_tiny_clip(model_dir, tiny_checkpoint: str) -> Path:
    """``model_dir/openai/clip-vit-large-patch14`` (transformers layout) holding the tiny checkpoint's weights."""
    from safetensors.torch import load_file, save_file

    folder = clip_transformers_dir(model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(timm_to_transformers_clip(load_file(tiny_checkpoint)), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(transformers_clip_config(TINY_VISION)))
    return folder


def shared_head_paths() -> dict[str, str] | None:
    """The real heads of ../shared/weights, or None when they are not there."""
    paths = {"aesthetic": SHARED_WEIGHTS / AESTHETIC_PTH, "nsfw": SHARED_WEIGHTS / NSFW_PTH}
    return {k: str(v) for k, v in paths.items()} if all(p.is_file() for p in paths.values()) else None


def write_heads(model_dir, paths: dict[str, str] | None = None) -> dict[str, str]:
    """The heads in 1.x's layout, from ``.pth`` files (``{"aesthetic": ..., "nsfw": ...}``; default
    the real ones when there, else random ones); returns the ``.pth`` paths used."""
    import torch
    from safetensors.torch import save_file

    from nemo_curator.image.classifiers import write_random_heads

    paths = paths or shared_head_paths() or write_random_heads(Path(model_dir) / "_random_heads_pth")
    aesthetic, nsfw = aesthetic_file(model_dir), nsfw_file(model_dir)
    aesthetic.parent.mkdir(parents=True, exist_ok=True)
    nsfw.parent.mkdir(parents=True, exist_ok=True)
    state = torch.load(paths["aesthetic"], map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(aesthetic))
    shutil.copy(paths["nsfw"], nsfw)
    return paths


def tiny_model_dir(folder, tiny_checkpoint: str, head_paths: dict[str, str] | None = None) -> Path:
    """A model dir (1.x layout) with the tiny CLIP and the heads of ``write_heads``."""
    folder = Path(folder)
    write_tiny_clip(folder, tiny_checkpoint)
    write_heads(folder, head_paths)
    return folder
