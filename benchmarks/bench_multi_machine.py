"""Benchmark 7: the Slurm recipe's way of starting a cluster, simulated on this machine, against a LocalCluster.

    .venv/bin/python benchmarks/bench_multi_machine.py [--quick] [--repeats N]

On the same many small shards (~500x375 photographs, 2 per shard, so that the per-shard cost of
the scheduler shows), the same job: ``from_webdataset`` -> ``TimmImageEmbedder`` (the tiny CLIP
model + both real heads) -> ``save_metadata`` to a new folder, then ``to_webdataset`` of the rows
whose aesthetic score is above a fixed threshold (100 samples per output shard), on

- the recipe's cluster (examples/slurm/curate.sbatch with WORKER=cpu): ``dask scheduler
  --scheduler-file F`` and 4 ``dask worker --scheduler-file F --nworkers 1 --nthreads 1``
  processes (each a nanny + its worker process), the job connecting with
  ``get_client(scheduler_file=F)``. Everything listens on 127.0.0.1 (the recipe binds all
  interfaces; on one machine the traffic is loopback either way);
- ``get_client(cluster_type="cpu", n_workers=4, threads_per_worker=1)``: a LocalCluster whose
  scheduler and nannies run on the event-loop thread of the job's own process.

Both clusters live side by side (the same memory limit per worker, torch 1 thread, DALI 1 thread)
and run round-robin after an untimed warm-up on every shard. Both must give the same outputs:
the same ids, embeddings and scores in every parquet, and the same members (names and bytes) in
every curated tar.

CPU time (psutil, per process and per thread), per shard, over each phase, median over the runs:
- scheduler: the recipe's ``dask scheduler`` process, all of it. A LocalCluster's scheduler has no
  process of its own: it runs on the job process's event-loop thread with the cluster's 4 nannies
  and the client's own messages. What is measured alike for both is therefore the control plane:
  scheduler + nannies + the job's event-loop thread;
- "net": less each part's idle rate (measured for 20 s per cluster before and after the runs:
  heartbeats, memory monitors, Dask's profiler) x the phase's wall time, i.e. the cost of the work
  itself. The LocalCluster's scheduler, net, is estimated as its event-loop thread, net, less the
  recipe's client event-loop thread, net (the client's own messages for the same work; nannies do
  nothing per task, as the recipe's nanny processes show);
- workers (the 4 worker processes), the job's main thread (graphs, plans, results), everything
  together; scheduler transitions per shard come from the scheduler.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import load_average, log, md_table, photo_dataset, tars_of  # noqa: E402

SIZE = (500, 375)
N_WORKERS = 4
BATCH = 32
SAMPLES_PER_OUTPUT_SHARD = 100
RECIPE = "recipe: dask scheduler --scheduler-file + 4 × dask worker, get_client(scheduler_file=...)"
LOCAL = "LocalCluster: get_client(cluster_type='cpu', n_workers=4, threads_per_worker=1)"
PHASES = ("embed", "reshard")


# ------------------------------------------------------------------------------------------------
# CPU time of processes and threads
def _proc_cpu(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return float("nan")


def _thread_cpu() -> dict[int, float]:
    """{native thread id: CPU seconds} of this process's live threads."""
    import psutil

    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


def _loop_thread_id(loop) -> int:
    """The native id of the thread that runs a Dask event loop (a client's, a LocalCluster's)."""
    box, done = {}, threading.Event()

    def probe():
        box["id"] = threading.get_native_id()
        done.set()

    loop.add_callback(probe)
    if not done.wait(30):
        raise RuntimeError("the event loop did not answer")
    return box["id"]


def _worker_pid() -> int:
    return os.getpid()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _load_models(embedder) -> None:
    embedder.get_model("cpu")
    for clf in embedder.classifiers:
        clf.get_model("cpu")


