"""Dask cluster set-up (``get_client``) and the worker-side cache of loaded models."""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Hashable

from nemo_curator.utils.device import cuda_device_count
from nemo_curator.utils.import_utils import gpu_only_import

logger = logging.getLogger(__name__)

CLUSTER_TYPES = ("auto", "cpu", "gpu")
DEFAULT_THREADS_OUTSIDE_CLUSTER = 4  # DALI threads of a reader that runs outside any Dask worker
# A local cluster's dashboard shows task names, file paths and logs: only this machine may reach it
# unless the caller opens it (dashboard_address="0.0.0.0:8787"); reach it through an SSH tunnel.
DEFAULT_DASHBOARD_ADDRESS = "127.0.0.1:8787"
# threads of a GPU worker: one computes a shard on the GPU while the other prepares the next
# (parquet read, tar scan); they take turns on the GPU (utils.device.device_turn)
GPU_WORKER_THREADS = 2
MAIN_GUARD_HINT = (
    "Dask starts its worker processes with 'spawn', which imports your script again in each of them: in a "
    "script, put the code that calls get_client() (and everything after it) under "
    "`if __name__ == \"__main__\":`")


def get_client(
    cluster_type: str = "cpu",
    scheduler_address: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = os.cpu_count(),
    threads_per_worker: int = 1,
    nvlink_only: bool = False,
    protocol: str = "tcp",
    rmm_pool_size: str | int | None = "1024M",
    enable_spilling: bool = True,
    set_torch_to_use_rmm: bool = False,
    rmm_async: bool = True,
    rmm_maximum_pool_size: str | int | None = None,
    rmm_managed_memory: bool = False,
    rmm_release_threshold: str | int | None = None,
    **cluster_kwargs,
):
    """Return a ``distributed.Client``: to a running cluster, or to a new local one.

    - ``scheduler_address`` ("tcp://host:8786") or ``scheduler_file`` (JSON written by
      ``dask scheduler --scheduler-file``): connect to a cluster that already runs (Slurm, PBS,
      dask-mpi, dask-jobqueue). At most one of the two.
    - otherwise ``cluster_type="cpu"``: a ``distributed.LocalCluster`` of ``n_workers`` processes
      with ``threads_per_worker`` threads each; ``"gpu"``: a ``dask_cuda.LocalCUDACluster``, one
      worker per visible GPU with ``GPU_WORKER_THREADS`` threads (one shard computes while the
      next is prepared; a ``threads_per_worker`` other than 1 replaces it), with the RMM pool,
      spilling and protocol options passed through;
      ``"auto"``: "gpu" when this machine has a GPU and dask-cuda is installed, else "cpu" (a GPU
      without dask-cuda is logged as a warning).
      ``set_torch_to_use_rmm=True`` makes torch allocate through RMM on every GPU worker.

    A local cluster's dashboard listens on 127.0.0.1 only (``DEFAULT_DASHBOARD_ADDRESS``; from
    another machine: ``ssh -L 8787:127.0.0.1:8787 <this host>``); ``dashboard_address="0.0.0.0:8787"``
    opens it to the network, ``"127.0.0.1:0"`` picks a free port. ``security=`` (a
    ``distributed.security.Security``) secures the connection with TLS, to a running cluster as to
    a local one. In a script, call it under ``if __name__ == "__main__":`` (Dask starts workers with
    spawn, which imports the script again). Extra keyword arguments go to the cluster constructor.
    """
    from dask.distributed import Client

    if cluster_type not in CLUSTER_TYPES:
        raise ValueError(f"cluster_type must be one of {CLUSTER_TYPES}, got {cluster_type!r}")
    if scheduler_address and scheduler_file:
        raise ValueError("pass scheduler_address or scheduler_file, not both: they name the same scheduler")
    if not (scheduler_address or scheduler_file):
        if _in_spawned_import():
            raise RuntimeError(f"get_client() was called while a new process imported the script. {MAIN_GUARD_HINT}")
        if cluster_type == "auto":
            cluster_type = local_cluster_type()

    if set_torch_to_use_rmm and cluster_type != "gpu" and not scheduler_address and not scheduler_file:
        raise ValueError("set_torch_to_use_rmm=True needs GPU workers (cluster_type='gpu')")

    if scheduler_address or scheduler_file:
        if scheduler_file and not os.path.exists(scheduler_file):
            raise FileNotFoundError(f"scheduler file {scheduler_file} does not exist: start the scheduler with "
                                    f"`dask scheduler --scheduler-file {scheduler_file}` first")
        client = Client(address=scheduler_address, scheduler_file=scheduler_file, timeout=cluster_kwargs.pop("timeout", "60s"),
                        security=cluster_kwargs.pop("security", None))
        _require_workers(client, cluster_kwargs.pop("wait_for_workers_timeout", 60))
    elif cluster_type == "cpu":
        cluster_kwargs.setdefault("dashboard_address", DEFAULT_DASHBOARD_ADDRESS)
        if n_workers is not None and n_workers < 1:
            raise ValueError(f"n_workers must be at least 1, got {n_workers}")
        cluster = _start_local_cluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                                       **cluster_kwargs)
        client = Client(cluster)
    else:
        client = _local_cuda_client(
            n_workers, threads_per_worker, nvlink_only, protocol, rmm_pool_size, enable_spilling, rmm_async,
            rmm_maximum_pool_size, rmm_managed_memory, rmm_release_threshold, **cluster_kwargs,
        )
    if set_torch_to_use_rmm:
        client.run(_set_torch_to_use_rmm)
    logger.info("dask client ready: %s (dashboard %s%s)", client, client.dashboard_link,
                "; from another machine: ssh -L <port>:127.0.0.1:<port> this host" if "127.0.0.1" in str(
                    client.dashboard_link) else "")
    return client


