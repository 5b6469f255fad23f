"""examples/slurm/curate.sbatch run by bash, end to end, with a stand-in ``srun`` (tests/slurm_standin/srun)
first on PATH and the SLURM_* variables sbatch would set: a simulated job of 2 "nodes" on this machine.

- CPU workers (``WORKER=cpu``, 2 per node) and the tiny random model (``CURATE_ARGS=--smoke``): the
  real scheduler, workers and examples/curate.py; the curated shards, the scored parquets, the
  workers that joined and the processes left after the script are checked.
- The GPU form (the default) with stand-ins for ``dask`` and ``python`` that record their command
  lines (there is no GPU or dask-cuda here): the commands and the worker count are the recipe's.

Everything runs in a new session (process group) with a timeout; on failure the group is killed and
the job's logs are printed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pandas as pd
import psutil
import pytest

from nemo_curator.utils.sample_data import make_sample_dataset

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "slurm" / "curate.sbatch"
STANDIN_SRUN = Path(__file__).resolve().parent / "slurm_standin" / "srun"
NODES, WORKERS_PER_NODE = 2, 2
N_SHARDS, SAMPLES_PER_SHARD = 6, 4
JOB_TIMEOUT_S = 420

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")]


def _bin_with_srun(folder: Path) -> Path:
    """A folder holding the stand-in srun, run by this interpreter (the exec bit need not survive a checkout)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = STANDIN_SRUN.read_text().split("\n", 1)[1]
    srun = folder / "srun"
    srun.write_text(f"#!{sys.executable}\n{text}")
    srun.chmod(0o755)
    return folder


def _job_env(tmp_path: Path, bin_dir: Path, job_id: str, **extra: str) -> dict:
    """This process's environment without Slurm's and Dask's variables, plus what sbatch sets for
    a job of NODES nodes, one task each, and the stand-in srun first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DASK_"))}
    env.update({
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")]),
        "SLURM_JOB_ID": job_id, "SLURM_JOBID": job_id, "SLURM_JOB_NAME": "nemo-curator-image",
        "SLURM_JOB_NUM_NODES": str(NODES), "SLURM_NNODES": str(NODES),
        "SLURM_JOB_NODELIST": f"node[0-{NODES - 1}]", "SLURM_NODELIST": f"node[0-{NODES - 1}]",
        "SLURM_NTASKS": str(NODES), "SLURM_NPROCS": str(NODES), "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_TASKS_PER_NODE": f"1(x{NODES})", "SLURM_CPUS_ON_NODE": str(os.cpu_count() or 1),
        "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURMD_NODENAME": "node0",
        "SRUN_STANDIN_LOG": str(tmp_path / "srun.jsonl"),
        "TMPDIR": str(tmp_path / "tmp"),
        "PYTHONWARNINGS": "ignore",
    })
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update(extra)
    return env


def _job_processes(job_id: str, sid: int) -> list[psutil.Process]:
    """Live processes of the job: in the script's session, or carrying its SLURM_JOB_ID."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if os.getsid(proc.pid) == sid or proc.environ().get("SLURM_JOB_ID") == job_id:
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def _logs(job_dir: Path, tmp_path: Path) -> str:
    parts = []
    for path in (job_dir / "scheduler.log", job_dir / "workers.log", tmp_path / "srun.jsonl"):
        if path.exists():
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-6000:]}")
    return "\n".join(parts)


def run_recipe(tmp_path: Path, env: dict, job_dir: Path) -> subprocess.CompletedProcess:
    """bash examples/slurm/curate.sbatch from the repository root, in a new session; on a timeout
    the session is killed. The job's processes must all be gone a few seconds after it ends."""
    proc = subprocess.Popen(["bash", str(RECIPE)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=30)
        pytest.fail(f"the recipe ran past {JOB_TIMEOUT_S} s\n--- stdout\n{stdout[-3000:]}\n--- stderr\n"
                    f"{stderr[-3000:]}\n{_logs(job_dir, tmp_path)}")
    finally:
        lingering = _wait_for_no_processes(env["SLURM_JOB_ID"], proc.pid, timeout_s=10)
        for p in lingering:  # never leave them behind, whatever the assertions say
            try:
                p.kill()
            except psutil.Error:
                pass
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    result.lingering = [(p.pid, _cmdline(p)) for p in lingering]
    result.logs = _logs(job_dir, tmp_path)
    return result


def _wait_for_no_processes(job_id: str, sid: int, timeout_s: float) -> list[psutil.Process]:
    deadline = time.time() + timeout_s
    while True:
        left = _job_processes(job_id, sid)
        if not left or time.time() > deadline:
            return left
        time.sleep(0.25)


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:200]
    except psutil.Error:
        return "?"


