"""Weights in a ``model_dir``: the layout NeMo Curator 1.x's image stages use, found, filled and read.

A ``model_dir`` holds (1.x layout, one folder per Hugging Face repository)::

    openai/clip-vit-large-patch14/{config.json, model.safetensors, ...}     CLIP ViT-L/14, transformers layout
    ttj/sac-logos-ava1-l14-linearMSE/model.safetensors                       LAION aesthetic head
    laion/clip-autokeras-binary-nsfw/clip_autokeras_binary_nsfw.pth          LAION NSFW head

and, as an alternative for the CLIP model, timm's own weights of the same model
(``timm/vit_large_patch14_clip_224.openai/model.safetensors``, what ``TimmImageEmbedder``
loads). A folder filled by NeMo Curator 1.x works as it is.

``ensure_model_dir`` fills what is missing, in this order, and raises one ``ModelDirError``
naming every file it could not supply and where to put it:

1. the file already in ``model_dir``;
2. a local cache that holds it: the Hugging Face cache (``$HF_HOME/hub``: the transformers or the
   timm repository of the CLIP model, the aesthetic head's repository) or this package's weights
   cache (``$NEMO_CURATOR_HOME/weights``, see ``nemo_curator.utils.download``): linked (or copied)
   into ``model_dir``, the aesthetic ``.pth`` converted to the ``model.safetensors`` 1.x reads;
3. a download, unless offline (``offline=True`` or ``HF_HUB_OFFLINE=1``): the heads through the
   verified download of ``nemo_curator.utils.download`` (sha256-checked; a mirror URL set in
   ``NEMO_CURATOR_WEIGHTS_URL_<NAME>`` is used even offline), then huggingface_hub for the
   aesthetic head's repository; the CLIP model with ``huggingface_hub.snapshot_download`` at
   1.x's revision (the files 1.x downloads, so that 1.x can use the folder too).

The transformers CLIP vision tower is mapped onto timm's ViT (``transformers_clip_to_timm``):
timm's ``vit_large_patch14_clip_quickgelu_224`` with the same weights computes the same
embeddings as ``CLIPVisionModelWithProjection`` (checked by the tests); shapes other than
ViT-L/14 (a tiny random model) are mapped too, with the matching timm arguments.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from nemo_curator.image.classifiers.aesthetic import AESTHETIC_WEIGHTS, AestheticClassifier, AestheticMLP
from nemo_curator.image.classifiers.nsfw import NSFW_WEIGHTS, NsfwMLP
from nemo_curator.image.weights import WeightsUnavailableError, timm_hub_weights
from nemo_curator.utils.constants import DEFAULT_MODEL
from nemo_curator.utils.download import (CorruptWeightsError, WeightsDownloadError, cache_dir, cached_path,
                                         explicit_url, fetch_weights, read_state_dict, structure_problem)
from nemo_curator.utils.file_utils import atomic_write
from nemo_curator.utils.resume import file_identity

logger = logging.getLogger(__name__)

MODELS = ("clip", "aesthetic", "nsfw")

CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_REVISION = "32bd642"  # the revision NeMo Curator 1.x downloads
CLIP_IGNORE_PATTERNS = ["*.msgpack", "*.bin", "*.ot", "*.h5", "*.gz"]  # as 1.x: no TF/Flax/.bin copies
CLIP_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
AESTHETIC_REPO = "ttj/sac-logos-ava1-l14-linearMSE"
AESTHETIC_FILE = "model.safetensors"
AESTHETIC_REVISION = "1e77fa0"
NSFW_REPO = "laion/clip-autokeras-binary-nsfw"
NSFW_FILE = NSFW_WEIGHTS.filename  # clip_autokeras_binary_nsfw.pth

# timm's ViT-L/14 (what the heads expect): the transformers config values it corresponds to
VIT_L14 = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14,
           "image_size": 224, "intermediate_size": 4096, "projection_dim": 768, "hidden_act": "quick_gelu",
           "layer_norm_eps": 1e-5}
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_TIMM_DEFAULT_ACT = "quick_gelu"
_VISION = "vision_model."


class ModelDirError(WeightsUnavailableError):
    """Weights of a ``model_dir`` are missing and could not be supplied; the message names each
    missing file, where to put it and what was tried (``hint`` repeats the remedies)."""

    def __init__(self, model_dir: Path, missing: Sequence[str], remedies: Sequence[str]):
        super().__init__(missing, remedies)
        lines = [f"weights missing in model_dir {model_dir}:"]
        lines += [f"  - {m}\n      {r}" for m, r in zip(missing, remedies)]
        RuntimeError.__init__(self, "\n".join(lines))


def default_model_dir() -> Path:
    """``$NEMO_CURATOR_HOME/models`` (default ``~/.nemo_curator/models``): ``model_dir=None``."""
    return cache_dir().parent / "models"


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """The absolute ``model_dir`` (``default_model_dir()`` for None)."""
    return (Path(model_dir).expanduser() if model_dir is not None else default_model_dir()).absolute()


def offline_mode(offline: bool | None = None) -> bool:
    """``offline`` if given, else whether ``HF_HUB_OFFLINE`` is set to a true value."""
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------------------------
# Paths
def clip_transformers_dir(model_dir: str | os.PathLike | None) -> Path:
    return resolve_model_dir(model_dir) / CLIP_REPO


def clip_timm_file(model_dir: str | os.PathLike | None) -> Path:
    hub = timm_hub_weights(DEFAULT_MODEL)
    return resolve_model_dir(model_dir) / hub.repo / hub.filenames[0]


def aesthetic_file(model_dir: str | os.PathLike | None) -> Path:
    return resolve_model_dir(model_dir) / AESTHETIC_REPO / AESTHETIC_FILE


def nsfw_file(model_dir: str | os.PathLike | None) -> Path:
    return resolve_model_dir(model_dir) / NSFW_REPO / NSFW_FILE


@dataclass(frozen=True)
class ClipWeights:
    """The CLIP image model's files in a ``model_dir``.

    ``layout`` is ``"transformers"`` (``weights`` = ``model.safetensors`` or ``pytorch_model.bin``
    of a ``CLIPModel`` / ``CLIPVisionModelWithProjection``, ``config`` = its ``config.json``) or
    ``"timm"`` (``weights`` = timm's ViT-L/14 state dict, ``config`` None).
    """

    layout: str
    weights: Path
    config: Path | None = None

    def identity(self) -> dict:
        """What identifies these weights (for the worker cache and resume): paths, sizes, mtimes."""
        out = {"layout": self.layout, "weights": str(self.weights), "file": file_identity(self.weights)}
        if self.config is not None:
            out["config"] = file_identity(self.config)
        return out

    def vision_config(self) -> dict:
        """The vision tower's settings (``VIT_L14`` keys): from the weights' shapes, and from
        ``config.json`` what shapes do not tell (heads, activation, epsilon)."""
        shapes = tensor_shapes(self.weights)
        if self.layout == "timm":
            config = dict(VIT_L14)
            expected = timm_state_shapes(timm_model_kwargs(config))
            if shapes != expected:
                wrong = sorted(k for k in set(shapes) | set(expected) if shapes.get(k) != expected.get(k))[:5]
                raise CorruptWeightsError(f"{self.weights} is not timm's {DEFAULT_MODEL} state dict (keys or shapes "
                                          f"differ: {wrong}): replace it with timm's model.safetensors of "
                                          f"{timm_hub_weights(DEFAULT_MODEL).repo}")
            return config
        return clip_vision_config(shapes, _read_config(self.config))

    def timm_model_kwargs(self) -> dict:
        """``timm.create_model(DEFAULT_MODEL, **kwargs)`` arguments for this model ({} for ViT-L/14)."""
        return timm_model_kwargs(self.vision_config())

    def timm_state_dict(self) -> dict:
        """The weights as timm's ViT state dict (CPU tensors)."""
        state = load_tensors(self.weights, prefixes=(_VISION, "visual_projection.") if self.layout == "transformers" else ())
        return state if self.layout == "timm" else transformers_clip_to_timm(state)


# ----------------------------------------------------------------------------------------------
# Finding and filling
def find_clip(model_dir: str | os.PathLike | None) -> ClipWeights | None:
    """The CLIP files present in ``model_dir`` (1.x's transformers layout first), or None."""
    folder = clip_transformers_dir(model_dir)
    config = folder / "config.json"
    for name in CLIP_WEIGHT_FILES:
        if (folder / name).is_file() and config.is_file():
            return ClipWeights("transformers", folder / name, config)
    timm_file = clip_timm_file(model_dir)
    if timm_file.is_file():
        return ClipWeights("timm", timm_file)
    return None


def ensure_model_dir(model_dir: str | os.PathLike | None, models: Sequence[str] = MODELS,
                     offline: bool | None = None) -> dict[str, ClipWeights | Path]:
    """Make sure ``model_dir`` holds the weights of ``models`` ("clip", "aesthetic", "nsfw"),
    taking missing files from the local caches or downloading them (see the module docstring).

    Returns ``{"clip": ClipWeights, "aesthetic": Path, "nsfw": Path}`` for the models asked.
    Raises ``ModelDirError`` naming every file that is still missing and where to put it.
    Safe to run from several processes at once (every file appears atomically).
    """
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}: choose from {MODELS}")
    root = resolve_model_dir(model_dir)
    offline = offline_mode(offline)
    found: dict[str, ClipWeights | Path] = {}
    missing, remedies = [], []
    for name in models:
        resolver = {"clip": _ensure_clip, "aesthetic": _ensure_aesthetic, "nsfw": _ensure_nsfw}[name]
        try:
            found[name] = resolver(root, offline)
        except _Missing as problem:
            missing.append(problem.what)
            remedies.append(problem.remedy)
    if missing:
        raise ModelDirError(root, missing, remedies)
    return found


