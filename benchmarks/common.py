"""Shared pieces of the benchmarks: data, timing, the machine header, result files.

- Data: ``photo_dataset(...)`` writes shards of *photographs* into ``benchmarks/_data/``
  (git-ignored) once and reuses them. The pictures are the real photos of
  ``../shared/sample_images`` (or ``$NEMO_BENCH_PHOTOS``) cropped and resized to the asked size,
  with mild sensor-like noise so that the JPEG sizes match real photos of that size
  (~43 KB at 500x375, ~145 KB at 1024x768, quality 90); 256 distinct pictures per size, cycled.
  Decode time depends mostly on the pixel count and the entropy of the bitstream, and both are
  those of real photos.
- Timing: ``interleave`` runs the competing cases round-robin (A B A B ...) so that the noise of
  a shared machine hits all of them alike; tables report the median and the spread.
- Results: each benchmark prints a Markdown table and writes ``benchmarks/_data/results/<name>.json``.
"""
from __future__ import annotations

import datetime as _dt
import glob
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.utils.data

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("NEMO_BENCH_DATA", ROOT / "benchmarks" / "_data"))
RESULTS_DIR = DATA_DIR / "results"
PHOTO_GLOB = os.environ.get("NEMO_BENCH_PHOTOS", str(ROOT.parent / "shared" / "sample_images" / "*.jpg"))

# The model of every CPU benchmark: the CLIP ViT-L/14 architecture shrunk to 2 blocks of width 64
# (it keeps the 768-d CLIP head and the real 224 px eval transform), random weights.
from nemo_curator.utils.constants import DEFAULT_MODEL as MODEL_NAME  # noqa: E402
from nemo_curator.utils.constants import TINY_MODEL_KWARGS  # noqa: E402
WEIGHTS_DIR = Path(os.environ.get("NEMO_BENCH_WEIGHTS", ROOT.parent / "shared" / "weights"))
AESTHETIC_WEIGHTS = WEIGHTS_DIR / "sac+logos+ava1-l14-linearMSE.pth"
NSFW_WEIGHTS = WEIGHTS_DIR / "clip_autokeras_binary_nsfw.pth"

SIZES = {"500x375": (500, 375), "1024x768": (1024, 768)}
POOL_SIZE = 256


# ------------------------------------------------------------------------------------------------
# Data
def _photos() -> list:
    from PIL import Image

    paths = sorted(glob.glob(PHOTO_GLOB))
    if not paths:
        raise FileNotFoundError(f"no photos match {PHOTO_GLOB}: set NEMO_BENCH_PHOTOS to a glob of JPEG photographs")
    return [Image.open(p).convert("RGB") for p in paths]