class Cluster:
    """A running cluster, its client, and the processes whose CPU time is counted."""

    def __init__(self, name: str, client, scheduler_pid: int | None, nanny_pids: list[int], procs=(), logs=()):
        self.name, self.client = name, client
        self.scheduler_pid, self.nanny_pids = scheduler_pid, nanny_pids
        self.procs, self.logs = list(procs), list(logs)
        self.worker_pids = sorted(client.run(_worker_pid).values())
        if len(self.worker_pids) != N_WORKERS:
            raise RuntimeError(f"{name}: {len(self.worker_pids)} workers, not {N_WORKERS}")
        got = set(client.run(_torch_threads).values())
        if got != {1}:
            raise RuntimeError(f"{name}: workers run torch with {got} threads, not 1")
        # the job process's event-loop threads of this cluster: the client's, and a LocalCluster's own
        # (its scheduler and nannies run there; the client of a LocalCluster shares it)
        loops = [client.loop] + ([client.cluster.loop] if client.cluster is not None else [])
        self.loop_tids = sorted({_loop_thread_id(loop) for loop in loops})

    def cpu(self, all_loop_tids=()) -> dict:
        """CPU seconds so far of each part; ``all_loop_tids``: the loop threads of every cluster of
        this process (the rest of the process's threads is counted as shared)."""
        import psutil

        threads = _thread_cpu()
        main = threads.get(threading.main_thread().native_id, 0.0)
        own = sum(threads.get(t, 0.0) for t in self.loop_tids)
        t = psutil.Process().cpu_times()
        shared = t.user + t.system - main - sum(threads.get(tid, 0.0) for tid in set(all_loop_tids) | set(self.loop_tids))
        return {"scheduler": _proc_cpu(self.scheduler_pid) if self.scheduler_pid else 0.0,
                "nannies": sum(_proc_cpu(p) for p in self.nanny_pids),
                "workers": sum(_proc_cpu(p) for p in self.worker_pids),
                "job main thread": main, "job loop thread": own, "job other threads": shared}

    def transitions(self) -> int:
        return self.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)

    def close(self):
        cluster = self.client.cluster
        self.client.close()
        if cluster is not None:
            cluster.close()
        # as the recipe's trap does: the workers first, then the scheduler
        for proc in self.procs[::-1]:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def log_tail(self) -> str:
        return "\n".join(f"--- {p}\n{Path(p).read_text(errors='replace')[-3000:]}" for p in self.logs if Path(p).exists())


def memory_limit_per_worker() -> int:
    import psutil

    return psutil.virtual_memory().total // N_WORKERS  # what LocalCluster gives each of 4 workers


def start_recipe_cluster(root: str) -> Cluster:
    """The recipe's commands (as its CPU form runs them, without srun): a scheduler writing a
    scheduler file, then 4 `dask worker --scheduler-file` processes; the job connects through the file."""
    from nemo_curator import get_client

    dask_cli = str(Path(sys.executable).with_name("dask"))
    scheduler_file = os.path.join(root, "scheduler.json")
    logs = [os.path.join(root, "scheduler.log")] + [os.path.join(root, f"worker-{i}.log") for i in range(N_WORKERS)]
    procs = [subprocess.Popen([dask_cli, "scheduler", "--scheduler-file", scheduler_file, "--host", "127.0.0.1",
                               "--port", "0", "--dashboard-address", "127.0.0.1:0"],
                              stdout=subprocess.DEVNULL, stderr=open(logs[0], "w"))]
    cluster = None
    try:
        deadline = time.time() + 120
        while not os.path.exists(scheduler_file):
            if procs[0].poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the scheduler did not start:\n{Path(logs[0]).read_text()[-3000:]}")
            time.sleep(0.2)
        for i in range(N_WORKERS):
            procs.append(subprocess.Popen(
                [dask_cli, "worker", "--scheduler-file", scheduler_file, "--nworkers", "1", "--nthreads", "1",
                 "--memory-limit", str(memory_limit_per_worker()), "--host", "127.0.0.1",
                 "--local-directory", os.path.join(root, "workers")],
                stdout=subprocess.DEVNULL, stderr=open(logs[1 + i], "w")))
        client = get_client(scheduler_file=scheduler_file, wait_for_workers_timeout=300)
        client.wait_for_workers(N_WORKERS, timeout=300)
        common.quiet_logs()
        cluster = Cluster(RECIPE, client, procs[0].pid, [p.pid for p in procs[1:]], procs, logs)
        return cluster
    except BaseException:
        if cluster is None:
            for proc in procs[::-1]:
                proc.kill()
                proc.wait()
            for path in logs:
                if os.path.exists(path):
                    log(f"--- {path}\n{Path(path).read_text(errors='replace')[-2000:]}")
        raise


def start_local_cluster() -> Cluster:
    from nemo_curator import get_client

    client = get_client(cluster_type="cpu", n_workers=N_WORKERS, threads_per_worker=1,
                        dashboard_address="127.0.0.1:0", memory_limit=memory_limit_per_worker())
    common.quiet_logs()
    return Cluster(LOCAL, client, None, [])


# ------------------------------------------------------------------------------------------------
# The job and its outputs
def make_embedder():
    from nemo_curator.image.embedders import TimmImageEmbedder

    return TimmImageEmbedder(common.MODEL_NAME, batch_size=BATCH, num_threads_per_worker=1,
                             model_kwargs=common.TINY_MODEL_KWARGS, classifiers=common.classifier_heads())


