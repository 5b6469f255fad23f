"""Shared pytest fixtures: a real LocalCluster, the shared real material, a tiny CLIP-shaped model."""
from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).parent
SHARED = Path(os.environ.get("NEMO_CURATOR_SHARED", ROOT.parent / "shared"))
from nemo_curator.utils.constants import DEFAULT_MODEL as MODEL_NAME  # noqa: E402
from nemo_curator.utils.constants import TINY_MODEL_KWARGS  # noqa: E402


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where there is none)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine (GPU tests run with `make test-gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder with real weights and photographs; tests using it skip without it."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: real weights and photographs are not available here")
    return SHARED


@pytest.fixture(scope="session")
def sample_photos(shared_dir) -> list[Path]:
    photos = sorted((shared_dir / "sample_images").glob("*.jpg"))
    if not photos:
        pytest.skip(f"no photographs in {shared_dir / 'sample_images'}")
    return photos


@pytest.fixture(scope="session")
def client():
    """A real distributed.LocalCluster with 2 single-threaded worker processes."""
    from nemo_curator import get_client

    c = get_client(cluster_type="cpu", n_workers=2, threads_per_worker=1, dashboard_address=":0")
    yield c
    cluster = c.cluster
    c.close()
    if cluster is not None:
        cluster.close()


@pytest.fixture(scope="session")
def tiny_model_kwargs() -> dict:
    return dict(TINY_MODEL_KWARGS)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny CLIP-shaped model with fixed random weights, saved as safetensors (weights with an identity)."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(MODEL_NAME, pretrained=False, **TINY_MODEL_KWARGS)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


class WeightsServer:
    """A real HTTP server on 127.0.0.1 (port chosen by the OS) serving ``routes``.

    A route is ``("bytes", data)``, ``("truncate", data)`` (announces len(data), sends half and
    closes), ``("raw", data)`` (not HTTP), ``("status", code)`` or ``("hang", None)`` (never answers until the test ends).
    """

    def __init__(self):
        self.routes: dict[str, tuple] = {}
        self.requests: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                kind, payload = server.routes.get(self.path, ("status", 404))
                if kind == "hang":
                    server.release.wait(30)
                    return
                if kind == "raw":
                    self.wfile.write(payload)
                    return
                if kind == "status":
                    self.send_error(payload)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload if kind == "bytes" else payload[: len(payload) // 2])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = WeightsServer()
    yield s
    s.close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty weights cache home ($NEMO_CURATOR_HOME); URL overrides from the environment removed."""
    from nemo_curator.image.classifiers.aesthetic import AESTHETIC_WEIGHTS
    from nemo_curator.image.classifiers.nsfw import NSFW_WEIGHTS

    monkeypatch.setenv("NEMO_CURATOR_HOME", str(tmp_path / "home"))
    for spec in (AESTHETIC_WEIGHTS, NSFW_WEIGHTS):
        monkeypatch.delenv(spec.url_env, raising=False)
    return tmp_path / "home"
