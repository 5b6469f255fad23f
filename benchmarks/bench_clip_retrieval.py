"""Headline: end to end against the real clip-retrieval (``clip_inference``), same shards, cores and model.

    bash benchmarks/clip_retrieval/setup.sh          # once: clip-retrieval's own virtualenv (~6 GB)
    .venv/bin/python benchmarks/bench_clip_retrieval.py [--quick] [--repeats N] [--sweep]

The job: webdataset shards of ~500x375 photographs -> the tiny CLIP-shaped ViT (the CLIP ViT-L/14
architecture shrunk to 2 blocks of width 64, the same random weights for both: one safetensors
checkpoint) -> L2-normalised 768-d embeddings -> the real aesthetic and NSFW heads -> files.
Round-robin after a warm-up of every case, model loading and cluster start outside the timings:

- ours: ``ImageTextPairDataset.from_webdataset`` -> ``TimmImageEmbedder(checkpoint_path=...,
  classifiers=[both])`` -> ``save_metadata`` on a real ``LocalCluster`` of 2 workers (1 DALI
  thread, 1 torch thread each: benchmark 2's best layout);
- clip-retrieval: its real ``clip_inference`` (``input_format="webdataset"``: webdataset reader,
  PIL decode + CLIP preprocess in a torch DataLoader, its ClipMapper and NumpyWriter), run in its
  own virtualenv (``benchmarks/clip_retrieval/runner.py``, a long-lived process, so that its model
  is loaded once, as ours), with the model given through all_clip's loader registry; then both
  heads, applied as ours applies them (``ImageClassifier.score_tensor`` on the normalised
  embeddings), to the embeddings it wrote, and the scores written next to its metadata: all of it
  inside its timing. Its settings: the best of ``--sweep`` on this machine (printed in the table);
- the hand-written peer of benchmark 2 (PIL DataLoader + model + pandas), as a second row;
- "small call" rows: the same two tools on 2 shards of 16 photos, for their fixed cost per call
  (clip_inference spawns two logger processes that import clip_retrieval, ~7 CPU s each); the
  "marginal" columns are (images - 32) / (seconds - small call's seconds).

Then the embeddings of the same sample ids are compared (ours against clip-retrieval's, both
against a float32 PIL reference on the first shard that separates the decoder's share from the
float16 storage of clip-retrieval) and the scores.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import (DATA_DIR, MODEL_NAME, ROOT, SIZES, TINY_MODEL_KWARGS, classifier_heads, cpu_seconds,  # noqa: E402
                    fmt_rate, load_average, log, md_table, photo_dataset, tars_of)

CLIP_VENV = Path(os.environ.get("NEMO_BENCH_CLIP_RETRIEVAL_VENV", DATA_DIR / "clip-retrieval-venv"))
RUNNER = ROOT / "benchmarks" / "clip_retrieval" / "runner.py"
WORK_DIR = DATA_DIR / "clip_retrieval"
CHECKPOINT = WORK_DIR / "tiny_clip_seed0.safetensors"
OURS_BATCH = 32
# clip-retrieval's settings on 2 cores (a first sweep, one run each, on a loaded machine; rerun
# --sweep to check): batch 32 (133 images/s; 256: 55-89, with 8x the memory per batch),
# 2 DataLoader workers (one per core; 1 worker: 43; its default is 4), torch 1 thread in its main
# process (2 threads oversubscribe the cores the DataLoader workers use: 64 images/s, and 20.2
# against 12.9 CPU ms/image in a second pair of runs)
PEER_SETTINGS = {"batch_size": 32, "num_prepro_workers": 2, "torch_threads": 1}
SWEEP = [  # (batch_size, num_prepro_workers, torch_threads); (256, 4, cores) are clip_inference's defaults
    (32, 2, 1), (32, 2, 2), (256, 2, 1), (256, 2, 2), (32, 1, 1), (32, 3, 1), (256, 4, 2),
]
SETUP_HINT = "bash benchmarks/clip_retrieval/setup.sh"


# ------------------------------------------------------------------------------------------------
def tiny_checkpoint() -> Path:
    """The tiny CLIP-shaped model's weights (seed 0), saved once as safetensors for both tools."""
    if CHECKPOINT.exists():
        return CHECKPOINT
    import timm
    import torch
    from safetensors.torch import save_file

    WORK_DIR.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model(MODEL_NAME, pretrained=False, **TINY_MODEL_KWARGS)
    tmp = CHECKPOINT.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, CHECKPOINT)
    return CHECKPOINT


