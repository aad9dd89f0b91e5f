"""Joining or starting Ray, for every stage that runs on it (extraction's Ray executor, Ray Train): one place
decides which Ray a process uses and whether it stops it afterwards. Ray is imported only when called."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from slidecache.errors import ConfigError


def _check_address(address: str) -> None:
    """An http(s):// address is a dashboard's, where `ray job submit --address` sends jobs; a process joins a
    cluster by its GCS address (what `ray start --head` prints, HEAD:6379)."""
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"RAY_ADDRESS={address} is a Ray dashboard's address (for `ray job submit --address`); "
                          "to run on the cluster, submit the command with `ray job submit --address "
                          f"{address} --working-dir . -- ...`, or join it from this process with "
                          "RAY_ADDRESS=HEAD:6379 (its GCS address); unset RAY_ADDRESS to run on this machine alone")


def connect_ray(address: str | None = None, *, object_store_memory: int | None = None,
                join_running: bool = False) -> bool:
    """Join the cluster at `address`, else the one RAY_ADDRESS names (`ray job submit` sets it); else start
    Ray on this machine: a new one of this process's own with `object_store_memory` as its object-store cap,
    or, with `join_running`, the one a `ray start` left running here if there is one (else a new one).

    Returns True when this call initialised Ray in this process (which should then shut it down).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    _check_address(address or os.environ.get("RAY_ADDRESS", ""))
    if address or os.environ.get("RAY_ADDRESS") or join_running:
        # address None: ray.init takes RAY_ADDRESS, else joins a Ray running here, else starts one
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    else:
        # "local": never a Ray that a `ray start` left running on this machine (which ray.init() with no
        # address would join, refusing the object-store cap)
        ray.init(address="local", object_store_memory=object_store_memory, include_dashboard=False,
                 log_to_driver=True)
    return True


def shutdown_ray() -> None:
    import ray

    ray.shutdown()


@contextmanager
def ray_connection(address: str | None = None, *, object_store_memory: int | None = None,
                   join_running: bool = False) -> Iterator[None]:
    """Ray for the length of a `with` block (connect_ray), shut down afterwards only if this block started it."""
    started = connect_ray(address, object_store_memory=object_store_memory, join_running=join_running)
    try:
        yield
    finally:
        if started:
            shutdown_ray()
