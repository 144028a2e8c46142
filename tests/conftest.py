"""Shared fixtures: real data samples, a tiny random BERT for fast unit tests, a local Ray runtime.

The tiny BERT is random: fine for checking mechanics (gradients, masking, recovery), never for quality.
"""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A plain Hugging Face BERT checkpoint (not a sentence-transformers folder), random, without dropout."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from denseqa.model import bundled_model_path

    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
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