class _Missing(Exception):
    def __init__(self, what: str, remedy: str):
        super().__init__(what)
        self.what, self.remedy = what, remedy


def _ensure_clip(root: Path, offline: bool) -> ClipWeights:
    present = find_clip(root)
    if present is not None:
        return present
    folder = clip_transformers_dir(root)
    cached = _hf_cached_files(CLIP_REPO, ("config.json", "model.safetensors"), optional=("preprocessor_config.json",))
    if cached:
        for name, src in cached.items():
            _place(src, folder / name)
        logger.info("CLIP ViT-L/14 taken from the Hugging Face cache into %s", folder)
        return find_clip(root)
    hub = timm_hub_weights(DEFAULT_MODEL)
    timm_cached = _hf_cached_files(hub.repo, (hub.filenames[0],)) if hub else None
    if timm_cached:
        _place(timm_cached[hub.filenames[0]], clip_timm_file(root))
        logger.info("CLIP ViT-L/14 taken from timm's weights in the Hugging Face cache into %s", clip_timm_file(root))
        return find_clip(root)
    tried = f"not in the Hugging Face cache ({_hf_cache_root()})"
    if offline:
        tried += ", offline: no download"
    else:
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(CLIP_REPO, revision=CLIP_REVISION, local_dir=str(folder),
                              ignore_patterns=CLIP_IGNORE_PATTERNS)
            present = find_clip(root)
            if present is not None:
                return present
            tried += ", downloaded but config.json/model.safetensors are not in the repository snapshot"
        except Exception as err:  # noqa: BLE001 - offline, DNS, HTTP, disk: all mean "not available here"
            tried += f", download failed: {_short(err)}"
    raise _Missing(
        f"CLIP ViT-L/14 image model: {folder}/config.json and model.safetensors (Hugging Face transformers "
        f"layout) are absent; {tried}",
        f"put them there (`hf download {CLIP_REPO} config.json model.safetensors --local-dir {folder}`), or timm's "
        f"weights of the same model at {clip_timm_file(root)}, or a Hugging Face cache holding either (HF_HOME=...)")


