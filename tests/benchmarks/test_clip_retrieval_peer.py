"""The clip-retrieval peer of benchmarks/bench_clip_retrieval.py gets our model and our transform.

The first tests run the runner's model loader in this project's environment (timm and torchvision
are all it needs); the last one runs clip-retrieval's real ``clip_inference`` and needs its own
virtualenv (``bash benchmarks/clip_retrieval/setup.sh``): it skips without it, so CI never depends
on installing clip-retrieval.
"""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nemo_curator.utils.constants import DEFAULT_MODEL, TINY_MODEL_KWARGS

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "benchmarks" / "clip_retrieval" / "runner.py"
VENV = Path(os.environ.get("NEMO_BENCH_CLIP_RETRIEVAL_VENV", ROOT / "benchmarks" / "_data" / "clip-retrieval-venv"))


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("clip_retrieval_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_injected_model_is_ours_with_the_same_weights(runner, tiny_checkpoint):
    import torch

    from nemo_curator.image.embedders import TimmImageEmbedder

    model, _, tokenizer = runner.make_timm_loader(TINY_MODEL_KWARGS, tiny_checkpoint)(DEFAULT_MODEL, False, "cpu", None)
    ours = TimmImageEmbedder(DEFAULT_MODEL, checkpoint_path=tiny_checkpoint, model_kwargs=TINY_MODEL_KWARGS,
                             autocast=False).load_embedding_model("cpu")
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_image(x), ours(x), rtol=0, atol=0)
        assert model.encode_text(tokenizer(["a", "b"])).shape == (2, 768)  # all_clip's warm-up calls it


def test_the_injected_preprocess_is_timms_with_clips_rgb_step(runner, tiny_checkpoint, sample_photos):
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    _, preprocess, _ = runner.make_timm_loader(TINY_MODEL_KWARGS, tiny_checkpoint)(DEFAULT_MODEL, False, "cpu", None)
    names = [type(t).__name__ for t in preprocess.transforms]
    assert names[:2] == ["Resize", "CenterCrop"] and names[3:] == ["MaybeToTensor", "Normalize"], names
    assert preprocess.transforms[2] is runner._convert_image_to_rgb  # where CLIP's own preprocess has it
    model = timm.create_model(DEFAULT_MODEL, pretrained=False, **TINY_MODEL_KWARGS)
    reference = create_transform(**resolve_data_config({}, model=model))
    for path in sample_photos[:3]:
        with Image.open(path) as im:
            torch.testing.assert_close(preprocess(im), reference(im.convert("RGB")), rtol=0, atol=0)
        with Image.open(path) as im:
            assert preprocess(im.convert("L")).shape == (3, 224, 224)  # grey JPEGs become RGB, as in CLIP


def test_brace_list_gives_clip_inference_one_expandable_string(runner):
    assert runner.brace_list(["/d/00000.tar"]) == "/d/00000.tar"
    assert runner.brace_list(["/d/00000.tar", "/d/00001.tar"]) == "/d/{00000.tar,00001.tar}"
    assert runner.brace_list(["/a/0.tar", "/b/1.tar"]) == "{/a/0.tar,/b/1.tar}"


@pytest.mark.slow
def test_real_clip_inference_gives_our_embeddings(runner, tiny_checkpoint, sample_photos, tmp_path):
    """clip_inference (webdataset reader, PIL, DataLoader, its writer) with the injected model: the
    embeddings of every sample match ours within the benchmark's tolerance."""
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"clip-retrieval's virtualenv {VENV} is absent (bash benchmarks/clip_retrieval/setup.sh)")
    from nemo_curator.image.embedders import TimmImageEmbedder
    from nemo_curator.utils.sample_data import make_sample_dataset

    tars = make_sample_dataset(tmp_path / "data", n_shards=2, samples_per_shard=8, photos=map(str, sample_photos))
    config = {"model_name": DEFAULT_MODEL, "model_kwargs": TINY_MODEL_KWARGS, "checkpoint": tiny_checkpoint,
              "batch_size": 4, "num_prepro_workers": 2, "torch_threads": 1}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-W", "ignore", str(RUNNER), "run", "--config", json.dumps(config),
                           "--tars", *tars, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    import pandas as pd

    theirs = np.load(tmp_path / "out" / "img_emb" / "img_emb_0.npy").astype(np.float32)
    keys = pd.read_parquet(tmp_path / "out" / "metadata" / "metadata_0.parquet")["image_path"].tolist()
    assert len(keys) == 16 and stats["cpu_s"] > 0

    embedder = TimmImageEmbedder(DEFAULT_MODEL, checkpoint_path=tiny_checkpoint, model_kwargs=TINY_MODEL_KWARGS,
                                 autocast=False, batch_size=4, num_threads_per_worker=1)
    model = embedder.get_model("cpu")
    ours = {}
    for tar in tars:
        for item in embedder.iter_shard(tar, None, "key", "cpu"):
            if item.batch is not None:
                ours.update(zip(item.ids, embedder.normalize(model(item.batch)).detach().numpy()))
    mine = np.stack([ours[k] for k in keys])
    cosine = (mine * theirs).sum(1) / np.linalg.norm(mine, axis=1) / np.linalg.norm(theirs, axis=1)
    assert np.abs(mine - theirs).max() <= 1e-3 and cosine.min() >= 0.9999, (np.abs(mine - theirs).max(), cosine.min())
