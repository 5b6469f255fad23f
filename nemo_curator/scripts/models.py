"""Models for the command line, the demo and the notebook: the embedder with its heads, random
"smoke" heads, and a check, on the client and before any cluster starts, that the weights can be had.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from nemo_curator.image.embedders.timm import cpu_has_fast_bf16  # noqa: F401  (re-exported for the CLI and examples)

DEFAULT_MODEL = "vit_large_patch14_clip_quickgelu_224.openai"
# A CLIP-shaped ViT small enough for CPU smoke runs: it keeps the 768-d head and the real transform.
SMOKE_MODEL_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2}
SMOKE_WARNING = ("SMOKE MODE: a tiny random model and random heads - the scores mean nothing "
                 "(this run only shows that the pipeline works)")
HEAD_NAMES = ("aesthetic", "nsfw")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsUnavailableError(RuntimeError):
    """Some weights are neither here nor downloadable. ``str(err)`` names each on one line;
    ``err.hint`` holds the lines that say how to supply them."""

    def __init__(self, missing: Sequence[str], remedies: Sequence[str]):
        super().__init__("weights missing: " + "; ".join(missing))
        self.hint = ["supply them in one of these ways, then run again:", *(f"  {r}" for r in remedies),
                     "  or run `nemo-curator-image demo --smoke` (random weights: the scores mean nothing)"]


def head_classes() -> dict:
    """Registry of the classifier heads by CLI name: ``{"aesthetic": AestheticClassifier, "nsfw": NsfwClassifier}``."""
    from nemo_curator.image.classifiers import AestheticClassifier, NsfwClassifier

    return {"aesthetic": AestheticClassifier, "nsfw": NsfwClassifier}


def build_heads(names: Sequence[str], paths: Mapping[str, str | None] | None = None,
                embedding_column: str = "image_embedding") -> list:
    """Classifier heads by name, each with its local weights file from ``paths`` (None: cache/download)."""
    registry, paths = head_classes(), dict(paths or {})
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown head(s) {unknown}: choose from {sorted(registry)}")
    return [registry[n](embedding_column=embedding_column, model_path=paths.get(n)) for n in names]


def build_embedder(model: str = DEFAULT_MODEL, pretrained: bool = True, checkpoint: str | None = None,
                   model_kwargs: Mapping | None = None, batch_size: int = 32, threads: int = 2,
                   heads: Sequence = (), use_index_files: bool = False, autocast: bool = True):
    """A ``TimmImageEmbedder`` (L2-normalised embeddings; bf16 autocast if ``autocast``) with ``heads`` attached."""
    from nemo_curator.image.embedders import TimmImageEmbedder

    return TimmImageEmbedder(model, pretrained=pretrained, batch_size=batch_size, num_threads_per_worker=threads,
                             normalize_embeddings=True, classifiers=list(heads), autocast=autocast,
                             use_index_files=use_index_files, checkpoint_path=checkpoint,
                             model_kwargs=dict(model_kwargs or {}))


def write_random_heads(folder: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write randomly initialised aesthetic and NSFW heads (the real layouts) to ``folder``.

    Returns ``{"aesthetic": path, "nsfw": path}`` for ``build_heads(..., paths=...)``. Their
    scores mean nothing: for smoke runs and tests only.
    """
    import torch

    from nemo_curator.image.classifiers import AestheticMLP, NsfwMLP

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    paths = {}
    for name, module_class in (("aesthetic", AestheticMLP), ("nsfw", NsfwMLP)):
        paths[name] = str(folder / f"random_{name}_head.pth")
        torch.save(module_class().state_dict(), paths[name])
    return paths