def _ensure_aesthetic(root: Path, offline: bool) -> Path:
    dest = aesthetic_file(root)
    if dest.is_file():
        return dest
    cached = _hf_cached_files(AESTHETIC_REPO, (AESTHETIC_FILE,))
    if cached:
        _place(cached[AESTHETIC_FILE], dest)
        return dest
    tried = [f"not in the Hugging Face cache ({_hf_cache_root()})"]
    pth = cached_path(AESTHETIC_WEIGHTS)
    if not pth.is_file() and (not offline or explicit_url(AESTHETIC_WEIGHTS)):
        try:
            pth = fetch_weights(AESTHETIC_WEIGHTS, offline=offline)
        except WeightsDownloadError as err:
            tried.append(f"verified download failed: {_short(err.__cause__ or err)}")
    if pth.is_file():
        _write_safetensors(read_state_dict(AESTHETIC_WEIGHTS, pth), dest)
        logger.info("aesthetic head converted from %s to %s", pth, dest)
        return dest
    tried.append(f"not in {cache_dir()}")
    if offline:
        tried.append("offline: no download")
    else:
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(AESTHETIC_REPO, AESTHETIC_FILE, revision=AESTHETIC_REVISION, local_dir=str(dest.parent))
            if dest.is_file():
                return dest
        except Exception as err:  # noqa: BLE001
            tried.append(f"Hugging Face download failed: {_short(err)}")
    raise _Missing(f"aesthetic head: {dest} is absent; " + ", ".join(tried),
                   f"put {AESTHETIC_REPO}'s {AESTHETIC_FILE} there, or {AESTHETIC_WEIGHTS.filename} "
                   f"({AESTHETIC_WEIGHTS.url}) in {cache_dir()}, or set {AESTHETIC_WEIGHTS.url_env} to a mirror URL")


