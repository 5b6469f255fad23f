"""Weights download and verification against a real local HTTP server (no network needed)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import socket
import time
import zipfile

import pytest
import torch

from nemo_curator.image.classifiers.aesthetic import AESTHETIC_WEIGHTS, AestheticMLP
from nemo_curator.image.classifiers.nsfw import NSFW_WEIGHTS, NsfwMLP
from nemo_curator.utils.download import (
    CorruptWeightsError,
    WeightsDownloadError,
    cache_dir,
    cached_path,
    explicit_url,
    fetch_weights,
    load_weights,
    sha256_file,
)

HTML_PAGE = b"<!DOCTYPE html><html><head><title>GitHub</title></head><body>Sign in</body></html>\n" * 20


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def state_dict_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/weights.pth"


def cache_listing() -> list[str]:
    folder = cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------------------------
# Successful downloads
def test_upstream_locations_are_the_real_ones():
    assert AESTHETIC_WEIGHTS.url == ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                                     "sac+logos+ava1-l14-linearMSE.pth")
    assert NSFW_WEIGHTS.url == ("https://github.com/LAION-AI/CLIP-based-NSFW-Detector/files/10250461/"
                                "clip_autokeras_binary_nsfw.zip")
    assert NSFW_WEIGHTS.archive_member == "clip_autokeras_binary_nsfw.pth"


def test_cache_folder_follows_nemo_curator_home(home):
    assert cache_dir() == home / "weights"
    assert cached_path(AESTHETIC_WEIGHTS) == home / "weights" / "sac+logos+ava1-l14-linearMSE.pth"


def test_aesthetic_download_verifies_caches_and_is_not_repeated(shared_dir, server, home):
    original = shared_dir / "weights" / AESTHETIC_WEIGHTS.filename
    server.routes["/a.pth"] = ("bytes", original.read_bytes())
    state = load_weights(AESTHETIC_WEIGHTS, url=server.url("/a.pth"))
    assert server.requests == ["/a.pth"]
    assert cache_listing() == [AESTHETIC_WEIGHTS.filename]  # no temporary file left behind
    assert sha256_file(cached_path(AESTHETIC_WEIGHTS)) == AESTHETIC_WEIGHTS.sha256
    reference = torch.load(original, map_location="cpu", weights_only=True)
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) and state[k].device.type == "cpu" for k in state)
    AestheticMLP().load_state_dict(state)

    load_weights(AESTHETIC_WEIGHTS, url=server.url("/a.pth"))
    assert server.requests == ["/a.pth"]  # served from the cache


def test_nsfw_zip_is_downloaded_and_its_member_extracted(shared_dir, server, home):
    original = (shared_dir / "weights" / NSFW_WEIGHTS.filename).read_bytes()
    server.routes["/nsfw.zip"] = ("bytes", zip_bytes({"README.md": b"hello", NSFW_WEIGHTS.archive_member: original}))
    path = fetch_weights(NSFW_WEIGHTS, url=server.url("/nsfw.zip"))
    assert path == cached_path(NSFW_WEIGHTS)
    assert path.read_bytes() == original
    assert cache_listing() == [NSFW_WEIGHTS.filename]
    NsfwMLP().load_state_dict(load_weights(NSFW_WEIGHTS))


def test_url_environment_variable_overrides_upstream(shared_dir, server, home, monkeypatch):
    server.routes["/mirror/a.pth"] = ("bytes", (shared_dir / "weights" / AESTHETIC_WEIGHTS.filename).read_bytes())
    monkeypatch.setenv("NEMO_CURATOR_WEIGHTS_URL_AESTHETIC", server.url("/mirror/a.pth"))
    fetch_weights(AESTHETIC_WEIGHTS)
    assert server.requests == ["/mirror/a.pth"]


# ----------------------------------------------------------------------------------------------
# Failed downloads: a clear error, and nothing saved under the final name
@pytest.mark.parametrize("route, reason", [
    (("bytes", HTML_PAGE), "sha256"),
    (("bytes", b"\x80\x02truncated torch file"), "sha256"),
    (("truncate", b"x" * 300_000), "truncated download: 150000 of 300000 bytes"),
    (("status", 404), "HTTP status 404"),
    (("status", 500), "HTTP status 500"),
    (("hang", None), "timed out"),
    (("raw", b"garbage instead of HTTP\r\n\r\n"), "BadStatusLine"),
], ids=["html", "truncated-file", "truncated-stream", "404", "500", "hang", "not-http"])
def test_download_failures_name_model_url_and_remedies(server, home, route, reason):
    server.routes["/a.pth"] = route
    url = server.url("/a.pth")
    started = time.monotonic()
    with pytest.raises(WeightsDownloadError) as info:
        fetch_weights(AESTHETIC_WEIGHTS, url=url, timeout=0.5)
    assert time.monotonic() - started < 10
    message = str(info.value)
    for part in (reason, url, "aesthetic", "model_path=", str(cached_path(AESTHETIC_WEIGHTS)),
                 "NEMO_CURATOR_WEIGHTS_URL_AESTHETIC"):
        assert part in message
    assert cache_listing() == []


def test_unreachable_server_is_a_download_error(home):
    url = closed_port_url()
    with pytest.raises(WeightsDownloadError, match="Connection ?[Rr]efused") as info:
        load_weights(NSFW_WEIGHTS, url=url, timeout=2)
    assert url in str(info.value) and "model_path=" in str(info.value)
    assert cache_listing() == []


def test_zip_without_the_member_is_a_download_error(server, home):
    server.routes["/nsfw.zip"] = ("bytes", zip_bytes({"other.pth": b"1234"}))
    with pytest.raises(WeightsDownloadError, match="no member clip_autokeras_binary_nsfw.pth"):
        fetch_weights(NSFW_WEIGHTS, url=server.url("/nsfw.zip"))
    assert cache_listing() == []


def test_html_served_as_zip_is_a_download_error(server, home):
    server.routes["/nsfw.zip"] = ("bytes", HTML_PAGE)
    with pytest.raises(WeightsDownloadError, match="BadZipFile"):
        fetch_weights(NSFW_WEIGHTS, url=server.url("/nsfw.zip"))
    assert cache_listing() == []


# ----------------------------------------------------------------------------------------------
# Local files: structure checked, corrupt ones named with what to do
def _truncated_state_dict() -> bytes:
    data = state_dict_bytes(AestheticMLP().state_dict())
    return data[: len(data) // 2]


@pytest.mark.parametrize("content, reason", [
    (HTML_PAGE, "cannot be read as a torch file"),
    (_truncated_state_dict(), "cannot be read as a torch file"),
    (state_dict_bytes(NsfwMLP().state_dict()), "missing keys ['layers.0.weight'"),
    (state_dict_bytes(AestheticMLP(embedding_size=512).state_dict()),
     "wrong shapes ['layers.0.weight: (1024, 512) instead of (1024, 768)']"),
    (state_dict_bytes(torch.zeros(3)), "holds a Tensor, not a state_dict"),
], ids=["html", "truncated", "other-model", "wrong-shape", "not-a-dict"])
def test_corrupt_model_path_names_file_and_remedy(tmp_path, home, content, reason):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CorruptWeightsError) as info:
        load_weights(AESTHETIC_WEIGHTS, model_path=path)
    message = str(info.value)
    assert reason in message and str(path) in message and "replace it with a good copy" in message
    assert AESTHETIC_WEIGHTS.sha256 in message


def test_corrupt_cached_file_says_delete_it(server, home):
    cached_path(AESTHETIC_WEIGHTS).parent.mkdir(parents=True)
    cached_path(AESTHETIC_WEIGHTS).write_bytes(HTML_PAGE)
    with pytest.raises(CorruptWeightsError, match="delete it and run again") as info:
        load_weights(AESTHETIC_WEIGHTS, url=server.url("/a.pth"))
    assert str(cached_path(AESTHETIC_WEIGHTS)) in str(info.value)
    assert server.requests == []


def test_missing_model_path_is_named(tmp_path, home):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_weights(AESTHETIC_WEIGHTS, model_path=tmp_path / "absent.pth")


def test_model_path_is_checked_for_structure_not_checksum(tmp_path, home):
    """A user's own (e.g. fine-tuned) file with the right layout loads; only downloads are hashed."""
    state = AestheticMLP().state_dict()
    path = tmp_path / "finetuned.pth"
    path.write_bytes(state_dict_bytes(state))
    loaded = load_weights(AESTHETIC_WEIGHTS, model_path=path)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert hashlib.sha256(path.read_bytes()).hexdigest() != AESTHETIC_WEIGHTS.sha256
    assert cache_listing() == []