# ----------------------------------------------------------------------------------------------
# Weights check
def check_weights(model: str | None, pretrained: bool = True, checkpoint: str | None = None,
                  heads: Sequence[str] = HEAD_NAMES, head_paths: Mapping[str, str | None] | None = None,
                  offline: bool = False) -> None:
    """Make sure every weights file the run needs is here, downloading into the caches what is not.

    ``model``: a timm model whose pretrained weights are needed (None, or ``pretrained=False``
    without ``checkpoint``: none). ``offline`` (or ``HF_HUB_OFFLINE=1``): look in the caches only.
    Raises WeightsUnavailableError naming everything that is missing and the ways to supply it;
    a weights file that is present but invalid raises its own error (CorruptWeightsError).
    """
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    missing, remedies = [], []
    if model and checkpoint:
        if not os.path.isfile(checkpoint):
            missing.append(f"checkpoint {checkpoint} does not exist")
            remedies.append("model: pass --checkpoint the path of an existing weights file")
    elif model and pretrained:
        problem = _timm_problem(model, offline)
        if problem:
            missing.append(problem[0])
            remedies.append(problem[1])
    for name, clf in zip(heads, build_heads(heads, head_paths)):
        problem = _head_problem(name, clf, offline)
        if problem:
            missing.append(problem[0])
            remedies.append(problem[1])
    if missing:
        raise WeightsUnavailableError(missing, remedies)


def _timm_problem(model: str, offline: bool) -> tuple[str, str] | None:
    """None when timm's pretrained weights of ``model`` are in the Hugging Face cache (or now
    downloaded there); else (what is missing, how to supply it)."""
    import timm
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None:
        return (f"timm has no pretrained weights named {model!r}",
                "model: pass --model a name from timm.list_pretrained()")
    if not cfg.hf_hub_id:
        return None  # weights at a plain URL: timm fetches them itself
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else list(_HF_WEIGHT_FILES)
    if any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str) for f in files):
        return None
    remedy = (f"model: --checkpoint /path/to/{files[0]}, or a Hugging Face cache holding "
              f"hub/models--{repo.replace('/', '--')}/snapshots/<rev>/{files[0]} (+ refs/main): "
              f"HF_HOME=<its folder> HF_HUB_OFFLINE=1")
    what = f"the {model} model ({repo} on the Hugging Face hub, not in {constants.HF_HUB_CACHE}"
    if offline:
        return what + ", offline)", remedy
    try:  # a HEAD request without retries first: fails fast when the hub is unreachable
        get_hf_file_metadata(hf_hub_url(repo, files[0], revision=revision or None))
        hf_hub_download(repo, files[0], revision=revision or None)
    except Exception as err:  # offline, DNS, HTTP, disk: all mean "not available here"
        return what + f", download failed: {_short(err)})", remedy
    return None


def _head_problem(name: str, clf, offline: bool) -> tuple[str, str] | None:
    """None when the head's weights file is at hand (``model_path``, the cache, or downloaded now) and
    valid; else (what is missing, how to supply it)."""
    from nemo_curator.utils.download import WeightsDownloadError, cached_path, fetch_weights, read_state_dict

    spec = clf.weights
    remedy = (f"{name} head: --{name}-weights /path/to/{spec.filename}, or copy it to {cached_path(spec).parent}/ "
              f"($NEMO_CURATOR_HOME/weights), or {spec.url_env}=<mirror URL>")
    if clf.model_path is not None:
        if not os.path.isfile(clf.model_path):
            return f"the {name} head: {clf.model_path} does not exist", remedy
        path = clf.model_path
    elif cached_path(spec).is_file() or not offline:
        try:
            path = fetch_weights(spec)
        except WeightsDownloadError as err:
            return f"the {name} head ({cached_path(spec)} absent, download failed: {_short(err.__cause__ or err)})", remedy
    else:
        return f"the {name} head ({cached_path(spec)} absent, offline)", remedy
    read_state_dict(spec, path)  # a present but invalid file raises CorruptWeightsError with its own remedy
    return None


def _short(err: BaseException) -> str:
    """``Type: first sentence`` of an error, at most 120 characters."""
    text = " ".join(str(err).split()).split(". ")[0]
    return f"{type(err).__name__}: {text}"[:120]
