"""Benchmark 4: memory. Peak RSS of a worker against the size of the shard it works on.

    .venv/bin/python benchmarks/bench_memory.py [--quick]

Two one-shard datasets of small photos (~128x96 JPEGs, so that 10,000 images stay quick to
embed), one of 1,000 samples and one of 10,000. For each, on a fresh one-worker LocalCluster
(1 DALI thread, 1 torch thread):
- embed: tiny CLIP model + both heads -> ``save_metadata`` (one task embeds the whole shard);
- reshard: ``to_webdataset`` of the rows with ``keep`` True (every other row) into shards of
  ``samples_per_shard=10000``.
Reported: the worker's RSS before the job (models loaded for embed) and its peak RSS during it
(sampled every 5 ms by a thread in the worker). Flat means the peak does not grow with the shard beyond what the
output itself needs (768 float32 per embedded row must be held by the partition: 3 KB/row).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from bench_cpu_end_to_end import _load_models, make_embedder, start_cluster  # noqa: E402
from common import load_average, log, md_table, photo_dataset  # noqa: E402

SIZE = (128, 96)


def _one(client, fn):
    (value,) = client.run(fn).values()
    return value


def measure_embed(folder) -> dict:
    from nemo_curator.datasets import ImageTextPairDataset

    client = start_cluster(1, 1)
    try:
        embedder = make_embedder(1)
        client.run(_load_models, embedder)
        before = _one(client, common.start_rss_sampler)
        with tempfile.TemporaryDirectory(prefix="nemo-bench-mem-") as out:
            dataset = ImageTextPairDataset.from_webdataset(str(folder), id_col="key")
            summary = embedder(dataset).save_metadata(path=out, show_progress=False, resume=False)
        peak = _one(client, common.stop_rss_sampler)
        return {"rows": summary["totals"]["rows"], "rss_before_mb": before, "peak_mb": peak, "seconds": summary["seconds"]}
    finally:
        _close(client)


def measure_reshard(folder) -> dict:
    from nemo_curator.datasets import ImageTextPairDataset

    client = start_cluster(1, 1)
    try:
        before = _one(client, common.start_rss_sampler)
        dataset = ImageTextPairDataset.from_webdataset(str(folder), id_col="key")
        dataset.metadata["keep"] = dataset.metadata["key"].str[-1].isin(list("02468"))
        with tempfile.TemporaryDirectory(prefix="nemo-bench-mem-") as out:
            summary = dataset.to_webdataset(os.path.join(out, "resharded"), filter_column="keep", samples_per_shard=10000,
                                            show_progress=False)
        peak = _one(client, common.stop_rss_sampler)
        return {"rows": summary["rows_in"], "kept": summary["rows_kept"], "rss_before_mb": before, "peak_mb": peak,
                "seconds": summary["seconds"]}
    finally:
        _close(client)


def _close(client):
    cluster = client.cluster
    client.close()
    cluster.close()


def main(argv=None):
    common.quiet_logs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shards of 100 and 1,000 samples instead of 1,000 and 10,000")
    args = ap.parse_args(argv)
    sizes = (100, 1000) if args.quick else (1000, 10000)
    load0 = load_average()
    results = {}
    for n in sizes:
        folder = photo_dataset("small_photos", SIZE, 1, n)
        tar_mb = os.path.getsize(common.tars_of(folder)[0]) / 2**20
        log(f"embed {n}")
        emb = measure_embed(folder)
        log(f"  {emb}")
        log(f"reshard {n}")
        res = measure_reshard(folder)
        log(f"  {res}")
        results[n] = {"tar_mb": tar_mb, "embed": emb, "reshard": res}
    small, large = (results[n] for n in sizes)
    rows = []
    for job in ("embed", "reshard"):
        for n in sizes:
            r = results[n][job]
            rows.append([job, f"{n:,}", f"{results[n]['tar_mb']:.0f}", f"{r['rss_before_mb']:.0f}", f"{r['peak_mb']:.0f}",
                         f"{r['peak_mb'] - r['rss_before_mb']:+.0f}", f"{r['seconds']:.1f}"])
        grow = large[job]["peak_mb"] - small[job]["peak_mb"]
        rows.append([job, f"{sizes[1]:,} vs {sizes[0]:,}", "", "", f"{grow:+.0f} MB",
                     f"{grow * 2**20 / (sizes[1] - sizes[0]):.0f} B/extra row", ""])
    md = (f"### 4. Memory (worker peak RSS against shard size; photos ~{SIZE[0]}x{SIZE[1]}; fresh 1-worker LocalCluster "
          f"per row; load average {load0:.1f})\n\n"
          + md_table(["job", "samples in the shard", "tar MB", "worker RSS before, MB", "worker peak RSS, MB",
                      "peak − before, MB", "seconds"], rows))
    common.save_result("memory", {"results": results}, md)


if __name__ == "__main__":
    main()
