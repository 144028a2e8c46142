"""Shared fixtures: real data samples, a tiny random BERT for fast unit tests, a local Ray runtime.

The tiny BERT is random: fine for checking mechanics (gradients, masking, recovery), never for quality.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_EN = REPO / "data" / "debian-en-sample.parquet"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable here; fail fast instead of retrying


def real_pairs(n: int, seed: int = 0) -> pa.Table:
    """n real Debian synopsis -> description pairs from ../shared/data (the repo's sample if it is absent)."""
    source = SHARED_DATA / "debian-packages-en.parquet"
    table = pq.read_table(source if source.exists() else SAMPLE_EN)
    import numpy as np

    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, n, replace=False))
    return table.take(idx)


def _tiny_bert(path, dropout: float) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from denseqa.model import bundled_model_path

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A plain Hugging Face BERT checkpoint (not a sentence-transformers folder), random, without dropout."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.0)


@pytest.fixture(scope="session")
def tiny_model_with_dropout_dir(tmp_path_factory) -> str:
    """The same tiny BERT with BERT's usual dropout (0.1), where a step's result depends on the random generator."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert-dropout"), dropout=0.1)


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir(tmp_path_factory) -> str:
    """A random BERT with one score (a Hugging Face sequence-classification checkpoint, as CrossEncoder reads)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from denseqa.model import bundled_model_path

    path = tmp_path_factory.mktemp("tiny-cross-encoder")
    torch.manual_seed(1)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(bundled_model_path()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray runtime sized like this machine (2 CPUs), for one test module."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh runtime, even if a stale address file points at a stopped cluster
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def qa_parquet(tmp_path):
    """Write a Q/A parquet from columns and return its path."""

    def write(name: str = "qa.parquet", **columns) -> str:
        path = tmp_path / name
        pq.write_table(pa.table(columns), path)
        return str(path)

    return write


# ------------------------------------------------------------ a real cluster for `ray job submit` tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`ray start --head` from this venv (its python is the one jobs run), token auth on, 2 CPUs like CI."""
    tmp = tmp_path_factory.mktemp("cluster")
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    dashboard, gcs_port = _free_port(), _free_port()
    # --block keeps `ray start` in the foreground, in a session of its own: teardown stops exactly this cluster.
    # (`ray stop` would stop every Ray on the machine, a user's own cluster or a benchmark included.)
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs_port), "--dashboard-port",
         str(dashboard), "--include-dashboard", "true", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_until_jobs_are_accepted(address, env)
        yield {"env": env, "address": address, "tmp": tmp}
    finally:
        _stop_process_group(head)
        _forget_address(gcs_port)


def _forget_address(gcs_port: int) -> None:
    """Remove Ray's 'current cluster' file if it names the cluster just stopped (`ray stop` would do this, but it
    stops every cluster): a stale file makes the next plain `ray.init()` on this machine try to join a dead one."""
    address_file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if address_file.exists() and address_file.read_text().strip().endswith(f":{gcs_port}"):
        address_file.unlink()


def _stop_process_group(process: subprocess.Popen, grace_s: float = 5) -> None:
    """SIGTERM, then SIGKILL after grace_s. `ray start --block` takes 32 s to stop its daemons gracefully, which a
    throwaway test cluster does not need; its workers (sessions of their own) exit when the raylet is gone."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    except ProcessLookupError:
        pass


def _wait_until_jobs_are_accepted(address: str, env: dict, timeout_s: float = 240) -> None:
    """`ray start` returns before the dashboard's job agent is up ("No available agent to submit job"). A probe job
    accepted is enough (--no-wait): waiting for it to run and end would add ~7 s to every cluster's start."""
    deadline = time.time() + timeout_s
    while True:
        probe = subprocess.run(["ray", "job", "submit", "--no-wait", "--address", address, "--", "python", "-c",
                                "print(1)"],
                               env=env, capture_output=True, text=True, timeout=180)
        if probe.returncode == 0:
            return
        if time.time() > deadline:
            raise RuntimeError(f"the local cluster accepts no job: {probe.stderr[-1000:]}")
        time.sleep(3)


def submit_job(cluster, job: str, *args: str, timeout: int = 900, faults: str | None = None
               ) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python jobs/<job>.py ARGS`, as a user runs it; waits for the end.

    ``faults``: test-only faults for every process of the job (see :mod:`denseqa.faults`), e.g.
    ``"train.fail_at_step=5"``, passed in the job's runtime environment as a cluster would pass them."""
    from denseqa.faults import ENV_VAR

    runtime_env = ["--runtime-env-json", json.dumps({"env_vars": {ENV_VAR: faults}})] if faults else []
    return subprocess.run(
        ["ray", "job", "submit", "--address", cluster["address"], "--working-dir", str(REPO), *runtime_env, "--",
         "python", f"jobs/{job}.py", *args],
        env=cluster["env"], capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def denseqa_lines():
    """The messages the ``denseqa`` logger emits during a test (it does not propagate, so caplog misses them)."""
    import logging

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = Keep()
    logging.getLogger("denseqa").addHandler(handler)
    yield lines
    logging.getLogger("denseqa").removeHandler(handler)
