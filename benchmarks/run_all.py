"""Run every benchmark, one after the other (what ``make bench`` calls).

    .venv/bin/python benchmarks/run_all.py [--quick | --full] [--only cpu_preprocess,memory,...]

Each benchmark runs in its own process, prints its Markdown table and writes
``benchmarks/_data/results/<name>.json``; this script then writes all the tables, with the
machine and versions, to ``benchmarks/_data/results/summary.md``. The GPU benchmark skips
itself on a machine without CUDA, the clip-retrieval one without clip-retrieval's virtualenv
(``bash benchmarks/clip_retrieval/setup.sh``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

BENCHMARKS = {  # result name -> script
    "cpu_preprocess": "bench_cpu_preprocess.py",
    "cpu_end_to_end": "bench_cpu_end_to_end.py",
    "clip_retrieval": "bench_clip_retrieval.py",  # skips itself without benchmarks/clip_retrieval/setup.sh's venv
    "scaling": "bench_scaling.py",
    "memory": "bench_memory.py",
    "gpu": "bench_gpu.py",
    "shard_cost": "bench_shard_cost.py",
    "multi_machine": "bench_multi_machine.py",
    "client_scale": "bench_client_scale.py",
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke runs: fewer images, one repeat")
    ap.add_argument("--full", action="store_true", help="benchmark 1 with its knob sweep and per-change ablation too, "
                    "the clip-retrieval one with its settings sweep")
    ap.add_argument("--only", default="", help="comma-separated names among " + ", ".join(BENCHMARKS))
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        ap.error(f"unknown benchmarks {sorted(unknown)}; choose among {list(BENCHMARKS)}")
    failed = []
    for name in names:
        cmd = [sys.executable, os.path.join(HERE, BENCHMARKS[name])]
        if args.quick and name != "gpu":
            cmd.append("--quick")
        if args.full and name == "cpu_preprocess":
            cmd += ["--knobs", "--ablation"]
        if args.full and name == "clip_retrieval":
            cmd.append("--sweep")
        common.log(f"=== {name}: {' '.join(cmd)}")
        t0 = time.time()
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        common.log(f"=== {name}: {time.time() - t0:.0f} s")
    parts = [common.header_md(common.machine_info())]
    for name in names:
        path = common.RESULTS_DIR / f"{name}.json"
        if path.exists() and name not in failed:
            parts.append(json.loads(path.read_text())["markdown"])
    summary = "\n\n".join(parts) + "\n"
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / "summary.md").write_text(summary)
    print("\n" + summary)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
