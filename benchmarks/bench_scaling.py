"""Benchmark 3: scaling on one machine, end to end with 2 Dask workers against 1.

    .venv/bin/python benchmarks/bench_scaling.py [--quick]

The job of benchmark 2 (tiny CLIP model + both heads, shards -> parquet) on the same photos,
every worker with 1 DALI thread and 1 torch thread:
- pinned: worker ``i`` and all its threads on core ``i``: does throughput grow with the cores
  given to it? (the question for a machine with many cores and one worker per core);
- free: the same clusters unpinned: one worker already spreads its DALI and torch threads over
  both cores, so a second worker has less to add.
The two clusters of a pair (1 worker, 2 workers) run round-robin, started once, the other pair's
clusters closed; every worker runs a warm-up task and model loading is outside the timings.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from bench_cpu_end_to_end import Runner, dataset_for, measure  # noqa: E402
from common import fmt_rate, load_average, log, md_table  # noqa: E402


def main(argv=None):
    common.quiet_logs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and one repeat (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    cores = os.cpu_count() or 1
    folder = dataset_for(args.quick)
    load0 = load_average()
    results = {}
    with tempfile.TemporaryDirectory(prefix="nemo-bench-scaling-") as out_root:
        for pin in (True, False):  # one pair of clusters alive at a time: idle clusters cost CPU too
            runner = Runner(folder, out_root)
            try:
                cases = {}
                for workers in (1, cores):
                    label = f"{workers} worker{'s' if workers > 1 else ''}, {'pinned, one core each' if pin else 'not pinned'}"
                    cases[label] = runner.ours(f"scale-{workers}-{pin}", workers, 1, 1, pin=pin)
                log(f"scaling: {len(runner.tars)} shards of {folder.name}")
                results.update(measure(cases, runner, repeats))
            finally:
                runner.close()
    load1 = load_average()
    rows = []
    for pinned in (True, False):
        group = {k: v for k, v in results.items() if ("not pinned" in k) != pinned}
        one = next(v for k, v in group.items() if k.startswith("1 worker,"))
        for name, r in group.items():
            rows.append([name, fmt_rate(r["rate"]), f"{r['cpu_ms_per_image']:.2f}",
                         f"{r['rate']['median'] / one['rate']['median']:.2f}×"])
    md = (f"### 3. Scaling on one machine ({cores} cores; {results[next(iter(results))]['images']} photos ~500x375 in "
          f"{len(runner.tars)} shards; each worker: 1 DALI thread, 1 torch thread; {repeats} runs each, round-robin; "
          f"load average {load0:.1f} → {load1:.1f})\n\n"
          + md_table(["cluster", "images/s median (min–max)", "CPU ms/image", "vs 1 worker"], rows))
    common.save_result("scaling", {"results": results, "load_average": [load0, load1]}, md)


if __name__ == "__main__":
    main()