def local_cluster_type() -> str:
    """What ``cluster_type="auto"`` starts on this machine: "gpu" when a GPU is visible and dask-cuda
    is installed, else "cpu"."""
    import importlib.util

    if cuda_device_count() == 0:
        return "cpu"
    if importlib.util.find_spec("dask_cuda") is None:
        logger.warning("a GPU is visible but dask-cuda is not installed: starting CPU workers (pip install -e .[gpu])")
        return "cpu"
    return "gpu"


def _start_local_cluster(cluster_class=None, **kwargs):
    """Start a local cluster; a failure to start its worker processes says what to do in a script."""
    if cluster_class is None:
        from dask.distributed import LocalCluster as cluster_class
    try:
        return cluster_class(**kwargs)
    except Exception as err:
        main_file = _main_file()
        if "failed to start" not in str(err).lower() or main_file is None:
            raise
        hint = MAIN_GUARD_HINT if os.path.isfile(main_file) else (
            f"the main module is {main_file!r}, not a file: Dask's spawned worker processes import the main module "
            f"again, so save the code as a script (under `if __name__ == \"__main__\":`) and run that")
        raise RuntimeError(f"the local Dask cluster could not start its workers ({type(err).__name__}: {err}). "
                           f"{hint}") from err


def _main_file() -> str | None:
    """The file of ``__main__`` that spawned workers import again; None in an interpreter or a notebook."""
    import sys

    return getattr(sys.modules.get("__main__"), "__file__", None)


def _in_spawned_import() -> bool:
    """True while a spawned child process imports the parent's script again (as ``__mp_main__``):
    multiprocessing's spawn runs it before the child's own work, and only afterwards makes it
    ``__main__``; a process's later calls (a Dask task) are not affected."""
    import multiprocessing
    import sys

    return (multiprocessing.current_process().name != "MainProcess" and "__mp_main__" in sys.modules
            and sys.modules.get("__main__") is not sys.modules.get("__mp_main__"))


