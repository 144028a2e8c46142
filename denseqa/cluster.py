"""The Ray cluster a command runs on: joining it (or starting a local one), and what it spans.

A job submitted with ``ray job submit`` joins the cluster it was submitted to; a command started by hand joins the
cluster RAY_ADDRESS names or the one running on this machine, and only where allowed starts a local Ray.
"""

from __future__ import annotations

import logging
import os

from denseqa import ray_private, storage
from denseqa.errors import InputError

logger = logging.getLogger(__name__)


def connect(may_start_local: bool) -> bool:
    """Join the cluster RAY_ADDRESS names, or the one running on this machine; else start a local Ray if allowed.

    Returns whether a local Ray was started here (it stops with this process).
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address != "local":
        try:
            ray.init(address=address or "auto")
            return False
        except ConnectionError:
            if address or not may_start_local:
                raise InputError(f"no running Ray cluster at {address or 'this machine'}: start one (ray start "
                                 "--head) or set RAY_ADDRESS") from None
    elif not may_start_local:
        raise InputError("RAY_ADDRESS=local would start a new Ray; this needs the running cluster's address")
    ray.init(address="local")
    return True


def span() -> tuple[int, int | None]:
    """(nodes alive now, most nodes the autoscaler may run: None when unbounded, 0 when there is no autoscaler).

    The autoscaler's limits come from the cluster config it reports to the GCS (the cluster launcher and KubeRay
    do); Ray exposes no public call for it (see denseqa.ray_private).
    """
    import ray

    alive = sum(1 for node in ray.nodes() if node["Alive"])
    try:
        config = ray_private.autoscaler_cluster_config()
    except Exception as e:  # a private API: if it moves, fall back to the nodes alive now
        logger.debug("no autoscaler config readable: %s", e)
        config = None
    groups = list(config.node_group_configs) if config else []
    if any(group.max_count == -1 for group in groups):
        return alive, None
    return alive, sum(group.max_count for group in groups)


def check_reachable_by_every_node(path: str, what: str, shared_filesystem: bool = False) -> None:
    """Refuse a local ``path`` on a cluster of several nodes (now or after autoscaling) unless it is shared.

    Training workers write checkpoints and embedding actors write shards from other machines: a local folder
    would scatter them over the nodes' own disks.
    """
    if storage.is_uri(path) or shared_filesystem:
        return
    alive, most = span()
    if alive > 1 or most is None or most > 1:
        nodes = f"{alive} node{'s' * (alive > 1)}"
        if most is None or most > alive:
            nodes += f" (up to {'any number' if most is None else most} with autoscaling)"
        raise InputError(f"{what} {path} is a local path, but this cluster has {nodes} and every node must reach "
                         "the run folder: use a URI (s3://bucket/runs/x, gs://...), or pass --shared-filesystem "
                         "if this path is on storage every node mounts (NFS, EFS)")


def free_resources(until: dict[str, float] | None = None, timeout_s: float = 20.0) -> dict[str, float]:
    """``ray.available_resources()`` once it has settled: the actors of a Ray Data job that just finished give
    their CPUs back a moment later, so a reading taken right after it would count them as held. Returns once
    ``until`` is met, or the reading has not grown for 3 s, or after ``timeout_s``."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    free, stable_since = ray.available_resources(), time.monotonic()
    while time.monotonic() < deadline:
        if until and all(free.get(k, 0.0) + 1e-6 >= v for k, v in until.items()):
            break
        if time.monotonic() - stable_since >= 3.0:
            break
        time.sleep(0.25)
        now = ray.available_resources()
        if any(now.get(k, 0.0) > free.get(k, 0.0) + 1e-6 for k in now):
            stable_since = time.monotonic()
        free = now
    return free


def check_can_schedule(what: str, cpus: float, gpus: float = 0) -> None:
    """Fail now, saying why, when a cluster that cannot add nodes lacks the free CPUs or GPUs ``what`` needs.

    Ray would queue the work and wait forever; with an autoscaler the missing nodes are started instead.
    """
    import ray

    if span()[1] != 0:
        return
    free, total = free_resources(until={"CPU": cpus, "GPU": gpus}), ray.cluster_resources()
    for name, need in (("CPU", cpus), ("GPU", gpus)):
        if need > free.get(name, 0.0) + 1e-6:
            raise InputError(
                f"{what} needs {need:g} free {name}s, but this cluster has {free.get(name, 0.0):g} of "
                f"{total.get(name, 0.0):g} free and cannot add nodes: running actors hold the rest (a deployed "
                "search service, for one: stop it with `serve shutdown -y`), or give Ray more (ray start "
                f"--num-{name.lower()}s N)")
