"""The Ray cluster a command runs on: joining it (or starting a local one), and what it spans.

A job submitted with ``ray job submit`` joins the cluster it was submitted to; a command started by hand joins the
cluster RAY_ADDRESS names or the one running on this machine, and only where allowed starts a local Ray.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class NodeType:
    """A kind of node a cluster's autoscaler may run: its resources, and how many at most (None: no limit)."""

    name: str
    resources: dict[str, float]
    max_count: int | None
    head: bool = False

    def holds(self, bundle: dict[str, float]) -> int:
        """How many ``bundle`` (a worker's resources) one node of this type holds."""
        fits = [math.floor(self.resources.get(name, 0.0) / need + 1e-9) for name, need in bundle.items() if need > 0]
        return min(fits) if fits else 1 << 30

    def __str__(self) -> str:
        resources = ", ".join(f"{k} {v:g}" for k, v in self.resources.items()
                              if k not in ("memory", "object_store_memory"))
        most = "head" if self.head else "any number" if self.max_count is None else f"0-{self.max_count}"
        return f"{self.name} ({resources}; {most})"


@dataclass(frozen=True)
class Autoscaler:
    """What a cluster's autoscaler may start: its node types (None when they cannot be read from this process, see
    :mod:`denseqa.ray_private`) and the most worker nodes in all (None: no limit)."""

    node_types: tuple[NodeType, ...] | None
    max_workers: int | None


def node_types_from_config(config: dict) -> Autoscaler:
    """The autoscaler a cluster config (cluster.yaml's format: ``available_node_types``) describes. A node type
    without resources (the launcher fills some in from the instance type) makes the node types unknown."""
    types = []
    for name, node_type in config.get("available_node_types", {}).items():
        resources = {k: float(v) for k, v in (node_type.get("resources") or {}).items()}
        head = name == config.get("head_node_type")
        if "CPU" not in resources:
            return Autoscaler(None, config.get("max_workers"))
        types.append(NodeType(name, resources, 1 if head else node_type.get("max_workers"), head))
    return Autoscaler(tuple(types), config.get("max_workers"))


def autoscaler() -> Autoscaler | None:
    """The connected cluster's autoscaler, or None when the cluster cannot add nodes.

    From the cluster config a platform reports to the GCS; else from Ray's own autoscaler (the cluster launcher's,
    KubeRay's): v1's status tells it from a fixed-size cluster's monitor, and its config file, readable on the head
    node, gives the node types; v2 is known to run, its limits are not. How each is read is private to Ray (see
    denseqa.ray_private).
    """
    import ray
    import yaml

    try:
        config = ray_private.autoscaler_cluster_config()
        if config is not None and config.node_group_configs:
            types = tuple(NodeType(g.name, dict(g.resources), None if g.max_count == -1 else g.max_count)
                          for g in config.node_group_configs)
            unbounded = any(t.max_count is None for t in types)
            return Autoscaler(types, None if unbounded else sum(t.max_count for t in types))
        v2 = ray_private.autoscaler_v2()
        if not v2:
            status = ray_private.autoscaler_status()
            if status is None or ray_private.mirrors_fixed_nodes(status):
                return None
        seen, path = ray_private.autoscaler_monitor(ray.get_runtime_context().gcs_address)
    except Exception as e:  # private APIs: if they move, say so and judge the cluster by the nodes alive now
        logger.warning("cannot tell whether this cluster autoscales (%s): taken as one that cannot add nodes", e)
        return None
    if v2 and seen and path is None:
        return None  # v2's monitor without a config: a fixed-size cluster (its read-only provider)
    if path is None:
        # An autoscaler whose node types cannot be read here (v2 in KubeRay's sidecar, a v1 monitor elsewhere):
        # it adds nodes, within limits not known.
        return Autoscaler(None, None)
    try:
        with open(os.path.expanduser(path)) as f:
            return node_types_from_config(yaml.safe_load(f))
    except (OSError, yaml.YAMLError) as e:
        logger.debug("autoscaler config %s unreadable: %s", path, e)
        return Autoscaler(None, None)


def span() -> tuple[int, int | None]:
    """(nodes alive now, most nodes the cluster may run: None when unbounded or unknown, 0 when it cannot add
    nodes)."""
    import ray

    alive = sum(1 for node in ray.nodes() if node["Alive"])
    scaler = autoscaler()
    if scaler is None:
        return alive, 0
    if scaler.node_types is None:
        return alive, None
    workers = [t.max_count for t in scaler.node_types if not t.head]
    if any(most is None for most in workers) and scaler.max_workers is None:
        return alive, None
    most = sum(m for m in workers if m is not None) if all(m is not None for m in workers) else None
    if scaler.max_workers is not None:
        most = scaler.max_workers if most is None else min(most, scaler.max_workers)
    return alive, 1 + most


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
                         f"the {what}: use a URI (s3://bucket/runs/x, gs://...), or pass --shared-filesystem "
                         "if this path is on storage every node mounts (NFS, EFS)")


