"""Run clip-retrieval's real ``clip_inference`` on webdataset shards with a timm model.

Runs inside clip-retrieval's own virtualenv (``benchmarks/clip_retrieval/setup.sh``), never in the
project's: it imports nothing from ``nemo_curator``.

    <venv>/bin/python benchmarks/clip_retrieval/runner.py run --config '{...}' --tars a.tar b.tar --out DIR  # JSON on stdout
    <venv>/bin/python benchmarks/clip_retrieval/runner.py serve    # JSON requests on stdin, one per line

How the model gets in: clip-retrieval loads its model with ``all_clip.load_clip`` (in
``clip_inference.worker.reader_builder`` for the preprocess and in ``clip_inference.mapper.ClipMapper``
for the model), and ``all_clip`` picks a loader from its registry ``all_clip.main._CLIP_REGISTRY``
by the prefix of ``clip_model`` ("open_clip:", "hf_clip:", ...: its documented way of adding a model
family). This module adds one loader, for the prefix ``"timm:"``, at the front of that registry and
nothing else: ``clip_inference.main`` -> its ``SequentialDistributor`` -> ``worker`` -> ``Runner``
with its ``WebdatasetReader`` (``webdataset.WebDataset`` + PIL decode + the preprocess, in a torch
``DataLoader``), ``ClipMapper`` (normalise, float16) and ``NumpyWriter`` all run unchanged, and
``all_clip.load_clip`` keeps its own caching and warm-up. The loader builds
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": checkpoint}, **model_kwargs)``
(the call ``TimmImageEmbedder(checkpoint_path=...)`` makes) and returns as preprocess
``timm.data.create_transform(**resolve_data_config({}, model=model))`` with CLIP's RGB conversion
put where CLIP's own preprocess has it (after the centre crop): for the CLIP ViT-L/14 config this
is CLIP's preprocess (resize 224 bicubic, centre crop 224, RGB, to tensor, CLIP mean/std).

Each run reports its wall time, the CPU seconds of this process and of every child it reaped
(the DataLoader workers, the logger processes clip_inference spawns) and, from the model calls,
the time to the first batch and the rate between the first and the last batch.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# calls of the model's encode_image in the current run: (end time, batch size)
_CALLS: list = []


def _cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def make_timm_loader(model_kwargs: dict, checkpoint: str, embed_dim: int = 768):
    """An ``all_clip`` loader: ``(clip_model, use_jit, device, clip_cache_path) -> (model, preprocess, tokenizer)``."""

    def load_timm_clip(clip_model, use_jit, device, clip_cache_path):  # noqa: ARG001 (all_clip's signature)
        import timm
        import torch
        import torchvision.transforms as T
        from timm.data import create_transform, resolve_data_config

        visual = timm.create_model(clip_model, pretrained=True, pretrained_cfg_overlay={"file": checkpoint},
                                   **model_kwargs).eval().to(device)
        transform = create_transform(**resolve_data_config({}, model=visual))
        steps = list(transform.transforms)
        at = next(i for i, s in enumerate(steps) if type(s).__name__ in ("MaybeToTensor", "ToTensor"))
        preprocess = T.Compose(steps[:at] + [_convert_image_to_rgb] + steps[at:])

        class TimmClip(torch.nn.Module):
            """What clip-retrieval needs of a CLIP model: ``encode_image`` and ``encode_text``."""

            def __init__(self):
                super().__init__()
                self.visual = visual

            def encode_image(self, images):
                out = self.visual(images)
                _CALLS.append((time.perf_counter(), int(images.shape[0])))
                return out

            def encode_text(self, tokens):  # only all_clip's warm-up calls it (enable_text=False)
                return torch.zeros(tokens.shape[0], embed_dim, device=tokens.device)

        def tokenizer(texts):
            return torch.zeros(len(texts), 77, dtype=torch.long)

        return TimmClip().eval(), preprocess, tokenizer

    return load_timm_clip


def _convert_image_to_rgb(image):  # as in CLIP's own preprocess (clip/clip.py)
    return image.convert("RGB")


def register(model_kwargs: dict, checkpoint: str) -> None:
    """Put the ``"timm:"`` loader at the front of all_clip's registry (its prefixes are tried in order)."""
    import all_clip.main

    registry = all_clip.main._CLIP_REGISTRY
    others = [(k, v) for k, v in registry.items() if k != "timm:"]
    registry.clear()
    registry["timm:"] = make_timm_loader(model_kwargs, checkpoint)
    registry.update(others)