def photo_pool(width: int, height: int, n: int = POOL_SIZE, seed: int = 0, quality: int = 90,
               noise: float = 4.0) -> list[bytes]:
    """``n`` JPEG-encoded photographs of about ``width`` x ``height`` (a quarter portrait, sizes
    jittered by up to 8 %), made from the real photos: random scale >= cover, random crop, random
    flip, Gaussian noise of ``noise`` grey levels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos()
    out = []
    for i in range(n):
        w, h = (round(width * rng.uniform(0.92, 1.08)), round(height * rng.uniform(0.92, 1.08)))
        if i % 4 == 3:
            w, h = h, w
        src = photos[i % len(photos)]
        scale = max(w / src.width, h / src.height) * rng.uniform(1.0, 1.4)
        big = src.resize((max(w, round(src.width * scale)), max(h, round(src.height * scale))), Image.BICUBIC)
        x0, y0 = int(rng.integers(0, big.width - w + 1)), int(rng.integers(0, big.height - h + 1))
        img = big.crop((x0, y0, x0 + w, y0 + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, (h, w, 3)).astype(np.float32)
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def photo_dataset(name: str, size: tuple[int, int], n_shards: int, samples_per_shard: int, seed: int = 0,
                  write_index: bool = False) -> Path:
    """A dataset folder ``benchmarks/_data/<name>_<n_shards>x<samples_per_shard>`` of shards of
    photographs (made once, reused while its spec is unchanged)."""
    from nemo_curator.utils.sample_data import CAPTION_WORDS, Sample, write_shard
    from nemo_curator.utils.webdataset import shard_name

    folder = DATA_DIR / f"{name}_{n_shards}x{samples_per_shard}"
    spec = {"size": list(size), "n_shards": n_shards, "samples_per_shard": samples_per_shard, "seed": seed,
            "pool": POOL_SIZE, "write_index": write_index, "version": 1}
    marker = folder / "_bench_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folder
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    t0 = time.time()
    pool = photo_pool(*size, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for s in range(n_shards):
        samples = []
        for i in range(samples_per_shard):
            key = f"{s:05d}{i:05d}"
            caption = " ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(3, 9))))
            data = pool[(s * samples_per_shard + i) % len(pool)]
            members = {"jpg": data, "txt": caption.encode(), "json": json.dumps({"key": key, "caption": caption}).encode()}
            samples.append(Sample(key, members, {"caption": caption, "url": f"https://example.com/{key}.jpg"}))
        write_shard(folder, shard_name(s, 5), samples, write_index=write_index)
    marker.write_text(json.dumps(spec))
    log(f"made {folder} ({n_shards} x {samples_per_shard} photos of ~{size[0]}x{size[1]}) in {time.time() - t0:.1f} s")
    return folder


def tars_of(folder: Path) -> list[str]:
    return sorted(str(p) for p in Path(folder).glob("*.tar"))


def mean_jpeg_kb(folder: Path) -> float:
    from nemo_curator.utils.webdataset import iter_tar_samples

    sizes = [m.size for _, ms in iter_tar_samples(tars_of(folder)[0]) for m in ms if m.ext == "jpg"]
    return float(np.mean(sizes)) / 1000


# ------------------------------------------------------------------------------------------------
# Timing
SETTLE_SECONDS = 1.0


def interleave(cases: dict[str, Callable[[], dict | None]], repeats: int, warmup: bool = True) -> dict[str, dict]:
    """Run each case ``repeats`` times round-robin; return ``{name: {"seconds": [...], "info": last}}``.

    A case returns an optional dict (e.g. ``{"images": n}``) kept as ``info``. ``warmup`` runs
    each case once first, untimed (imports, page cache, first-call costs).
    """
    results = {name: {"seconds": [], "info": None} for name in cases}
    if warmup:
        for name, fn in cases.items():
            log(f"  warm-up {name}")
            fn()
    for r in range(repeats):
        for name, fn in cases.items():
            time.sleep(SETTLE_SECONDS)  # let the previous case's processes finish their clean-up
            t0 = time.perf_counter()
            info = fn()
            dt = time.perf_counter() - t0
            results[name]["seconds"].append(dt)
            results[name]["info"] = info
            log(f"  run {r + 1}/{repeats} {name}: {dt:.2f} s {info or ''}")
    return results


def rate(images: int, seconds: Sequence[float]) -> dict:
    """Images per second: median over runs, with min and max."""
    rates = [images / s for s in seconds]
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": len(rates)}


def fmt_rate(r: dict) -> str:
    return f"{r['median']:.0f} ({r['min']:.0f}–{r['max']:.0f})"


def quiet_logs() -> None:
    """Keep Dask's INFO lines (cluster start and stop) out of the benchmark output."""
    import logging

    for name in ["distributed", "nemo_curator", *logging.root.manager.loggerDict]:
        if name.split(".")[0] in ("distributed", "nemo_curator"):
            logging.getLogger(name).setLevel(logging.WARNING)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Machine and versions
def machine_info() -> dict:
    def _cpu_model() -> str:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()

    def _mem_gb() -> float | None:
        try:
            return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        except (ValueError, OSError):
            return None

    def _git() -> str:
        try:
            rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                                   text=True).stdout.strip()
            return rev + ("+dirty" if dirty else "")
        except OSError:
            return "?"

    versions = {"python": platform.python_version()}
    for mod in ("nvidia.dali", "torch", "timm", "PIL", "dask", "distributed", "pandas", "pyarrow", "numpy"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            versions[mod.split(".")[-1]] = m.__version__
        except ImportError:
            versions[mod.split(".")[-1]] = None
    info = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": _cpu_model(), "cores": os.cpu_count(),
            "memory_gb": _mem_gb(), "os": platform.platform(terse=True), "git": _git(), "versions": versions}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["versions"]["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def header_md(info: dict) -> str:
    v = info["versions"]
    vs = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    gpu = f", GPU: {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB{gpu}; {info['os']}. "
            f"Date: {info['date']}. Commit: {info['git']}.\nVersions: {vs}.")


def md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save_result(name: str, payload: dict, markdown: str) -> None:
    """Print the benchmark's Markdown and write its JSON (machine info included)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), **payload, "markdown": markdown}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    print(markdown, flush=True)


# ------------------------------------------------------------------------------------------------
# Shared peer pieces: what clip-retrieval-style tools do (tarfile + PIL + timm transform + DataLoader)
def timm_eval_transform(model_name: str = MODEL_NAME, model_kwargs: dict | None = None):
    """``timm.data.create_transform(**resolve_data_config({}, model=model))`` for the model."""
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(model_name, pretrained=False, **(model_kwargs if model_kwargs is not None else TINY_MODEL_KWARGS))
    return create_transform(**resolve_data_config({}, model=model))


class TarImageDataset(torch.utils.data.IterableDataset):
    """Torch IterableDataset over webdataset tars: ``(key, transformed image)``, shards split
    among DataLoader workers (as ``webdataset.split_by_worker`` does)."""

    def __init__(self, tars: Sequence[str], transform, image_ext: str = "jpg"):
        self.tars = list(tars)
        self.transform = transform
        self.image_ext = image_ext

    def __iter__(self):
        import tarfile

        from PIL import Image

        worker = torch.utils.data.get_worker_info()
        tars = self.tars if worker is None else self.tars[worker.id::worker.num_workers]
        for tar in tars:
            with tarfile.open(tar, "r|") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.rpartition(".")
                    if ext != self.image_ext:
                        continue
                    data = tf.extractfile(member).read()
                    image = Image.open(io.BytesIO(data)).convert("RGB")
                    yield key, self.transform(image)


def peer_loader(tars: Sequence[str], transform, batch_size: int, num_workers: int = 2, prefetch_factor: int = 2):
    return torch.utils.data.DataLoader(TarImageDataset(tars, transform), batch_size=batch_size, num_workers=num_workers,
                                       prefetch_factor=prefetch_factor if num_workers else None)


def classifier_heads() -> list:
    """AestheticClassifier and NsfwClassifier with the real weights (raises if the module is missing)."""
    from nemo_curator.image.classifiers import AestheticClassifier, NsfwClassifier

    return [AestheticClassifier(model_path=str(AESTHETIC_WEIGHTS)), NsfwClassifier(model_path=str(NSFW_WEIGHTS))]


# ------------------------------------------------------------------------------------------------
# CPU time (robust on a shared machine: other people's processes do not add to it)
def cpu_seconds(client=None) -> float:
    """CPU seconds used so far by this process, its reaped children (DataLoader workers) and,
    with ``client``, the processes of its Dask workers."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    if client is not None:
        total += sum(client.run(_process_cpu_seconds).values())
    return total