def embed(embedder, folder: str, out: str) -> dict:
    from nemo_curator.datasets import ImageTextPairDataset

    shutil.rmtree(out, ignore_errors=True)
    dataset = ImageTextPairDataset.from_webdataset(folder, id_col="key")
    summary = embedder(dataset).save_metadata(path=out, show_progress=False, resume=False)
    totals = summary["totals"]
    if totals.get("embedded") != totals.get("rows"):
        raise RuntimeError(f"not every row embedded: {totals}")
    for name in os.listdir(folder):  # to_webdataset reads the tars beside the embedded parquets
        if name.endswith(".tar"):
            os.symlink(os.path.join(folder, name), os.path.join(out, name))
    return totals


def reshard(embedded: str, out: str, threshold: float) -> dict:
    from nemo_curator.datasets import ImageTextPairDataset

    shutil.rmtree(out, ignore_errors=True)
    dataset = ImageTextPairDataset.from_webdataset(embedded, id_col="key")
    dataset.metadata["keep"] = dataset.metadata.aesthetic_score > threshold
    summary = dataset.to_webdataset(out, "keep", samples_per_shard=SAMPLES_PER_OUTPUT_SHARD, show_progress=False)
    return summary["totals"]


def parquet_digest(folder: str) -> tuple[str, int, float]:
    """(digest of every shard's ids, embeddings and scores, rows, median aesthetic score)."""
    import numpy as np
    import pandas as pd

    h, rows, scores = hashlib.sha256(), 0, []
    for path in sorted(Path(folder).glob("*.parquet")):
        frame = pd.read_parquet(path, columns=["key", "image_embedding", "aesthetic_score", "nsfw_score"])
        h.update(path.name.encode())
        h.update("\0".join(frame.key).encode())
        h.update(np.stack(frame.image_embedding.to_numpy()).astype(np.float32).tobytes())
        h.update(frame[["aesthetic_score", "nsfw_score"]].to_numpy(np.float64).tobytes())
        rows += len(frame)
        scores.extend(frame.aesthetic_score)
    return h.hexdigest(), rows, float(statistics.median(scores))


def tar_digest(folder: str) -> tuple[str, int]:
    """(digest of every curated tar's member names and bytes and its parquet's ids, members)."""
    import pandas as pd

    h, members = hashlib.sha256(), 0
    for path in sorted(Path(folder).glob("*.tar")):
        h.update(path.name.encode())
        with tarfile.open(path) as tf:
            for member in tf.getmembers():
                h.update(member.name.encode())
                h.update(hashlib.sha256(tf.extractfile(member).read()).digest())
                members += 1
        h.update("\0".join(pd.read_parquet(path.with_suffix(".parquet"), columns=["key"]).key).encode())
    return h.hexdigest(), members


def measure_idle(clusters: dict, all_loops, seconds: float) -> dict:
    """{cluster: {part: CPU ms per second}} with nothing to do, each cluster in turn."""
    idle = {}
    for key, c in clusters.items():
        time.sleep(common.SETTLE_SECONDS)
        cpu0, t0 = c.cpu(all_loops), time.perf_counter()
        time.sleep(seconds)
        cpu1, dt = c.cpu(all_loops), time.perf_counter() - t0
        idle[key] = {k: 1e3 * (cpu1[k] - cpu0[k]) / dt for k in cpu0}
        log(f"  idle {key}: " + ", ".join(f"{k} {v:.1f} ms/s" for k, v in idle[key].items()))
    return idle


