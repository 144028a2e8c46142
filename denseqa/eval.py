"""Held-out retrieval metrics during training, through sentence-transformers' ``InformationRetrievalEvaluator``.

The held-out questions are searched against the corpus of held-out answers. A question may have several right
answers: every answer of every held-out pair with the same question text counts as relevant, and a repeated
answer text is one document.
"""

from __future__ import annotations

from typing import Any

METRIC_KEYS = {
    "recall@1": "cosine_recall@1",
    "recall@10": "cosine_recall@10",
    "mrr@10": "cosine_mrr@10",
    "ndcg@10": "cosine_ndcg@10",
}


def build_evaluator(pairs: list[tuple[str, str]], batch_size: int = 64, name: str = "heldout"):
    """An ``InformationRetrievalEvaluator`` for (question, answer) pairs."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import cos_sim

    doc_ids: dict[str, str] = {}
    query_ids: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    for question, answer in pairs:
        did = doc_ids.setdefault(answer, f"d{len(doc_ids)}")
        qid = query_ids.setdefault(question, f"q{len(query_ids)}")
        relevant.setdefault(qid, set()).add(did)
    return InformationRetrievalEvaluator(
        queries={qid: q for q, qid in query_ids.items()},
        corpus={did: d for d, did in doc_ids.items()},
        relevant_docs=relevant,
        mrr_at_k=[10],
        ndcg_at_k=[10],
        accuracy_at_k=[1, 10],
        precision_recall_at_k=[1, 10],
        map_at_k=[10],
        batch_size=batch_size,
        name=name,
        write_csv=False,
        score_functions={"cosine": cos_sim},
    )


def evaluate(model, evaluator) -> dict[str, float]:
    """Run the evaluator and return ``{"recall@1": ..., "recall@10": ..., "mrr@10": ..., "ndcg@10": ...}``."""
    raw: dict[str, Any] = evaluator(model)
    prefix = f"{evaluator.name}_" if evaluator.name else ""
    return {ours: float(raw[prefix + theirs]) for ours, theirs in METRIC_KEYS.items()}
