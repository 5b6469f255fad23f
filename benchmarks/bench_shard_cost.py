"""Benchmark 6: the fixed cost per shard of embedding + ``save_metadata`` and of ``to_webdataset``.

    .venv/bin/python benchmarks/bench_shard_cost.py [--quick] [--baseline REV]

The same photographs (~500x375) as S shards of 2 images and as 3 shards of 2S/3 images: what
the many small shards cost beyond the few large ones, divided by the extra shards, is the fixed
cost of a shard. In worker-ms (wall time x workers, what a shard takes away from a cluster) and
in CPU ms (every worker process's CPU time). On a real LocalCluster of 2 workers (1 thread, 1
DALI thread, 1 torch thread each), the tiny CLIP model and both real heads:

- embed: ``from_webdataset`` -> ``TimmImageEmbedder`` -> ``save_metadata`` to a new folder;
- reshard: ``from_webdataset`` of the embedded shards -> ``to_webdataset`` (every row kept,
  1,000 samples per output shard), planning included.

Each code version runs in its own process (its cluster warmed up on both sets first), the
versions alternating (``--baseline REV``: the package of git revision REV, from a worktree under
``benchmarks/_data``), and small and large sets alternating inside each. The parts of a shard's
cost come from a profile of the worker's steps in one process (no Dask), and the Dask task's own
cost is the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import common  # noqa: E402
from common import DATA_DIR, load_average, log, md_table, photo_dataset  # noqa: E402

SIZE = (500, 375)
WORKERS = 2
BATCH = 32
# the parts of a shard's worker time, as functions of the package (qualified name suffixes)
PARTS = [
    ("parquet read", ("read_shard_metadata",)),
    ("tar scan and member selection", ("DaliShardReader.image_members",)),
    ("DALI pipeline build (or checkout)", ("_ShardRun._build", "_PipelinePool.checkout")),
    ("DALI decode + preprocess", ("Pipeline.outputs",)),
    ("model + heads", ("TimmImageEmbedder.run_model.<locals>.embed", "score_tensor")),
    ("rows joined by id", ("ImageEmbedder._output_frame",)),
    ("parquet write (atomic)", ("write_parquet_atomic",)),
    ("stats file + completion marker", ("commit_shard",)),
]


def datasets(quick: bool):
    n_small = 30 if quick else 300
    small = photo_dataset("shardcost", SIZE, n_small, 2)
    large = photo_dataset("shardcost", SIZE, 3, 2 * n_small // 3)
    return small, large


def baseline_tree(rev: str) -> str:
    """A git worktree of ``rev`` under benchmarks/_data (made once); its package is imported."""
    path = DATA_DIR / f"baseline-{rev}"
    if not (path / "nemo_curator").is_dir():
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "--force", str(path), rev], check=True,
                       stdout=subprocess.DEVNULL)
    return str(path)


# ------------------------------------------------------------------------------------------------
# The child: one code version, one cluster
def child(args) -> dict:
    common.quiet_logs()
    import nemo_curator
    from bench_cpu_end_to_end import make_embedder, start_cluster
    from common import cpu_seconds  # noqa: F401  (the workers' CPU is read below)
    from nemo_curator.datasets import ImageTextPairDataset

    client = start_cluster(WORKERS, torch_threads=1)
    embedder = make_embedder(threads=1, batch_size=BATCH)
    client.run(lambda: (embedder.get_model("cpu"), [c.get_model("cpu") for c in embedder.classifiers]) and None)
    out_root = tempfile.mkdtemp(prefix="nemo-bench-shardcost-")

    def worker_cpu() -> float:
        return sum(client.run(common._process_cpu_seconds).values())

    def embed(folder, tag):
        out = os.path.join(out_root, f"embed-{tag}")
        shutil.rmtree(out, ignore_errors=True)
        dataset = ImageTextPairDataset.from_webdataset(str(folder), id_col="key")
        summary = embedder(dataset).save_metadata(path=out, show_progress=False, resume=False)
        if summary["totals"].get("embedded") != summary["totals"].get("rows"):
            raise RuntimeError(f"not every row embedded: {summary['totals']}")
        for name in os.listdir(folder):  # the reshard reads the tars beside the embedded parquets
            if name.endswith(".tar") and not os.path.exists(os.path.join(out, name)):
                os.symlink(os.path.join(folder, name), os.path.join(out, name))
        return out

    def reshard(embedded, tag):
        out = os.path.join(out_root, f"reshard-{tag}")
        shutil.rmtree(out, ignore_errors=True)
        dataset = ImageTextPairDataset.from_webdataset(embedded, id_col="key")
        dataset.metadata = dataset.metadata.assign(keep=True)
        summary = dataset.to_webdataset(out, "keep", samples_per_shard=1000, show_progress=False)
        if summary["totals"].get("samples_written") != summary.get("rows_in"):
            raise RuntimeError(f"not every row written: {summary}")

    def timed(fn, *a):
        c0 = worker_cpu()
        t0 = time.perf_counter()
        result = fn(*a)
        return result, time.perf_counter() - t0, worker_cpu() - c0

    sets = {"small": args.small, "large": args.large}
    embedded = {tag: embed(folder, tag) for tag, folder in sets.items()}  # warm-up: every worker ran tasks
    for tag in sets:
        reshard(embedded[tag], tag)
    runs = {f"{job}-{tag}": {"seconds": [], "worker_cpu_s": []} for job in ("embed", "reshard") for tag in sets}
    for _ in range(args.repeats):
        for tag, folder in sets.items():
            time.sleep(common.SETTLE_SECONDS)
            embedded[tag], dt, cpu = timed(embed, folder, tag)
            runs[f"embed-{tag}"]["seconds"].append(dt)
            runs[f"embed-{tag}"]["worker_cpu_s"].append(cpu)
        for tag in sets:
            time.sleep(common.SETTLE_SECONDS)
            _, dt, cpu = timed(reshard, embedded[tag], tag)
            runs[f"reshard-{tag}"]["seconds"].append(dt)
            runs[f"reshard-{tag}"]["worker_cpu_s"].append(cpu)
    client.close()
    client.cluster.close()
    parts = profile_parts(args.small, embedder, args.profile_shards) if args.profile_shards else None
    shutil.rmtree(out_root, ignore_errors=True)
    return {"package": os.path.dirname(nemo_curator.__file__), "runs": runs, "parts": parts}


def profile_parts(folder, embedder, n_shards: int) -> dict:
    """ms per shard of each part of embed + save_metadata on one small shard, in this process
    (no Dask): profiled, and the whole without the profiler."""
    import cProfile
    import pstats

    import torch

    from nemo_curator.datasets.image_text_pair_dataset import _write_shard_metadata, read_shard_metadata
    from nemo_curator.utils.webdataset import Shard

    torch.set_num_threads(1)
    tars = common.tars_of(folder)[:n_shards]
    out = tempfile.mkdtemp(prefix="nemo-bench-shardcost-parts-")
    columns = None

    def one(tar):
        nonlocal columns
        parquet = tar[:-4] + ".parquet"
        if columns is None:
            import pyarrow.parquet as pq

            columns = pq.read_schema(parquet).names
        frame = read_shard_metadata(parquet, "key", columns)
        frame, stats = embedder.embed_shard(frame, tar, "key")
        _write_shard_metadata(frame, Shard.of_file(tar).moved_to(out), None, stats, "job", {})

    one(tars[0])  # the model, the heads and the first pipeline
    t0 = time.perf_counter()
    for tar in tars:
        one(tar)
    bare_ms = (time.perf_counter() - t0) / len(tars) * 1e3
    profiler = cProfile.Profile()
    profiler.enable()
    for tar in tars:
        one(tar)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    parts = {}
    for label, suffixes in PARTS:
        total = 0.0
        for (file, _, name), (_, _, _, cumulative, callers) in stats.items():
            qualified = _qualified(file, name)
            if any(qualified.endswith(s) for s in suffixes):
                # cumulative time of the outermost calls only (not again for recursive ones)
                if not any(_qualified(f, n).endswith(s) for (f, _, n) in callers for s in suffixes):
                    total += cumulative
        parts[label] = total / len(tars) * 1e3
    reshard = reshard_parts(tars, out)
    shutil.rmtree(out, ignore_errors=True)
    return {"bare_ms_per_shard": bare_ms, "profiled_ms_per_shard": {k: round(v, 2) for k, v in parts.items()},
            "shards": len(tars), "reshard_ms_per_input_shard": reshard}


def reshard_parts(tars, embedded: str) -> dict:
    """ms per input shard of ``to_webdataset``'s worker steps, in this process (no Dask), timed
    directly: the count pass (ids and filter column read, kept rows counted), the piece (the kept
    rows read and their members located in the tar), and the output shard's write (tar, index,
    parquet, completion marker), which copies the members of all the input shards."""
    import pyarrow.parquet as pq

    from nemo_curator.datasets.image_text_pair_dataset import read_shard_metadata
    from nemo_curator.datasets.reshard import _kept_summary, _read_piece, _write_output_shard
    from nemo_curator.utils.webdataset import Shard

    parquets = [os.path.join(embedded, os.path.basename(t)[:-4] + ".parquet") for t in tars]
    columns = pq.read_schema(parquets[0]).names

    def timed(fn):
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0

    count_s = piece_s = 0.0
    pieces = []
    for tar, parquet in zip(tars, parquets):
        _, dt = timed(lambda: _kept_summary(read_shard_metadata(parquet, "key", ["key"]).assign(keep=True), "keep", "key"))
        count_s += dt

        def piece():
            rows = read_shard_metadata(parquet, "key", columns).assign(keep=True)
            return _read_piece(rows, tar, "keep", "key", 0, len(rows))

        result, dt = timed(piece)
        piece_s += dt
        pieces.append((tar, 0, len(result[0]), result))
    out = tempfile.mkdtemp(prefix="nemo-bench-shardcost-reshard-")
    _, write_s = timed(lambda: _write_output_shard(pieces, 0, Shard.in_folder(out, "00000"), "key", None, 5, 10000,
                                                   "job", {}))
    shutil.rmtree(out, ignore_errors=True)
    n = len(tars)
    return {"count pass (ids read, kept rows counted)": round(count_s / n * 1e3, 2),
            "piece (kept rows read, members located in the tar)": round(piece_s / n * 1e3, 2),
            "output shard write, per input shard (members copied; tar, idx, parquet, marker)": round(write_s / n * 1e3, 2)}


def _qualified(file: str, name: str) -> str:
    """'Class.method' for a profiled function where the file defines it; else its bare name."""
    if file.endswith("pipeline.py") and name == "outputs":
        return "Pipeline.outputs"
    return _QUALNAMES.get((file, name), name)


_QUALNAMES: dict = {}


def _index_qualnames() -> None:
    """Map (file, function name) -> qualified name for the package's functions (for the profile)."""
    import importlib
    import inspect

    for module_name in ("nemo_curator.image.shard_reader", "nemo_curator.image.embedders.base",
                        "nemo_curator.image.embedders.timm", "nemo_curator.datasets.image_text_pair_dataset",
                        "nemo_curator.utils.file_utils", "nemo_curator.utils.shard_job"):
        module = importlib.import_module(module_name)
        for _, obj in inspect.getmembers(module):
            members = inspect.getmembers(obj, inspect.isfunction) if inspect.isclass(obj) else [(None, obj)]
            for _, fn in members:
                if inspect.isfunction(fn) and fn.__module__ == module_name:
                    _QUALNAMES[(fn.__code__.co_filename, fn.__code__.co_name)] = fn.__qualname__
    _QUALNAMES[("", "")] = ""


