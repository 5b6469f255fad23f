"""Benchmark 1: CPU decode + preprocess, our DALI graph against PIL + timm transform + DataLoader.

    .venv/bin/python benchmarks/bench_cpu_preprocess.py [--quick] [--knobs]

Both sides turn the same shards of photographs (~500x375 and ~1024x768 JPEGs) into batches of
normalised 3x224x224 float tensors in this process, on the same cores:
- ours: ``TimmImageEmbedder.iter_shard`` (what every embedding task runs: tar scan, DALI
  ``fn.readers.webdataset`` + ``fn.decoders.image(device="cpu")`` + ``transforms.dali_preprocess``,
  hand-over as torch tensors) with ``num_threads_per_worker`` = the core count;
- peer: the clip-retrieval way: a torch ``DataLoader`` with one worker per core over an
  IterableDataset that reads the tars with ``tarfile``, decodes with PIL and applies
  ``timm.data.create_transform(**resolve_data_config(...))``;
- ours with the shards' DALI index files (``use_index_files=True``): no tar header scan;
- ours at the baseline revision (before the speed changes), for what the changes bought.
Cases run round-robin; the table gives the median images/s (min–max) and CPU ms per image
(all processes and threads: robust to other load on a shared machine).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (MODEL_NAME, SIZES, TINY_MODEL_KWARGS, cpu_seconds, fmt_rate, interleave, load_average, log,  # noqa: E402
                    md_table, peer_loader, photo_dataset, tars_of, timm_eval_transform)

BATCH = 32


def reader_module(embedder_cls):
    """The module whose DALI graph ``embedder_cls`` builds with ``dali_preprocess``: the shard
    reader now, the embedder's own module in the baseline revision."""
    from nemo_curator.image import shard_reader

    module = sys.modules[embedder_cls.__module__]
    return module if hasattr(module, "dali_preprocess") else shard_reader


def ours_case(tars, embedder_cls, batch_size=BATCH, threads=None, use_index_files=False):
    threads = threads or os.cpu_count()
    embedder = embedder_cls(MODEL_NAME, batch_size=batch_size, num_threads_per_worker=threads, model_kwargs=TINY_MODEL_KWARGS,
                            use_index_files=use_index_files)

    def run(tars=tars):
        n = 0
        for tar in tars:
            for item in embedder.iter_shard(tar, None, "__key__", "cpu"):
                if item.batch is not None:
                    n += item.batch.shape[0]
        return {"images": n}

    return run


def peer_case(tars, transform, batch_size=BATCH, workers=None):
    workers = workers or os.cpu_count()

    def run(tars=tars):
        n = 0
        for keys, batch in peer_loader(tars, transform, batch_size, num_workers=workers):
            n += batch.shape[0]
        return {"images": n}

    return run


def with_cpu(fn):
    """Wrap a case so that its info carries the CPU seconds it used."""
    def run():
        c0 = cpu_seconds()
        info = fn()
        info["cpu_s"] = cpu_seconds() - c0
        return info
    return run