def _process_cpu_seconds() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ------------------------------------------------------------------------------------------------
# The code before the benchmark-driven changes, for side-by-side "before / after" rows
BASELINE_REV = os.environ.get("NEMO_BENCH_BASELINE_REV", "2ca24f3")  # last commit before the speed changes


def baseline_embedder_class(rev: str = BASELINE_REV):
    """``TimmImageEmbedder`` as it was at git revision ``rev`` (its timm.py and transforms.py), or
    None if git cannot show that revision. The two files are written to
    ``benchmarks/_data/baseline/`` as modules of their own, importable by Dask workers started
    after this call (the folder is added to PYTHONPATH)."""
    import importlib

    prefix = f"_nemo_bench_baseline_{rev}"
    folder = DATA_DIR / "baseline"
    sources = {}
    for key, path in (("transforms", "nemo_curator/image/transforms.py"), ("timm", "nemo_curator/image/embedders/timm.py")):
        proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            log(f"baseline {rev} unavailable ({proc.stderr.strip()}): its rows are skipped")
            return None
        sources[key] = proc.stdout
    sources["timm"] = sources["timm"].replace("from nemo_curator.image.transforms import", f"from {prefix}_transforms import")
    folder.mkdir(parents=True, exist_ok=True)
    for key, text in sources.items():
        target = folder / f"{prefix}_{key}.py"
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return importlib.import_module(f"{prefix}_timm").TimmImageEmbedder


# ------------------------------------------------------------------------------------------------
# Peak RSS of a process, sampled by a background thread (ru_maxrss would include start-up peaks)
_SAMPLERS: dict = {}


def start_rss_sampler(interval_s: float = 0.005) -> float:
    """Start sampling this process's RSS; return the current RSS in MB."""
    import threading

    import psutil

    proc = psutil.Process()
    state = {"peak": proc.memory_info().rss, "stop": threading.Event()}

    def loop():
        while not state["stop"].wait(interval_s):
            state["peak"] = max(state["peak"], proc.memory_info().rss)

    threading.Thread(target=loop, name="rss-sampler", daemon=True).start()
    _SAMPLERS["current"] = state
    return state["peak"] / 2**20


def stop_rss_sampler() -> float:
    """Stop the sampler; return the peak RSS seen, in MB."""
    import psutil

    state = _SAMPLERS.pop("current")
    state["stop"].set()
    return max(state["peak"], psutil.Process().memory_info().rss) / 2**20


def embed_shards(embedder, tars: Sequence[str], device: str, model=None, heads: Sequence = ()) -> int:
    """Our reader over ``tars`` (no Dask, no join, no write), optionally + model + heads; returns images read.

    ``model``: ``embedder.get_model(device)`` or None for decode only; ``heads``: (classifier, head) pairs.
    Results are moved to the host (``.cpu()``) so GPU work is finished when this returns.
    """
    n = 0
    with torch.inference_mode():
        for tar in tars:
            for item in embedder.iter_shard(tar, None, "__key__", device):
                if item.batch is None:
                    continue
                if model is not None:
                    emb = embedder.normalize(model(item.batch)).float()
                    for clf, head in heads:
                        clf.score_tensor(head, emb).cpu()
                    emb.cpu()
                n += item.batch.shape[0]
    return n


def summarize_runs(results: dict) -> dict:
    """``interleave`` results (each run's info holding ``images`` and ``cpu_s``) -> rate and CPU ms per image."""
    out = {}
    for name, r in results.items():
        n = r["info"]["images"]
        out[name] = {"images": n, "rate": rate(n, r["seconds"]), "seconds": r["seconds"],
                     "cpu_ms_per_image": 1000 * r["info"]["cpu_s"] / n}
    return out
