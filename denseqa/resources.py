"""How many logical CPUs a Ray worker or actor asks for, so that Ray Data's read tasks are never starved, and how
many torch threads it runs, so that the node's cores are used.

The two are different things: a logical CPU is a scheduling token, a thread uses a core. A training worker that
asks for 1 logical CPU (leaving one for Ray Data's reads) can still run its matrix products on both cores of a
2-core node, since the read tasks are idle once the data is in the object store.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


def cpus_per_worker_default(num_workers: int, use_gpu: bool) -> float:
    """1 CPU per GPU worker; on CPU, share all but one of the cluster's CPUs among the workers.

    Workers (training workers, embedding actors) that hold every CPU leave none for the tasks that read the data
    they consume, and the job waits forever. 2 workers on a 2-core machine get 0.5 CPU each. On a cluster that
    cannot add nodes, what is shared is what is free now: CPUs held by running actors (a deployed search
    service) would otherwise be counted twice.
    """
    import ray

    from denseqa.cluster import free_resources, span

    if use_gpu:
        return 1.0
    total = ray.cluster_resources().get("CPU", 1.0)
    if span()[1] == 0:
        total = min(total, free_resources(until={"CPU": total}).get("CPU", 0.0))
    return max(0.1, min(1.0, math.floor((total - 1) / num_workers * 20) / 20))


def node_cores() -> int:
    """The cores this process may run on: its CPU affinity, bounded by a cgroup v2 CPU quota (a Kubernetes pod's
    limit, which ``os.cpu_count()`` does not see)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def torch_threads_default(processes_on_node: int) -> int:
    """torch intra-op threads for one of ``processes_on_node`` CPU processes (training workers, model actors)
    sharing a node: its cores divided among them, at least 1."""
    return max(1, node_cores() // max(1, processes_on_node))


def embeds_on_gpu(use_gpu: bool | None) -> bool:
    """Whether a model actor pool runs on GPUs: as configured, else when the connected cluster has GPUs."""
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) > 0 if use_gpu is None else use_gpu


@dataclass(frozen=True)
class ModelActors:
    """The pool of Ray Data actors that run a model over a dataset (embedding passages, mining negatives)."""

    actors: int
    use_gpu: bool
    cpus: float  # logical CPUs each actor asks for
    torch_threads: int | None  # each actor's, on CPU; None on GPU (torch's default)


def model_actors(what: str, use_gpu: bool | None, actors: int | None = None, cpus_per_actor: float | None = None,
                 torch_threads: int | None = None) -> ModelActors:
    """Resolve a model actor pool's defaults on the connected cluster, and fail now if it cannot be scheduled.

    GPUs when the cluster has them (``use_gpu`` None), one actor per GPU, else one actor; CPUs per actor from
    :func:`cpus_per_worker_default`; on CPU the machine's cores are shared among the actors' torch threads.
    ``what`` names the work in the error of a cluster that lacks the resources.
    """
    import ray

    from denseqa.cluster import check_can_schedule

    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = embeds_on_gpu(use_gpu)
    actors = actors or (max(1, cluster_gpus) if use_gpu else 1)
    cpus = cpus_per_actor or cpus_per_worker_default(actors, use_gpu)
    threads = torch_threads or (None if use_gpu else torch_threads_default(actors))
    check_can_schedule(what, 1 + actors * cpus, actors if use_gpu else 0)  # the actors and one read task
    return ModelActors(actors, use_gpu, cpus, threads)
