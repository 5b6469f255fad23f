"""Weights in a model_dir (NeMo Curator 1.x's layout): the transformers -> timm mapping checked
against transformers itself (random weights; the real ViT-L/14 shapes on the meta device), a
folder written by transformers, filling from the Hugging Face cache and $NEMO_CURATOR_HOME, a
verified download from a mirror, and one error naming every missing file."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from nemo_curator.image.model_dir import (VIT_L14, ClipWeights, ModelDirError, aesthetic_file, clip_timm_file,
                                          clip_transformers_dir, clip_vision_config, ensure_model_dir, find_clip,
                                          load_aesthetic_state_dict, nsfw_file, timm_model_kwargs, timm_state_shapes,
                                          timm_to_transformers_clip, transformers_clip_to_timm, write_random_model_dir)
from nemo_curator.utils.constants import DEFAULT_MODEL
from nemo_curator.utils.download import CorruptWeightsError

@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is a test-only dependency (the test extra)")


def vision_config(transformers, **overrides):
    values = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                  image_size=224, projection_dim=768, hidden_act="quick_gelu")
    values.update(overrides)
    return transformers.CLIPVisionConfig(**values)


def timm_from_transformers(state, config: dict):
    import timm

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    model = timm.create_model(DEFAULT_MODEL, pretrained=False,
                              **timm_model_kwargs(clip_vision_config(shapes, config)))
    model.load_state_dict(transformers_clip_to_timm(state), strict=True)
    return model.eval()


@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu", "patch_size": 16, "image_size": 64,
                                            "intermediate_size": 96, "num_attention_heads": 4, "projection_dim": 32}])
def test_mapped_timm_model_gives_transformers_embeddings(transformers, overrides):
    torch.manual_seed(0)
    config = vision_config(transformers, **overrides)
    reference = transformers.CLIPVisionModelWithProjection(config).eval()
    randomize(reference)
    model = timm_from_transformers(reference.state_dict(), config.to_dict())
    images = torch.randn(3, 3, config.image_size, config.image_size)
    with torch.no_grad():
        want = reference(pixel_values=images).image_embeds
        got = model(images)
    assert got.shape == (3, config.projection_dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # q and k swapped: off by 2e-2


def randomize(model) -> None:
    """Random weights everywhere, large enough that every part matters (the default init leaves
    biases at 0 and norms at 1, and its small attention weights make attention almost uniform)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)


def test_real_vit_l14_shapes_map_onto_timms_model_on_the_meta_device(transformers):
    openai = transformers.CLIPConfig(projection_dim=768, vision_config=dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
        image_size=224, hidden_act="quick_gelu"))
    with torch.device("meta"):
        state = transformers.CLIPModel(openai).state_dict()  # text tower included, as in 1.x's model.safetensors
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    vision = clip_vision_config(shapes, openai.to_dict())
    assert {k: vision[k] for k in VIT_L14} == VIT_L14 and timm_model_kwargs(vision) == {}
    mapped = {k: tuple(v.shape) for k, v in transformers_clip_to_timm(state).items()}
    assert mapped == timm_state_shapes({})


def test_inverse_mapping_round_trips(transformers):
    torch.manual_seed(1)
    state = transformers.CLIPVisionModelWithProjection(vision_config(transformers)).state_dict()
    back = timm_to_transformers_clip(transformers_clip_to_timm(state))
    assert set(back) == {k for k in state if k != "vision_model.embeddings.position_ids"}
    assert all(torch.equal(back[k], state[k]) for k in back)


