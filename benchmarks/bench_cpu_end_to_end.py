"""Benchmark 2: CPU end to end, shards -> embeddings + aesthetic + NSFW scores -> parquet.

    .venv/bin/python benchmarks/bench_cpu_end_to_end.py [--quick]

The model is the CLIP ViT-L/14 architecture shrunk to 2 blocks of width 64 (random weights,
768-d output, the real 224 px transform), with both real heads. On the same shards of ~500x375
photographs, round-robin:
- ours: ``ImageTextPairDataset.from_webdataset`` -> ``TimmImageEmbedder(..., classifiers=[both])``
  -> ``save_metadata`` on a real ``LocalCluster`` (``get_client``), in a few worker/thread
  layouts for the machine's cores;
- peer: a straightforward script without Dask: PIL DataLoader (one worker per core) -> the same
  model and heads -> pandas merge with each shard's parquet -> ``to_parquet``;
- bare loop: our DALI reader + model + heads in this process, no Dask, no join, no write
  (what Dask, joins and writing cost is the gap to it);
- decode only: our DALI reader alone, as in benchmark 1 (the rate the spec compares with).
Cluster start-up and model loading are outside the timings (each case warms up once).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (MODEL_NAME, SIZES, TINY_MODEL_KWARGS, classifier_heads, cpu_seconds, fmt_rate, interleave,  # noqa: E402
                    load_average, log, md_table, peer_loader, photo_dataset, rate, tars_of, timm_eval_transform)

BATCH = 32


def make_embedder(threads: int, batch_size: int = BATCH, autocast: bool = False, cls=None):
    from nemo_curator.image.embedders import TimmImageEmbedder

    cls = cls or TimmImageEmbedder
    return cls(MODEL_NAME, batch_size=batch_size, num_threads_per_worker=threads, model_kwargs=TINY_MODEL_KWARGS,
               autocast=autocast, classifiers=classifier_heads())


def start_cluster(n_workers: int, torch_threads: int):
    """A real LocalCluster through the toolkit's ``get_client``, with ``torch_threads`` intra-op
    threads per worker (Dask's nanny sets OMP_NUM_THREADS=1 unless told otherwise)."""
    from nemo_curator import get_client

    # Dask's nanny copies OMP_NUM_THREADS/MKL_NUM_THREADS from this process's environment when
    # set (else from its pre-spawn config: 1) before spawning; the worker imports torch early.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(torch_threads)
    client = get_client(cluster_type="cpu", n_workers=n_workers, threads_per_worker=1, dashboard_address=":0")
    common.quiet_logs()
    got = client.submit(_torch_threads, pure=False).result()
    if got != torch_threads:
        raise RuntimeError(f"workers run torch with {got} threads, not {torch_threads}")
    return client


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _pin_to_core(core: int) -> None:
    """Pin every thread of this process to ``core``; threads started later inherit it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:
            pass


def _load_models(embedder) -> None:
    embedder.get_model("cpu")
    for clf in embedder.classifiers:
        clf.get_model("cpu")


class Runner:
    """Cases over one dataset folder; each returns {"images": n, "cpu_s": s}."""

    def __init__(self, folder, out_root):
        self.folder = str(folder)
        self.tars = tars_of(folder)
        self.out_root = out_root
        self.clients = []

    def close(self):
        for client in self.clients:
            cluster = client.cluster
            client.close()
            cluster.close()

    def _out(self, name):
        path = os.path.join(self.out_root, name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    def _subset(self, tars):
        """A dataset folder holding only ``tars`` (links), for warm-ups on one shard."""
        if tars is None or len(tars) == len(self.tars):
            return self.folder
        folder = os.path.join(self.out_root, f"subset{len(tars)}")
        if not os.path.isdir(folder):
            os.makedirs(folder)
            for tar in tars:
                for suffix in (".tar", ".parquet"):
                    src = tar[:-4] + suffix
                    os.symlink(src, os.path.join(folder, os.path.basename(src)))
        return folder

    def ours(self, name, n_workers, dali_threads, torch_threads, autocast=False, cls=None, pin=False,
             dask_malloc=False):
        """``pin``: worker ``i`` (and every thread it starts) runs on core ``i`` only.
        ``dask_malloc``: keep Dask's malloc settings in the workers (MALLOC_MMAP_THRESHOLD_ set to
        glibc's default, so that the embedder leaves malloc alone)."""
        from nemo_curator.datasets import ImageTextPairDataset

        if dask_malloc:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
        try:
            client = start_cluster(n_workers, torch_threads)
        finally:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        self.clients.append(client)
        if pin:
            for core, worker in enumerate(sorted(client.scheduler_info()["workers"])):
                client.run(_pin_to_core, core % (os.cpu_count() or 1), workers=[worker])
        embedder = make_embedder(dali_threads, autocast=autocast, cls=cls)
        client.run(_load_models, embedder)  # every worker loads the model and heads before any timing

        def run(tars=None):
            folder = self._subset(tars)
            out = self._out(name.replace(" ", "_").replace("/", "-"))
            with client.as_current():
                c0 = cpu_seconds(client)
                dataset = ImageTextPairDataset.from_webdataset(folder, id_col="key")
                summary = embedder(dataset).save_metadata(path=out, show_progress=False, resume=False)
                cpu = cpu_seconds(client) - c0
            embedded = int(summary["totals"].get("embedded", 0))
            if embedded != summary["totals"].get("rows"):
                raise RuntimeError(f"{name}: only {embedded} of {summary['totals'].get('rows')} rows embedded")
            return {"images": embedded, "cpu_s": cpu}

        return run

    def peer(self, name, workers, torch_threads):
        import numpy as np
        import pandas as pd
        import timm
        import torch

        transform = timm_eval_transform()
        model = timm.create_model(MODEL_NAME, pretrained=False, **TINY_MODEL_KWARGS).eval()
        heads = [(clf, clf.load_model("cpu").eval()) for clf in classifier_heads()]

        def run(tars=None):
            tars = tars or self.tars
            out = self._out(name.replace(" ", "_"))
            os.makedirs(out)
            old_threads = torch.get_num_threads()
            torch.set_num_threads(torch_threads)
            c0 = cpu_seconds()
            keys, embeddings, scores = [], [], {clf.pred_column: [] for clf, _ in heads}
            with torch.inference_mode():
                for batch_keys, batch in peer_loader(tars, transform, BATCH, num_workers=workers):
                    emb = torch.nn.functional.normalize(model(batch).float(), dim=-1)
                    for clf, head in heads:
                        scores[clf.pred_column].append(clf.score_tensor(head, emb).numpy())
                    embeddings.append(emb.numpy())
                    keys.extend(batch_keys)
            emb = np.concatenate(embeddings)
            results = pd.DataFrame({"key": keys, "image_embedding": list(emb),
                                    **{c: np.concatenate(v) for c, v in scores.items()}})
            for tar in tars:
                meta = pd.read_parquet(tar[:-4] + ".parquet")
                meta.merge(results, on="key", how="left").to_parquet(os.path.join(out, os.path.basename(tar)[:-4] + ".parquet"))
            cpu = cpu_seconds() - c0
            torch.set_num_threads(old_threads)
            return {"images": len(keys), "cpu_s": cpu}

        return run

    def bare(self, name, dali_threads, torch_threads, decode_only=False):
        import torch

        embedder = make_embedder(dali_threads)
        model = None if decode_only else embedder.get_model("cpu")
        heads = [] if decode_only else [(clf, clf.get_model("cpu")) for clf in embedder.classifiers]

        def run(tars=None):
            old_threads = torch.get_num_threads()
            torch.set_num_threads(torch_threads)
            c0 = cpu_seconds()
            n = common.embed_shards(embedder, tars or self.tars, "cpu", model, heads)
            cpu = cpu_seconds() - c0
            torch.set_num_threads(old_threads)
            return {"images": n, "cpu_s": cpu}

        return run


def measure(cases: dict, runner: Runner, repeats: int) -> dict:
    """Warm up each case on every shard (so that every worker has run a task), then time them round-robin."""
    for name, fn in cases.items():
        log(f"  warm-up {name}")
        fn()
    return common.summarize_runs(interleave(cases, repeats=repeats, warmup=False))


def dataset_for(quick: bool):
    n_shards, per_shard = (2, 64) if quick else (4, 300)
    return photo_dataset("photos_500x375", SIZES["500x375"], n_shards, per_shard, write_index=True)


def main(argv=None):
    common.quiet_logs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and one repeat (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="skip the row of the code before the speed changes")
    ap.add_argument("--no-autocast-row", action="store_true", help="skip the row with bf16 autocast (slow on CPUs without bf16)")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    cores = os.cpu_count()
    folder = dataset_for(args.quick)
    load0 = load_average()
    with tempfile.TemporaryDirectory(prefix="nemo-bench-e2e-") as out_root:
        runner = Runner(folder, out_root)
        try:
            cases = {
                f"peer: PIL DataLoader ({cores} workers) + model (torch {cores} threads) + pandas": runner.peer("peer", cores, cores),
                f"ours: 1 worker, DALI {cores} threads, torch 1 thread": runner.ours("ours-1w-d2-t1", 1, cores, 1),
                f"ours: 1 worker, DALI {cores} threads, torch {cores} threads": runner.ours("ours-1w-d2-t2", 1, cores, cores),
                f"ours: {cores} workers, DALI 1 thread, torch 1 thread each": runner.ours("ours-2w", cores, 1, 1),
                f"bare loop: DALI {cores} threads + model + heads, torch 1 thread (no Dask/join/write)": runner.bare("bare", cores, 1),
                f"decode only: DALI {cores} threads (benchmark 1's pipeline)": runner.bare("decode", cores, 1, decode_only=True),
            }
            cases[f"ours, Dask's malloc settings kept (no keep_freed_memory_for_reuse): 1 worker, DALI {cores} threads, "
                  f"torch 1 thread"] = runner.ours("ours-dask-malloc", 1, cores, 1, dask_malloc=True)
            baseline = None if args.no_baseline else common.baseline_embedder_class()
            if baseline is not None:
                cases[f"ours before the changes ({common.BASELINE_REV}): 1 worker, DALI {cores} threads, torch 1 thread"] = \
                    runner.ours("ours-baseline", 1, cores, 1, cls=baseline)
            log(f"end to end: {len(runner.tars)} shards of {folder.name}")
            results = measure(cases, runner, repeats)
            autocast_row = None
            if not args.no_autocast_row:
                # bf16 autocast (the embedder's default) on a CPU without native bf16: one shard, one run
                name = f"ours: 1 worker, DALI {cores} threads, torch 1 thread, autocast=True (default), 1 shard"
                fn = runner.ours("ours-autocast", 1, cores, 1, autocast=True)
                fn(tars=runner.tars[:1])  # warm-up
                r = interleave({name: lambda: fn(tars=runner.tars[:1])}, repeats=1, warmup=False)[name]
                autocast_row = {"images": r["info"]["images"], "rate": rate(r["info"]["images"], r["seconds"]),
                                "seconds": r["seconds"], "cpu_ms_per_image": 1000 * r["info"]["cpu_s"] / r["info"]["images"]}
                results[name] = autocast_row
        finally:
            runner.close()
    load1 = load_average()
    peer = next(v for k, v in results.items() if k.startswith("peer"))
    decode = next(v for k, v in results.items() if k.startswith("decode only"))
    bare = next(v for k, v in results.items() if k.startswith("bare loop"))
    rows = []
    for name, r in results.items():
        rows.append([name, fmt_rate(r["rate"]), f"{r['cpu_ms_per_image']:.2f}",
                     f"{r['rate']['median'] / peer['rate']['median']:.2f}×",
                     f"{r['rate']['median'] / decode['rate']['median']:.0%}",
                     f"{r['rate']['median'] / bare['rate']['median']:.0%}"])
    md = (f"### 2. CPU end to end ({cores} cores; {results[next(iter(results))]['images']} photos ~500x375 in "
          f"{len(tars_of(folder))} shards; batch {BATCH}; tiny CLIP ViT + aesthetic + NSFW heads; {repeats} runs each, "
          f"round-robin; load average {load0:.1f} → {load1:.1f})\n\n"
          + md_table(["pipeline", "images/s median (min–max)", "CPU ms/image", "vs peer", "vs decode only",
                      "vs bare loop"], rows))
    common.save_result("cpu_end_to_end", {"results": results, "load_average": [load0, load1]}, md)


if __name__ == "__main__":
    main()
