"""Model weights: the one place that finds, downloads and verifies them.

A model family declares a :class:`WeightsSpec` (upstream URL, file name, sha256, expected
state_dict keys and shapes); :func:`load_weights` turns it into a verified state_dict:

1. ``model_path`` given: that file (a ``.pth``, or an upstream zip holding it).
2. otherwise the cache file ``$NEMO_CURATOR_HOME/weights/<filename>`` (default home
   ``~/.nemo_curator``), downloaded once when absent: urllib with a timeout, an HTTP status check,
   a length check, the sha256 check, then an atomic rename (a crash never leaves a partial file
   under the final name). ``NEMO_CURATOR_WEIGHTS_URL_<NAME>`` (or ``url=``) replaces the
   upstream URL, e.g. with a mirror.
3. every file is read with ``torch.load(weights_only=True, map_location="cpu")`` and its keys and
   shapes are checked against the spec, so a corrupt or wrong file fails with its name and a remedy.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Mapping

from nemo_curator.utils.file_utils import atomic_write

logger = logging.getLogger(__name__)

HOME_ENV = "NEMO_CURATOR_HOME"
URL_ENV_PREFIX = "NEMO_CURATOR_WEIGHTS_URL_"
DEFAULT_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class WeightsError(RuntimeError):
    """Weights could not be obtained or are not valid; the message says which file and what to do."""


class WeightsDownloadError(WeightsError):
    """The download failed (network, HTTP status, timeout, truncated or wrong content)."""


class CorruptWeightsError(WeightsError):
    """A weights file exists but is not a readable state_dict with the expected keys and shapes."""


@dataclass(frozen=True)
class WeightsSpec:
    """Where a model's weights come from and what they must look like.

    Args:
        name: short name (``"aesthetic"``); the URL override is ``NEMO_CURATOR_WEIGHTS_URL_<NAME>``.
        description: human name used in messages.
        url: upstream download location.
        filename: the ``.pth`` file name in the cache folder.
        sha256: hex digest of the ``.pth`` (of the extracted member for zips); ``None`` if unknown.
        shapes: expected state_dict ``{key: shape}``.
        archive_member: for a zip download, the member to extract (``None``: the URL is the file).
    """

    name: str
    description: str
    url: str
    filename: str
    sha256: str | None
    shapes: Mapping[str, tuple[int, ...]] = field(hash=False)
    archive_member: str | None = None

    @property
    def url_env(self) -> str:
        return URL_ENV_PREFIX + self.name.upper()


# ----------------------------------------------------------------------------------------------
# Locations
def cache_dir() -> Path:
    """The weights cache folder: ``$NEMO_CURATOR_HOME/weights`` (default ``~/.nemo_curator/weights``)."""
    home = os.environ.get(HOME_ENV) or os.path.join("~", ".nemo_curator")
    return Path(home).expanduser() / "weights"


def cached_path(spec: WeightsSpec) -> Path:
    """Where the cache keeps (or would keep) ``spec``'s file."""
    return cache_dir() / spec.filename


def resolve_url(spec: WeightsSpec, url: str | None = None) -> str:
    """``url`` if given, else ``$NEMO_CURATOR_WEIGHTS_URL_<NAME>`` if set, else the upstream URL."""
    return url or os.environ.get(spec.url_env) or spec.url


