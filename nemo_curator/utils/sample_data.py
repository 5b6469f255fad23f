"""Build small sample datasets in the img2dataset layout (for the demo, tests and benchmarks)."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from nemo_curator.utils.file_utils import atomic_write, write_parquet_atomic
from nemo_curator.utils.webdataset import INDEX_SUFFIX, PARQUET_SUFFIX, TAR_SUFFIX, TarWriter, shard_name

CAPTION_WORDS = ["a", "photo", "of", "red", "blue", "green", "cat", "dog", "sunset", "mountain", "city",
                 "painting", "river", "portrait", "abstract", "pattern", "over", "with", "the", "bright"]


@dataclass
class Sample:
    """One webdataset sample: its key and members {extension: bytes}, and its parquet row (or None)."""

    key: str
    members: dict[str, bytes]
    row: dict | None = field(default_factory=dict)


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> "Image.Image":
    """A smooth, photo-like RGB picture (gradients + blobs) of ``width`` x ``height`` pixels."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 127 + 80 * np.sin(fx * x / width * 6.28 + phase) * np.cos(fy * y / height * 6.28)
    for _ in range(rng.integers(2, 6)):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.3) * min(width, height)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        img[mask] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode_image(image, fmt: str = "jpg", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    kwargs = {"quality": quality} if pil_format in ("JPEG", "WEBP") else {}
    image.save(buf, format=pil_format, **kwargs)
    return buf.getvalue()


def write_shard(folder: str | os.PathLike, name: str, samples: Sequence[Sample], write_index: bool = False,
                extra_rows: Sequence[dict] = ()) -> dict[str, str]:
    """Write ``<name>.tar`` (members in sample order) and ``<name>.parquet`` (rows of samples whose
    ``row`` is not None, then ``extra_rows``: rows with no sample in the tar). Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tar_path, parquet_path = folder / (name + TAR_SUFFIX), folder / (name + PARQUET_SUFFIX)
    with atomic_write(tar_path) as f:
        writer = TarWriter(f)
        for sample in samples:
            for ext, data in sample.members.items():
                writer.add(f"{sample.key}.{ext}", data)
        writer.close()
    rows = [dict(s.row, key=s.key) for s in samples if s.row is not None] + list(extra_rows)
    frame = pd.DataFrame(rows) if rows else pd.DataFrame({"key": pd.Series([], dtype="str")})
    write_parquet_atomic(frame, parquet_path)
    paths = {"tar": str(tar_path), "parquet": str(parquet_path)}
    if write_index:
        with atomic_write(folder / (name + INDEX_SUFFIX), "w") as f:
            f.write("\n".join(writer.index_lines()) + "\n")
        paths["idx"] = str(folder / (name + INDEX_SUFFIX))
    return paths


def make_samples(n: int, start_index: int, rng: np.random.Generator, key_digits: int = 9,
                 image_formats: Sequence[str] = ("jpg",), sizes: Sequence[tuple[int, int]] | None = None,
                 photos: Sequence[str] = ()) -> list[Sample]:
    """``n`` samples with an image (cycling ``image_formats``), a caption ``.txt`` and a ``.json``.

    ``photos``: paths of real images used in turn (their bytes copied as ``.jpg``) before
    synthetic ones.
    """
    sizes = sizes or [(512, 384), (384, 512), (640, 480), (300, 300), (800, 450)]
    samples = []
    for i in range(n):
        key = f"{start_index + i:0{key_digits}d}"
        caption = " ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(3, 9))))
        if i < len(photos):
            image_ext, image_bytes = "jpg", Path(photos[i]).read_bytes()
        else:
            image_ext = image_formats[i % len(image_formats)]
            w, h = sizes[i % len(sizes)]
            image_bytes = encode_image(synthetic_image(rng, w, h), image_ext)
        members = {image_ext: image_bytes, "txt": caption.encode(), "json": json.dumps({"key": key, "caption": caption}).encode()}
        samples.append(Sample(key, members, {"caption": caption, "url": f"https://example.com/{key}.{image_ext}"}))
    return samples


def make_sample_dataset(path: str | os.PathLike, n_shards: int = 2, samples_per_shard: int = 16, seed: int = 0,
                        image_formats: Sequence[str] = ("jpg",), photos: Iterable[str] = (), write_index: bool = False,
                        sizes: Sequence[tuple[int, int]] | None = None) -> list[str]:
    """Write ``n_shards`` shards ``00000.tar``... of synthetic (and optionally real) images.

    Ids are zero-padded strings ``SSSSSIIII`` (shard then index). Returns the tar paths.
    """
    rng = np.random.default_rng(seed)
    photos = list(photos)
    tars = []
    for s in range(n_shards):
        chunk, photos = photos[:samples_per_shard], photos[samples_per_shard:]
        samples = make_samples(samples_per_shard, s * 10_000, rng, image_formats=image_formats, sizes=sizes, photos=chunk)
        tars.append(write_shard(path, shard_name(s, 5), samples, write_index=write_index)["tar"])
    return tars


def shared_photos_dir() -> Path | None:
    """The real photographs of the project's ``shared/sample_images`` folder (beside the repository,
    or ``$NEMO_CURATOR_SHARED/sample_images``), when it holds ``*.jpg`` files; else None."""
    root = os.environ.get("NEMO_CURATOR_SHARED")
    shared = Path(root) if root else Path(__file__).resolve().parents[2].parent / "shared"
    folder = shared / "sample_images"
    return folder if folder.is_dir() and any(folder.glob("*.jpg")) else None
