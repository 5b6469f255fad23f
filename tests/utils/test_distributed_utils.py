"""get_client: local CPU clusters, connecting to running clusters, and argument errors."""
import json

import pytest
from distributed import LocalCluster

from nemo_curator import get_client


def test_cpu_cluster_has_requested_workers_and_threads():
    client = get_client(cluster_type="cpu", n_workers=1, threads_per_worker=2, dashboard_address=":0")
    try:
        info = client.scheduler_info()["workers"]
        assert len(info) == 1
        assert [w["nthreads"] for w in info.values()] == [2]
        assert client.submit(lambda x: x + 1, 1).result() == 2
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def test_connects_to_running_cluster_by_address_and_by_scheduler_file(client, tmp_path):
    address = client.scheduler.address
    other = get_client(scheduler_address=address)
    try:
        assert other.submit(sum, [1, 2]).result() == 3
    finally:
        other.close()
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text(json.dumps({"address": address}))
    other = get_client(scheduler_file=str(scheduler_file))
    try:
        assert len(other.scheduler_info()["workers"]) == 2
    finally:
        other.close()


def test_scheduler_without_workers_is_a_clear_error():
    with LocalCluster(n_workers=0, dashboard_address=":0") as cluster:
        with pytest.raises(RuntimeError, match="has no workers"):
            get_client(scheduler_address=cluster.scheduler_address, wait_for_workers_timeout=1)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"cluster_type": "tpu"}, ValueError, "cluster_type must be one of"),
        ({"scheduler_address": "tcp://x:1", "scheduler_file": "f.json"}, ValueError, "not both"),
        ({"scheduler_file": "/nonexistent/scheduler.json"}, FileNotFoundError, "dask scheduler --scheduler-file"),
        ({"n_workers": 0}, ValueError, "n_workers must be at least 1"),
        ({"set_torch_to_use_rmm": True, "n_workers": 1, "dashboard_address": ":0"}, ValueError, "needs GPU workers"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        get_client(**kwargs)


def test_gpu_cluster_without_gpu_says_so():
    from conftest import cuda_available

    if cuda_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        get_client(cluster_type="gpu")


@pytest.mark.gpu
def test_gpu_cluster_one_worker_per_gpu():
    import torch

    from nemo_curator.utils.distributed_utils import GPU_WORKER_THREADS

    client = get_client(cluster_type="gpu", rmm_pool_size=None)
    try:
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == torch.cuda.device_count()
        assert {w["nthreads"] for w in workers} == {GPU_WORKER_THREADS}  # one computes, one prepares
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def test_auto_starts_cpu_workers_on_a_machine_without_gpu():
    from nemo_curator.utils.distributed_utils import local_cluster_type
    from nemo_curator.utils.device import cuda_available

    if cuda_available():
        pytest.skip("this machine has a GPU: 'auto' means GPU workers here")
    assert local_cluster_type() == "cpu"
    client = get_client(cluster_type="auto", n_workers=1, dashboard_address=":0")
    try:
        assert type(client.cluster).__name__ == "LocalCluster" and client.submit(abs, -3).result() == 3
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    with pytest.raises(ValueError, match="cluster_type must be one of"):
        get_client(cluster_type="tpu")


UNGUARDED_SCRIPT = """
from nemo_curator import get_client

client = get_client(cluster_type="cpu", n_workers=1, dashboard_address=":0")  # no __main__ guard
print("started", flush=True)
client.close()
"""


def test_a_script_without_the_main_guard_is_told_what_to_do(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED_SCRIPT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode != 0 and "started" not in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError:") and 'if __name__ == "__main__":' in last, done.stderr[-3000:]
    guarded = tmp_path / "guarded.py"
    guarded.write_text("if __name__ == '__main__':\n" + "".join(f"    {line}\n" for line in UNGUARDED_SCRIPT.splitlines()))
    done = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0 and "started" in done.stdout, done.stderr[-3000:]


def test_a_local_clusters_dashboard_listens_on_this_machine_only():
    import psutil

    client = get_client(cluster_type="cpu", n_workers=1)  # the default dashboard address
    try:
        port = int(client.dashboard_link.split(":")[2].split("/")[0])
        listening = [c.laddr for c in psutil.Process().net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and {addr.ip for addr in listening} <= {"127.0.0.1"}, listening
        assert "127.0.0.1" in client.dashboard_link
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()


def _tls_files(folder):
    """A self-signed CA and a certificate it signed for 127.0.0.1 (openssl), as PEM files."""
    import subprocess

    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "node.pem",
        "-days", "1", "-extfile", "ext.cnf")
    return folder / "ca.pem", folder / "node.pem", folder / "node.key"


def test_a_tls_secured_scheduler_and_worker_run_a_job_through_the_scheduler_file(tmp_path):
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    from distributed.security import Security

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificates can be made for the TLS test")
    ca, cert, key = _tls_files(tmp_path)
    tls = ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    dask_cli = str(Path(sys.executable).with_name("dask"))
    scheduler_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([dask_cli, "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                               "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file), *tls],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.2)
        procs.append(subprocess.Popen([dask_cli, "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "1",
                                       "--nthreads", "1", "--host", "127.0.0.1", *tls],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        security = Security(tls_ca_file=str(ca), tls_client_cert=str(cert), tls_client_key=str(key), require_encryption=True)
        client = get_client(scheduler_file=str(scheduler_file), security=security)
        try:
            assert client.scheduler.address.startswith("tls://")
            assert client.submit(sum, [1, 2, 3]).result() == 6
        finally:
            client.close()
        # without the certificates the scheduler does not talk (in another process: a Client that
        # failed to connect stays registered as this process's default client)
        refused = subprocess.run([sys.executable, "-c", "import sys; from nemo_curator import get_client; "
                                  f"get_client(scheduler_file={str(scheduler_file)!r}, timeout='3s')"],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
    finally:
        for proc in procs[::-1]:
            proc.terminate()
            proc.wait(timeout=30)


def _in_spawned_import_now():
    from nemo_curator.utils.distributed_utils import _in_spawned_import

    return _in_spawned_import()


def test_a_spawned_process_may_start_its_own_cluster_after_its_import():
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_in_spawned_import_now) is False  # its work runs after the import of __main__
