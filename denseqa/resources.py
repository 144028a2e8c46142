"""How many logical CPUs a Ray worker or actor asks for, so that Ray Data's read tasks are never starved."""

from __future__ import annotations

import math


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