# ------------------------------------------------------------------------------------------------
# The parent: versions alternating, the table
def run_child(package_root: str, small, large, repeats: int, profile_shards: int) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, HERE] + ([os.environ["PYTHONPATH"]]
                                                                                if os.environ.get("PYTHONPATH") else [])))
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", result.name, "--small", str(small),
                        "--large", str(large), "--repeats", str(repeats), "--profile-shards", str(profile_shards)],
                       env=env, check=True, cwd=package_root)
        return json.load(open(result.name))


def per_shard(runs: dict, job: str, n_small: int, n_large: int, key: str) -> float:
    """ms per extra shard: (median small - median large) / (shards difference), x WORKERS for wall time."""
    small = statistics.median(runs[f"{job}-small"][key])
    large = statistics.median(runs[f"{job}-large"][key])
    scale = WORKERS if key == "seconds" else 1
    return (small - large) * scale / (n_small - n_large) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 small shards, one round (a smoke run)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each set per process")
    ap.add_argument("--rounds", type=int, default=2, help="processes per code version, alternating")
    ap.add_argument("--baseline", help="also measure the package of this git revision, alternating with this tree")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--small", help=argparse.SUPPRESS)
    ap.add_argument("--large", help=argparse.SUPPRESS)
    ap.add_argument("--profile-shards", type=int, default=40, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _index_qualnames()
        with open(args.child, "w") as f:
            json.dump(child(args), f)
        return
    common.quiet_logs()
    small, large = datasets(args.quick)
    n_small, n_large = len(common.tars_of(small)), len(common.tars_of(large))
    rounds, repeats = (1, 1) if args.quick else (args.rounds, args.repeats)
    versions = {"this tree": REPO}
    if args.baseline:
        versions = {f"before (`{args.baseline}`)": baseline_tree(args.baseline), **versions}
    load0 = load_average()
    results = {name: [] for name in versions}
    for r in range(rounds):
        for name, root in versions.items():
            log(f"round {r + 1}/{rounds}: {name}")
            profile = 0 if root != REPO else 10 if args.quick else 40  # the parts: this tree's functions
            results[name].append(run_child(root, small, large, repeats, profile))
    load1 = load_average()

    rows, payload = [], {"small_shards": n_small, "large_shards": n_large, "images": 2 * n_small, "versions": {}}
    for name, children in results.items():
        runs = {k: {m: sum((c["runs"][k][m] for c in children), []) for m in ("seconds", "worker_cpu_s")}
                for k in children[0]["runs"]}
        figures = {f"{job}_{unit}": per_shard(runs, job, n_small, n_large, key)
                   for job in ("embed", "reshard") for unit, key in (("worker_ms", "seconds"), ("cpu_ms", "worker_cpu_s"))}
        payload["versions"][name] = {"runs": runs, **figures, "parts": [c["parts"] for c in children]}
        rows.append([name, f"{figures['embed_worker_ms']:.1f}", f"{figures['embed_cpu_ms']:.1f}",
                     f"{figures['reshard_worker_ms']:.1f}", f"{figures['reshard_cpu_ms']:.1f}",
                     f"{statistics.median(runs['embed-small']['seconds']):.2f} / "
                     f"{statistics.median(runs['embed-large']['seconds']):.2f}",
                     f"{statistics.median(runs['reshard-small']['seconds']):.2f} / "
                     f"{statistics.median(runs['reshard-large']['seconds']):.2f}"])
    md = (f"### 6. Fixed cost per shard ({2 * n_small} photos ~500x375 as {n_small} shards of 2 and as {n_large} of "
          f"{2 * n_small // n_large}; {WORKERS} workers x 1 thread; {rounds} processes x {repeats} runs per version; "
          f"load {load0:.1f} → {load1:.1f})\n\n"
          + md_table(["code", "embed + save: worker-ms / shard", "CPU ms / shard", "to_webdataset: worker-ms / shard",
                      "CPU ms / shard", "embed s (small / large)", "reshard s (small / large)"], rows))
    last = results["this tree"][-1]["parts"]
    part_rows = [[label, f"{ms:.2f}"] for label, ms in last["profiled_ms_per_shard"].items()]
    md += (f"\n\nParts of embed + save_metadata for one 2-image shard, this tree, in one process without Dask "
           f"(cProfile over {last['shards']} shards; without the profiler the whole takes "
           f"{last['bare_ms_per_shard']:.1f} ms per shard):\n\n" + md_table(["part", "ms / shard"], part_rows))
    md += ("\n\nParts of to_webdataset per 2-sample input shard, this tree, in one process without Dask (timed):\n\n"
           + md_table(["part", "ms / input shard"], [[k, f"{v:.2f}"] for k, v in last["reshard_ms_per_input_shard"].items()]))
    common.save_result("shard_cost", payload, md)


if __name__ == "__main__":
    main()