def _ensure_nsfw(root: Path, offline: bool) -> Path:
    dest = nsfw_file(root)
    if dest.is_file():
        return dest
    tried = []
    pth = cached_path(NSFW_WEIGHTS)
    if not pth.is_file():
        tried.append(f"not in {cache_dir()}")
        if not offline or explicit_url(NSFW_WEIGHTS):
            try:
                pth = fetch_weights(NSFW_WEIGHTS, offline=offline)
            except WeightsDownloadError as err:
                tried.append(f"verified download failed: {_short(err.__cause__ or err)}")
        else:
            tried.append("offline: no download")
    if pth.is_file():
        read_state_dict(NSFW_WEIGHTS, pth)  # a corrupt cache file fails here, with its remedy
        _place(pth, dest)
        return dest
    raise _Missing(f"NSFW head: {dest} is absent; " + ", ".join(tried),
                   f"put {NSFW_FILE} there (from the zip at {NSFW_WEIGHTS.url}), or in {cache_dir()}, or set "
                   f"{NSFW_WEIGHTS.url_env} to a mirror URL")


# ----------------------------------------------------------------------------------------------
# Reading
def load_aesthetic_state_dict(path: str | os.PathLike) -> dict:
    """The aesthetic head's state dict from a ``model.safetensors`` (1.x layout) or a ``.pth``,
    checked for keys and shapes."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return read_state_dict(AESTHETIC_WEIGHTS, path)
    try:
        state = load_tensors(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise CorruptWeightsError(f"{path} is not a readable safetensors file ({_short(err)}): replace it with "
                                  f"{AESTHETIC_REPO}'s {AESTHETIC_FILE}") from err
    problem = structure_problem(AESTHETIC_WEIGHTS, state)
    if problem:
        raise CorruptWeightsError(f"{path} is not the aesthetic head: {problem}; replace it with {AESTHETIC_REPO}'s "
                                  f"{AESTHETIC_FILE}")
    return state


class ModelDirAestheticClassifier(AestheticClassifier):
    """``AestheticClassifier`` reading ``model_dir``'s ``model.safetensors`` (1.x layout)."""

    def load_model(self, device):
        model = AestheticMLP()
        model.load_state_dict(load_aesthetic_state_dict(self.model_path))
        return model.to(device).eval()


