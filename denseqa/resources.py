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
    """1 CPU per GPU worker; on CPU, all but one CPU of a node for each worker.

    Workers (training workers, embedding actors) that hold every CPU leave none for the tasks that read the data
    they consume, and the job waits forever. On a cluster that cannot add nodes, its CPUs are shared among the
    workers, one kept back (a whole one on a node): 2 workers on a 2-core machine get 0.5 CPU each. What is shared
    is what is free now: CPUs held by running actors (a deployed search service) would otherwise be counted twice.
    On an autoscaling cluster each worker asks for a node of the largest CPU node type less one CPU, so it runs
    alone on a node the autoscaler starts for it, and the reads run beside it (or, on 1-CPU nodes, on a node of
    their own); 1 CPU when the node types cannot be read.
    """
    import ray

    from denseqa.cluster import autoscaler, free_resources

    if use_gpu:
        return 1.0
    scaler = autoscaler()
    if scaler is not None:
        cpu_types = [t for t in scaler.node_types or () if not t.head and not t.resources.get("GPU")] or \
            [t for t in scaler.node_types or () if not t.head]
        largest = max((t.resources.get("CPU", 0.0) for t in cpu_types), default=0.0)
        return float(max(1, math.floor(largest) - 1)) if largest >= 1 else 1.0
    total = ray.cluster_resources().get("CPU", 1.0)
    total = min(total, free_resources(until={"CPU": total}).get("CPU", 0.0))
    per_worker = (total - 1) / num_workers
    # Over several nodes the CPU kept back must be a whole one on one node: a read task asks for a whole CPU on
    # the node it runs on, and 4 workers of 0.75 spread over two 2-CPU nodes leave 0.5 on each, so the reads (and
    # the job) wait forever. Workers are spread evenly (training's SPREAD placement, Ray Data's actor pools), so
    # the largest node keeps one if its share of them leaves one.
    nodes = [node["Resources"].get("CPU", 0.0) for node in ray.nodes()
             if node["Alive"] and node["Resources"].get("CPU", 0.0) >= 1]
    if len(nodes) > 1:
        per_worker = min(per_worker, (max(nodes) - 1) / math.ceil(num_workers / len(nodes)))
    return max(0.1, min(1.0, math.floor(per_worker * 20) / 20))


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


def job_driver_threads() -> int | None:
    """Give a ``ray job submit`` entrypoint (this process) the node's cores for its torch, OpenMP (FAISS) and Kiwi
    threads, where Ray left it one. Returns the threads set; None where nothing changed.

    Ray runs a submitted job's entrypoint as a child of the job's supervisor, an actor that asks for the job's
    ``--entrypoint-num-cpus`` (0 by default), and sets OMP_NUM_THREADS to those CPUs, at least 1; the entrypoint
    inherits it, so torch ran the job's own model work on one core (measured on 2 cores: 68 passages/s embedding in a
    submitted job with Ray's 1, 109 with both cores). denseqa's driver does model work only while no actor of its job
    runs (the in-process embedding, mining and evaluation of small data, the queries of an index's tuning, FAISS's
    training and adds), so it takes the node's cores. Kept: an OMP_NUM_THREADS set by the job's ``runtime_env``
    (the way to keep one thread), and any count other than 1. A 1 exported before ``ray start``, or from
    ``--entrypoint-num-cpus 1``, reads the same as Ray's default and is replaced. Written by hand: Ray has no
    setting for its entrypoint's threads.
    """
    import json
    import sys

    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray for a submitted job's entrypoint only
    if job is None or os.environ.get("OMP_NUM_THREADS") != "1":
        return None
    try:
        env_vars = (json.loads(job).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        env_vars = {}
    if "OMP_NUM_THREADS" in env_vars:
        return None
    threads = node_cores()
    if threads == 1:
        return None
    os.environ["OMP_NUM_THREADS"] = str(threads)  # torch reads it when first imported; Kiwi (bm25.kiwi_workers)
    if "torch" in sys.modules:  # already imported: its thread count is fixed unless set
        sys.modules["torch"].set_num_threads(threads)
    return threads


def torch_threads_default(processes_on_node: int) -> int:
    """torch intra-op threads for one of ``processes_on_node`` CPU processes (training workers, model actors)
    sharing a node: its cores divided among them, at least 1."""
    return max(1, node_cores() // max(1, processes_on_node))


def native_bf16(device) -> bool:
    """Whether ``device`` (a torch.device) multiplies bf16 matrices in hardware: a CUDA GPU with bf16 (Ampere and
    later), or a CPU with AMX tiles (Intel Xeon 4th generation and later) or AVX-512 BF16 (AMD Zen 4 and later,
    Intel Cooper Lake), where oneDNN runs bf16 matrix products at several times fp32's rate (2.5 x on a Zen 5 EPYC's
    AVX-512 BF16, BENCHMARKS.md). Elsewhere bf16 autocast is emulated, slower than fp32."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # torch's own CPU feature checks (private, but the ones its oneDNN kernels dispatch on); absent: assume none.
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check and check() for check in checks)


def embeds_on_gpu(use_gpu: bool | None) -> bool:
    """Whether a model actor pool runs on GPUs: as configured, else when the connected cluster has GPUs now or
    its autoscaler has a node type with GPUs (it starts one for the pool)."""
    import ray

    from denseqa.cluster import autoscaler

    if use_gpu is not None:
        return use_gpu
    if int(ray.cluster_resources().get("GPU", 0)) > 0:
        return True
    scaler = autoscaler()
    return scaler is not None and any(t.resources.get("GPU", 0) >= 1 for t in scaler.node_types or ())


@dataclass(frozen=True)
class ModelActors:
    """The pool of Ray Data actors that run a model over a dataset (embedding passages, mining negatives)."""

    actors: int
    use_gpu: bool
    cpus: float  # logical CPUs each actor asks for
    torch_threads: int | None  # each actor's, on CPU; None: torch's default (on GPU, or on an autoscaler's nodes)


def model_actors(what: str, use_gpu: bool | None, actors: int | None = None, cpus_per_actor: float | None = None,
                 torch_threads: int | None = None) -> ModelActors:
    """Resolve a model actor pool's defaults on the connected cluster, and fail now if it cannot be scheduled.

    GPUs when the cluster has them (``use_gpu`` None), one actor per GPU, else one actor; CPUs per actor from
    :func:`cpus_per_worker_default`; on CPU the machine's cores are shared among the actors' torch threads. On an
    autoscaling cluster the actors run on nodes the autoscaler starts, not on this one, so their threads are left
    to torch there (``torch_threads`` None): as many as the CPUs each asks for (Ray sets OMP_NUM_THREADS).
    ``what`` names the work in the error of a cluster that lacks the resources.
    """
    import ray

    from denseqa.cluster import autoscaler, check_can_schedule

    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = embeds_on_gpu(use_gpu)
    actors = actors or (max(1, cluster_gpus) if use_gpu else 1)
    cpus = cpus_per_actor or cpus_per_worker_default(actors, use_gpu)
    threads = torch_threads or (None if use_gpu or autoscaler() is not None else torch_threads_default(actors))
    check_can_schedule(what, actors, cpus, 1 if use_gpu else 0)
    return ModelActors(actors, use_gpu, cpus, threads)