def _require_workers(client, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for at least one worker; raise a clear error if none joins."""
    from distributed.exceptions import WorkerStartTimeoutError

    try:
        client.wait_for_workers(1, timeout=timeout_s)
    except (TimeoutError, WorkerStartTimeoutError) as err:
        address = client.scheduler_info().get("address", "?") if client.status == "running" else "?"
        client.close()
        raise RuntimeError(
            f"the scheduler at {address} has no workers after {timeout_s} s: start workers "
            f"(`dask worker --scheduler-file ...` or `dask cuda worker ...`) before connecting"
        ) from err


def _local_cuda_client(n_workers, threads_per_worker, nvlink_only, protocol, rmm_pool_size, enable_spilling, rmm_async,
                       rmm_maximum_pool_size, rmm_managed_memory, rmm_release_threshold, **cluster_kwargs):
    if cuda_device_count() == 0:
        raise RuntimeError("cluster_type='gpu' needs a CUDA GPU, and none is visible (check CUDA_VISIBLE_DEVICES "
                           "and the driver with nvidia-smi), or use cluster_type='cpu'")
    dask_cuda = gpu_only_import("dask_cuda", "get_client(cluster_type='gpu')")
    from dask.distributed import Client

    if nvlink_only and protocol != "ucx":
        raise ValueError("nvlink_only=True needs protocol='ucx'")
    extra = {}
    if nvlink_only:
        extra.update(enable_tcp_over_ucx=False, enable_nvlink=True, enable_infiniband=False)
    if rmm_async:
        extra["rmm_async"] = True
        if rmm_release_threshold is not None:
            extra["rmm_release_threshold"] = rmm_release_threshold
    else:
        extra["rmm_managed_memory"] = rmm_managed_memory
        if rmm_maximum_pool_size is not None:
            extra["rmm_maximum_pool_size"] = rmm_maximum_pool_size
    if rmm_pool_size is not None:
        extra["rmm_pool_size"] = rmm_pool_size
    cluster_kwargs.setdefault("dashboard_address", DEFAULT_DASHBOARD_ADDRESS)
    if n_workers is not None and n_workers != os.cpu_count():
        extra["n_workers"] = n_workers  # default: one worker per visible GPU
    cluster_kwargs.setdefault("resources", {"GPU": 1})  # one GPU per worker: stages ask for fractions of it
    cluster_kwargs.setdefault("threads_per_worker", GPU_WORKER_THREADS if threads_per_worker == 1 else threads_per_worker)
    cluster = _start_local_cluster(dask_cuda.LocalCUDACluster, protocol=protocol, enable_cudf_spill=enable_spilling,
                                   **extra, **cluster_kwargs)
    return Client(cluster)


def _set_torch_to_use_rmm() -> None:
    """Route torch's CUDA allocations through RMM on this worker."""
    rmm_torch = gpu_only_import("rmm.allocators.torch", "set_torch_to_use_rmm=True")
    import torch

    torch.cuda.memory.change_current_allocator(rmm_torch.rmm_torch_allocator)


def cpu_threads_per_worker() -> int:
    """CPU threads one worker process may use: the cores it is pinned to when it is pinned to fewer
    than the machine has (dask-cuda's CPU affinity), else the machine's cores divided among the Dask
    workers on the same host (at least 1); ``DEFAULT_THREADS_OUTSIDE_CLUSTER`` outside a worker.
    Asked of the scheduler once per process."""
    global _THREADS
    if _THREADS is None:
        _THREADS = _count_threads_per_worker()
    return _THREADS


def _count_threads_per_worker() -> int:
    try:
        from distributed import get_client as _get_client, get_worker
    except ImportError:
        return DEFAULT_THREADS_OUTSIDE_CLUSTER
    try:
        worker = get_worker()
    except ValueError:  # not inside a Dask worker
        return DEFAULT_THREADS_OUTSIDE_CLUSTER
    total = os.cpu_count() or 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = total
    if cores < total:  # pinned to its share already (dask-cuda pins each worker near its GPU)
        return max(1, cores)
    try:
        from distributed.comm import get_address_host

        host = get_address_host(worker.address)
        workers = _get_client().scheduler_info(n_workers=-1)["workers"].values()
        on_host = sum(1 for w in workers if w.get("host") == host) or 1
    except Exception:  # noqa: BLE001 - no answer from the scheduler: count this worker alone
        on_host = 1
    return max(1, cores // on_host)


_THREADS: int | None = None


# ----------------------------------------------------------------------------------------------
# Worker-side cache: one loaded object per (process, key). The key must hold the object's WHOLE
# configuration (model name, weights, precision, device, ...), never the name alone.
_CACHE: dict[Hashable, Any] = {}
_CACHE_LOCK = threading.Lock()


def load_object_on_worker(key: Hashable, loader: Callable[[], Any]) -> Any:
    """Return the object cached under ``key`` in this process, calling ``loader()`` the first time.

    Thread-safe: a worker with several threads loads each object once.
    """
    with _CACHE_LOCK:
        if key not in _CACHE:
            logger.info("loading %s on worker pid %d", key, os.getpid())
            _CACHE[key] = loader()
        return _CACHE[key]


def evict_from_worker_cache(predicate: Callable[[Hashable], bool]) -> int:
    """Drop the objects cached in this process whose key satisfies ``predicate``; return how many
    (e.g. the model of the same configuration with weights since replaced)."""
    with _CACHE_LOCK:
        stale = [key for key in _CACHE if predicate(key)]
        for key in stale:
            del _CACHE[key]
    return len(stale)


def clear_worker_cache() -> None:
    """Drop every cached object in this process (e.g. to free GPU memory between runs), and what
    the hooks of ``on_clear_worker_cache`` hold (the shard reader's built DALI pipelines)."""
    with _CACHE_LOCK:
        _CACHE.clear()
    for hook in list(_CLEAR_HOOKS):
        hook()


_CLEAR_HOOKS: list[Callable[[], None]] = []


def on_clear_worker_cache(hook: Callable[[], None]) -> None:
    """Call ``hook()`` on every ``clear_worker_cache`` (a module that keeps its own per-process cache)."""
    if hook not in _CLEAR_HOOKS:
        _CLEAR_HOOKS.append(hook)


def cached_keys() -> list[Hashable]:
    """The keys cached in this process (for tests and diagnostics)."""
    with _CACHE_LOCK:
        return list(_CACHE)