def brace_list(tars: list[str]) -> str:
    """clip_inference's ``input_dataset`` for webdataset: one brace-expandable string."""
    if len(tars) == 1:
        return tars[0]
    folder = os.path.dirname(tars[0])
    if all(os.path.dirname(t) == folder for t in tars):
        return f"{folder}/{{{','.join(os.path.basename(t) for t in tars)}}}"
    return "{" + ",".join(tars) + "}"


def run_once(config: dict, tars: list[str], out: str) -> dict:
    """One ``clip_inference`` call over ``tars`` into ``out`` (removed first)."""
    import importlib
    import shutil

    import torch

    clip_main = importlib.import_module("clip_retrieval.clip_inference.main")  # the package shadows the name
    torch.set_num_threads(int(config.get("torch_threads", os.cpu_count() or 1)))
    shutil.rmtree(out, ignore_errors=True)
    _CALLS.clear()
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    clip_main.main(
        input_dataset=brace_list(tars),
        output_folder=out,
        input_format="webdataset",
        batch_size=int(config["batch_size"]),
        num_prepro_workers=int(config["num_prepro_workers"]),
        enable_text=False,
        enable_image=True,
        enable_metadata=bool(config.get("enable_metadata", True)),
        wds_image_key="jpg",
        clip_model="timm:" + config["model_name"],
        use_jit=False,
    )
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - c0
    calls = list(_CALLS)
    images = sum(n for _, n in calls)
    steady = None
    if len(calls) >= 3:
        steady = sum(n for _, n in calls[1:]) / (calls[-1][0] - calls[0][0])
    return {"images": images, "seconds": seconds, "cpu_s": cpu, "batches": len(calls),
            "first_batch_s": (calls[0][0] - t0) if calls else None, "steady_images_per_s": steady,
            "torch_threads": torch.get_num_threads()}


def _end_children() -> None:
    """After a failed call: clip_inference's logger processes were never told to end (they poll)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.terminate()
        child.join(5)


def versions() -> dict:
    from importlib.metadata import version

    out = {"python": sys.version.split()[0]}
    for name in ("clip-retrieval", "all-clip", "webdataset", "torch", "torchvision", "timm", "pillow", "numpy",
                 "pandas", "pyarrow"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def _protocol_stdout():
    """The original stdout, for this module's replies; fd 1 then goes to stderr, so that what
    clip_inference and its child processes print (progress lines with carriage returns) stays out."""
    sys.stdout.flush()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return proto


def serve() -> None:
    """Requests on stdin, one JSON object a line: {"cmd": "config", ...} once, then {"cmd": "run",
    "tars": [...], "out": DIR} or {"cmd": "versions"} or {"cmd": "exit"}; one JSON reply a line on
    the original stdout. Everything clip_inference prints goes to stderr."""
    proto = _protocol_stdout()
    config = None
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            if req["cmd"] == "config":
                config = req["config"]
                register(config["model_kwargs"], config["checkpoint"])
                reply = {"ok": True}
            elif req["cmd"] == "run":
                reply = {"ok": True, **run_once({**config, **req.get("config", {})}, req["tars"], req["out"])}
            elif req["cmd"] == "versions":
                reply = {"ok": True, "versions": versions()}
            elif req["cmd"] == "exit":
                proto.write(json.dumps({"ok": True}) + "\n")
                return
            else:
                reply = {"ok": False, "error": f"unknown cmd {req['cmd']!r}"}
        except Exception as err:  # noqa: BLE001 - reported to the benchmark
            import traceback

            traceback.print_exc()
            _end_children()
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        sys.stdout.flush()
        sys.stderr.flush()
        proto.write(json.dumps(reply) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve")
    one = sub.add_parser("run")
    one.add_argument("--config", required=True, help="JSON: model_name, model_kwargs, checkpoint, batch_size, "
                                                     "num_prepro_workers[, torch_threads, enable_metadata]")
    one.add_argument("--tars", nargs="+", required=True)
    one.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve()
        return
    config = json.loads(args.config)
    proto = _protocol_stdout()
    register(config["model_kwargs"], config["checkpoint"])
    result = run_once(config, args.tars, args.out)
    sys.stdout.flush()
    proto.write(json.dumps(result) + "\n")


if __name__ == "__main__":  # clip_inference's logger processes are spawned: they import this module
    main()