# ------------------------------------------------------------------------------------------------
def main(argv=None):
    common.quiet_logs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 shards and one repeat (a smoke run)")
    ap.add_argument("--shards", type=int, help="shards of 2 photos (default 300; 40 with --quick)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, help="seconds of an idle cluster measured (default 20; 3 with --quick)")
    args = ap.parse_args(argv)
    n_shards = args.shards or (40 if args.quick else 300)
    repeats = 1 if args.quick else args.repeats
    args.idle_seconds = args.idle_seconds or (3.0 if args.quick else 20.0)
    folder = str(photo_dataset("multimachine", SIZE, n_shards, 2))
    n_shards = len(tars_of(folder))
    # Dask's nannies pass these on to the worker processes they spawn, in both clusters alike
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    load0 = load_average()
    root = tempfile.mkdtemp(prefix="nemo-bench-multi-")
    clusters: dict[str, Cluster] = {}
    try:
        clusters["recipe"] = start_recipe_cluster(root)
        clusters["local"] = start_local_cluster()
        embedder = make_embedder()
        for c in clusters.values():
            c.client.run(_load_models, embedder)
        threshold = None
        all_loops = sorted({tid for c in clusters.values() for tid in c.loop_tids})
        log("event-loop threads: " + ", ".join(f"{k} {c.loop_tids}" for k, c in clusters.items()))

        def run(key: str, tag: str) -> dict:
            nonlocal threshold
            c = clusters[key]
            embedded, curated = os.path.join(root, f"{key}-embedded"), os.path.join(root, f"{key}-curated")
            out = {"phases": {}}
            with c.client.as_current():
                for phase in PHASES:
                    if phase == "reshard" and threshold is None:  # fixed once, from the first warm-up's scores
                        threshold = parquet_digest(embedded)[2]
                    time.sleep(common.SETTLE_SECONDS)
                    cpu0, tr0, t0 = c.cpu(all_loops), c.transitions(), time.perf_counter()
                    totals = (embed(embedder, folder, embedded) if phase == "embed"
                              else reshard(embedded, curated, threshold))
                    seconds = time.perf_counter() - t0
                    cpu1, tr1 = c.cpu(all_loops), c.transitions()
                    out["phases"][phase] = {"seconds": seconds, "transitions": tr1 - tr0, "totals": totals,
                                            "cpu_s": {k: cpu1[k] - cpu0[k] for k in cpu0}}
            out["parquets"] = parquet_digest(embedded)[:2]
            out["tars"] = tar_digest(curated)
            log(f"  {tag} {key}: " + ", ".join(f"{p} {v['seconds']:.2f} s" for p, v in out["phases"].items()))
            return out

        runs = {key: [] for key in clusters}
        for key in clusters:  # warm-up: every worker has run tasks of both phases
            run(key, "warm-up")
        idle = [measure_idle(clusters, all_loops, args.idle_seconds)]  # before the runs and after them
        for r in range(repeats):
            for key in clusters:
                runs[key].append(run(key, f"run {r + 1}/{repeats}"))
        idle.append(measure_idle(clusters, all_loops, args.idle_seconds))
    except BaseException:
        for c in clusters.values():
            if c.logs:
                log(c.log_tail())
        raise
    finally:
        for c in clusters.values():
            c.close()
        shutil.rmtree(root, ignore_errors=True)
    load1 = load_average()

    # the same outputs, in every run of both clusters
    parquets = {tuple(r["parquets"]) for rs in runs.values() for r in rs}
    tars = {tuple(r["tars"]) for rs in runs.values() for r in rs}
    if len(parquets) != 1 or len(tars) != 1:
        raise RuntimeError(f"the clusters' outputs differ: parquets {parquets}, curated tars {tars}")
    (_, rows), (_, members) = next(iter(parquets)), next(iter(tars))

    # Per run and phase, CPU ms per shard of each part, gross and net of idle (a part's idle rate,
    # measured before and after the runs, x the phase's wall time: heartbeats, monitors, profilers).
    # The parts measured alike in both clusters: the control plane = scheduler + nannies + the
    # job's event-loop thread (a LocalCluster runs its scheduler and nannies there, beside the
    # client's messages; the recipe runs them as processes of their own).
    def control(cpu: dict) -> float:
        return cpu["scheduler"] + cpu["nannies"] + cpu["job loop thread"]

    idle_rate = {key: {part: statistics.mean(i[key][part] for i in idle) for part in idle[0][key]} for key in clusters}
    summary = {}
    for key in clusters:
        summary[key] = {}
        for phase in PHASES:
            per_run = []
            for r in runs[key]:
                ph = r["phases"][phase]
                gross = {part: 1e3 * v / n_shards for part, v in ph["cpu_s"].items()}
                net = {part: v - idle_rate[key][part] * ph["seconds"] / n_shards for part, v in gross.items()}
                per_run.append({"seconds": ph["seconds"], "gross": gross, "net": net,
                                "control": control(gross), "control_net": control(net), "all": sum(gross.values()),
                                "transitions": ph["transitions"] / n_shards})
            med = lambda f: statistics.median(f(x) for x in per_run)  # noqa: E731
            secs = [x["seconds"] for x in per_run]
            summary[key][phase] = {
                "seconds_median": statistics.median(secs), "seconds_min": min(secs), "seconds_max": max(secs),
                "transitions_per_shard": med(lambda x: x["transitions"]),
                "cpu_ms_per_shard": {part: med(lambda x, p=part: x["gross"][p]) for part in per_run[0]["gross"]},
                "cpu_ms_per_shard_net_of_idle": {part: med(lambda x, p=part: x["net"][p]) for part in per_run[0]["net"]},
                "control_plane_ms_per_shard": med(lambda x: x["control"]),
                "control_plane_ms_per_shard_net_of_idle": med(lambda x: x["control_net"]),
                "all_cpu_ms_per_shard": med(lambda x: x["all"])}
    for phase in PHASES:
        # The LocalCluster's scheduler alone, estimated: its control plane net of idle, less the
        # client's own messages for the same work (the recipe's job loop thread, net of idle; the
        # nannies do nothing per task: the recipe's nanny processes, net of idle, show it)
        rec, loc = summary["recipe"][phase], summary["local"][phase]
        rec["scheduler_ms_per_shard_net_of_idle"] = rec["cpu_ms_per_shard_net_of_idle"]["scheduler"]
        loc["scheduler_ms_per_shard_net_of_idle"] = (loc["control_plane_ms_per_shard_net_of_idle"]
                                                     - rec["cpu_ms_per_shard_net_of_idle"]["job loop thread"])

    rows_md = []
    for phase in PHASES:
        for key, label in (("recipe", "recipe (scheduler file, 4 × `dask worker`)"), ("local", "LocalCluster (4 workers)")):
            s = summary[key][phase]
            c = s["cpu_ms_per_shard"]
            if key == "recipe":
                sched = f"{c['scheduler']:.2f} (net {s['scheduler_ms_per_shard_net_of_idle']:.2f})"
                ctrl = (f"{s['control_plane_ms_per_shard']:.2f} = {c['scheduler']:.2f} + {c['nannies']:.2f} + "
                        f"{c['job loop thread']:.2f} (net {s['control_plane_ms_per_shard_net_of_idle']:.2f})")
            else:
                sched = f"in the job process (net ≈ {s['scheduler_ms_per_shard_net_of_idle']:.2f})"
                ctrl = f"{s['control_plane_ms_per_shard']:.2f} (net {s['control_plane_ms_per_shard_net_of_idle']:.2f})"
            rows_md.append([phase, label, f"{s['seconds_median']:.2f} ({s['seconds_min']:.2f}–{s['seconds_max']:.2f})",
                            sched, ctrl, f"{c['workers']:.1f}", f"{c['job main thread']:.2f}",
                            f"{s['all_cpu_ms_per_shard']:.1f}", f"{s['transitions_per_shard']:.1f}"])
    ir, il = idle_rate["recipe"], idle_rate["local"]
    md = (f"### 7. The Slurm recipe's cluster, simulated, against a LocalCluster ({os.cpu_count()} cores; "
          f"{n_shards} shards of 2 photos ~500x375; 4 workers × 1 thread, DALI 1 thread, torch 1 thread; tiny CLIP "
          f"ViT + both heads; {repeats} runs each, round-robin; load average {load0:.1f} → {load1:.1f})\n\n"
          + md_table(["phase", "cluster", "wall s median (min–max)", "scheduler CPU ms/shard",
                      "scheduler + nannies + job's event loop, CPU ms/shard", "workers CPU ms/shard",
                      "job main thread CPU ms/shard", "all CPU ms/shard", "scheduler transitions/shard"], rows_md)
          + f"\n\nSame outputs in every run of both: {rows} rows (ids, embeddings, scores), {members} curated tar "
            f"members (names and bytes). CPU time: psutil, per process and per thread, median over the runs. The "
            f"recipe's scheduler is a process of its own; a LocalCluster's scheduler and its nannies run on the job "
            f"process's event-loop thread, beside the client's messages, so the column measured alike for both is "
            f"scheduler + nannies + the job's event-loop thread. \"net\" takes off each part's idle rate × the "
            f"phase's wall time; idle (2 × {args.idle_seconds:.0f} s), the recipe's scheduler used {ir['scheduler']:.1f} "
            f"ms/s, its 4 nanny processes {ir['nannies']:.1f} ms/s, its workers {ir['workers']:.1f} ms/s; the "
            f"LocalCluster's event-loop thread {il['job loop thread']:.1f} ms/s, its workers {il['workers']:.1f} ms/s. "
            f"The LocalCluster's scheduler estimate is its event-loop thread, net, less the recipe's client loop "
            f"thread, net (the client's own messages). \"all\" adds the job process's other threads.")
    common.save_result("multi_machine", {"shards": n_shards, "rows": rows, "curated_members": members,
                                         "threshold": threshold, "summary": summary, "runs": runs,
                                         "idle_cpu_ms_per_second": idle, "idle_rate_mean": idle_rate,
                                         "load_average": [load0, load1]}, md)


if __name__ == "__main__":
    main()