def measure(cases: dict, tars, repeats: int) -> dict:
    # warm-up: one shard each (imports, page cache, first pipeline)
    for name, fn in cases.items():
        log(f"  warm-up {name}")
        fn(tars=tars[:1])
    return common.summarize_runs(interleave({k: with_cpu(v) for k, v in cases.items()}, repeats=repeats, warmup=False))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and one repeat (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--knobs", action="store_true", help="also sweep DALI threads and batch size (500x375)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the rows of the code before the speed changes")
    ap.add_argument("--ablation", action="store_true",
                    help="also each change alone: the reader's scheduling (timm.py) and the ROI resize (transforms.py)")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    shards = {"500x375": (2, 100 if args.quick else 1000), "1024x768": (2, 40 if args.quick else 400)}
    from nemo_curator.image.embedders import TimmImageEmbedder

    baseline = None if args.no_baseline else common.baseline_embedder_class()
    transform = timm_eval_transform()
    load0 = load_average()
    results, rows = {}, []
    for label, size in SIZES.items():
        n_shards, per_shard = shards[label]
        folder = photo_dataset(f"photos_{label}", size, n_shards, per_shard, write_index=True)
        tars = tars_of(folder)
        kb = common.mean_jpeg_kb(folder)
        cases = {"peer: PIL + timm transform, DataLoader": peer_case(tars, transform),
                 "ours: DALI CPU (TimmImageEmbedder.iter_shard)": ours_case(tars, TimmImageEmbedder),
                 "ours, with .idx files (use_index_files=True: no tar header scan)":
                     ours_case(tars, TimmImageEmbedder, use_index_files=True)}
        if baseline is not None:
            cases[f"ours before the changes ({common.BASELINE_REV})"] = ours_case(tars, baseline)
        log(f"{label}: {len(tars)} shards x {per_shard} photos, {kb:.0f} KB each")
        res = measure(cases, tars, repeats)
        peer = res["peer: PIL + timm transform, DataLoader"]
        for name, r in res.items():
            rows.append([f"~{label} ({kb:.0f} KB)", name, fmt_rate(r["rate"]), f"{r['cpu_ms_per_image']:.2f}",
                         f"{r['rate']['median'] / peer['rate']['median']:.2f}×",
                         f"{peer['cpu_ms_per_image'] / r['cpu_ms_per_image']:.2f}×"])
        results[label] = res
    table = md_table(["photos", "pipeline", "images/s median (min–max)", "CPU ms/image", "speed vs peer",
                      "CPU efficiency vs peer"], rows)
    knob_table = ""
    if args.knobs:
        folder = photo_dataset("photos_500x375", SIZES["500x375"], *shards["500x375"], write_index=True)
        tars = tars_of(folder)
        cases = {}
        for threads in (1, 2):  # the reader decodes one batch ahead of the one being used (no depth knob)
            for bs in (32, 128):
                cases[f"threads={threads} batch={bs}"] = ours_case(tars, TimmImageEmbedder, bs, threads)
        log("knobs (500x375)")
        res = measure(cases, tars, repeats)
        results["knobs_500x375"] = res
        knob_table = "\n\nKnobs (ours, ~500x375):\n\n" + md_table(
            ["setting", "images/s median (min–max)", "CPU ms/image"],
            [[k, fmt_rate(r["rate"]), f"{r['cpu_ms_per_image']:.2f}"] for k, r in res.items()])
    ablation_table = ""
    if args.ablation and baseline is not None:
        import importlib

        from nemo_curator.image import transforms as new_transforms
        from nemo_curator.image.embedders import timm as new_timm

        old_timm = importlib.import_module(baseline.__module__)
        old_preprocess = old_timm.dali_preprocess
        rows_a = []
        for label, size in SIZES.items():
            folder = photo_dataset(f"photos_{label}", size, *shards[label], write_index=True)
            tars = tars_of(folder)

            def variant(timm_module, preprocess):
                embedder_cls = timm_module.TimmImageEmbedder
                inner = ours_case(tars, embedder_cls)
                patched = reader_module(embedder_cls)

                def run(tars=tars):
                    from nemo_curator.image.shard_reader import PIPELINES

                    saved = patched.dali_preprocess
                    patched.dali_preprocess = preprocess
                    PIPELINES.clear()  # pipelines built with the other variant's graph are reused otherwise
                    try:
                        return inner(tars=tars)
                    finally:
                        patched.dali_preprocess = saved
                        PIPELINES.clear()
                return run

            cases = {"before (both old)": variant(old_timm, old_preprocess),
                     "reader scheduling only (new timm.py, old transform)": variant(new_timm, old_preprocess),
                     "ROI resize only (old timm.py, new transform)": variant(old_timm, new_transforms.dali_preprocess),
                     "both (now)": variant(new_timm, new_transforms.dali_preprocess)}
            log(f"ablation {label}")
            res = measure(cases, tars, repeats)
            results[f"ablation_{label}"] = res
            before = res["before (both old)"]
            for name, r in res.items():
                rows_a.append([f"~{label}", name, fmt_rate(r["rate"]), f"{r['cpu_ms_per_image']:.2f}",
                               f"{before['cpu_ms_per_image'] / r['cpu_ms_per_image']:.2f}×"])
        ablation_table = "\n\nEach change alone (ours, default reader):\n\n" + md_table(
            ["photos", "code", "images/s median (min–max)", "CPU ms/image", "CPU efficiency vs before"], rows_a)
    load1 = load_average()
    md = (f"### 1. CPU decode + preprocess ({os.cpu_count()} cores, batch {BATCH}, {repeats} runs each, round-robin; "
          f"load average {load0:.1f} → {load1:.1f})\n\n" + table + knob_table + ablation_table)
    common.save_result("cpu_preprocess", {"results": results, "load_average": [load0, load1]}, md)


if __name__ == "__main__":
    main()