def test_nsfw_model_path_may_be_the_upstream_zip(shared_dir, tmp_path, home):
    original = shared_dir / "weights" / NSFW_WEIGHTS.filename
    path = tmp_path / "clip_autokeras_binary_nsfw.zip"
    path.write_bytes(zip_bytes({NSFW_WEIGHTS.archive_member: original.read_bytes()}))
    state = load_weights(NSFW_WEIGHTS, model_path=path)
    reference = torch.load(original, map_location="cpu", weights_only=True)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


# ----------------------------------------------------------------------------------------------
# Mirrors: an explicit URL is used even offline; a mirror may serve the .pth or the upstream zip
def test_explicit_url_is_the_argument_or_the_environment_variable(home, monkeypatch):
    assert explicit_url(NSFW_WEIGHTS) is None and explicit_url(AESTHETIC_WEIGHTS) is None
    monkeypatch.setenv("NEMO_CURATOR_WEIGHTS_URL_NSFW", "http://mirror.internal/nsfw.zip")
    assert explicit_url(NSFW_WEIGHTS) == "http://mirror.internal/nsfw.zip"
    assert explicit_url(NSFW_WEIGHTS, url="http://other/x.pth") == "http://other/x.pth"
    assert explicit_url(AESTHETIC_WEIGHTS) is None
    monkeypatch.setenv("NEMO_CURATOR_WEIGHTS_URL_AESTHETIC", "")  # empty: not set
    assert explicit_url(AESTHETIC_WEIGHTS) is None