def test_a_folder_saved_by_transformers_is_read_as_is(transformers, tmp_path):
    """1.x downloads openai/clip-vit-large-patch14 with huggingface_hub: the files save_pretrained writes."""
    torch.manual_seed(2)
    config = transformers.CLIPConfig(projection_dim=768, vision_config=vision_config(transformers).to_dict(),
                                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2))
    reference = transformers.CLIPModel(config).eval()
    randomize(reference)
    reference.save_pretrained(clip_transformers_dir(tmp_path), safe_serialization=True)
    found = ensure_model_dir(tmp_path, ("clip",), offline=True)["clip"]
    assert found == ClipWeights("transformers", clip_transformers_dir(tmp_path) / "model.safetensors",
                                clip_transformers_dir(tmp_path) / "config.json")
    import timm

    model = timm.create_model(DEFAULT_MODEL, pretrained=False, **found.timm_model_kwargs())
    model.load_state_dict(found.timm_state_dict())
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = reference.get_image_features(pixel_values=images)
        want = features if isinstance(features, torch.Tensor) else features.pooler_output  # transformers 4 / 5
        torch.testing.assert_close(model.eval()(images), want, atol=1e-5, rtol=1e-5)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def cache_repo(hf_home, repo: str, files: dict[str, bytes]):
    """A Hugging Face cache entry of ``repo`` (refs/main -> one snapshot) holding ``files``; returns the snapshot."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("ab" * 20)
    return snapshot


def test_missing_files_come_from_the_caches(tmp_path, hf_home, home, shared_dir):
    random_dir = write_random_model_dir(tmp_path / "random")
    src = clip_transformers_dir(random_dir)
    cache_repo(hf_home, "openai/clip-vit-large-patch14", {n: (src / n).read_bytes() for n in ("config.json",
                                                                                              "model.safetensors")})
    weights = home / "weights"
    weights.mkdir(parents=True)
    for name in ("sac+logos+ava1-l14-linearMSE.pth", "clip_autokeras_binary_nsfw.pth"):
        shutil.copy(shared_dir / "weights" / name, weights / name)
    models = tmp_path / "models"
    found = ensure_model_dir(models)
    assert found["clip"].layout == "transformers" and found["clip"].weights.read_bytes() == \
        (src / "model.safetensors").read_bytes()
    original = torch.load(weights / "sac+logos+ava1-l14-linearMSE.pth", map_location="cpu", weights_only=True)
    converted = load_aesthetic_state_dict(aesthetic_file(models))  # 1.x reads model.safetensors
    assert found["aesthetic"] == aesthetic_file(models) and all(torch.equal(converted[k], original[k]) for k in original)
    assert nsfw_file(models).read_bytes() == (weights / "clip_autokeras_binary_nsfw.pth").read_bytes()
    shutil.rmtree(hf_home)  # now kept in model_dir: no cache needed any more
    shutil.rmtree(weights)
    assert ensure_model_dir(models)["clip"] == found["clip"]


def test_timms_own_weights_in_the_cache_serve_too(tmp_path, hf_home):
    from safetensors.torch import save_file

    from nemo_curator.image.weights import timm_hub_weights

    hub = timm_hub_weights(DEFAULT_MODEL)
    snapshot = cache_repo(hf_home, hub.repo, {})
    # ViT-L/14's keys and shapes (uint8 zeros: 300 MB instead of 1.2 GB; only the shapes are read here)
    save_file({k: torch.zeros(s, dtype=torch.uint8) for k, s in timm_state_shapes({}).items()},
              str(snapshot / hub.filenames[0]))
    found = ensure_model_dir(tmp_path / "models", ("clip",))["clip"]
    assert found.layout == "timm" and found.weights == clip_timm_file(tmp_path / "models")
    assert found.timm_model_kwargs() == {}
    assert find_clip(tmp_path / "models") == found


def test_one_error_names_every_missing_file_and_where_to_put_it(tmp_path, hf_home, home):
    with pytest.raises(ModelDirError) as info:
        ensure_model_dir(tmp_path / "models")
    text = str(info.value)
    assert text.count("\n  - ") == 3
    for path in (clip_transformers_dir(tmp_path / "models"), aesthetic_file(tmp_path / "models"),
                 nsfw_file(tmp_path / "models")):
        assert str(path) in text
    assert "offline" in text and "hf download openai/clip-vit-large-patch14" in text
    assert str(home / "weights") in text and "NEMO_CURATOR_WEIGHTS_URL_AESTHETIC" in text
    with pytest.raises(ModelDirError, match="NSFW head") as only:
        ensure_model_dir(tmp_path / "models", ("nsfw",))
    assert str(only.value).count("\n  - ") == 1


def test_heads_are_downloaded_verified_from_a_mirror(tmp_path, hf_home, home, server, shared_dir, monkeypatch):
    for name, env in (("sac+logos+ava1-l14-linearMSE.pth", "NEMO_CURATOR_WEIGHTS_URL_AESTHETIC"),
                      ("clip_autokeras_binary_nsfw.pth", "NEMO_CURATOR_WEIGHTS_URL_NSFW")):
        server.routes[f"/{name}"] = ("bytes", (shared_dir / "weights" / name).read_bytes())
        monkeypatch.setenv(env, server.url(f"/{name}"))
    found = ensure_model_dir(tmp_path / "models", ("aesthetic", "nsfw"))  # offline: a mirror is still used
    assert found["nsfw"].is_file() and found["aesthetic"].suffix == ".safetensors"
    assert (home / "weights" / "clip_autokeras_binary_nsfw.pth").is_file()  # the verified cache filled on the way
    server.routes["/sac+logos+ava1-l14-linearMSE.pth"] = ("bytes", b"<html>not the weights</html>")
    monkeypatch.setenv("NEMO_CURATOR_HOME", str(tmp_path / "other_home"))
    with pytest.raises(ModelDirError, match="sha256"):
        ensure_model_dir(tmp_path / "other_models", ("aesthetic",))


def test_corrupt_files_say_which_and_what_to_do(tmp_path):
    models = write_random_model_dir(tmp_path / "models")
    (clip_transformers_dir(models) / "config.json").write_text("{not json")
    with pytest.raises(CorruptWeightsError, match="config.json"):
        find_clip(models).timm_model_kwargs()
    aesthetic_file(models).write_bytes(b"garbage")
    with pytest.raises(CorruptWeightsError, match="not a readable safetensors"):
        load_aesthetic_state_dict(aesthetic_file(models))
    (clip_transformers_dir(models) / "config.json").write_text(json.dumps({"vision_config": {"num_attention_heads": 3}}))
    with pytest.raises(CorruptWeightsError, match="does not divide"):
        find_clip(models).timm_model_kwargs()


def test_random_model_dir_is_the_1x_layout(tmp_path):
    models = write_random_model_dir(tmp_path / "m")
    assert sorted(p.relative_to(models).as_posix() for p in models.rglob("*") if p.is_file()) == [
        "laion/clip-autokeras-binary-nsfw/clip_autokeras_binary_nsfw.pth",
        "openai/clip-vit-large-patch14/config.json", "openai/clip-vit-large-patch14/model.safetensors",
        "ttj/sac-logos-ava1-l14-linearMSE/model.safetensors"]
    config = json.loads((clip_transformers_dir(models) / "config.json").read_text())
    assert config["vision_config"]["hidden_size"] == 64 and config["projection_dim"] == 768
    try:
        import transformers
    except ImportError:
        return
    assert transformers.CLIPConfig.from_pretrained(clip_transformers_dir(models)).vision_config.hidden_size == 64
