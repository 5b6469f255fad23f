"""Benchmark 5: GPU. ViT-L/14 with bf16 autocast and DALI "mixed" decode, against the compute limit.

    .venv/bin/python benchmarks/bench_gpu.py [--images 32000] [--batch-size 512] [--dali-threads 8]
                                             [--peak-tflops 989] [--compile] [--cpu-smoke]

On a CUDA machine (skips with a message and exit code 0 without one):
- model only: ``TimmImageEmbedder.load_embedding_model("cuda")`` (random weights, channels_last,
  bf16 autocast, as every embedding task runs it) on random batches already on the GPU;
- decode only: the embedder's shard reader (``iter_shard``: DALI webdataset reader + nvJPEG
  "mixed" decode + ``dali_preprocess`` on the GPU, handed to torch without a host copy) over
  shards of ~500x375 photographs;
- end to end (bare): reader + model + both heads in this process, no Dask;
- end to end (Dask): ``from_webdataset`` -> embedder with both heads -> ``save_metadata`` on
  ``get_client(cluster_type="gpu")`` (a plain one-worker LocalCluster if dask_cuda is missing).
``--compile`` adds model-only and bare end-to-end rows with ``compile_model=True`` (torch.compile;
compile time excluded: it runs in the warm-up). Each rate is set against the compute limit: 162 GFLOP per 224 px image for ViT-L/14, and the
GPU's dense bf16 peak (H100 SXM: 989 TFLOP/s -> ~6,100 images/s). Target: end to end >= 50 %.
``--cpu-smoke`` runs the same code on the CPU with the tiny model and a few images (a check of
the script, not a measurement).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import MODEL_NAME, TINY_MODEL_KWARGS, classifier_heads, log, md_table, photo_dataset, tars_of  # noqa: E402

GFLOP_PER_IMAGE = 162.0  # ViT-L/14 at 224 px, forward (2 x 81 GMAC)
# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; no sparsity)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                    "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(gpu_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in gpu_name.lower():
            return value
    if "h100" in gpu_name.lower():
        return 989.0
    return None


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def model_only(embedder, device, batch_size, seconds=10.0) -> dict:
    import torch

    embed = embedder.get_model(device)
    heads = [(clf, clf.get_model(device)) for clf in embedder.classifiers]
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    with torch.inference_mode():
        for _ in range(3):
            embed(x)
        sync(device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            emb = embedder.normalize(embed(x)).float()
            for clf, head in heads:
                clf.score_tensor(head, emb)
            n += batch_size
        sync(device)
        return {"images": n, "seconds": time.perf_counter() - t0}


def reader_loop(embedder, device, tars, with_model: bool) -> dict:
    embed = embedder.get_model(device) if with_model else None
    heads = [(clf, clf.get_model(device)) for clf in embedder.classifiers] if with_model else []
    t0 = time.perf_counter()
    n = common.embed_shards(embedder, tars, device, embed, heads)
    sync(device)
    return {"images": n, "seconds": time.perf_counter() - t0}


def dask_end_to_end(embedder, folder, device) -> dict:
    from nemo_curator.datasets import ImageTextPairDataset

    client, kind = _client(device)
    try:
        client.run(_load_models, embedder, device)
        dataset = ImageTextPairDataset.from_webdataset(str(folder), id_col="key")
        with tempfile.TemporaryDirectory(prefix="nemo-bench-gpu-") as out:
            t0 = time.perf_counter()
            summary = embedder(dataset).save_metadata(path=out, show_progress=False, resume=False)
            seconds = time.perf_counter() - t0
        return {"images": int(summary["totals"]["embedded"]), "seconds": seconds, "cluster": kind}
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def _client(device):
    from nemo_curator import get_client

    if device == "cuda":
        try:
            import dask_cuda  # noqa: F401

            return get_client(cluster_type="gpu", n_workers=1, dashboard_address=":0"), "LocalCUDACluster, 1 worker"
        except ImportError:
            log("dask_cuda is not installed: a plain LocalCluster with one worker (it sees the GPU) instead")
    return get_client(cluster_type="cpu", n_workers=1, threads_per_worker=1, dashboard_address=":0"), "LocalCluster, 1 worker"


def _load_models(embedder, device):
    embedder.get_model(device)
    for clf in embedder.classifiers:
        clf.get_model(device)


def main(argv=None):
    common.quiet_logs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32000, help="photos in the decode and end-to-end runs")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--dali-threads", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: from its name)")
    ap.add_argument("--compile", action="store_true", help="also measure the model compiled with torch.compile")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the code on the CPU with the tiny model (no measurement)")
    args = ap.parse_args(argv)

    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU visible (torch.cuda.is_available() is False): skipped. Run it on a CUDA machine "
              "with the gpu extra installed (pip install -e .[gpu]), or pass --cpu-smoke to check the script.")
        common.save_result("gpu", {"skipped": "no CUDA GPU"}, "### 5. GPU\n\nSkipped: no CUDA GPU on this machine.")
        return 0
    device = "cpu" if smoke else "cuda"
    n_images, n_shards, batch = (96, 2, 16) if smoke else (args.images, args.shards, args.batch_size)
    from nemo_curator.image.embedders import TimmImageEmbedder

    def make_embedder(compile_model=False):
        return TimmImageEmbedder(MODEL_NAME, batch_size=batch, num_threads_per_worker=args.dali_threads,
                                 autocast=not smoke, model_kwargs=TINY_MODEL_KWARGS if smoke else {},
                                 classifiers=classifier_heads(), device=device, compile_model=compile_model)

    embedder = make_embedder()
    folder = photo_dataset("photos_500x375", common.SIZES["500x375"], n_shards, max(1, n_images // n_shards),
                           write_index=True)
    tars = tars_of(folder)
    gpu_name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (smoke run)"
    peak = args.peak_tflops or (peak_tflops(gpu_name) if device == "cuda" else None)
    limit = peak * 1e12 / (GFLOP_PER_IMAGE * 1e9) if peak else None
    log(f"{gpu_name}: peak {peak} TFLOP/s bf16 -> compute limit {limit and round(limit)} images/s")

    results = {}
    log("model only")
    results["model only (random batches on the GPU, bf16 autocast, + heads)"] = model_only(embedder, device, batch,
                                                                                          2.0 if smoke else 10.0)
    log("decode only (warm-up on one shard first)")
    reader_loop(embedder, device, tars[:1], with_model=False)
    results[f"decode only (DALI mixed decode + preprocess, {args.dali_threads} threads)"] = \
        reader_loop(embedder, device, tars, with_model=False)
    log("end to end, bare loop")
    results["end to end, bare loop (reader + model + heads, no Dask)"] = reader_loop(embedder, device, tars, with_model=True)
    if args.compile:
        compiled = make_embedder(compile_model=True)
        log("model only, torch.compile (compiling in the warm-up)")
        results["model only, torch.compile"] = model_only(compiled, device, batch, 2.0 if smoke else 10.0)
        log("end to end, bare loop, torch.compile")
        reader_loop(compiled, device, tars[:1], with_model=True)  # compiles the last-batch size too
        results["end to end, bare loop, torch.compile"] = reader_loop(compiled, device, tars, with_model=True)
    log("end to end, Dask")
    r = dask_end_to_end(embedder, folder, device)
    results[f"end to end, Dask ({r['cluster']}): from_webdataset -> embed + heads -> save_metadata"] = r

    rows = []
    for name, r in results.items():
        ips = r["images"] / r["seconds"]
        r["images_per_second"] = ips
        rows.append([name, f"{r['images']:,}", f"{ips:,.0f}", f"{ips / limit:.0%}" if limit else "n/a"])
    e2e = next(r for name, r in results.items() if name.startswith("end to end, Dask"))["images_per_second"]
    verdict = (f"End to end at {e2e / limit:.0%} of the compute limit (target ≥ 50 %)." if limit else "")
    md = (f"### 5. GPU ({gpu_name}; ViT-L/14 {MODEL_NAME if not smoke else '(tiny, smoke run)'}, random weights; "
          f"batch {batch}; {GFLOP_PER_IMAGE:.0f} GFLOP/image; peak {peak} TFLOP/s bf16 → limit "
          f"{limit and f'{limit:,.0f}'} images/s)\n\n"
          + md_table(["stage", "images", "images/s", "of the compute limit"], rows) + ("\n\n" + verdict if verdict else ""))
    common.save_result("gpu" if not smoke else "gpu_cpu_smoke",
                       {"results": results, "gpu": gpu_name, "peak_tflops": peak, "limit_images_per_s": limit}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
