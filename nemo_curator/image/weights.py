"""The weights a run needs, checked on the client before any cluster starts.

``check_weights`` makes sure the timm model's pretrained weights (Hugging Face cache) and the
heads' weights (``$NEMO_CURATOR_HOME/weights``, ``nemo_curator.utils.download``) are at hand,
downloading what it may, and raises one ``WeightsUnavailableError`` that names everything missing
and how to supply it. ``timm_hub_weights`` says where timm keeps a model's pretrained weights.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from nemo_curator.image.classifiers.registry import build_heads
from nemo_curator.utils.constants import HEAD_NAMES
from nemo_curator.utils.download import WeightsDownloadError, cached_path, explicit_url, fetch_weights, read_state_dict

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsUnavailableError(RuntimeError):
    """Some weights are neither here nor downloadable. ``str(err)`` names each on one line;
    ``err.hint`` holds the lines that say how to supply them."""

    def __init__(self, missing: Sequence[str], remedies: Sequence[str]):
        super().__init__("weights missing: " + "; ".join(missing))
        self.hint = ["supply them in one of these ways, then run again:", *(f"  {r}" for r in remedies),
                     "  or run `nemo-curator-image demo --smoke` (random weights: the scores mean nothing)"]


@dataclass(frozen=True)
class HubWeights:
    """Where timm takes a model's pretrained weights from on the Hugging Face hub."""

    repo: str
    revision: str | None
    filenames: tuple[str, ...]  # in order of preference

    def cached_file(self) -> str | None:
        """The path of the weights in this machine's Hugging Face cache, or None."""
        from huggingface_hub import try_to_load_from_cache

        for name in self.filenames:
            path = try_to_load_from_cache(self.repo, name, revision=self.revision)
            if isinstance(path, str):
                return path
        return None


def timm_hub_weights(model_name: str) -> HubWeights | None:
    """The hub location of ``model_name``'s pretrained weights; None when timm has no hub weights
    for it (an unknown name, or weights at a plain URL)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else _HF_WEIGHT_FILES
    return HubWeights(repo, revision or None, tuple(files))


def check_weights(model: str | None, pretrained: bool = True, checkpoint: str | None = None,
                  heads: Sequence[str] = HEAD_NAMES, head_paths: Mapping[str, str | None] | None = None,
                  offline: bool = False) -> None:
    """Make sure every weights file the run needs is here, downloading into the caches what is not.

    ``model``: a timm model whose pretrained weights are needed (None, or ``pretrained=False``
    without ``checkpoint``: none). ``offline`` (or ``HF_HUB_OFFLINE=1``): the hub and the heads'
    upstream URLs are not asked; a mirror URL set for a head (``NEMO_CURATOR_WEIGHTS_URL_<NAME>``)
    still is. Raises WeightsUnavailableError naming everything that is missing and the ways to
    supply it; a weights file that is present but invalid raises its own error (CorruptWeightsError).
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
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    if timm.models.get_pretrained_cfg(model) is None:
        return (f"timm has no pretrained weights named {model!r}",
                "model: pass --model a name from timm.list_pretrained()")
    hub = timm_hub_weights(model)
    if hub is None or hub.cached_file() is not None:
        return None  # weights at a plain URL (timm fetches them itself), or cached
    first = hub.filenames[0]
    remedy = (f"model: --checkpoint /path/to/{first}, or a Hugging Face cache holding "
              f"hub/models--{hub.repo.replace('/', '--')}/snapshots/<rev>/{first} (+ refs/main): "
              f"HF_HOME=<its folder> HF_HUB_OFFLINE=1")
    what = f"the {model} model ({hub.repo} on the Hugging Face hub, not in {constants.HF_HUB_CACHE}"
    if offline:
        return what + ", offline)", remedy
    try:  # a HEAD request without retries first: fails fast when the hub is unreachable
        get_hf_file_metadata(hf_hub_url(hub.repo, first, revision=hub.revision))
        hf_hub_download(hub.repo, first, revision=hub.revision)
    except Exception as err:  # offline, DNS, HTTP, disk: all mean "not available here"
        return what + f", download failed: {_short(err)})", remedy
    return None


def _head_problem(name: str, clf, offline: bool) -> tuple[str, str] | None:
    """None when the head's weights file is at hand (``model_path``, the cache, or downloaded now
    from a mirror or, online, upstream) and valid; else (what is missing, how to supply it)."""
    spec = clf.weights
    remedy = (f"{name} head: --{name}-weights /path/to/{spec.filename}, or copy it to {cached_path(spec).parent}/ "
              f"($NEMO_CURATOR_HOME/weights), or {spec.url_env}=<mirror URL>")
    if clf.model_path is not None:
        if not os.path.isfile(clf.model_path):
            return f"the {name} head: {clf.model_path} does not exist", remedy
        path = clf.model_path
    else:
        try:
            path = fetch_weights(spec, offline=offline)
        except WeightsDownloadError as err:
            if offline and explicit_url(spec) is None:
                return f"the {name} head ({cached_path(spec)} absent, offline)", remedy
            return f"the {name} head ({cached_path(spec)} absent, download failed: {_short(err.__cause__ or err)})", remedy
    read_state_dict(spec, path)  # a present but invalid file raises CorruptWeightsError with its own remedy
    return None


def _short(err: BaseException) -> str:
    """``Type: first sentence`` of an error, at most 120 characters."""
    text = " ".join(str(err).split()).split(". ")[0]
    return f"{type(err).__name__}: {text}"[:120]