def load_tensors(path: str | os.PathLike, prefixes: Sequence[str] = ()) -> dict:
    """The tensors of a safetensors or torch file (those whose key starts with one of
    ``prefixes``, all without), on the CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if not prefixes or k.startswith(tuple(prefixes))}
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return {k: v for k, v in state.items() if not prefixes or k.startswith(tuple(prefixes))}


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of a weights file, read from its header (safetensors) or memory-mapped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in load_tensors(path).items()}


def _read_config(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorruptWeightsError(f"{path} is not a readable config.json ({_short(err)}): replace it with the "
                                  f"config.json of {CLIP_REPO}") from err
    return config


# ----------------------------------------------------------------------------------------------
# transformers CLIP <-> timm ViT
def clip_vision_config(shapes: Mapping[str, tuple[int, ...]], config: Mapping | None = None) -> dict:
    """The vision tower's settings from a transformers CLIP state dict's shapes and ``config.json``
    (of a ``CLIPModel``: its ``vision_config``; of a ``CLIPVisionModelWithProjection``: itself)."""
    config = dict(config or {})
    vision = dict(config.get("vision_config") or config)
    key = _VISION + "embeddings.patch_embedding.weight"
    if key not in shapes or "visual_projection.weight" not in shapes:
        raise CorruptWeightsError(f"not a CLIP vision model: the weights lack {key!r} or 'visual_projection.weight' "
                                  f"(transformers' CLIPModel or CLIPVisionModelWithProjection expected)")
    hidden, _, patch, _ = shapes[key]
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith(_VISION + "encoder.layers."))
    tokens = shapes[_VISION + "embeddings.position_embedding.weight"][0]
    grid = round((tokens - 1) ** 0.5)
    heads = int(vision.get("num_attention_heads") or max(1, hidden // 64))
    if hidden % heads:
        raise CorruptWeightsError(f"config.json says num_attention_heads={heads}, which does not divide the hidden "
                                  f"size {hidden} of the weights")
    act = vision.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise CorruptWeightsError(f"hidden_act={act!r} of the CLIP config has no timm counterpart here "
                                  f"(supported: {sorted(_ACTIVATIONS)})")
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "patch_size": patch,
            "image_size": grid * patch, "intermediate_size": shapes[_VISION + "encoder.layers.0.mlp.fc1.weight"][0],
            "projection_dim": shapes["visual_projection.weight"][0], "hidden_act": act,
            "layer_norm_eps": float(vision.get("layer_norm_eps", 1e-5))}


def timm_model_kwargs(vision: Mapping) -> dict:
    """``timm.create_model(DEFAULT_MODEL, **kwargs)`` for a vision tower with these settings:
    {} for ViT-L/14, else the arguments that differ (a tiny model: ``embed_dim``, ``depth``...)."""
    args = {"embed_dim": ("hidden_size", 1024), "depth": ("num_hidden_layers", 24),
            "num_heads": ("num_attention_heads", 16), "patch_size": ("patch_size", 14), "img_size": ("image_size", 224),
            "num_classes": ("projection_dim", 768)}
    kwargs = {arg: int(vision[key]) for arg, (key, default) in args.items() if int(vision[key]) != default}
    ratio = vision["intermediate_size"] / vision["hidden_size"]
    if ratio != 4.0:
        kwargs["mlp_ratio"] = ratio
    act = _ACTIVATIONS[vision["hidden_act"]]
    if act != _TIMM_DEFAULT_ACT:
        kwargs["act_layer"] = act
    if float(vision["layer_norm_eps"]) != 1e-5:
        raise CorruptWeightsError(f"layer_norm_eps={vision['layer_norm_eps']} differs from the 1e-5 of timm's CLIP "
                                  f"ViT: not supported")
    return kwargs


def timm_state_shapes(kwargs: Mapping) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of timm's ``DEFAULT_MODEL`` built with ``kwargs``, on the meta device."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(DEFAULT_MODEL, pretrained=False, **kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _layer_ids(state: Mapping) -> list[int]:
    prefix = _VISION + "encoder.layers."
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)})


def transformers_clip_to_timm(state: Mapping) -> dict:
    """Map a transformers CLIP state dict (``vision_model.*`` and ``visual_projection.weight`` of a
    ``CLIPModel`` or ``CLIPVisionModelWithProjection``) onto timm's CLIP ViT (``pre_norm``,
    token pooling, a 768-d ``head``). Shape-generic; text-tower keys are ignored.

    q, k and v projections become one ``qkv``; ``visual_projection`` (no bias) becomes ``head``
    with a zero bias; ``pre_layrnorm``/``post_layernorm`` become ``norm_pre``/``norm`` (the
    latter is per token, so applying it to every token and then taking the class token equals
    transformers' pooled output).
    """
    import torch

    v = _VISION
    missing = [k for k in (v + "embeddings.class_embedding", v + "embeddings.patch_embedding.weight",
                           v + "embeddings.position_embedding.weight", "visual_projection.weight") if k not in state]
    if missing:
        raise CorruptWeightsError(f"not a transformers CLIP vision state dict: keys {missing} are missing")
    proj = state["visual_projection.weight"]
    out = {
        "cls_token": state[v + "embeddings.class_embedding"].reshape(1, 1, -1),
        "pos_embed": state[v + "embeddings.position_embedding.weight"].unsqueeze(0),
        "patch_embed.proj.weight": state[v + "embeddings.patch_embedding.weight"],
        "norm_pre.weight": state[v + "pre_layrnorm.weight"], "norm_pre.bias": state[v + "pre_layrnorm.bias"],
        "norm.weight": state[v + "post_layernorm.weight"], "norm.bias": state[v + "post_layernorm.bias"],
        "head.weight": proj, "head.bias": torch.zeros(proj.shape[0], dtype=proj.dtype),
    }
    for i in _layer_ids(state):
        src, dst = f"{v}encoder.layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{dst}attn.qkv.{part}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[f"{dst}attn.proj.{part}"] = state[f"{src}self_attn.out_proj.{part}"]
            out[f"{dst}norm1.{part}"] = state[f"{src}layer_norm1.{part}"]
            out[f"{dst}norm2.{part}"] = state[f"{src}layer_norm2.{part}"]
            out[f"{dst}mlp.fc1.{part}"] = state[f"{src}mlp.fc1.{part}"]
            out[f"{dst}mlp.fc2.{part}"] = state[f"{src}mlp.fc2.{part}"]
    return out


def timm_to_transformers_clip(state: Mapping) -> dict:
    """The inverse of ``transformers_clip_to_timm`` (the ``head`` bias must be zero): writes
    random model dirs for smoke runs and tests in 1.x's layout."""
    v = _VISION
    head_bias = state["head.bias"]
    if bool((head_bias != 0).any()):
        raise ValueError("head.bias is not zero: transformers' visual_projection has no bias")
    out = {
        v + "embeddings.class_embedding": state["cls_token"].reshape(-1),
        v + "embeddings.position_embedding.weight": state["pos_embed"].squeeze(0),
        v + "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
        v + "pre_layrnorm.weight": state["norm_pre.weight"], v + "pre_layrnorm.bias": state["norm_pre.bias"],
        v + "post_layernorm.weight": state["norm.weight"], v + "post_layernorm.bias": state["norm.bias"],
        "visual_projection.weight": state["head.weight"],
    }
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"{v}encoder.layers.{i}."
        for part in ("weight", "bias"):
            q, k, val = state[f"{src}attn.qkv.{part}"].chunk(3)
            out[f"{dst}self_attn.q_proj.{part}"], out[f"{dst}self_attn.k_proj.{part}"] = q, k
            out[f"{dst}self_attn.v_proj.{part}"] = val
            out[f"{dst}self_attn.out_proj.{part}"] = state[f"{src}attn.proj.{part}"]
            out[f"{dst}layer_norm1.{part}"] = state[f"{src}norm1.{part}"]
            out[f"{dst}layer_norm2.{part}"] = state[f"{src}norm2.{part}"]
            out[f"{dst}mlp.fc1.{part}"] = state[f"{src}mlp.fc1.{part}"]
            out[f"{dst}mlp.fc2.{part}"] = state[f"{src}mlp.fc2.{part}"]
    return {k: t.contiguous() for k, t in out.items()}


def transformers_clip_config(vision: Mapping) -> dict:
    """A ``CLIPModel`` ``config.json`` (vision part filled) for a vision tower's settings."""
    vision = {**VIT_L14, **vision}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": vision["projection_dim"],
            "vision_config": {**{k: vision[k] for k in VIT_L14}, "model_type": "clip_vision_model",
                              "num_channels": 3}}


