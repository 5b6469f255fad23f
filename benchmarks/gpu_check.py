"""The GPU check of issue 11, in one run: tests, GPU/CPU parity, benchmark 5 with its knobs.

    python benchmarks/gpu_check.py [--out DIR] [--cpu-smoke] [--suite-timeout 240]

Steps, in this order; each result is written to ``<out>/gpu-<device>.json`` as soon as it is known,
so a run cut short still reports what it did:

1. ``pytest -m gpu``, then the whole suite with the GPU visible (capped at ``--suite-timeout`` s);
2. GPU against CPU on the real photos (``../shared/sample_images``) with ViT-L/14 and the same
   random weights (a checkpoint written once): cosine per image and the heads' scores;
3. benchmark 5 (``bench_gpu.py``'s measurements): model only (eager, ``torch.compile``), decode +
   preprocess only (``hw_decoder_load`` 0, 0.65, 0.9; 4, 8 and 16 DALI threads), end to end without
   Dask, end to end on ``get_client(cluster_type="gpu")``; each in images/s and as a share of the
   compute limit (162 GFLOP per image at the GPU's dense bf16 peak).

``--cpu-smoke`` runs every step on the CPU with the tiny model, a few images and a short test
selection: a check of this script before machine time is spent on it, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_gpu  # noqa: E402
import common  # noqa: E402
from common import MODEL_NAME, ROOT, TINY_MODEL_KWARGS, classifier_heads, log, photo_dataset, tars_of  # noqa: E402

PARITY_COSINE = 0.999  # per image, GPU against CPU
PARITY_SCORE_ATOL = 1e-3


class Report:
    """The JSON result, rewritten (atomically) after every step."""

    def __init__(self, path: Path, fields: dict):
        self.path, self.data = path, {**fields, "steps_done": []}
        self.save()

    def update(self, step: str, **fields) -> None:
        self.data.update(fields)
        self.data["steps_done"].append(step)
        self.save()

    def save(self) -> None:
        from nemo_curator.utils.file_utils import write_json_atomic

        write_json_atomic(self.data, self.path)


def run_pytest(args: list[str], timeout: float) -> dict:
    """``pytest -q`` with ``args``: passed/failed/skipped counts, the exit code and the tail."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        out, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        out, code = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or ""), "timeout"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out)}
    return {"args": args, "exit": code, "seconds": round(time.perf_counter() - started, 1), **counts,
            "tail": out[-3000:]}


def parity(device: str, smoke: bool, work: Path) -> dict:
    """Embeddings and scores of the real photos on ``device`` against the CPU, same weights."""
    import numpy as np
    import pandas as pd
    import timm
    import torch
    from safetensors.torch import save_file

    from nemo_curator.image.embedders import TimmImageEmbedder
    from nemo_curator.utils.sample_data import make_samples, shared_photos_dir, write_shard

    photos = sorted(str(p) for p in shared_photos_dir().glob("*.jpg")) if shared_photos_dir() else []
    if not photos:
        return {"skipped": "no photos in ../shared/sample_images"}
    kwargs = TINY_MODEL_KWARGS if smoke else {}
    torch.manual_seed(0)
    checkpoint = work / "random_vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(MODEL_NAME, **kwargs).state_dict().items()},
              str(checkpoint))
    write_shard(work / "photos", "00000", make_samples(len(photos), 0, np.random.default_rng(0), photos=photos))
    frame = pd.read_parquet(work / "photos" / "00000.parquet")
    frame["key"] = frame["key"].astype(str)
    outputs = {}
    for dev in ("cpu", device):
        embedder = TimmImageEmbedder(MODEL_NAME, checkpoint_path=str(checkpoint), model_kwargs=kwargs, batch_size=4,
                                     classifiers=classifier_heads(), device=dev, precision="auto")
        out, _ = embedder.embed_shard(frame, str(work / "photos" / "00000.tar"), "key")
        outputs[dev] = out.set_index("key").sort_index()
    cpu, gpu = outputs["cpu"], outputs[device]
    a, b = np.stack(cpu["image_embedding"].to_list()), np.stack(gpu["image_embedding"].to_list())
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    scores = {c: float(np.abs(cpu[c].to_numpy() - gpu[c].to_numpy()).max()) for c in ("aesthetic_score", "nsfw_score")}
    ok = bool(cosine.min() >= PARITY_COSINE and max(scores.values()) <= PARITY_SCORE_ATOL)
    return {"images": len(cosine), "cosine_min": float(cosine.min()), "cosine_mean": float(cosine.mean()),
            "score_max_abs_diff": scores, "passed": ok,
            "note": "the GPU runs bf16 autocast (precision auto), the CPU fp32 unless it has native bf16"}


