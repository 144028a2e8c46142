"""How many logical CPUs a worker asks for (denseqa.resources), on clusters this machine cannot be: Ray's view of
the cluster is replaced, the arithmetic is denseqa's."""

from __future__ import annotations

import pytest

from denseqa import cluster, resources


def _cluster(monkeypatch, node_cpus: list[float], free: float | None = None) -> None:
    import ray

    total = sum(node_cpus)
    monkeypatch.setattr(cluster, "autoscaler", lambda: None)  # a fixed-size cluster
    monkeypatch.setattr(cluster, "free_resources", lambda until=None, timeout_s=20.0: {"CPU": total if free is None
                                                                                        else free})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": total})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": c}} for c in node_cpus])


@pytest.mark.parametrize("node_cpus, workers, free, expected", [
    ([2], 1, None, 1.0),  # this machine: one worker, one CPU kept for the reads
    ([2], 2, None, 0.5),
    ([2], 2, 1.25, 0.1),  # a service holds 0.75: what is free is shared
    ([0, 2, 2], 4, None, 0.5),  # head without CPUs; two workers on each 2-CPU node keep a whole CPU there
    ([32, 32, 32, 32], 4, None, 1.0),
    ([4, 2], 2, None, 1.0),  # one worker on each: both keep one
    ([4, 2], 4, None, 1.0),  # two on each: the 4-CPU node keeps two
    ([1, 16, 16], 4, None, 1.0),  # a 1-CPU node beside large ones costs them nothing
])
def test_the_largest_node_keeps_a_whole_cpu_for_the_reads_however_the_workers_spread(
        monkeypatch, node_cpus, workers, free, expected):
    _cluster(monkeypatch, node_cpus, free)
    per_worker = resources.cpus_per_worker_default(workers, use_gpu=False)
    assert per_worker == expected
    # and, workers spread as evenly as they go, the largest node keeps a whole CPU for the reads
    nodes = [c for c in node_cpus if c >= 1]
    most_on_one = -(-workers // len(nodes))
    assert max(nodes) - most_on_one * per_worker >= 1 or per_worker == 0.1


@pytest.mark.parametrize("omp, job, expected", [
    ("1", {"runtime_env": {"working_dir": "gcs://x.zip"}}, "cores"),  # Ray's default for a submitted job: replaced
    ("1", {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}, None),  # the job asked for 1: kept
    ("3", {"runtime_env": {}}, None),  # --entrypoint-num-cpus 3, or a 3 exported before `ray start`: kept
    ("1", None, None),  # not a submitted job's entrypoint: not Ray's to undo
])
def test_a_submitted_jobs_process_gets_the_nodes_cores_where_ray_left_it_one(monkeypatch, omp, job, expected):
    import json
    import os

    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", omp)
    if job is None:
        monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    else:
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    monkeypatch.setattr(resources, "node_cores", lambda: 6)
    before = torch.get_num_threads()
    try:
        threads = resources.job_driver_threads()
        assert threads == (6 if expected == "cores" else None)
        assert os.environ["OMP_NUM_THREADS"] == ("6" if expected == "cores" else omp)
        assert torch.get_num_threads() == (6 if expected == "cores" else before)
    finally:
        torch.set_num_threads(before)


def test_a_one_core_node_leaves_a_submitted_jobs_threads_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setattr(resources, "node_cores", lambda: 1)
    assert resources.job_driver_threads() is None
