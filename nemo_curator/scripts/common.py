"""What the subcommands share: the Dask client from the cluster options, argument types, output lines."""
from __future__ import annotations

import argparse
import contextlib
import logging


def say(text: str) -> None:
    """Print a progress line for a person (stdout)."""
    print(text, flush=True)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


@contextlib.contextmanager
def open_client(args):
    """A Dask client from the cluster options (a running scheduler, else a local cluster of
    ``--cluster`` kind); a local cluster started here is closed on exit."""
    from nemo_curator import get_client

    if args.scheduler_file or args.scheduler_address:
        client = get_client(scheduler_file=args.scheduler_file, scheduler_address=args.scheduler_address)
        owned = None
    else:
        kwargs = {"n_workers": args.n_workers} if args.n_workers else {}
        kwargs["silence_logs"] = logging.INFO if args.verbose else logging.ERROR
        client = get_client(cluster_type=args.cluster, rmm_pool_size=args.rmm_pool_size, **kwargs)
        owned = client.cluster
    workers = len(client.scheduler_info(n_workers=-1)["workers"])
    say(f"dask: {workers} workers, dashboard {client.dashboard_link}")
    try:
        yield client
    finally:
        client.close()
        if owned is not None:
            owned.close()
