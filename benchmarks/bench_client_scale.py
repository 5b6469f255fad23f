"""Benchmark 8: the client at scale. Client wall time and peak memory of each step over 1,000,
10,000 and 100,000 tiny shards, and how they grow with the number of shards.

    .venv/bin/python benchmarks/bench_client_scale.py [--quick] [--sizes 1000,10000,100000]
                                                       [--rows-check 10000] [--no-full-reshard]

Data: tiny shards made once into ``benchmarks/_data/client_scale_<N>x<rows>/`` (git-ignored), in
parallel: each ``NNNNN.tar`` holds ``rows`` samples (one 8x8 JPEG's bytes, reused, + ``.txt`` +
``.json``), each ``NNNNN.parquet`` their rows (``key``, ``caption``, ``url``). 100,000 shards take
about a minute to make.

Each N runs in a fresh client process (``--child``) against a fresh cluster of its own: a Dask
scheduler process and 2 worker processes of 1 thread (``dask scheduler`` / ``dask worker``), so
that the client's memory is the client's alone (with ``get_client()``'s LocalCluster the
scheduler runs inside the client process; its memory is reported apart here). The steps, in that
process, one after the other:

1. ``from_webdataset``;
2. ``map_shards`` of a cheap per-shard function that adds a column and returns a stats dict (the
   graph an embedder builds, without the model: a real embedder on 100,000 shards would take
   hours of worker time on 2 cores and tell nothing more about the client);
3. ``save_metadata(path=<new folder>)`` of that dataset, split by timestamps taken inside it
   (``compute_with_progress`` and ``one_task_per_output`` wrapped, nothing else changed): the
   client's planning (resume markers, stale temporaries, the tasks' graph), the graph's fusion
   (``one_task_per_output``), the submission (``client.get``), the wait for the workers (worker
   time: not the client's), and what follows (summary, re-opening the written parquets);
4. ``to_webdataset`` of the saved dataset with a ``keep`` column set by hand (every other row of a
   shard; the one row of a 1-row shard), 10,000 samples per output shard: its planning (the kept counts computed on the cluster, the
   plan, the input identities, the job fingerprint, the output tasks' graph), then the writing.

Memory: the client process's RSS sampled every 5 ms by a thread; per step its peak minus the
RSS when the step began ("peak +"), and what it still holds when the step ends ("kept +"). RSS
is what the machine pays; freed Python memory is reused by later steps, so a step's "peak +"
counts only what it needed beyond what earlier steps left free. The scheduler's peak RSS is
sampled the same way (in its own process). Growth: the ratio of a step's time (or memory) at
10x the shards; linear is 10x. The per-row check runs the same steps over the same number of
shards with 100 rows each: what the client holds per shard must not grow with the rows.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
DATA_DIR = Path(os.environ.get("NEMO_BENCH_DATA", REPO / "benchmarks" / "_data"))
RESULTS_DIR = DATA_DIR / "results"
SPEC_VERSION = 1
WORKERS = 2
RESHARD_SAMPLES_PER_SHARD = 10_000
CHUNK = 500  # shards per generation task


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Data: tiny shards, made in parallel, cached
def _tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 80, 40)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A plain ustar archive of ``members`` (what ``tarfile`` writes, without its per-member cost)."""
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _make_chunk(folder: str, first: int, last: int, rows: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpeg = _tiny_jpeg()
    for s in range(first, last):
        keys = [f"{s:06d}{i:04d}" for i in range(rows)]
        captions = [f"a photo of shard {s} sample {i}" for i in range(rows)]
        members = []
        for key, caption in zip(keys, captions):
            members += [(f"{key}.jpg", jpeg), (f"{key}.txt", caption.encode()),
                        (f"{key}.json", json.dumps({"key": key, "caption": caption}).encode())]
        name = f"{s:05d}" if s < 100_000 else f"{s:06d}"
        with open(os.path.join(folder, name + ".tar"), "wb") as f:
            f.write(_tar_bytes(members))
        table = pa.table({"key": keys, "caption": captions, "url": [f"https://example.com/{k}.jpg" for k in keys]})
        pq.write_table(table, os.path.join(folder, name + ".parquet"))
    return last - first


def tiny_dataset(n_shards: int, rows: int) -> Path:
    """``benchmarks/_data/client_scale_<n_shards>x<rows>``: made once, reused while its spec holds."""
    folder = DATA_DIR / f"client_scale_{n_shards}x{rows}"
    spec = {"n_shards": n_shards, "rows": rows, "version": SPEC_VERSION}
    marker = folder / "_bench_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = [pool.submit(_make_chunk, str(folder), a, min(a + CHUNK, n_shards), rows)
                   for a in range(0, n_shards, CHUNK)]
        done = sum(f.result() for f in futures)
    assert done == n_shards
    marker.write_text(json.dumps(spec))
    log(f"made {folder} ({n_shards:,} shards x {rows} rows) in {time.time() - t0:.1f} s")
    return folder


