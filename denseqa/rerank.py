"""Re-ranking: a cross-encoder scores (question, passage) pairs and reorders a retriever's candidates.

A bi-encoder embeds question and passage apart, so passages are embedded once and searched fast; a cross-encoder
reads the two together (full attention across both), which ranks better and costs one forward pass per pair. So it
re-ranks only the first candidates of the retriever: retrieve, then re-rank (Nogueira & Cho, 2019, "Passage
Re-ranking with BERT"). :mod:`denseqa.train_reranker` trains one; the evaluation job (:mod:`denseqa.eval`), the
service's ``Reranker`` deployment (:mod:`denseqa.serve`) and the benchmark all score through :class:`Reranker`, so
they answer alike.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from denseqa.errors import InputError


def resolve_reranker(path: str) -> str:
    """A local folder holding a sentence-transformers CrossEncoder with one output (a relevance score).

    A URI is copied to a local cache first. A bi-encoder folder is refused: sentence-transformers would otherwise
    "convert" it and score with a randomly initialised head.
    """
    from denseqa import storage

    local = storage.cached_copy(path, "reranker") if storage.is_uri(path) else os.path.abspath(
        os.path.expanduser(path))
    config = os.path.join(local, "config.json")
    if not os.path.isfile(config):
        raise InputError(f"reranker {path}: not a model folder (no config.json); give a folder written by "
                         "train-reranker")
    with open(config) as f:
        hf_config = json.load(f)
    architectures = hf_config.get("architectures") or ["no architecture"]
    # Transformers' own default where config.json names neither is two labels (PretrainedConfig), not one.
    labels = hf_config.get("num_labels", len(hf_config.get("id2label") or {0: 0, 1: 1}))
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or labels != 1:
        raise InputError(f"reranker {path}: not a cross-encoder with one score ({', '.join(architectures)}, "
                         f"{labels} labels); a bi-encoder cannot re-rank; give a folder written by train-reranker")
    return local


class Reranker:
    """A cross-encoder folder loaded for scoring: :meth:`scores` of pairs, :meth:`rerank` of one query's hits."""

    def __init__(self, path: str, device: str | None = None, batch_size: int = 64, backend: str | None = None) -> None:
        from sentence_transformers import CrossEncoder

        self.path = path
        self.source = resolve_reranker(path)
        self.batch_size = batch_size
        try:
            self.model = CrossEncoder(self.source, device=device)
        except OSError as e:
            raise InputError(f"reranker {path}: cannot be loaded ({' '.join(str(e).split())})") from None
        self.model.eval()
        # torch by default, on CPU too: a reranker reads long (question, passage) pairs, where ONNX Runtime fp32 was
        # measured 11 % slower than torch (50 pairs of 128 tokens, BENCHMARKS.md); onnx-int8 is 1.6 x faster but
        # its effect on re-ranking quality is not measured yet. Scores are not compared with an index's, so the
        # backend is only a speed choice here, reported by describe().
        self.backend = {"name": "torch", "sha256": None}
        if backend not in (None, "torch"):
            from denseqa.model import model_fingerprint
            from denseqa.onnx_backend import run_on_onnx_runtime

            self.backend = run_on_onnx_runtime(self.model, backend, path, self.source, model_fingerprint(self.model))
        record_file = os.path.join(self.source, "denseqa.json")
        self.record: dict[str, Any] = {}
        if os.path.isfile(record_file):
            with open(record_file) as f:
                self.record = json.load(f)

    def scores(self, pairs: list[tuple[str, str]], logits: bool = False) -> np.ndarray:
        """One relevance score per (question, passage) pair, higher is better: the model's own activation, or with
        ``logits`` its raw output (what distillation learns from: a sigmoid squeezes the margins between a good
        and a hard passage, which MarginMSE and the teacher's softmax are made of)."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        import torch

        options = {"activation_fn": torch.nn.Identity()} if logits else {}
        return np.asarray(self.model.predict(pairs, batch_size=self.batch_size, convert_to_numpy=True,
                                             show_progress_bar=False, **options), dtype=np.float32).reshape(len(pairs))

    def describe(self) -> dict[str, Any]:
        final = (self.record.get("metrics") or {}).get("final")
        return {"path": self.path, "max_length": self.model.max_length, "device": str(self.model.device),
                "backend": dict(self.backend), "trained_from": self.record.get("model"), "heldout": final}


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """Positions of ``scores`` best first; equal scores keep the retriever's order (a stable sort)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