def _steps(tmp_path: Path) -> dict[int, list[dict]]:
    steps: dict[int, list[dict]] = {}
    for line in (tmp_path / "srun.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("task") is not None:
            steps.setdefault(record["step"], []).append(record)
    return steps


def _explain(result) -> str:
    return (f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}\n"
            f"{result.logs}")


def test_the_slurm_recipe_runs_end_to_end_on_cpu_workers_with_a_standin_srun(tmp_path):
    data, curated, job_dir = tmp_path / "data", tmp_path / "curated", tmp_path / "job"
    make_sample_dataset(data, n_shards=N_SHARDS, samples_per_shard=SAMPLES_PER_SHARD)
    job_id = f"standin-{uuid.uuid4().hex[:12]}"
    env = _job_env(tmp_path, _bin_with_srun(tmp_path / "bin"), job_id,
                   INPUT=str(data), OUTPUT=str(curated), JOB_DIR=str(job_dir), VENV=str(Path(sys.executable).parents[1]),
                   WORKER="cpu", CPU_WORKERS_PER_NODE=str(WORKERS_PER_NODE), CPU_THREADS_PER_WORKER="1",
                   BATCH_SIZE="4", SCHEDULER_PORT="0", CURATE_ARGS="--smoke --threads 1",
                   HF_HOME=str(tmp_path / "hf"), NEMO_CURATOR_HOME=str(tmp_path / "nemo"))
    result = run_recipe(tmp_path, env, job_dir)
    explain = _explain(result)
    assert result.returncode == 0, explain
    assert "SMOKE MODE" in result.stdout and "curated samples" in result.stdout, explain

    # the steps: the scheduler once, on node 0; one `dask worker` per node, NODES nodes
    steps = _steps(tmp_path)
    assert len(steps) == 2, explain
    scheduler_step, worker_step = steps[0], steps[1]
    assert [(t["task"], t["node"]) for t in scheduler_step] == [(0, 0)], explain
    assert scheduler_step[0]["argv"][:2] == ["dask", "scheduler"], explain
    assert sorted(t["node"] for t in worker_step) == list(range(NODES)), explain
    assert all(t["argv"][:2] == ["dask", "worker"] and "--nworkers" in t["argv"] for t in worker_step), explain

    # every worker joined: the job waited for NODES x WORKERS_PER_NODE, and the scheduler saw them
    scheduler_log, workers_log = (job_dir / "scheduler.log").read_text(), (job_dir / "workers.log").read_text()
    registered = {line.split("Register worker")[1].split(",")[0] for line in scheduler_log.splitlines()
                  if "Register worker" in line}
    assert len(registered) == NODES * WORKERS_PER_NODE, explain
    assert workers_log.count("Registered to:") == NODES * WORKERS_PER_NODE, explain
    assert "Scheduler at:     tcp://" in scheduler_log, explain

    # the input parquets gained an embedding and both scores for every row
    for s in range(N_SHARDS):
        frame = pd.read_parquet(data / f"{s:05d}.parquet")
        assert len(frame) == SAMPLES_PER_SHARD
        assert (frame.image_status == "ok").all(), frame
        assert frame.aesthetic_score.notna().all() and frame.nsfw_score.between(0, 1).all(), frame
        assert all(len(e) == 768 for e in frame.image_embedding)

    # the curated shards: some samples kept, some dropped, each tar holding its parquet's samples
    tars = sorted(curated.glob("*.tar"))
    assert tars, explain
    kept = pd.concat([pd.read_parquet(t.with_suffix(".parquet")) for t in tars])
    assert 0 < len(kept) < N_SHARDS * SAMPLES_PER_SHARD
    for tar in tars:
        with tarfile.open(tar) as tf:
            keys = {Path(m.name).stem for m in tf.getmembers() if m.name.endswith(".jpg")}
        assert keys == set(pd.read_parquet(tar.with_suffix(".parquet")).key), tar

    # the script stopped its background steps: no scheduler, worker or srun left
    assert not result.lingering, f"left running after the script: {result.lingering}\n{explain}"
    assert "End scheduler" in scheduler_log and workers_log.count("End worker") == NODES, explain
    assert not (job_dir / "scheduler.json").exists()  # the scheduler removes its file when it closes


