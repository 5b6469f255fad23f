"""Benchmark: SemDeDup on planted 768-d embeddings (100k and 1M rows) against one faiss flat index.

For each size the data (``nemo_curator.modules.semantic_dedup.synthetic``: 200 topics, 20% of
the rows in planted groups of 2-5 near-copies, similarity > 0.993) is written once as parquet
shards of 10,000 rows under ``benchmarks/_data/dedup_<n>/`` (the tars are empty files: the
semantic step never opens them). Then, on a LocalCluster of ``--workers`` single-threaded workers:

- ``SemanticDeduplicator(eps=0.01, n_clusters=n/1000, max_iter=10)(dataset)`` followed by
  ``write_removal_parquets`` (the join back to every shard): wall time, peak RSS of each worker
  and of this (client) process, sampled every 0.2 s, and the recall of the planted duplicates;
- in a separate single process, a faiss ``IndexFlatIP`` over all rows and a range search at
  similarity >= 0.99 (every near-duplicate pair, exactly): wall time and peak RSS. At 1M rows the
  search runs on a sample of the queries and its time is scaled to all of them (said in the table).

``--quick``: 20,000 rows only (about a minute). ``--libraries``: only the one-thread comparison
of torch, numpy and faiss for the three kernels (docs/dedup.md, "Why these libraries").
Results: a Markdown table on stdout and ``benchmarks/_data/results/bench_dedup.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("NEMO_BENCH_DATA", ROOT / "benchmarks" / "_data"))
ROWS_PER_SHARD = 10_000
N_TOPICS = 200
EPS = 0.01
FLAT_QUERY_SAMPLE = 20_000  # above this many rows the flat search times this many queries and scales up


def dataset_dir(n: int) -> Path:
    return DATA_DIR / f"dedup_{n}"


def generate(n: int) -> Path:
    """Write the planted dataset of ``n`` rows once (and its group labels as ``_groups.npy``)."""
    import pyarrow as pa

    from nemo_curator.modules.semantic_dedup.arrays import arrow_list_from_matrix
    from nemo_curator.modules.semantic_dedup.synthetic import planted_embeddings
    from nemo_curator.utils.file_utils import atomic_write, write_parquet_atomic

    folder = dataset_dir(n)
    marker = folder / "_groups.npy"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    planted = planted_embeddings(n, dim=768, n_topics=N_TOPICS, duplicate_fraction=0.2, sigma=(0.02, 0.08), seed=n)
    for s, start in enumerate(range(0, n, ROWS_PER_SHARD)):
        stop = min(start + ROWS_PER_SHARD, n)
        table = pa.table({"key": pa.array(planted.ids[start:stop].tolist(), pa.string()),
                          "image_embedding": arrow_list_from_matrix(planted.embeddings[start:stop])})
        write_parquet_atomic(table, folder / f"{s:05d}.parquet")
        with atomic_write(folder / f"{s:05d}.tar") as f:
            f.write(b"")
    with atomic_write(marker) as f:
        np.save(f, planted.group)
    return folder


class MemorySampler:
    """Peak RSS (bytes) of this process and of each given pid, sampled every ``interval`` s."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2):
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.me = psutil.Process()
        self.peak = {name: 0 for name in pids} | {"client": 0}
        self.phase = "start"
        self.by_phase: dict[str, dict[str, int]] = {}
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            phase = self.by_phase.setdefault(self.phase, {})
            for name, proc in [*self.procs.items(), ("client", self.me)]:
                try:
                    rss = proc.memory_info().rss
                except Exception:  # a worker restarting
                    continue
                self.peak[name] = max(self.peak[name], rss)
                phase[name] = max(phase.get(name, 0), rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_semdedup(n: int, workers: int, client, partition_size: str = "256MB") -> dict:
    import shutil

    from nemo_curator.datasets import ImageTextPairDataset
    from nemo_curator.modules.semantic_dedup import SemanticDeduplicator, write_removal_parquets

    folder = dataset_dir(n)
    removal = DATA_DIR / f"dedup_{n}_removal"
    shutil.rmtree(removal, ignore_errors=True)
    n_clusters = max(1, n // 1000)
    pids = client.run(os.getpid)
    client.run(_import_dedup)  # so that the baseline includes the libraries (torch alone is ~600 MB of RSS)
    import psutil

    baseline = {f"worker{i}": psutil.Process(pid).memory_info().rss for i, pid in enumerate(pids.values())}
    baseline["client"] = psutil.Process().memory_info().rss
    with MemorySampler({f"worker{i}": pid for i, pid in enumerate(pids.values())}) as mem:
        started = time.time()
        mem.phase = "dedup call"
        dataset = ImageTextPairDataset.from_webdataset(str(folder), id_col="key")
        dedup = SemanticDeduplicator(eps=EPS, n_clusters=n_clusters, max_iter=10, random_state=42,
                                     partition_size=partition_size)
        result = dedup(dataset)
        dedup_seconds = time.time() - started
        mem.phase = "join + write removal list"
        written = write_removal_parquets(result, removal)
        seconds = time.time() - started
    groups = np.load(folder / "_groups.npy")
    removed = set()
    for f in sorted(removal.glob("*.parquet")):
        import pyarrow.parquet as pq

        removed.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    ids = np.array([f"{i:09d}" for i in range(n)])
    in_group = groups >= 0
    expected = np.bincount(groups[in_group]) - 1
    found = np.bincount(groups[np.isin(ids, list(removed)) & in_group], minlength=len(expected))
    recall = float(np.minimum(found, expected).sum() / expected.sum())
    false = int(len(removed) - np.isin(ids[in_group], list(removed)).sum())
    return {"rows": n, "n_clusters": n_clusters, "workers": workers, "partition_size": partition_size,
            "seconds": round(seconds, 1),
            "dedup_seconds": round(dedup_seconds, 1), "removed": written["removed"],
            "planted_duplicates": int(expected.sum()), "recall": round(recall, 4), "removed_outside_groups": false,
            "peak_worker_rss_mb": {k: round(v / 2**20) for k, v in mem.peak.items() if k != "client"},
            "peak_client_rss_mb": round(mem.peak["client"] / 2**20),
            "baseline_rss_mb": {k: round(v / 2**20) for k, v in baseline.items()},
            "peak_rss_mb_by_phase": {p: {k: round(v / 2**20) for k, v in d.items()} for p, d in mem.by_phase.items()},
            "summary": dedup.summary}


def _import_dedup() -> None:
    import nemo_curator.modules.semantic_dedup  # noqa: F401


def flat_baseline(n: int) -> dict:
    """Run in its own process: every row into one IndexFlatIP (file by file), then a range search at
    >= 1 - EPS for all rows, or for a uniform sample of ``FLAT_QUERY_SAMPLE`` rows above 5x that."""
    import faiss
    import pyarrow.parquet as pq

    from nemo_curator.modules.semantic_dedup.arrays import matrix_from_arrow

    started = time.time()
    files = sorted(dataset_dir(n).glob("*.parquet"))
    sampled = n > FLAT_QUERY_SAMPLE * 5
    chosen = np.sort(np.random.default_rng(0).choice(n, FLAT_QUERY_SAMPLE, replace=False)) if sampled else None
    index, queries, seen = None, [], 0
    for f in files:
        X = matrix_from_arrow(pq.read_table(f, columns=["image_embedding"]).column(0))
        if index is None:
            index = faiss.IndexFlatIP(X.shape[1])
        index.add(X)
        queries.append(X if chosen is None else X[chosen[(chosen >= seen) & (chosen < seen + len(X))] - seen])
        seen += len(X)
    queries = np.concatenate(queries)
    load = time.time() - started
    t0 = time.time()
    lims, _, _ = index.range_search(queries, 1 - EPS)
    search = time.time() - t0
    scale = n / len(queries)
    pairs = int((lims[1:] - lims[:-1] - 1).sum() * scale / 2)  # minus self-matches, each pair found twice
    return {"rows": n, "load_seconds": round(load, 1), "search_seconds": round(search * scale, 1),
            "queries_timed": len(queries), "scaled": scale > 1, "pairs_found": pairs,
            "threads": faiss.omp_get_max_threads(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def library_micro() -> list[str]:
    """The library choice, on one thread (as one Dask worker runs): a cluster's pairwise maxima, the
    assignment to centroids and k-means, each best of 5 (k-means: once)."""
    import faiss
    import torch

    from nemo_curator.modules.semantic_dedup.clustering import nearest_centroids
    from nemo_curator.modules.semantic_dedup.kernel import max_similarity_to_earlier

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)

    def best(f, repeats=5):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times)

    X = rng.standard_normal((4096, 768)).astype(np.float32)
    flat = faiss.IndexFlatIP(768)
    flat.add(X)
    C = rng.standard_normal((1000, 768)).astype(np.float32)
    Q = rng.standard_normal((8192, 768)).astype(np.float32)
    l2 = faiss.IndexFlatL2(768)
    l2.add(C)
    S = rng.standard_normal((100_000, 768)).astype(np.float32)
    t0 = time.perf_counter()
    faiss.Kmeans(768, 100, niter=10, seed=1, max_points_per_centroid=1001).train(S)
    kmeans = time.perf_counter() - t0
    return [f"pairwise 4096 x 768 (max over earlier rows): torch tiles of 1024 {best(lambda: max_similarity_to_earlier(X, 1024, 'cpu')):.0f} ms, "
            f"numpy X @ X.T + triu {best(lambda: np.max(np.triu(X @ X.T, 1), axis=0)):.0f} ms, "
            f"faiss IndexFlatIP top-2 {best(lambda: flat.search(X, 2)):.0f} ms",
            f"assign 8192 rows to 1000 centroids: torch {best(lambda: nearest_centroids(Q, C, 'cpu')):.0f} ms, "
            f"faiss IndexFlatL2 {best(lambda: l2.search(Q, 1)):.0f} ms",
            f"faiss k-means 100,000 x 768, k=100, 10 iterations: {kmeans:.1f} s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 rows only")
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated row counts. Default: 100000,1000000")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers (1 thread each). Default: 2")
    parser.add_argument("--no-flat", action="store_true", help="skip the faiss flat-index baseline")
    parser.add_argument("--partition-size", default="256MB", help="SemanticDeduplicator(partition_size=). Default: 256MB")
    parser.add_argument("--libraries", action="store_true", help="only the one-thread library comparison")
    parser.add_argument("--flat-only", type=int, metavar="N", help=argparse.SUPPRESS)  # the baseline's own process
    parser.add_argument("--generate-only", type=int, metavar="N", help=argparse.SUPPRESS)  # the data's own process
    args = parser.parse_args()
    if args.flat_only:
        print(json.dumps(flat_baseline(args.flat_only)))
        return
    if args.generate_only:
        generate(args.generate_only)
        return
    if args.libraries:
        print("\n".join(library_micro()))
        return
    sizes = [20_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    from nemo_curator import get_client

    results = []
    for n in sizes:
        t0 = time.time()
        # in its own process, so that the client's memory figures are not those of the generator
        subprocess.run([sys.executable, __file__, "--generate-only", str(n)], check=True)
        print(f"data {n:,} rows ready ({time.time() - t0:.0f} s)", flush=True)
        client = get_client(cluster_type="cpu", n_workers=args.workers, threads_per_worker=1, dashboard_address=":0",
                            silence_logs=logging.ERROR)
        try:
            row = run_semdedup(n, args.workers, client, args.partition_size)
        finally:
            cluster = client.cluster
            client.close()
            cluster.close()
        print(json.dumps(row), flush=True)
        if not args.no_flat:
            env = dict(os.environ, OMP_NUM_THREADS=str(args.workers))  # the same cores as the cluster
            out = subprocess.run([sys.executable, __file__, "--flat-only", str(n)], capture_output=True, text=True,
                                 check=True, env=env)
            row["flat"] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(row["flat"]), flush=True)
        results.append(row)
    print("\n| rows | clusters | SemDeDup wall (s) | k-means fit / assign+match (s) | peak RSS per worker (MB) "
          "| peak RSS client (MB) | recall of planted | faiss flat: load + search (s) | flat peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        flat = r.get("flat")
        flat_text = (f"{flat['load_seconds']} + {flat['search_seconds']}" + (" (scaled from "
                     f"{flat['queries_timed']:,} queries)" if flat["scaled"] else "")) if flat else "-"
        base = r["baseline_rss_mb"]
        print(f"| {r['rows']:,} | {r['n_clusters']} | {r['seconds']} | {r['summary']['fit_seconds']} / "
              f"{r['summary']['match_seconds']} | "
              f"{', '.join(f'{v} (idle {base[k]})' for k, v in r['peak_worker_rss_mb'].items())} | "
              f"{r['peak_client_rss_mb']} (idle {base['client']}) | "
              f"{r['recall']} | {flat_text} | {flat['peak_rss_mb'] if flat else '-'} |")
    out_dir = DATA_DIR / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    from nemo_curator.utils.file_utils import write_json_atomic

    write_json_atomic(results, out_dir / "bench_dedup.json")


if __name__ == "__main__":
    main()
