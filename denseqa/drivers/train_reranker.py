"""The train-reranker job: the train job's driver (:mod:`denseqa.drivers.train`) run with the cross-encoder task."""

from __future__ import annotations

from typing import Any

from denseqa.config import JobConfig
from denseqa.drivers.train import run_training
from denseqa.train_reranker import RerankerTask


def run_reranker_training(cfg: JobConfig) -> dict[str, Any]:
    """Train the cross-encoder on Ray Train and write its folder (CrossEncoder, ``denseqa.json``, held-out pairs)."""
    return run_training(cfg, task=RerankerTask)