def test_mirror_is_used_even_when_the_hub_is_offline(shared_dir, server, home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = (shared_dir / "weights" / AESTHETIC_WEIGHTS.filename).read_bytes()
    server.routes["/mirror/a.pth"] = ("bytes", original)
    monkeypatch.setenv("NEMO_CURATOR_WEIGHTS_URL_AESTHETIC", server.url("/mirror/a.pth"))
    assert fetch_weights(AESTHETIC_WEIGHTS, offline=True).read_bytes() == original
    assert server.requests == ["/mirror/a.pth"]


def test_offline_without_a_mirror_makes_no_request_and_says_so(server, home):
    with pytest.raises(WeightsDownloadError, match="offline") as info:
        fetch_weights(NSFW_WEIGHTS, offline=True)
    assert "NEMO_CURATOR_WEIGHTS_URL_NSFW" in str(info.value) and "model_path=" in str(info.value)
    assert cache_listing() == [] and server.requests == []


@pytest.mark.parametrize("route", ["/mirror/clip_autokeras_binary_nsfw.pth", "/mirror/looks-like-a.zip"])
def test_mirror_may_serve_the_nsfw_pth_itself(shared_dir, server, home, monkeypatch, route):
    """Told apart from the upstream zip by its content (a torch file), not by the URL."""
    original = (shared_dir / "weights" / NSFW_WEIGHTS.filename).read_bytes()
    server.routes[route] = ("bytes", original)
    monkeypatch.setenv("NEMO_CURATOR_WEIGHTS_URL_NSFW", server.url(route))
    path = fetch_weights(NSFW_WEIGHTS)
    assert path.read_bytes() == original and sha256_file(path) == NSFW_WEIGHTS.sha256
    assert cache_listing() == [NSFW_WEIGHTS.filename]
    NsfwMLP().load_state_dict(load_weights(NSFW_WEIGHTS))


def test_upstream_zip_under_a_pth_url_is_still_extracted(shared_dir, server, home):
    original = (shared_dir / "weights" / NSFW_WEIGHTS.filename).read_bytes()
    server.routes["/nsfw.pth"] = ("bytes", zip_bytes({NSFW_WEIGHTS.archive_member: original}))
    assert fetch_weights(NSFW_WEIGHTS, url=server.url("/nsfw.pth")).read_bytes() == original


def test_pth_from_a_mirror_is_checked_against_the_sha256(server, home):
    wrong = state_dict_bytes(NsfwMLP().state_dict())  # the right layout, other values
    server.routes["/nsfw.pth"] = ("bytes", wrong)
    with pytest.raises(WeightsDownloadError, match="sha256"):
        fetch_weights(NSFW_WEIGHTS, url=server.url("/nsfw.pth"))
    assert cache_listing() == []


def test_legacy_pickle_pth_is_accepted_from_a_mirror(server, home):
    """torch.save(..., _use_new_zipfile_serialization=False) files are not zips at all."""
    buf = io.BytesIO()
    torch.save(NsfwMLP().state_dict(), buf, _use_new_zipfile_serialization=False)
    spec = dataclasses.replace(NSFW_WEIGHTS, sha256=hashlib.sha256(buf.getvalue()).hexdigest())
    server.routes["/legacy.pth"] = ("bytes", buf.getvalue())
    assert fetch_weights(spec, url=server.url("/legacy.pth")).read_bytes() == buf.getvalue()
    NsfwMLP().load_state_dict(load_weights(spec))