# ----------------------------------------------------------------------------------------------
# Public entry points
def fetch_weights(spec: WeightsSpec, url: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Return the cached ``.pth`` for ``spec``, downloading and verifying it first when absent.

    Raises WeightsDownloadError naming the model, the URL and the other ways to supply the file.
    """
    dest = cached_path(spec)
    if dest.is_file():
        return dest
    url = resolve_url(spec, url)
    logger.info("downloading the %s weights from %s to %s", spec.description, url, dest)
    try:
        if spec.archive_member is None:
            with atomic_write(dest) as f:
                _verify_digest(spec, url, _download(url, f, timeout))
        else:
            _download_and_extract(spec, url, dest, timeout)
    except WeightsDownloadError:
        raise
    except (OSError, http.client.HTTPException, ValueError, zipfile.BadZipFile, KeyError) as err:  # URLError is an OSError
        raise _download_error(spec, url, _describe(err)) from err
    return dest


def load_weights(spec: WeightsSpec, model_path: str | os.PathLike | None = None, url: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """The verified state_dict (CPU tensors) from ``model_path``, or from the cache (downloading once)."""
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model_path {path} for the {spec.description} does not exist: pass the path of "
                                    f"{spec.filename} (download it from {spec.url})")
    else:
        path = fetch_weights(spec, url=url, timeout=timeout)
    return read_state_dict(spec, path)


def read_state_dict(spec: WeightsSpec, path: str | os.PathLike) -> dict:
    """Load ``path`` (a ``.pth``, or a zip holding ``spec.archive_member``) and check keys and shapes."""
    import torch

    path = Path(path)
    try:
        with open(path, "rb") as f:
            source = _archive_member_or_file(spec, f)
            state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a state_dict
        raise _corrupt_error(spec, path, f"it cannot be read as a torch file ({_describe(err)})") from err
    problem = structure_problem(spec, state)
    if problem:
        raise _corrupt_error(spec, path, problem)
    return state


def structure_problem(spec: WeightsSpec, state) -> str | None:
    """Describe how ``state`` differs from ``spec.shapes`` (missing/unexpected keys, shapes); None if it matches."""
    if not isinstance(state, Mapping):
        return f"it holds a {type(state).__name__}, not a state_dict"
    missing = [k for k in spec.shapes if k not in state]
    unexpected = [k for k in state if k not in spec.shapes]
    wrong = [f"{k}: {tuple(state[k].shape)} instead of {tuple(shape)}" for k, shape in spec.shapes.items()
             if k in state and tuple(getattr(state[k], "shape", ())) != tuple(shape)]
    parts = [f"missing keys {missing[:5]}" if missing else "", f"unexpected keys {unexpected[:5]}" if unexpected else "",
             f"wrong shapes {wrong[:5]}" if wrong else ""]
    parts = [p for p in parts if p]
    return "its state_dict does not match: " + "; ".join(parts) if parts else None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Helpers
def _download(url: str, out: IO[bytes], timeout: float) -> str:
    """Stream ``url`` into ``out``; return the sha256 of the bytes received.

    ``timeout`` (seconds) bounds the connection, each read and the whole transfer. Raises the
    low-level error (URLError, HTTPError, TimeoutError, OSError for a non-200 status or fewer bytes
    than Content-Length) for the caller to turn into a WeightsDownloadError.
    """
    deadline = time.monotonic() + timeout
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "nemo-curator-image"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        status = getattr(response, "status", 200)
        if status != 200:
            raise OSError(f"HTTP status {status}")
        expected = response.headers.get("Content-Length")
        received = 0
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the transfer took longer than {timeout} s ({received} bytes received)")
    if expected is not None and received != int(expected):
        raise OSError(f"truncated download: {received} of {expected} bytes received")
    return digest.hexdigest()


def _download_and_extract(spec: WeightsSpec, url: str, dest: Path, timeout: float) -> None:
    """Download the zip at ``url`` to a temporary file beside ``dest``; extract its member atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=dest.parent) as archive:
        _download(url, archive, timeout)
        archive.seek(0)
        with zipfile.ZipFile(archive) as zf, zf.open(_find_member(zf, spec.archive_member)) as member, \
                atomic_write(dest) as f:
            digest = hashlib.sha256()
            for chunk in iter(lambda: member.read(_CHUNK), b""):
                f.write(chunk)
                digest.update(chunk)
            _verify_digest(spec, url, digest.hexdigest())


def _find_member(zf: zipfile.ZipFile, name: str) -> str:
    """The zip entry named ``name`` (at the top level or in a folder); KeyError listing the entries."""
    for entry in zf.namelist():
        if entry == name or entry.endswith("/" + name):
            return entry
    raise KeyError(f"the zip has no member {name} (it holds {zf.namelist()[:10]})")


def _archive_member_or_file(spec: WeightsSpec, f: IO[bytes]) -> IO[bytes]:
    """For a zip that holds ``spec.archive_member`` (the upstream download), that member's bytes; else ``f``.

    A torch ``.pth`` is itself a zip, so only a zip that contains the named member is unpacked.
    """
    if spec.archive_member and zipfile.is_zipfile(f):
        with zipfile.ZipFile(f) as zf:
            try:
                return io.BytesIO(zf.read(_find_member(zf, spec.archive_member)))
            except KeyError:
                pass
    f.seek(0)
    return f


def _verify_digest(spec: WeightsSpec, url: str, digest: str) -> None:
    if spec.sha256 is not None and digest != spec.sha256:
        raise _download_error(spec, url, f"the content's sha256 is {digest}, expected {spec.sha256} (the server sent "
                                         "something else: an error page, a truncated or a different file)")


def _describe(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP status {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return f"{type(err.reason).__name__}: {err.reason}"
    return f"{type(err).__name__}: {err}"


def _remedy(spec: WeightsSpec) -> str:
    return (f"supply the weights another way: pass model_path='/path/to/{spec.filename}', or put {spec.filename} "
            f"at {cached_path(spec)} (the cache folder is ${HOME_ENV}/weights, default ~/.nemo_curator/weights), "
            f"or set {spec.url_env} to a mirror URL")


def _download_error(spec: WeightsSpec, url: str, reason: str) -> WeightsDownloadError:
    return WeightsDownloadError(f"could not download the {spec.description} weights ({spec.name}) from {url}: "
                                f"{reason}. Nothing was saved; {_remedy(spec)}")


def _corrupt_error(spec: WeightsSpec, path: Path, reason: str) -> CorruptWeightsError:
    in_cache = path.resolve() == cached_path(spec).resolve()
    todo = ("delete it and run again to download it afresh" if in_cache else
            f"replace it with a good copy of {spec.filename} (sha256 {spec.sha256}, from {spec.url})")
    return CorruptWeightsError(f"{path} is not a valid {spec.description} weights file: {reason}. It may be an HTML "
                               f"page saved in place of the file or a truncated download: {todo}")