def free_resources(until: dict[str, float] | None = None, timeout_s: float = 20.0) -> dict[str, float]:
    """``ray.available_resources()`` once it has settled: the actors of a Ray Data job that just finished give
    their CPUs back a moment later, so a reading taken right after it would count them as held. Returns once
    ``until`` is met, or its resources (CPU and GPU without it) have not grown for 3 s, or after ``timeout_s``.
    Only those count as growing: the object store's free memory moves all the time and would hold the reading off
    until ``timeout_s``."""
    import time

    import ray

    watched = tuple(until) if until else ("CPU", "GPU")
    deadline = time.monotonic() + timeout_s
    free, stable_since = ray.available_resources(), time.monotonic()
    while time.monotonic() < deadline:
        if until and all(free.get(k, 0.0) + 1e-6 >= v for k, v in until.items()):
            break
        if time.monotonic() - stable_since >= 3.0:
            break
        time.sleep(0.25)
        now = ray.available_resources()
        if any(now.get(k, 0.0) > free.get(k, 0.0) + 1e-6 for k in watched):
            stable_since = time.monotonic()
        free = now
    return free


def check_can_schedule(what: str, workers: int, cpus: float, gpus: float = 0) -> None:
    """Fail now, saying why, when the cluster can never hold ``workers`` workers (training workers, model actors)
    of ``cpus`` CPUs and ``gpus`` GPUs each, plus one CPU for the Ray Data reads that feed them.

    Ray would queue the work and wait forever. A cluster that cannot add nodes must have them free now; an
    autoscaling one must have node types that hold them, within their limits (the autoscaler starts the nodes).
    """
    import ray

    scaler = autoscaler()
    if scaler is not None:
        if scaler.node_types is not None:
            _check_node_types_hold(what, scaler, workers, {"CPU": cpus, "GPU": gpus})
        return
    need = {"CPU": 1 + workers * cpus, "GPU": workers * gpus}
    free, total = free_resources(until=need), ray.cluster_resources()
    for name in ("CPU", "GPU"):
        if need[name] > free.get(name, 0.0) + 1e-6:
            raise InputError(
                f"{what} needs {need[name]:g} free {name}s, but this cluster has {free.get(name, 0.0):g} of "
                f"{total.get(name, 0.0):g} free and cannot add nodes: running actors hold the rest (a deployed "
                "search service, for one: stop it with `serve shutdown -y`), or give Ray more (ray start "
                f"--num-{name.lower()}s N)")


def _check_node_types_hold(what: str, scaler: Autoscaler, workers: int, per_worker: dict[str, float]) -> None:
    """The autoscaler's side of check_can_schedule: one worker fits a node type, and all of them (and one CPU for
    the reads) fit the node types' limits. A bin-packing estimate, as the autoscaler's: per node type, how many
    workers one node holds times how many nodes it may start."""
    types = scaler.node_types or ()
    names = "; ".join(str(t) for t in types)
    bundle = {k: v for k, v in per_worker.items() if v > 0}
    one = " and ".join(f"{v:g} {k}" for k, v in bundle.items())
    if not any(t.holds(bundle) for t in types):
        lacking = [k for k, v in bundle.items() if all(t.resources.get(k, 0.0) + 1e-9 < v for t in types)]
        has = " and ".join(f"{bundle[k]:g} {k}" for k in lacking or bundle)
        raise InputError(f"{what} needs workers of {one} each, but no node type of this autoscaling cluster has "
                         f"{has}: {names}. Add a node type that has them to the cluster config, or ask for less "
                         "(the --*.cpus-per-* and --*.use-gpu options)")
    room = 0
    for t in types:
        if t.holds(bundle):
            room += t.holds(bundle) * (t.max_count if t.max_count is not None else workers)
    cpus = sum(t.resources.get("CPU", 0.0) * (t.max_count if t.max_count is not None else workers + 1)
               for t in types)
    need_cpus = workers * bundle.get("CPU", 0.0) + 1
    if room < workers or cpus + 1e-6 < need_cpus:
        raise InputError(f"{what} needs {workers} workers of {one} each and 1 CPU for reading data "
                         f"({need_cpus:g} CPUs), but this autoscaling cluster's node types hold at most "
                         f"{min(room, workers)} such workers and {cpus:g} CPUs: {names}. Raise a node type's "
                         "max_workers, or ask for fewer workers")