# ------------------------------------------------------------------------------------------------
# Measuring inside the client process
class RssSampler:
    """This process's RSS, sampled every ``interval_s`` by a thread; ``take()`` returns the peak
    since the last ``take()`` and the RSS now, and starts a new interval."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self._peak = self._proc.memory_info().rss
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(0.005):
            rss = self._proc.memory_info().rss
            with self._lock:
                self._peak = max(self._peak, rss)

    def take(self) -> tuple[int, int]:
        now = self._proc.memory_info().rss
        with self._lock:
            peak, self._peak = max(self._peak, now), now
        return peak, now

    def stop(self) -> None:
        self._stop.set()


_SAMPLER: dict = {}


def start_sampler() -> float:
    """In any process (the scheduler): start an ``RssSampler``; return the RSS now, MB."""
    _SAMPLER["s"] = RssSampler()
    return _SAMPLER["s"].take()[1] / 2**20


def stop_sampler() -> float:
    """The peak RSS since ``start_sampler``, MB."""
    sampler = _SAMPLER.pop("s")
    sampler.stop()
    return sampler.take()[0] / 2**20


class Recorder:
    """Phases of the steps: wall and CPU seconds of this process, its peak RSS in each phase."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.sampler = RssSampler()
        self.steps: dict[str, dict] = {}
        self._step = None

    def _cpu(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    @staticmethod
    def _heap() -> tuple[int, int] | None:
        """(Python heap now, its peak since the last call) when tracemalloc traces, else None."""
        import tracemalloc

        if not tracemalloc.is_tracing():
            return None
        now, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        return now, peak

    def begin(self, step: str) -> None:
        import gc

        gc.collect()
        _, rss = self.sampler.take()
        heap = self._heap()
        self._step = {"phases": [], "rss_start": rss, "t0": time.perf_counter(), "cpu0": self._cpu(),
                      "heap_start": heap and heap[0]}
        self._last = (self._step["t0"], self._step["cpu0"])
        self.steps[step] = self._step

    def mark(self, phase: str) -> None:
        if self._step is None:
            return
        t, cpu = time.perf_counter(), self._cpu()
        peak, rss = self.sampler.take()
        heap = self._heap()
        self._step["phases"].append({"phase": phase, "wall_s": t - self._last[0], "cpu_s": cpu - self._last[1],
                                     "peak_rss": peak, "rss_end": rss, "heap_peak": heap and heap[1],
                                     "heap_end": heap and heap[0]})
        self._last = (t, cpu)

    def end(self, last_phase: str = "rest") -> dict:
        import gc

        self.mark(last_phase)
        step, self._step = self._step, None
        phases = step["phases"]
        gc.collect()
        heap = self._heap()
        out = {"wall_s": sum(p["wall_s"] for p in phases), "cpu_s": sum(p["cpu_s"] for p in phases),
               "rss_start_mb": step["rss_start"] / 2**20,
               "peak_plus_mb": (max(p["peak_rss"] for p in phases) - step["rss_start"]) / 2**20,
               "kept_plus_mb": (phases[-1]["rss_end"] - step["rss_start"]) / 2**20,
               "phases": [{"phase": p["phase"], "wall_s": p["wall_s"], "cpu_s": p["cpu_s"],
                           "peak_plus_mb": (p["peak_rss"] - step["rss_start"]) / 2**20} for p in phases]}
        if heap is not None:  # the live Python heap (tracemalloc): what the client holds, not what it freed
            out["heap_peak_plus_mb"] = (max(p["heap_peak"] for p in phases) - step["heap_start"]) / 2**20
            out["heap_kept_plus_mb"] = (heap[0] - step["heap_start"]) / 2**20
        step.clear()
        step.update(out)
        return out


def _result_bytes(results: list) -> dict:
    """What crossed back to the client per task: pickled bytes of the largest result (a sample of
    up to 2,000 results) and the result types."""
    import pickle

    sample = results if len(results) <= 2000 else results[:: max(1, len(results) // 2000)]
    sizes = [len(pickle.dumps(r)) for r in sample]
    return {"results": len(results), "max_bytes": max(sizes, default=0),
            "mean_bytes": sum(sizes) / len(sizes) if sizes else 0,
            "types": sorted({type(r).__name__ for r in sample})}


def instrument(rec: Recorder, client, crossed: list) -> None:
    """Timestamps inside the library's jobs: wrap ``compute_with_progress`` where the jobs import it,
    ``one_task_per_output`` (the fusion) and the client's ``get``/``compute`` (the submission)."""
    import nemo_curator.datasets.reshard as reshard
    import nemo_curator.utils.progress as progress
    import nemo_curator.utils.shard_job as shard_job

    original = progress.compute_with_progress
    first_chunk = [False]  # the graph goes in chunks (progress.submission_chunks): the first one's submission is marked

    def compute_with_progress(tasks, desc, *args, **kwargs):
        rec.mark(f"{desc}: plan")
        first_chunk[0] = True
        try:
            results = original(tasks, desc, *args, **kwargs)
        finally:
            first_chunk[0] = False
        rec.mark(f"{desc}: wait for the workers")
        crossed.append({"desc": desc, **_result_bytes(results)})
        return results

    for module in (reshard, shard_job):
        module.compute_with_progress = compute_with_progress
    for name in ("fuse_shard_chains", "one_task_per_output"):  # the graph's fusion, where there is one
        if hasattr(progress, name):
            def fuse(tasks, _fuse=getattr(progress, name), _name=name):
                graph = _fuse(tasks)
                rec.mark(f"  graph merged and fused ({_name})")
                return graph

            setattr(progress, name, fuse)
    for name in ("get", "compute"):
        method = getattr(client, name)

        def submit(*args, _method=method, **kwargs):
            out = _method(*args, **kwargs)
            if first_chunk[0]:
                rec.mark("  first chunk submitted (client.%s)" % _method.__name__)
                first_chunk[0] = False
            return out

        setattr(client, name, submit)


def add_column(frame, tar: str):
    """The cheap per-shard function (an embedder's place): a column ``n``, the row's position in
    its shard (``n % 2 == 0`` keeps every other row, and the one row of a 1-row shard: every input
    shard feeds the output, whatever its rows), and a stats dict."""
    import numpy as np

    return frame.assign(n=np.arange(len(frame))), {"rows_seen": len(frame), "tar": os.path.basename(tar)}


# ------------------------------------------------------------------------------------------------
# The child: one N, one cluster, the steps
def start_cluster(workdir: Path) -> tuple[list, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    dask_bin = str(Path(sys.executable).with_name("dask"))
    sched_file = str(workdir / "scheduler.json")
    procs = [subprocess.Popen([dask_bin, "scheduler", "--scheduler-file", sched_file, "--host", "127.0.0.1",
                               "--port", "0", "--dashboard-address", "127.0.0.1:0"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / "scheduler.log", "w"))]
    for _ in range(600):
        if os.path.exists(sched_file):
            break
        time.sleep(0.1)
    procs.append(subprocess.Popen([dask_bin, "worker", "--scheduler-file", sched_file, "--nworkers", str(WORKERS),
                                   "--nthreads", "1", "--dashboard-address", "127.0.0.1:0", "--host", "127.0.0.1"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / "workers.log", "w")))
    return procs, sched_file


def run_steps(folder: Path, out: Path, rec: Recorder | None, full_reshard: bool) -> dict:
    """The steps on one dataset; ``rec`` None: untimed (the warm-up)."""
    from nemo_curator.datasets import ImageTextPairDataset

    rec = rec or _NullRecorder()
    info = {}
    rec.begin("from_webdataset")
    dataset = ImageTextPairDataset.from_webdataset(str(folder), id_col="key")
    rec.end()

    rec.begin("map_shards (graph)")
    meta = dataset.metadata._meta.assign(n=__import__("numpy").int64(0))
    mapped = dataset.map_shards(add_column, meta=meta, lineage_step="bench:add-column", returns_stats=True)
    rec.end()

    rec.begin("save_metadata")
    summary = mapped.save_metadata(path=str(out / "saved"), resume=False)
    rec.end("summary + re-open the written parquets")
    info["save_metadata"] = {"shards_written": summary["shards_written"], "rows": summary["totals"].get("rows"),
                             "summary_json_bytes": len(json.dumps(summary, default=str))}
    del summary, dataset

    rec.begin("to_webdataset")
    mapped.metadata["keep"] = mapped.metadata["n"] % 2 == 0  # a hand edit, as the docs show
    if full_reshard:
        summary = mapped.to_webdataset(str(out / "resharded"), "keep", samples_per_shard=RESHARD_SAMPLES_PER_SHARD)
        rec.end("summary")
        info["to_webdataset"] = {"rows_kept": summary["rows_kept"], "output_shards": summary["shards_total"],
                                 "summary_json_bytes": len(json.dumps(summary, default=str))}
    else:
        _plan_only(mapped, str(out / "resharded"), rec)
        rec.end()
    return info


def _plan_only(dataset, path: str, rec) -> None:
    """``to_webdataset`` stopped where the writing would begin (its last ``compute_with_progress``)."""
    import nemo_curator.utils.shard_job as shard_job

    class _Stop(Exception):
        pass

    current = shard_job.compute_with_progress

    def stop(tasks, desc, *args, **kwargs):
        rec.mark(f"{desc}: plan")
        raise _Stop

    shard_job.compute_with_progress = stop
    try:
        dataset.to_webdataset(path, "keep", samples_per_shard=RESHARD_SAMPLES_PER_SHARD)
    except _Stop:
        pass
    finally:
        shard_job.compute_with_progress = current


class _NullRecorder:
    def begin(self, step):
        pass

    def mark(self, phase):
        pass

    def end(self, last_phase="rest"):
        return {}


def child(args) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    for name in ("distributed", "nemo_curator"):
        logging.getLogger(name).setLevel(logging.ERROR)
    folder = tiny_dataset(args.n, args.rows)
    warm = tiny_dataset(50, args.rows)
    work = Path(tempfile.mkdtemp(prefix=f"client-scale-{args.n}-", dir=DATA_DIR))
    procs, sched_file = start_cluster(work)
    try:
        import psutil

        from nemo_curator import get_client

        client = get_client(scheduler_file=sched_file)
        client.wait_for_workers(WORKERS, timeout=120)
        client.run(lambda: __import__("nemo_curator.datasets.image_text_pair_dataset") and None)
        crossed: list = []
        log(f"child N={args.n:,} rows={args.rows}: warm-up on 50 shards")
        run_steps(warm, work / "warm", None, args.full_reshard)
        rss0 = psutil.Process().memory_info().rss / 2**20
        client.run_on_scheduler(start_sampler)
        if args.tracemalloc:
            import tracemalloc

            tracemalloc.start()
        rec = Recorder()
        instrument(rec, client, crossed)
        log(f"child N={args.n:,} rows={args.rows}: measuring")
        info = run_steps(folder, work / "run", rec, args.full_reshard)
        scheduler_peak = client.run_on_scheduler(stop_sampler)
        result = {"n_shards": args.n, "rows_per_shard": args.rows, "client_rss_before_mb": rss0,
                  "client_rss_after_mb": psutil.Process().memory_info().rss / 2**20,
                  "scheduler_peak_rss_mb": scheduler_peak, "steps": rec.steps, "crossed": crossed, "info": info,
                  "full_reshard": args.full_reshard, "tracemalloc": args.tracemalloc}
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        client.close()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The parent: one child per N, the tables
def run_child(n: int, rows: int, full_reshard: bool, heap: bool = False) -> dict:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f".client_scale_{n}x{rows}.json"
    cmd = [sys.executable, __file__, "--child", "--n", str(n), "--rows", str(rows), "--out", str(out)]
    if full_reshard:
        cmd.append("--full-reshard")
    if heap:
        cmd.append("--tracemalloc")
    log(f"=== N={n:,} shards x {rows} rows: {' '.join(cmd[1:])}")
    t0 = time.time()
    errlog = RESULTS_DIR / f".client_scale_{n}x{rows}.log"
    with open(errlog, "w") as err:
        proc = subprocess.run(cmd, stderr=err)
    if proc.returncode != 0:
        sys.stderr.write(errlog.read_text()[-5000:])
        raise RuntimeError(f"child N={n} rows={rows} failed ({proc.returncode}); log {errlog}")
    log(f"    done in {time.time() - t0:.0f} s")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def _phase_sum(step: dict, pred) -> tuple[float, float, float]:
    """(wall, cpu, peak +) of the phases of ``step`` that ``pred(name)`` picks."""
    picked = [p for p in step["phases"] if pred(p["phase"])]
    return (sum(p["wall_s"] for p in picked), sum(p["cpu_s"] for p in picked),
            max((p["peak_plus_mb"] for p in picked), default=0.0))


def rows_of(result: dict) -> dict[str, dict]:
    """The reported steps of one child: {name: {wall_s, cpu_s, peak_plus_mb, kept_plus_mb}}."""
    steps = result["steps"]
    out = {}
    for name in ("from_webdataset", "map_shards (graph)"):
        s = steps[name]
        out[name] = {k: s[k] for k in ("wall_s", "cpu_s", "peak_plus_mb", "kept_plus_mb")}
    s = steps["save_metadata"]
    wait = lambda p: p.endswith("wait for the workers")  # noqa: E731
    w = _phase_sum(s, wait)
    c = _phase_sum(s, lambda p: not wait(p))
    out["save_metadata: client side"] = {"wall_s": c[0], "cpu_s": c[1], "peak_plus_mb": c[2], "kept_plus_mb": s["kept_plus_mb"]}
    out["save_metadata: wait for the workers"] = {"wall_s": w[0], "cpu_s": w[1], "peak_plus_mb": w[2], "kept_plus_mb": None}
    out["save_metadata: total"] = {k: s[k] for k in ("wall_s", "cpu_s", "peak_plus_mb", "kept_plus_mb")}
    s = steps["to_webdataset"]
    names = [p["phase"] for p in s["phases"]]
    cut = names.index("to_webdataset: plan") + 1  # the write's compute begins after this phase
    plan, write = s["phases"][:cut], s["phases"][cut:]
    count_wait = [p for p in plan if p["phase"].endswith("wait for the workers")]
    out["to_webdataset planning: client side"] = {
        "wall_s": sum(p["wall_s"] for p in plan) - sum(p["wall_s"] for p in count_wait),
        "cpu_s": sum(p["cpu_s"] for p in plan) - sum(p["cpu_s"] for p in count_wait),
        "peak_plus_mb": max(p["peak_plus_mb"] for p in plan if p not in count_wait), "kept_plus_mb": None}
    out["to_webdataset planning: total (kept counts on the cluster included)"] = {
        "wall_s": sum(p["wall_s"] for p in plan), "cpu_s": sum(p["cpu_s"] for p in plan),
        "peak_plus_mb": max(p["peak_plus_mb"] for p in plan), "kept_plus_mb": None}
    if write:
        out["to_webdataset: write (fuse, submit, wait, summary)"] = {
            "wall_s": sum(p["wall_s"] for p in write), "cpu_s": sum(p["cpu_s"] for p in write),
            "peak_plus_mb": max(p["peak_plus_mb"] for p in write), "kept_plus_mb": s["kept_plus_mb"]}
    return out


def _fmt(x, digits=1):
    return "–" if x is None else f"{x:,.{digits}f}"


def _growth(a, b):
    if a is None or b is None or a <= 0:
        return "–"
    return f"{b / a:.1f}×"


def tables(by_n: dict[int, dict], check: dict | None) -> tuple[str, dict]:
    sizes = sorted(by_n)
    steps = {n: rows_of(by_n[n]) for n in sizes}
    names = list(steps[sizes[-1]])
    rows, growth = [], {}
    for name in names:
        for i, n in enumerate(sizes):
            r = steps[n].get(name)
            if r is None:
                continue
            prev = steps[sizes[i - 1]].get(name) if i else None
            g = {"wall": _growth(prev and prev["wall_s"], r["wall_s"]), "cpu": _growth(prev and prev["cpu_s"], r["cpu_s"]),
                 "peak": _growth(prev and max(prev["peak_plus_mb"], 0.01), max(r["peak_plus_mb"], 0.01))} if prev else None
            growth.setdefault(name, {})[n] = g
            rows.append([name if i == 0 else "", f"{n:,}", _fmt(r["wall_s"], 2), _fmt(1e3 * r["wall_s"] / n, 3),
                         _fmt(r["cpu_s"], 2), _fmt(r["peak_plus_mb"]), _fmt(r["peak_plus_mb"] * 1024 / n, 2),
                         _fmt(r["kept_plus_mb"]),
                         "" if g is None else f"{g['wall']} / {g['cpu']} / {g['peak']}"])
    big = by_n[sizes[-1]]
    md = [f"### 8. The client at scale (tiny shards of 1 sample; 2 workers of 1 thread; scheduler in its own process; "
          f"one fresh client process per N)\n",
          md_table(["step", "shards", "client wall s", "ms / shard", "client CPU s", "peak + MB", "KB / shard",
                    "kept + MB", f"growth at 10× shards: wall / CPU / peak"], rows),
          "",
          "Client RSS before the steps (imports, client, warm-up): "
          + ", ".join(f"{by_n[n]['client_rss_before_mb']:.0f} MB at {n:,}" for n in sizes)
          + "; scheduler peak RSS: " + ", ".join(f"{by_n[n]['scheduler_peak_rss_mb']:.0f} MB" for n in sizes) + "."]
    crossed = [c for c in big["crossed"]]
    md.append("What came back to the client per task at " + f"{sizes[-1]:,} shards: "
              + "; ".join(f"{c['desc']}: {c['results']:,} results, {', '.join(c['types'])}, ≤ {c['max_bytes']:,} B pickled"
                          for c in crossed) + ".")
    payload = {"steps": steps, "growth": growth}
    if check:
        one, hundred = check["1"], check["100"]
        n = one["n_shards"]
        crow, verdict = [], {}
        for name in one["steps"]:
            a, b = one["steps"][name], hundred["steps"][name]
            extra = {k: (b[k] - a[k]) * 2**20 / n for k in ("heap_peak_plus_mb", "heap_kept_plus_mb") if k in a}
            verdict[name] = {"extra_bytes_per_shard_for_99_more_rows": extra}
            crow.append([name, _fmt(a["wall_s"], 2), _fmt(b["wall_s"], 2),
                         _fmt(a.get("heap_peak_plus_mb"), 2), _fmt(b.get("heap_peak_plus_mb"), 2),
                         _fmt(a.get("heap_kept_plus_mb"), 2), _fmt(b.get("heap_kept_plus_mb"), 2),
                         _fmt(extra.get("heap_peak_plus_mb"), 0), _fmt(a["peak_plus_mb"]), _fmt(b["peak_plus_mb"])])
        bytes_rows = [[c1["desc"], f"{c1['results']:,}", f"{c1['max_bytes']:,}", f"{c100['max_bytes']:,}"]
                      for c1, c100 in zip(one["crossed"], hundred["crossed"])]
        md += ["", f"Per-row check: {n:,} shards of 1 row against {n:,} shards of 100 rows ({100 * n:,} rows); "
                   "the client's live Python heap (tracemalloc, which slows the client: its wall times are not those "
                   "above) and its RSS\n",
               md_table(["step", "wall s, 1 row", "wall s, 100 rows", "heap peak + MB, 1 row", "…, 100 rows",
                         "heap kept + MB, 1 row", "…, 100 rows", "peak: extra B / shard", "RSS peak + MB, 1 row",
                         "…, 100 rows"], crow), "",
               md_table(["results that came back", "tasks", "largest pickled result, B, 1 row", "…, 100 rows"],
                        bytes_rows)]
        payload["rows_check"] = {"n_shards": n, "verdict": verdict, "crossed_one": one["crossed"],
                                 "crossed_hundred": hundred["crossed"]}
    return "\n".join(md), payload


def md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 / 1,000 shards, per-row check at 100: checks the script")
    ap.add_argument("--sizes", default="", help="comma-separated numbers of shards (default 1000,10000,100000)")
    ap.add_argument("--rows-check", type=int, default=None, help="N of the per-row check (default 10000; 0: none)")
    ap.add_argument("--no-full-reshard", action="store_true", help="to_webdataset: the planning only, no writing")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--full-reshard", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # from the importable module, so that Dask pickles its functions by reference
        import bench_client_scale

        return bench_client_scale.child(args)
    sizes = [int(s) for s in args.sizes.split(",") if s] or ([100, 1000] if args.quick else [1000, 10_000, 100_000])
    rows_check = args.rows_check if args.rows_check is not None else (100 if args.quick else 10_000)
    full = not args.no_full_reshard
    import common

    load0 = common.load_average()
    by_n = {n: run_child(n, 1, full) for n in sizes}
    check = None
    if rows_check:
        check = {"1": run_child(rows_check, 1, full, heap=True), "100": run_child(rows_check, 100, full, heap=True)}
    md, payload = tables(by_n, check)
    md += f"\n\nLoad average {load0:.1f} before, {common.load_average():.1f} after (a shared machine: the CPU column is the steadier)."
    common.save_result("client_scale", {"sizes": sizes, "rows_check": rows_check, "full_reshard": full,
                                        "runs": {str(n): r for n, r in by_n.items()},
                                        "check_runs": check, **payload}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