def venv_python() -> Path | None:
    python = CLIP_VENV / "bin" / "python"
    return python if python.exists() else None


class ClipRetrieval:
    """The runner in clip-retrieval's virtualenv, one long-lived process (JSON lines)."""

    def __init__(self, python: Path, settings: dict):
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = WORK_DIR / "runner.log"
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the process
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        env["PYTHONWARNINGS"] = "ignore"
        self.proc = subprocess.Popen([str(python), str(RUNNER), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log_file, text=True, cwd=str(WORK_DIR), env=env)
        self.settings = dict(settings)
        self.ask({"cmd": "config", "config": {"model_name": MODEL_NAME, "model_kwargs": TINY_MODEL_KWARGS,
                                              "checkpoint": str(tiny_checkpoint()), **self.settings}})
        self.versions = self.ask({"cmd": "versions"})["versions"]

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"clip-retrieval runner died; see {self.log_path}:\n{self._log_tail()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"clip-retrieval runner: {reply.get('error')}; see {self.log_path}:\n{self._log_tail()}")
        return reply

    def _log_tail(self, n: int = 3000) -> str:
        self.log_file.flush()
        return self.log_path.read_text()[-n:]

    def run(self, tars, out: str, settings: dict | None = None) -> dict:
        return self.ask({"cmd": "run", "tars": list(tars), "out": out, "config": settings or {}})

    def close(self):
        try:
            self.ask({"cmd": "exit"})
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self.log_file.close()


def score_clip_retrieval_output(out: str, heads) -> int:
    """Both heads on the embeddings clip_inference wrote (``img_emb/*.npy``, float16, L2-normalised),
    as our embedder applies them (``score_tensor``); scores written beside its metadata. Returns rows."""
    import numpy as np
    import pandas as pd
    import torch

    emb_files = sorted(Path(out, "img_emb").glob("img_emb_*.npy"))
    meta_files = sorted(Path(out, "metadata").glob("metadata_*.parquet"))
    os.makedirs(os.path.join(out, "scored"), exist_ok=True)
    rows = 0
    with torch.inference_mode():
        for emb_file, meta_file in zip(emb_files, meta_files):
            emb = torch.from_numpy(np.load(emb_file).astype(np.float32))
            meta = pd.read_parquet(meta_file)
            for clf, head in heads:
                meta[clf.pred_column] = clf.score_tensor(head, emb).numpy()
            meta.to_parquet(os.path.join(out, "scored", meta_file.name))
            rows += len(meta)
    return rows


def clip_retrieval_case(peer: ClipRetrieval, tars, out: str, heads, settings: dict | None = None):
    def run():
        r = peer.run(tars, out, settings)
        c0 = cpu_seconds()
        rows = score_clip_retrieval_output(out, heads)
        heads_cpu = cpu_seconds() - c0
        return {"images": rows, "cpu_s": r["cpu_s"] + heads_cpu, "heads_cpu_s": heads_cpu,
                "inner_seconds": r["seconds"], "first_batch_s": r["first_batch_s"],
                "steady_images_per_s": r["steady_images_per_s"]}

    return run


# ------------------------------------------------------------------------------------------------
# Parity
def load_ours(out: str) -> dict:
    import numpy as np
    import pandas as pd

    frame = pd.concat([pd.read_parquet(p) for p in sorted(Path(out).glob("*.parquet"))], ignore_index=True)
    return {"keys": frame["key"].tolist(), "emb": np.stack(frame["image_embedding"].to_numpy()).astype(np.float32),
            "aesthetic_score": frame["aesthetic_score"].to_numpy(), "nsfw_score": frame["nsfw_score"].to_numpy()}


def load_clip_retrieval(out: str) -> dict:
    import numpy as np
    import pandas as pd

    emb = np.concatenate([np.load(p) for p in sorted(Path(out, "img_emb").glob("img_emb_*.npy"))])
    frame = pd.concat([pd.read_parquet(p) for p in sorted(Path(out, "scored").glob("*.parquet"))], ignore_index=True)
    return {"keys": frame["image_path"].tolist(), "emb": emb.astype(np.float32),
            "aesthetic_score": frame["aesthetic_score"].to_numpy(), "nsfw_score": frame["nsfw_score"].to_numpy()}


def pil_reference(tar: str) -> dict:
    """float32 embeddings of one shard through PIL + the timm transform + the checkpoint model, unrounded."""
    import numpy as np
    import timm
    import torch

    model = timm.create_model(MODEL_NAME, pretrained=True, pretrained_cfg_overlay={"file": str(CHECKPOINT)},
                              **TINY_MODEL_KWARGS).eval()
    keys, embs = [], []
    with torch.inference_mode():
        for batch_keys, batch in common.peer_loader([tar], common.timm_eval_transform(), OURS_BATCH, num_workers=0):
            embs.append(torch.nn.functional.normalize(model(batch).float(), dim=-1).numpy())
            keys.extend(batch_keys)
    return {"keys": keys, "emb": np.concatenate(embs)}


def compare(a: dict, b: dict, scores: bool = True) -> dict:
    import numpy as np

    index_b = {k: i for i, k in enumerate(b["keys"])}
    common_keys = [k for k in a["keys"] if k in index_b]
    ia = np.array([i for i, k in enumerate(a["keys"]) if k in index_b])
    ib = np.array([index_b[k] for k in common_keys])
    ea, eb = a["emb"][ia], b["emb"][ib]
    cos = (ea * eb).sum(1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))
    out = {"rows_a": len(a["keys"]), "rows_b": len(b["keys"]), "common": len(common_keys),
           "max_abs_diff": float(np.abs(ea - eb).max()), "mean_abs_diff": float(np.abs(ea - eb).mean()),
           "min_cosine": float(cos.min()), "median_cosine": float(np.median(cos))}
    if scores:
        for col in ("aesthetic_score", "nsfw_score"):
            out[f"{col}_max_abs_diff"] = float(np.abs(a[col][ia] - b[col][ib]).max())
    return out


