"""Model weights: the one place that finds, downloads and verifies them.

A model family declares a :class:`WeightsSpec` (upstream URL, file name, sha256, expected
state_dict keys and shapes); :func:`load_weights` turns it into a verified state_dict:

1. ``model_path`` given: that file (a ``.pth``, or an upstream zip holding it).
2. otherwise the cache file ``$NEMO_CURATOR_HOME/weights/<filename>`` (default home
   ``~/.nemo_curator``), downloaded once when absent: urllib with a timeout, an HTTP status check,
   a length check, the sha256 check, then an atomic rename (a crash never leaves a partial file
   under the final name). The cached file gets the mode a plain ``open()`` gives (umask applied),
   so a cache on a shared file system is readable by others where the umask allows it.
3. every file is read with ``torch.load(weights_only=True, map_location="cpu")`` and its keys and
   shapes are checked against the spec, so a corrupt or wrong file fails with its name and a remedy.

Mirrors: ``NEMO_CURATOR_WEIGHTS_URL_<NAME>`` (or ``url=``) replaces the upstream URL
(:func:`explicit_url`). Such an explicit URL is always used when the file is not cached, also
when offline (``fetch_weights(offline=True)``, ``--offline``, ``HF_HUB_OFFLINE=1``): offline only
stops requests to the upstream locations. A mirror may serve either what upstream serves (for the
NSFW head: the zip holding ``clip_autokeras_binary_nsfw.pth``) or the ``.pth`` itself: the two
are told apart by the content (a zip that holds ``archive_member`` is unpacked; a torch file,
whether torch's own zip format or a legacy pickle, is taken as it is), never by the URL. The
sha256 is always that of the ``.pth`` (the extracted member for a zip).
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


def explicit_url(spec: WeightsSpec, url: str | None = None) -> str | None:
    """The URL the user chose for ``spec``: ``url`` if given, else ``$NEMO_CURATOR_WEIGHTS_URL_<NAME>``
    if set (non-empty); None when neither is, i.e. only the upstream location is known.

    An explicit URL (typically an internal mirror) is used even offline: a weights check that
    finds no cached file should still fetch when this is not None."""
    return url or os.environ.get(spec.url_env) or None


def resolve_url(spec: WeightsSpec, url: str | None = None) -> str:
    """:func:`explicit_url` if there is one, else the upstream URL."""
    return explicit_url(spec, url) or spec.url


# ----------------------------------------------------------------------------------------------
# Public entry points
def fetch_weights(spec: WeightsSpec, url: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                  offline: bool = False) -> Path:
    """Return the cached ``.pth`` for ``spec``, downloading and verifying it first when absent.

    The download comes from :func:`explicit_url` (``url``, or ``$NEMO_CURATOR_WEIGHTS_URL_<NAME>``)
    when set, else from the upstream URL. ``offline=True`` forbids only the upstream URL: an
    explicit (mirror) URL is still used. The content may be the ``.pth`` or a zip holding
    ``spec.archive_member`` (see the module docstring).

    Raises WeightsDownloadError naming the model, the URL and the other ways to supply the file.
    """
    dest = cached_path(spec)
    if dest.is_file():
        return dest
    if offline and explicit_url(spec, url) is None:
        raise _download_error(spec, spec.url, f"offline (--offline or HF_HUB_OFFLINE=1), no request made, and no "
                                              f"mirror URL is set ({spec.url_env})")
    url = resolve_url(spec, url)
    logger.info("downloading the %s weights from %s to %s", spec.description, url, dest)
    try:
        _download_to_cache(spec, url, dest, timeout)
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


def _download_to_cache(spec: WeightsSpec, url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to an anonymous temporary file beside ``dest``; write the ``.pth`` (the
    download itself, or the member extracted from a zip) atomically to ``dest`` once its sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    # TemporaryFile: unnamed (O_TMPFILE, or unlinked at once), never visible, so its 0600 mode does not matter
    with tempfile.TemporaryFile(dir=dest.parent) as download:
        digest = _download(url, download, timeout)
        download.seek(0)
        member = _zip_member_to_extract(spec, download)
        download.seek(0)
        with atomic_write(dest) as f:
            if member is None:
                for chunk in iter(lambda: download.read(_CHUNK), b""):
                    f.write(chunk)
            else:
                with zipfile.ZipFile(download) as zf, zf.open(member) as source:
                    hasher = hashlib.sha256()
                    for chunk in iter(lambda: source.read(_CHUNK), b""):
                        f.write(chunk)
                        hasher.update(chunk)
                    digest = hasher.hexdigest()
            _verify_digest(spec, url, digest)  # raising here removes the temporary: nothing is saved


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first local header, or an empty zip
_PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2: a legacy (non-zip) torch.save file


def _zip_member_to_extract(spec: WeightsSpec, f: IO[bytes]) -> str | None:
    """What a download is, told by its magic bytes: the zip entry to extract (an upstream-style zip
    holding ``spec.archive_member``), or None when the content is the ``.pth`` itself.

    A ``.pth`` written by ``torch.save`` is itself a zip (``<name>/data.pkl``, ``<name>/data/0``,
    ...) or, in the legacy format, a pickle. Raises KeyError for a zip that is neither, and
    BadZipFile for content that is no zip and no torch file (an HTML page, say) when a zip or a
    ``.pth`` was expected; without ``archive_member`` any content is the file (the sha256 decides).
    """
    if spec.archive_member is None:
        return None
    head = f.read(4)
    f.seek(0)
    if head.startswith(_ZIP_MAGIC):
        with zipfile.ZipFile(f) as zf:
            names = zf.namelist()
            if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names) and \
                    not any(n == spec.archive_member or n.endswith("/" + spec.archive_member) for n in names):
                return None  # torch's zip format: the .pth itself
            return _find_member(zf, spec.archive_member)
    if head.startswith(_PICKLE_MAGIC):
        return None
    raise zipfile.BadZipFile(f"the content is neither a zip holding {spec.archive_member} nor a torch .pth file "
                             f"(it starts with {head!r})")


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