def knob_rows(device: str, smoke: bool, tars: list[str], batch: int, limit: float | None) -> dict:
    """Decode + preprocess only, over the hardware decoder's load and the DALI threads."""
    from nemo_curator.image.embedders import TimmImageEmbedder

    rows = {}
    loads = (None,) if device == "cpu" else (0.0, 0.65, 0.9)
    for load in loads:
        for threads in ((2,) if smoke else (4, 8, 16)):
            embedder = TimmImageEmbedder(MODEL_NAME, batch_size=batch, num_threads_per_worker=threads,
                                         model_kwargs=TINY_MODEL_KWARGS if smoke else {}, device=device)
            embedder.reader.hw_decoder_load = load
            bench_gpu.reader_loop(embedder, device, tars[:1], with_model=False)  # warm-up
            r = bench_gpu.reader_loop(embedder, device, tars, with_model=False)
            r["images_per_second"] = r["images"] / r["seconds"]
            r["share_of_compute_limit"] = r["images_per_second"] / limit if limit else None
            rows[f"decode only, hw_decoder_load={load}, {threads} DALI threads"] = r
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"), help="folder of gpu-<device>.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="every step on the CPU, tiny model, few images")
    ap.add_argument("--suite-timeout", type=float, default=240.0, help="seconds for the whole test suite")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args(argv)
    common.quiet_logs()
    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; run it on a CUDA machine, or pass --cpu-smoke")
        return 1
    device = "cpu" if smoke else "cuda"
    name = "cpu-smoke" if smoke else torch.cuda.get_device_name(0)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                            text=True).stdout.strip() if not smoke else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out / f"gpu-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}.json",
                    {"device_name": name, "driver": driver, "machine": common.machine_info(), "smoke": smoke})

    log("1. tests")
    gpu_tests = run_pytest(["-m", "gpu", "tests"], timeout=600)
    report.update("gpu tests", gpu_tests=gpu_tests, gpu_tests_passed=gpu_tests.get("passed", 0),
                  gpu_tests_failed=gpu_tests.get("failed", 0) + gpu_tests.get("error", 0) + gpu_tests.get("errors", 0))
    suite = run_pytest(["tests/image/test_shard_reader.py"] if smoke else ["tests", "README.md", "docs"],
                       timeout=args.suite_timeout)
    report.update("whole suite", suite=suite)

    log("2. parity")
    with tempfile.TemporaryDirectory(prefix="nemo-gpu-check-") as work:
        report.update("parity", parity=parity(device, smoke, Path(work)))

    log("3. benchmark 5")
    n_images, n_shards, batch = (64, 2, 16) if smoke else (args.images, 8, args.batch_size)
    folder = photo_dataset("photos_500x375", common.SIZES["500x375"], n_shards, max(1, n_images // n_shards),
                           write_index=True)
    tars = tars_of(folder)
    peak = None if smoke else bench_gpu.peak_tflops(name)
    limit = peak * 1e12 / (bench_gpu.GFLOP_PER_IMAGE * 1e9) if peak else None
    from nemo_curator.image.embedders import TimmImageEmbedder

    def embedder(compile_model=False, threads=8):
        return TimmImageEmbedder(MODEL_NAME, batch_size=batch, num_threads_per_worker=threads,
                                 model_kwargs=TINY_MODEL_KWARGS if smoke else {}, classifiers=classifier_heads(),
                                 device=device, compile_model=compile_model)

    def rate(r: dict) -> dict:
        r["images_per_second"] = r["images"] / r["seconds"]
        r["share_of_compute_limit"] = r["images_per_second"] / limit if limit else None
        return r

    rows = {"model only, eager": rate(bench_gpu.model_only(embedder(), device, batch, 2.0 if smoke else 10.0))}
    report.update("model only", rows=rows, model_only_images_per_second=rows["model only, eager"]["images_per_second"],
                  compute_limit_images_per_second=limit, peak_tflops_bf16=peak)
    rows["model only, torch.compile"] = rate(bench_gpu.model_only(embedder(True), device, batch, 2.0 if smoke else 10.0))
    report.update("model only compiled", rows=rows)
    knobs = knob_rows(device, smoke, tars, batch, limit)
    rows.update(knobs)
    best = max(knobs.values(), key=lambda r: r["images_per_second"])
    report.update("decode only", rows=rows, decode_only_images_per_second=best["images_per_second"])
    e = embedder()
    bench_gpu.reader_loop(e, device, tars[:1], with_model=True)
    rows["end to end, no Dask"] = rate(bench_gpu.reader_loop(e, device, tars, with_model=True))
    report.update("end to end bare", rows=rows)
    dask_row = rate(bench_gpu.dask_end_to_end(embedder(), folder, device))
    rows[f"end to end, Dask ({dask_row['cluster']})"] = dask_row
    report.update("end to end dask", rows=rows, end_to_end_images_per_second=dask_row["images_per_second"],
                  share_of_compute_limit=dask_row["share_of_compute_limit"])
    print(json.dumps({k: v for k, v in report.data.items() if k not in ("rows", "gpu_tests", "suite", "machine")},
                     indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