# ------------------------------------------------------------------------------------------------
def sweep(peer: ClipRetrieval, tars, out_root: str, heads, repeats: int) -> dict:
    cases = {f"batch {b}, {w} DataLoader workers, torch {t} thread{'s' if t > 1 else ''}":
             clip_retrieval_case(peer, tars, os.path.join(out_root, "sweep"), heads,
                                 {"batch_size": b, "num_prepro_workers": w, "torch_threads": t})
             for b, w, t in SWEEP}
    return common.summarize_runs(common.interleave(cases, repeats=repeats, warmup=True))


def fmt_load(load: dict) -> str:
    return f"1-min load average {load['min']:.1f}–{load['max']:.1f}, median {load['median']:.1f}"


def sweep_md(sweep_results: dict, n_tars: int, folder, load: dict) -> str:
    r0 = next(iter(sweep_results.values()))
    rows = [[name, fmt_rate(r["rate"]), f"{r['cpu_ms_per_image']:.2f}"] for name, r in sweep_results.items()]
    return (f"#### clip-retrieval's settings on {os.cpu_count()} cores (clip_inference + heads alone, {r0['images']} "
            f"photos in {n_tars} shards of {Path(folder).name}, {r0['rate']['runs']} runs each after a warm-up, "
            f"round-robin; {fmt_load(load)})\n\n"
            + md_table(["clip_inference settings", "images/s median (min–max)", "CPU ms/image"], rows))


class LoadSampler:
    """The 1-minute load average every 5 s while the benchmark runs (the machine is shared)."""

    def __init__(self, interval_s: float = 5.0):
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="load-sampler", daemon=True)
        self._thread.start()

    def _loop(self, interval_s):
        while True:
            self.samples.append(load_average())
            if self._stop.wait(interval_s):
                return

    def stop(self) -> dict:
        import statistics

        self._stop.set()
        self._thread.join()
        s = self.samples
        return {"min": min(s), "median": statistics.median(s), "max": max(s), "samples": len(s)}


def skip(reason: str) -> int:
    log(reason)
    common.save_result("clip_retrieval", {"skipped": reason}, f"### Against clip-retrieval\n\nSkipped: {reason}")
    return 0


