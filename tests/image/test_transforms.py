"""DALI preprocessing reproduces timm's own PIL eval transform on real photographs."""
import numpy as np
import pytest

from nemo_curator.image.transforms import TransformSpec, UnsupportedTransformError, dali_preprocess, timm_data_config

MODEL = "vit_large_patch14_clip_quickgelu_224.openai"


def dali_outputs(files, spec):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None)
    def pipe():
        encoded, _ = fn.readers.file(files=[str(f) for f in files])
        return dali_preprocess(fn.decoders.image(encoded, device="cpu", output_type=types.RGB), spec)

    p = pipe()
    p.build()
    out, = p.run()
    return [np.asarray(out.at(i)) for i in range(len(files))]


@pytest.mark.parametrize("overlay", [None, {"crop_pct": 0.875}, {"interpolation": "bilinear"}])
def test_dali_matches_timm_eval_transform_on_photos(sample_photos, overlay, record_property):
    from PIL import Image
    from timm.data import create_transform

    cfg = timm_data_config(MODEL, overlay)
    reference = create_transform(**cfg)
    ours = dali_outputs(sample_photos, TransformSpec.from_data_config(cfg))
    diffs = []
    for path, got in zip(sample_photos, ours):
        with Image.open(path) as im:
            ref = reference(im.convert("RGB")).numpy()
        assert got.shape == ref.shape == (3, 224, 224)
        diffs.append((np.abs(got - ref).mean(), np.abs(got - ref).max()))
    means = [d[0] for d in diffs]
    record_property("mean_abs_diff_max_over_images", max(means))
    record_property("max_abs_diff", max(d[1] for d in diffs))
    assert max(means) <= 0.01, diffs


def test_geometry_follows_torchvision_on_odd_sizes(tmp_path):
    """Odd crop margins use Python's round-half-even like torchvision's center_crop."""
    from PIL import Image
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    files = []
    for w, h in [(225, 301), (227, 224), (224, 224), (1001, 333), (300, 225)]:
        path = tmp_path / f"{w}x{h}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        files.append(path)
    cfg = timm_data_config(MODEL)
    reference = create_transform(**cfg)
    for path, got in zip(files, dali_outputs(files, TransformSpec.from_data_config(cfg))):
        ref = reference(Image.open(path).convert("RGB")).numpy()
        # measured 0.000-0.004; a one-pixel shift of resize or crop gives 0.6-1.2 on noise
        assert np.abs(got - ref).mean() < 0.01, path.name


@pytest.mark.parametrize("cfg, match", [
    ({"crop_mode": "squash"}, "crop_mode"),
    ({"interpolation": "lanczos"}, "interpolation"),
    ({"input_size": (3, 224, 256)}, "non-square"),
])
def test_unsupported_transforms_are_clear_errors(cfg, match):
    base = timm_data_config(MODEL)
    with pytest.raises(UnsupportedTransformError, match=match):
        TransformSpec.from_data_config({**base, **cfg})


def test_exif_orientation_is_applied_unless_disabled(tmp_path):
    """A JPEG tagged 'rotate 90° CW' (orientation 6) decodes upright by default, as stored with False."""
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    path = tmp_path / "rotated.jpg"
    pixels = np.zeros((40, 100, 3), np.uint8)
    pixels[:, :50] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)

    def decode(adjust):
        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            encoded, _ = fn.readers.file(files=[str(path)])
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=adjust)

        p = pipe()
        p.build()
        return np.asarray(p.run()[0].at(0))

    assert decode(False).shape == (40, 100, 3)
    upright = decode(True)
    assert upright.shape == (100, 40, 3)
    assert upright[:45].mean() > 200 and upright[55:].mean() < 50  # the white half is now on top
