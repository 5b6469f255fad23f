"""The weights check the command line runs on the client: what is missing, how to supply it, mirrors."""
from __future__ import annotations

import pytest

from nemo_curator.image.weights import WeightsUnavailableError, check_weights, timm_hub_weights
from nemo_curator.utils.constants import DEFAULT_MODEL


def test_offline_with_a_mirror_the_heads_are_fetched_from_it(shared_dir, server, home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server.routes["/mirror/nsfw.pth"] = ("bytes", (shared_dir / "weights" / "clip_autokeras_binary_nsfw.pth").read_bytes())
    monkeypatch.setenv("NEMO_CURATOR_WEIGHTS_URL_NSFW", server.url("/mirror/nsfw.pth"))
    check_weights(None, heads=["nsfw"], offline=True)
    assert server.requests == ["/mirror/nsfw.pth"]
    check_weights(None, heads=["nsfw"], offline=True)  # cached now: no second request
    assert server.requests == ["/mirror/nsfw.pth"]


def test_offline_without_anything_names_each_missing_file_and_the_remedies(server, home, monkeypatch, tmp_path):
    import dataclasses

    from huggingface_hub import constants

    from nemo_curator.image.classifiers import AestheticClassifier, NsfwClassifier

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf" / "hub"))
    for cls in (AestheticClassifier, NsfwClassifier):  # upstream is the local server: offline must not ask it
        monkeypatch.setattr(cls, "weights", dataclasses.replace(cls.weights, url=server.url(f"/{cls.weights.filename}")))
    with pytest.raises(WeightsUnavailableError) as info:
        check_weights(DEFAULT_MODEL, heads=["aesthetic", "nsfw"], offline=True)
    message, hint = str(info.value), "\n".join(info.value.hint)
    assert "offline" in message and "aesthetic head" in message and "nsfw head" in message and DEFAULT_MODEL in message
    assert "--checkpoint" in hint and "NEMO_CURATOR_WEIGHTS_URL_AESTHETIC" in hint and "--smoke" in hint
    assert server.requests == []


def test_hub_location_of_the_default_model():
    hub = timm_hub_weights(DEFAULT_MODEL)
    assert hub.repo == "timm/vit_large_patch14_clip_224.openai" and hub.filenames[0] == "model.safetensors"
    assert timm_hub_weights("no_such_model_name") is None
