"""Files the toolkit writes get the mode a plain ``open()`` gives under the process's umask (not
mkstemp's 0600), so colleagues and jobs of other users can read shared datasets and weights caches.

Each umask is set in a fresh subprocess (the umask is process-wide); the weights are downloaded
from a real local HTTP server.
"""
from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import textwrap
import zipfile

import pytest

import nemo_curator
from nemo_curator.image.classifiers.aesthetic import AESTHETIC_WEIGHTS
from nemo_curator.image.classifiers.nsfw import NSFW_WEIGHTS

SCRIPT = textwrap.dedent("""
    import json, os, stat, sys
    os.umask(int(sys.argv[1], 8))
    folder, aesthetic_url, nsfw_url = sys.argv[2:5]
    os.environ["NEMO_CURATOR_HOME"] = os.path.join(folder, "home")

    import pandas as pd
    from nemo_curator.image.classifiers.aesthetic import AESTHETIC_WEIGHTS
    from nemo_curator.image.classifiers.nsfw import NSFW_WEIGHTS
    from nemo_curator.utils.download import fetch_weights
    from nemo_curator.utils.file_utils import atomic_write, write_json_atomic, write_parquet_atomic

    paths = {"open": os.path.join(folder, "plain.txt"), "atomic_write": os.path.join(folder, "a.bin"),
             "atomic_write_text": os.path.join(folder, "sub", "a.txt"),
             "parquet": os.path.join(folder, "00000.parquet"), "json": os.path.join(folder, "s.json")}
    with open(paths["open"], "w") as f:
        f.write("x")
    with atomic_write(paths["atomic_write"]) as f:
        f.write(b"x")
    with atomic_write(paths["atomic_write_text"], "w") as f:
        f.write("x")
    write_parquet_atomic(pd.DataFrame({"key": ["0"]}), paths["parquet"])
    write_json_atomic({"a": 1}, paths["json"])
    paths["aesthetic weights (.pth)"] = str(fetch_weights(AESTHETIC_WEIGHTS, url=aesthetic_url))
    paths["nsfw weights (from the zip)"] = str(fetch_weights(NSFW_WEIGHTS, url=nsfw_url))
    print(json.dumps({name: stat.S_IMODE(os.stat(p).st_mode) for name, p in paths.items()}))
""")


@pytest.fixture
def weights_server(server, shared_dir):
    """The local weights server (conftest) serving the aesthetic .pth and the upstream NSFW zip."""
    server.routes["/a.pth"] = ("bytes", (shared_dir / "weights" / AESTHETIC_WEIGHTS.filename).read_bytes())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(NSFW_WEIGHTS.archive_member, (shared_dir / "weights" / NSFW_WEIGHTS.filename).read_bytes())
    server.routes["/nsfw.zip"] = ("bytes", buf.getvalue())
    return server


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_get_the_mode_open_gives_under_the_umask(weights_server, tmp_path, umask, expected):
    server = weights_server
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEMO_CURATOR_WEIGHTS_URL_")}
    root = os.path.dirname(os.path.dirname(nemo_curator.__file__))  # the subprocess imports this same package
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, "-c", SCRIPT, oct(umask), str(tmp_path), server.url("/a.pth"),
                           server.url("/nsfw.zip")], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    modes = json.loads(done.stdout.strip().splitlines()[-1])
    assert modes["open"] == expected  # what a plain open() gives here
    assert {name: oct(mode) for name, mode in modes.items()} == {name: oct(expected) for name in modes}


def test_atomic_write_keeps_no_temporary_and_gives_open_modes_in_this_process(tmp_path):
    """Under the test process's own umask, whatever it is: the same mode as open()."""
    from nemo_curator.utils.file_utils import atomic_write

    with open(tmp_path / "plain", "wb") as f:
        f.write(b"x")
    with atomic_write(tmp_path / "atomic") as f:
        f.write(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic", "plain"]
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