def main(argv=None) -> int:
    common.quiet_logs()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 shards of 64 photos, one repeat (a smoke run)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true", help="first, clip-retrieval alone in the settings of SWEEP")
    ap.add_argument("--sweep-only", action="store_true", help="only the settings sweep (results: clip_retrieval_sweep.json)")
    ap.add_argument("--no-hand-peer", action="store_true", help="skip benchmark 2's hand-written peer row")
    args = ap.parse_args(argv)
    python = venv_python()
    if python is None:
        return skip(f"clip-retrieval's virtualenv {CLIP_VENV} is absent: run `{SETUP_HINT}` first")
    repeats = 1 if args.quick else args.repeats
    cores = os.cpu_count() or 1
    n_shards, per_shard = (2, 64) if args.quick else (4, 1000)
    folder = photo_dataset("photos_500x375", SIZES["500x375"], n_shards, per_shard, write_index=True)
    small = photo_dataset("photos_500x375", SIZES["500x375"], 2, 16, write_index=True)
    tars, small_tars = tars_of(folder), tars_of(small)
    tiny_checkpoint()

    from bench_cpu_end_to_end import Runner, measure  # noqa: E402  (its cases and warm-up)

    from nemo_curator.image.embedders import TimmImageEmbedder

    heads = [(clf, clf.load_model("cpu").eval()) for clf in classifier_heads()]
    sampler = LoadSampler()
    peer = ClipRetrieval(python, PEER_SETTINGS)
    sweep_results = None
    settings_txt = (f"batch {PEER_SETTINGS['batch_size']}, {PEER_SETTINGS['num_prepro_workers']} DataLoader workers, "
                    f"torch {PEER_SETTINGS['torch_threads']} thread")
    try:
        with tempfile.TemporaryDirectory(prefix="nemo-bench-clipret-") as out_root:
            if args.sweep or args.sweep_only:
                log(f"clip-retrieval settings sweep: {len(tars)} shards of {folder.name}")
                sweep_results = sweep(peer, tars, out_root, heads, max(1, repeats // 2))
                if args.sweep_only:
                    load = sampler.stop()
                    md = sweep_md(sweep_results, len(tars), folder, load)
                    common.save_result("clip_retrieval_sweep", {"sweep": sweep_results, "load_average": load}, md)
                    return 0
            runner = Runner(folder, out_root)
            try:
                ours_cls = functools.partial(TimmImageEmbedder, checkpoint_path=str(CHECKPOINT))
                ours_name = f"ours: {cores} workers, DALI 1 thread, torch 1 thread each"
                cr_name = f"clip-retrieval clip_inference ({settings_txt}) + heads"
                cr_out = os.path.join(out_root, "clip-retrieval")
                cases = {
                    cr_name: clip_retrieval_case(peer, tars, cr_out, heads),
                    ours_name: runner.ours("ours-2w", cores, 1, 1, cls=ours_cls),
                }
                if not args.no_hand_peer:
                    cases[f"hand-written peer (benchmark 2): PIL DataLoader ({cores} workers) + model (torch {cores} "
                          f"threads) + pandas"] = runner.peer("peer", cores, cores)
                ours_fn = cases[ours_name]
                cases[f"small call: clip-retrieval on {len(small_tars)} x 16 photos"] = clip_retrieval_case(
                    peer, small_tars, os.path.join(out_root, "clip-retrieval-small"), heads)
                cases[f"small call: ours on {len(small_tars)} x 16 photos"] = functools.partial(
                    _ours_on, runner, ours_fn, small, os.path.join(out_root, "small"))
                log(f"against clip-retrieval: {len(tars)} shards of {folder.name}")
                results = measure(cases, runner, repeats)
                log("parity: embeddings and scores of the same sample ids")
                ours_out = load_ours(os.path.join(out_root, "ours-2w"))
                theirs = load_clip_retrieval(cr_out)
                reference = pil_reference(tars[0])
                parity = {"ours_vs_clip_retrieval": compare(ours_out, theirs),
                          "ours_vs_pil_fp32_first_shard": compare(ours_out, reference, scores=False),
                          "clip_retrieval_vs_pil_fp32_first_shard": compare(theirs, reference, scores=False)}
            finally:
                runner.close()
    finally:
        versions = peer.versions
        peer.close()
    load = sampler.stop()
    return report(results, parity, sweep_results, versions, folder, tars, repeats, load, cr_name, ours_name)


def _ours_on(runner, ours_fn, folder, out_root):
    """Our case on another dataset folder, written under another root (``ours_fn`` reads
    ``runner.folder``, ``runner.tars`` and ``runner.out_root`` when it runs)."""
    saved = runner.folder, runner.tars, runner.out_root
    os.makedirs(out_root, exist_ok=True)
    runner.folder, runner.tars, runner.out_root = str(folder), tars_of(folder), out_root
    try:
        return ours_fn()
    finally:
        runner.folder, runner.tars, runner.out_root = saved


# Embeddings: clip-retrieval stores them as float16 (ClipMapper), half an ulp of which is up to
# 1.2e-4 for the entries of a unit vector below 0.5 (2.4e-4 below 1), and the decoders differ (DALI against PIL,
# both libjpeg-turbo; resize and crop agree to rounding, tests/image/test_transforms.py); the
# tolerance is 4x the larger rounding, and a cosine at which no ranking or threshold would move.
TOLERANCE = {"min_cosine": 0.9999, "max_abs_diff": 1e-3}


def report(results, parity, sweep_results, versions, folder, tars, repeats, load, cr_name, ours_name) -> int:
    cores = os.cpu_count() or 1
    cr = results[cr_name]
    small_cr = next(v for k, v in results.items() if k.startswith("small call: clip-retrieval"))
    small_ours = next(v for k, v in results.items() if k.startswith("small call: ours"))

    def marginal(r, small_r):
        import statistics

        extra = r["images"] - small_r["images"]
        dt = statistics.median(r["seconds"]) - statistics.median(small_r["seconds"])
        cpu = r["cpu_ms_per_image"] * r["images"] - small_r["cpu_ms_per_image"] * small_r["images"]
        return extra / dt, cpu / extra

    rows = []
    for name, r in results.items():
        m = ""
        if name == cr_name:
            m = marginal(r, small_cr)
        elif name == ours_name:
            m = marginal(r, small_ours)
        ratio = "" if name.startswith("small call") else f"{r['rate']['median'] / cr['rate']['median']:.2f}×"
        rows.append([name, fmt_rate(r["rate"]), f"{r['cpu_ms_per_image']:.2f}", ratio,
                     f"{m[0]:.0f}" if m else "", f"{m[1]:.2f}" if m else ""])
        if m:
            r["marginal_images_per_s"], r["marginal_cpu_ms_per_image"] = m
    p = parity["ours_vs_clip_retrieval"]
    ok = p["min_cosine"] >= TOLERANCE["min_cosine"] and p["max_abs_diff"] <= TOLERANCE["max_abs_diff"]
    prow = []
    for label, key in (("ours vs clip-retrieval (all images)", "ours_vs_clip_retrieval"),
                       ("ours vs PIL float32 reference (first shard)", "ours_vs_pil_fp32_first_shard"),
                       ("clip-retrieval vs PIL float32 reference (first shard)", "clip_retrieval_vs_pil_fp32_first_shard")):
        q = parity[key]
        prow.append([label, f"{q['common']} of {q['rows_a']}/{q['rows_b']}", f"{q['max_abs_diff']:.2e}",
                     f"{q['mean_abs_diff']:.1e}", f"{1 - q['min_cosine']:.1e}",
                     f"{q['aesthetic_score_max_abs_diff']:.1e}" if "aesthetic_score_max_abs_diff" in q else "",
                     f"{q['nsfw_score_max_abs_diff']:.1e}" if "nsfw_score_max_abs_diff" in q else ""])
    vs = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    md = (f"### Against clip-retrieval ({cores} cores; {cr['images']} photos ~500x375 in {len(tars)} shards; tiny CLIP "
          f"ViT (same checkpoint) + aesthetic + NSFW heads; {repeats} runs each, round-robin; {fmt_load(load)})\n\n"
          + md_table(["pipeline", "images/s median (min–max)", "CPU ms/image", "vs clip-retrieval",
                      "marginal images/s", "marginal CPU ms/image"], rows)
          + f"\n\nclip-retrieval's virtualenv: {vs}.\n\nEmbeddings and scores of the same sample ids (tolerance "
          f"ours vs clip-retrieval: cosine ≥ {TOLERANCE['min_cosine']}, max abs diff ≤ {TOLERANCE['max_abs_diff']:g}: "
          f"{'holds' if ok else 'DOES NOT HOLD'}):\n\n"
          + md_table(["compared", "ids in common", "max abs diff", "mean abs diff", "1 − min cosine",
                      "aesthetic max abs diff", "NSFW max abs diff"], prow))
    if sweep_results:
        md += "\n\n" + sweep_md(sweep_results, len(tars), folder, load)
    common.save_result("clip_retrieval", {"results": results, "parity": parity, "tolerance": TOLERANCE,
                                          "parity_holds": ok, "sweep": sweep_results, "clip_retrieval_settings":
                                          PEER_SETTINGS, "clip_retrieval_versions": versions,
                                          "load_average": load}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