def write_random_model_dir(model_dir: str | os.PathLike, tiny: bool = True, seed: int = 0) -> Path:
    """Fill ``model_dir`` (1.x layout) with RANDOM weights: a CLIP-shaped ViT (tiny: 64-d, 2 layers,
    2 heads, the real 768-d output and transform; else ViT-L/14's shapes) and random heads.

    For smoke runs and tests offline: the embeddings and scores mean nothing. With the default seed
    they are those of the legacy smoke setup (``TimmImageEmbedder(..., pretrained=False,
    model_kwargs=TINY_MODEL_KWARGS)`` and ``write_random_heads(folder)``). Returns the folder.
    """
    import timm
    import torch
    from safetensors.torch import save as save_safetensors

    root = resolve_model_dir(model_dir)
    vision = dict(VIT_L14)
    if tiny:
        vision.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256)
    torch.manual_seed(seed)
    model = timm.create_model(DEFAULT_MODEL, pretrained=False, **timm_model_kwargs(vision))
    with torch.no_grad():
        model.head.bias.zero_()
    folder = clip_transformers_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    blob = save_safetensors(timm_to_transformers_clip(model.state_dict()), metadata={"format": "pt"})
    _write_bytes(blob, folder / "model.safetensors")
    _write_bytes(json.dumps(transformers_clip_config(vision), indent=2).encode(), folder / "config.json")
    torch.manual_seed(seed)  # the heads of write_random_heads(folder, seed): the same random scores
    aesthetic, nsfw = AestheticMLP(), NsfwMLP()
    _write_safetensors(aesthetic.state_dict(), aesthetic_file(root))
    buffer = io.BytesIO()
    torch.save(nsfw.state_dict(), buffer)
    _write_bytes(buffer.getvalue(), nsfw_file(root))
    return root