FAKE_VENV_ACTIVATE = 'export PATH="{bin}:$PATH"\n'
FAKE_DASK = """#!/bin/bash
# records its command line; `dask scheduler` writes the scheduler file, then waits to be stopped
echo "dask $*" >>"{log}"
if [ "$1" = scheduler ]; then
    while [ $# -gt 0 ]; do [ "$1" = --scheduler-file ] && echo '{{"address": "tcp://127.0.0.1:1"}}' >"$2"; shift; done
fi
trap 'echo "stopped $PPID" >>"{log}"; exit 0' TERM
while true; do sleep 0.2; done
"""
FAKE_PYTHON = """#!/bin/bash
# records its command line once every worker step's task has started (up to 30 s), as a job would run
for _ in $(seq 150); do [ "$(grep -c '^dask cuda worker' "{log}")" -ge {nodes} ] && break; sleep 0.2; done
echo "python $*" >>"{log}"
"""


def test_the_gpu_form_stays_the_default(tmp_path):
    """Without WORKER the recipe starts `dask cuda worker` once per node, with the RMM pool, and
    waits for nodes x SLURM_GPUS_ON_NODE workers; the steps are stopped when the script ends."""
    venv, log = tmp_path / "venv", tmp_path / "commands.log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(FAKE_VENV_ACTIVATE.format(bin=venv / "bin"))
    for name, text in (("dask", FAKE_DASK), ("python", FAKE_PYTHON)):
        (venv / "bin" / name).write_text(text.format(log=log, nodes=NODES))
        (venv / "bin" / name).chmod(0o755)
    job_dir = tmp_path / "job"
    env = _job_env(tmp_path, _bin_with_srun(tmp_path / "bin"), f"standin-{uuid.uuid4().hex[:12]}",
                   INPUT="/data/in", OUTPUT="/data/out", JOB_DIR=str(job_dir), VENV=str(venv), SLURM_GPUS_ON_NODE="8")
    result = run_recipe(tmp_path, env, job_dir)
    assert result.returncode == 0, _explain(result)
    lines = log.read_text().splitlines()
    scheduler_file = str(job_dir / "scheduler.json")
    assert [line for line in lines if line.startswith("dask scheduler")] == [
        f"dask scheduler --scheduler-file {scheduler_file} --protocol tcp --port 8786 --dashboard-address 127.0.0.1:8787"]
    workers = [line for line in lines if line.startswith("dask cuda worker")]
    assert len(workers) == NODES and len(set(workers)) == 1, lines  # one per node, the same command
    assert workers[0].startswith(f"dask cuda worker --scheduler-file {scheduler_file} --rmm-pool-size 24GB "), lines
    assert workers[0].endswith(f" --local-directory {tmp_path / 'tmp'}") and "--nworkers" not in workers[0], lines
    assert [line for line in lines if line.startswith("python")] == [
        f"python examples/curate.py /data/in /data/out --scheduler-file {scheduler_file} "
        f"--wait-for-workers {NODES * 8} --batch-size 512"], lines
    assert sum(line.startswith("stopped") for line in lines) == 1 + NODES, lines  # every step got SIGTERM
    assert not result.lingering, result.lingering


def test_an_unknown_worker_kind_is_refused(tmp_path):
    env = _job_env(tmp_path, _bin_with_srun(tmp_path / "bin"), f"standin-{uuid.uuid4().hex[:12]}",
                   INPUT="/x", OUTPUT="/y", JOB_DIR=str(tmp_path / "job"), WORKER="tpu")
    done = subprocess.run(["bash", str(RECIPE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "WORKER must be gpu or cpu" in done.stderr, done.stderr
