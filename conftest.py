"""Shared pytest fixtures: a real LocalCluster, the shared real material, a tiny CLIP-shaped model,
offline weight caches, a local weights server; and the documentation as tests (Sybil: every fenced
block of README.md and docs/*.md runs, see ``docs_setup``)."""
from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nemo_curator.utils.constants import DEFAULT_MODEL as MODEL_NAME
from nemo_curator.utils.constants import TINY_MODEL_KWARGS

ROOT = Path(__file__).parent
SHARED = Path(os.environ.get("NEMO_CURATOR_SHARED", ROOT.parent / "shared"))


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

    c = get_client(cluster_type="cpu", n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0")
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



# ----------------------------------------------------------------------------------------------
# Offline weights: the real model architecture with random weights in a Hugging Face cache, the
# heads in $NEMO_CURATOR_HOME, so that code written for the real model runs here without a network.
@functools.lru_cache(maxsize=1)
def offline_weights_env() -> dict[str, str]:
    """Environment variables of offline caches holding random ViT-L/14 weights (``HF_HOME``, with
    ``HF_HUB_OFFLINE=1``) and the heads (``NEMO_CURATOR_HOME``: the real ones from ../shared when
    present, else random ones). Made once per test session (about 1.2 GB, removed at exit)."""
    import timm
    import torch
    from safetensors.torch import save_file

    from nemo_curator.image.classifiers import HEADS
    from nemo_curator.image.weights import timm_hub_weights

    home = Path(tempfile.mkdtemp(prefix="nemo-curator-offline-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    hub = timm_hub_weights(MODEL_NAME)
    repo = home / "hf" / "hub" / f"models--{hub.repo.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0000000000000000000000000000000000random"
    snapshot.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model(MODEL_NAME, pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / hub.filenames[0]))
    del model
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    weights = home / "nemo" / "weights"
    weights.mkdir(parents=True)
    for name, (classifier, module_class) in HEADS.items():
        spec = classifier.weights
        real = SHARED / "weights" / spec.filename
        if real.is_file():
            shutil.copy(real, weights / spec.filename)
        else:
            torch.manual_seed(1)
            torch.save(module_class().state_dict(), weights / spec.filename)
    return {"HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "NEMO_CURATOR_HOME": str(home / "nemo")}


@pytest.fixture(scope="session")
def offline_weights() -> dict[str, str]:
    """See ``offline_weights_env``."""
    return offline_weights_env()


# ----------------------------------------------------------------------------------------------
# The documentation as tests. Each page runs in a fresh working folder, with the offline caches
# and the package's console script on PATH; its Python blocks share one namespace (``__name__`` is
# "__main__"), a block written as a script (with the __main__ guard) runs as a script in a new
# interpreter, its bash blocks run in order in bash -e. A block that cannot run
# here is marked on the page: <!-- skip: next "why" -->; one meant for Jupyter or a REPL is marked
# <!-- interactive session -->. A ```python signature``` block is
# checked against the real signature of the callable it names.
def docs_setup(namespace: dict) -> None:
    env = {**offline_weights_env(), "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
           "PYTHONWARNINGS": "ignore"}
    workdir = tempfile.mkdtemp(prefix="nemo-curator-docs-")
    from huggingface_hub import constants  # read its environment at import: set what the page's blocks see

    hub = {"HF_HOME": env["HF_HOME"], "HF_HUB_CACHE": os.path.join(env["HF_HOME"], "hub"), "HF_HUB_OFFLINE": True}
    namespace["__docs_state__"] = (os.getcwd(), {k: os.environ.get(k) for k in env}, workdir,
                                   {k: getattr(constants, k) for k in hub})
    for key, value in hub.items():
        setattr(constants, key, value)
    os.environ.update(env)
    os.chdir(workdir)
    os.symlink(ROOT / "examples", Path(workdir) / "examples")  # pages run repository paths (examples/...)
    namespace["__name__"] = "__main__"
    namespace["scored_sample"] = lambda path="shards": _scored_sample(namespace, path)


def _scored_sample(namespace: dict, path: str):
    """For pages whose blocks start from a scored dataset (``<!-- invisible-code-block: python``):
    a sample in ``path`` embedded by the tiny model with random heads, on a 1-worker cluster kept
    in the page's namespace (closed by ``docs_teardown``)."""
    from nemo_curator import get_client
    from nemo_curator.datasets import ImageTextPairDataset
    from nemo_curator.image.classifiers import build_heads, write_random_heads
    from nemo_curator.image.embedders import TimmImageEmbedder
    from nemo_curator.utils.sample_data import make_sample_dataset

    namespace["client"] = get_client(cluster_type="cpu", n_workers=1, dashboard_address="127.0.0.1:0")
    make_sample_dataset(path, n_shards=2, samples_per_shard=3)
    heads = build_heads(paths=write_random_heads("random_heads"))
    embedder = TimmImageEmbedder(MODEL_NAME, model_kwargs=TINY_MODEL_KWARGS, classifiers=heads)
    dataset = embedder(ImageTextPairDataset.from_webdataset(path, id_col="key"))
    dataset.save_metadata(show_progress=False)
    return dataset


def docs_teardown(namespace: dict) -> None:
    client = namespace.get("client")
    if client is not None and hasattr(client, "close"):
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None:
            cluster.close()
    cwd, saved, workdir, hub = namespace.pop("__docs_state__")
    from huggingface_hub import constants

    for key, value in hub.items():
        setattr(constants, key, value)
    os.chdir(cwd)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(workdir, ignore_errors=True)


INTERACTIVE_MARK = "<!-- interactive session -->"  # before a block: it runs as typed into Jupyter or a REPL


def run_python_block(example) -> None:
    """A ```python``` block of a page. One written as a script (it has the
    ``if __name__ == "__main__":`` guard), or one that starts a local cluster, runs as a script, in
    a new interpreter, as a user would run it: that is how Dask's spawned workers see it (a block
    that starts a cluster without the guard fails there, as it would for a user). The others run
    in the page's namespace, as does a block marked ``<!-- interactive session -->``."""
    from sybil.evaluators.python import PythonEvaluator

    source = str(example.parsed)
    before = example.document.text[:example.start].rstrip().splitlines()
    invisible = example.document.text.startswith("<!--", example.start)  # the page's hidden set-up
    interactive = invisible or (bool(before) and before[-1].strip() == INTERACTIVE_MARK)
    starts_cluster = any("scheduler_" not in args for args in re.findall(r"get_client\(([^)]*)\)", source))
    if 'if __name__ == "__main__":' not in source and (interactive or not starts_cluster):
        return PythonEvaluator()(example)
    script = Path(os.getcwd()) / f"{Path(example.path).stem}_line{example.line}.py"
    script.write_text(str(example.parsed))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1200,
                          cwd=os.getcwd(), env=os.environ.copy())
    if done.returncode != 0:
        raise AssertionError(f"{example.path}:{example.line} as a script exited with {done.returncode}"
                             f"\n--- stderr\n{done.stderr[-4000:]}")


def run_bash_block(example) -> None:
    """Run a ```bash``` block of a page in its working folder; fail with the output's tail."""
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", example.parsed], capture_output=True, text=True,
                          timeout=1200, cwd=os.getcwd(), env=os.environ.copy())
    if done.returncode != 0:
        raise AssertionError(f"bash block exited with {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
                             f"\n--- stderr\n{done.stderr[-3000:]}")


SIGNATURE_MODULES = ("nemo_curator", "nemo_curator.datasets", "nemo_curator.image.embedders",
                     "nemo_curator.image.classifiers", "nemo_curator.image.shard_reader", "nemo_curator.report",
                     "nemo_curator.filtering", "nemo_curator.image.weights", "nemo_curator.utils.shard_job")


def check_signature_block(example) -> None:
    """A ```python signature``` block: ``name(params) [-> type]`` must give the parameters (names,
    kinds, defaults, in order) of the public callable ``name`` (looked up in ``SIGNATURE_MODULES``)."""
    import ast
    import importlib
    import inspect

    text = " ".join(example.parsed.split())
    name, _, rest = text.partition("(")
    params = rest[: rest.rindex(")")]  # drop "-> return type"
    documented = ast.parse(f"def {name.strip()}({params}): pass").body[0].args
    target = next((getattr(importlib.import_module(m), name.strip()) for m in SIGNATURE_MODULES
                   if hasattr(importlib.import_module(m), name.strip())), None)
    assert target is not None, f"{name.strip()} is not in any of {SIGNATURE_MODULES}"
    real = inspect.signature(target)
    kinds = inspect.Parameter
    got = []
    positional = documented.posonlyargs + documented.args
    defaults = [None] * (len(positional) - len(documented.defaults)) + list(documented.defaults)
    got += [(a.arg, kinds.POSITIONAL_OR_KEYWORD, d) for a, d in zip(positional, defaults)]
    if documented.vararg:
        got.append((documented.vararg.arg, kinds.VAR_POSITIONAL, None))
    got += [(a.arg, kinds.KEYWORD_ONLY, d) for a, d in zip(documented.kwonlyargs, documented.kw_defaults)]
    if documented.kwarg:
        got.append((documented.kwarg.arg, kinds.VAR_KEYWORD, None))
    want = [(p.name, p.kind, p.default) for p in real.parameters.values()]
    assert [(n, k) for n, k, _ in got] == [(n, k) for n, k, _ in want], (
        f"{name.strip()}: the page documents {[n for n, _, _ in got]}, the code has {[n for n, _, _ in want]}")
    for (param, _, node), (_, _, default) in zip(got, want):
        documented_default = inspect.Parameter.empty if node is None else eval(  # noqa: S307 - the page's own text
            compile(ast.Expression(node), "<signature>", "eval"), {"os": os})
        assert documented_default == default, f"{name.strip()}({param}=...): page {documented_default!r}, code {default!r}"


def _docs_sybil():
    from sybil import Sybil
    from sybil.parsers.markdown import CodeBlockParser, SkipParser

    return Sybil(
        parsers=[SkipParser(), CodeBlockParser("python", run_python_block), CodeBlockParser("bash", run_bash_block),
                 CodeBlockParser("python signature", check_signature_block)],
        patterns=["README.md", "docs/*.md"], setup=docs_setup, teardown=docs_teardown,
    )


pytest_collect_file = _docs_sybil().pytest()