# ----------------------------------------------------------------------------------------------
# Helpers
def _hf_cache_root() -> str:
    """The Hugging Face hub cache, read from the environment now (``HF_HUB_CACHE``, ``HF_HOME``),
    as huggingface_hub resolves it (its own constant is fixed when it is imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hf_cached_files(repo: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, Path] | None:
    """``{file: path}`` of ``required`` (and present ``optional``) files of one snapshot of ``repo``
    in the Hugging Face cache (``refs/main`` first, then any snapshot), or None."""
    folder = Path(_hf_cache_root()) / f"models--{repo.replace('/', '--')}"
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    main = folder / "refs" / "main"
    ordered = []
    if main.is_file():
        ordered.append(snapshots / main.read_text().strip())
    ordered += sorted(p for p in snapshots.iterdir() if p.is_dir() and p not in ordered)
    for snap in ordered:
        if all((snap / name).is_file() for name in required):
            return {name: snap / name for name in (*required, *optional) if (snap / name).is_file()}
    return None


def _place(src: Path, dest: Path) -> None:
    """Put a copy of ``src`` at ``dest`` atomically: a hard link where the file system allows it
    (no extra space; cache files are symlinks to blobs, the blob is linked), else a copy."""
    src = Path(os.path.realpath(src))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.link.tmp"
    try:
        os.link(src, tmp)
        os.replace(tmp, dest)
        return
    except OSError:
        if tmp.exists():
            tmp.unlink()
    with open(src, "rb") as fin, atomic_write(dest) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def _write_bytes(data: bytes, dest: Path) -> None:
    with atomic_write(dest) as f:
        f.write(data)


def _write_safetensors(state: Mapping, dest: Path) -> None:
    from safetensors.torch import save as save_safetensors

    _write_bytes(save_safetensors({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"}), dest)


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:200]
