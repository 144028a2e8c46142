"""Evaluation: held-out retrieval metrics during training, and the evaluation job over a built index.

Both compute their metrics with sentence-transformers' ``InformationRetrievalEvaluator``, and in both a question
may have several right answers: every answer of every held-out pair with the same question text is relevant.

- During training (:func:`build_evaluator`), the held-out questions are searched among the held-out answers only
  (a repeated answer text is one document): cheap enough to run at every checkpoint.
- The evaluation job (:mod:`denseqa.drivers.evaluate`) searches them in a built index, the whole corpus, with the
  :class:`~denseqa.search.Searcher` the service uses: dense, BM25 and their hybrid, and with ``--reranker`` each of
  them re-ranked by a cross-encoder (:class:`~denseqa.rerank.Reranker`, as the service does), written as JSON,
  Markdown and a recall@k plot.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from denseqa.errors import InputError
from denseqa.texts import non_blank

logger = logging.getLogger(__name__)

METRIC_KEYS = {
    "recall@1": "cosine_recall@1",
    "recall@10": "cosine_recall@10",
    "mrr@10": "cosine_mrr@10",
    "ndcg@10": "cosine_ndcg@10",
}


def build_evaluator(pairs: list[tuple[str, str]], batch_size: int = 64, name: str = "heldout",
                    query_prompt: str = "", passage_prompt: str = ""):
    """An ``InformationRetrievalEvaluator`` for (question, answer) pairs."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
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
        # Exactly the prompts training used; "" (not None) also keeps a model's default prompt from applying.
        query_prompt=query_prompt,
        corpus_prompt=passage_prompt,
    )


def evaluate(model, evaluator) -> dict[str, float]:
    """Run the evaluator and return ``{"recall@1": ..., "recall@10": ..., "mrr@10": ..., "ndcg@10": ...}``."""
    raw: dict[str, Any] = evaluator(model)
    prefix = f"{evaluator.name}_" if evaluator.name else ""
    return {ours: float(raw[prefix + theirs]) for ours, theirs in METRIC_KEYS.items()}


# ---------------------------------------------------------------------------------------------- evaluation job

REPORT_KS = (1, 5, 10, 100)
CURVE_MAX_K = 100
REPORT_JSON, REPORT_MD, REPORT_PNG = "eval.json", "eval.md", "recall.png"


@dataclass
class Judgements:
    """Questions and, for each, the ids of the passages that answer it."""

    questions: list[str]
    relevant: list[set[str]]
    counts: dict[str, int]


def load_judgements(cfg, searcher) -> Judgements:
    """Read the held-out Q/A parquet and find each question's relevant passages in the index's docstore.

    Relevant: the passages whose text equals one of the question's answers (or whose id is given in
    ``relevant_id_column``). Rows of the same question are merged. A question none of whose answers is in the
    corpus cannot be judged; it is left out and counted.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from denseqa.data import check_schema, resolve_parquet_files

    target = cfg.relevant_id_column or cfg.answer_column
    fs, files = resolve_parquet_files(cfg.queries)
    check_schema(fs, files, [cfg.question_column, target], integer_ok=(cfg.relevant_id_column or "",),
                 hint="name the right one with --question-column / --answer-column / --relevant-id-column")
    # Each file's columns as strings before they are joined: check_schema accepts parts whose types differ (string
    # and large_string, int32 and int64 ids, an all-null part), which concat_tables would refuse.
    strings = pa.schema([(cfg.question_column, pa.string()), (target, pa.string())])
    table = pa.concat_tables(pq.read_table(f, columns=[cfg.question_column, target], filesystem=fs).cast(strings)
                             for f in files)
    questions = table.column(cfg.question_column)
    targets = table.column(target)
    keep = pc.and_(non_blank(questions),
                   pc.is_valid(targets))
    rows = list(zip(pc.filter(questions, keep).to_pylist(), pc.filter(targets, keep).to_pylist(), strict=True))
    wanted: dict[str, set[str]] = {}
    for question, value in rows:
        wanted.setdefault(question, set()).add(value)

    # Passages a live update deleted or replaced stay in the docstore but no search returns them: not relevant.
    live = np.ones(searcher.docstore.num_rows, dtype=bool)
    live[searcher.deleted] = False
    docstore = searcher.docstore.filter(pa.array(live))
    ids = docstore.column("id").to_pylist()
    if cfg.relevant_id_column:
        known = set(ids)
        lookup = {value: {value} for values in wanted.values() for value in values if value in known}
    else:
        needed = {value for values in wanted.values() for value in values}
        lookup: dict[str, set[str]] = {}
        for doc_id, text in zip(ids, docstore.column("text").to_pylist(), strict=True):
            if text in needed:
                lookup.setdefault(text, set()).add(doc_id)
    judged = [(q, set().union(*(lookup.get(v, set()) for v in values))) for q, values in wanted.items()]
    judged = [(q, rel) for q, rel in judged if rel]
    counts = {"rows": table.num_rows, "dropped_empty": table.num_rows - len(rows), "questions": len(wanted),
              "without_relevant_in_corpus": len(wanted) - len(judged)}
    if not judged:
        raise InputError(f"{cfg.queries}: none of the {len(wanted)} questions has a relevant passage in the index "
                         f"{cfg.index} (matched by {target!r}); are these held-out pairs of the indexed corpus?")
    if cfg.max_queries is not None and len(judged) > cfg.max_queries:
        pick = np.sort(np.random.default_rng(0).choice(len(judged), cfg.max_queries, replace=False))
        judged = [judged[i] for i in pick]
    counts["evaluated"] = len(judged)
    return Judgements([q for q, _ in judged], [rel for _, rel in judged], counts)


def retrieval_metrics(ranked_ids: list[list[str]], relevant: list[set[str]]) -> dict[str, Any]:
    """Recall@1/5/10/100, MRR@10, nDCG@10 and the recall@k curve, by sentence-transformers' IR metric code.

    Each ranking is passed with strictly decreasing scores, so the evaluator keeps our rank order exactly.
    """
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    qids = [f"q{i}" for i in range(len(ranked_ids))]
    evaluator = InformationRetrievalEvaluator(
        queries=dict(zip(qids, qids, strict=True)), corpus={}, relevant_docs=dict(zip(qids, relevant, strict=True)),
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=list(range(1, CURVE_MAX_K + 1)),
        map_at_k=[10], write_csv=False,
    )
    results = [[{"corpus_id": doc_id, "score": -float(rank)} for rank, doc_id in enumerate(ranking)]
               for ranking in ranked_ids]
    raw = evaluator.compute_metrics(results)
    metrics = {f"recall@{k}": float(raw["recall@k"][k]) for k in REPORT_KS}
    metrics["mrr@10"] = float(raw["mrr@k"][10])
    metrics["ndcg@10"] = float(raw["ndcg@k"][10])
    metrics["recall_curve"] = [round(float(raw["recall@k"][k]), 6) for k in range(1, CURVE_MAX_K + 1)]
    return metrics


def reciprocal_ranks(ranked_ids: list[list[str]], relevant: list[set[str]], k: int = 10) -> np.ndarray:
    """Each question's reciprocal rank of its first relevant passage within the first ``k`` (0 if none): the
    per-question values whose mean is MRR@k. (sentence-transformers' evaluator returns the means only, and the
    paired test needs the values; ``tests/test_eval.py`` checks them against trec_eval's.)"""
    return np.array([next((1.0 / (rank + 1) for rank, doc in enumerate(ranking[:k]) if doc in rel), 0.0)
                     for ranking, rel in zip(ranked_ids, relevant, strict=True)])


BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def paired_interval(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The mean of ``a - b`` over the same questions and its 95% interval by the paired bootstrap (resampling
    questions, so each resample keeps both systems' values for a question together; Efron & Tibshirani 1993;
    for IR, Sakai 2006, "Evaluating evaluation metrics based on the bootstrap"), with scipy's ``bootstrap``.
    An interval that excludes 0 says the difference is not the luck of these questions."""
    from scipy.stats import bootstrap

    difference = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not difference.any():  # the same ranking: no spread to resample
        return {"difference": 0.0, "ci95": [0.0, 0.0]}
    if len(difference) < 2:  # one question: nothing to resample, so no interval (not an error after all the work)
        return {"difference": round(float(difference.mean()), 6), "ci95": None}
    result = bootstrap((difference,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=CONFIDENCE,
                       method="percentile", rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return {"difference": round(float(difference.mean()), 6), "ci95": [round(float(low), 6), round(float(high), 6)]}


def compare_modes(per_query: dict[str, np.ndarray], zero_shot: str | None, metric: str = "mrr@10") -> dict:
    """Each mode's difference in ``metric`` from the best mode and from the starting model (``zero_shot``, the
    row of the model before fine-tuning; None: not evaluated), each with its paired 95% interval."""
    best = max(per_query, key=lambda mode: per_query[mode].mean())
    out = {"metric": metric, "method": f"paired bootstrap over questions, {BOOTSTRAP_RESAMPLES} resamples, "
                                       f"{CONFIDENCE:.0%} percentile interval", "best": best, "zero_shot": zero_shot,
           "vs_best": {m: paired_interval(v, per_query[best]) for m, v in per_query.items() if m != best}}
    if zero_shot is not None:
        out["vs_zero_shot"] = {m: paired_interval(v, per_query[zero_shot]) for m, v in per_query.items()
                               if m != zero_shot}
    return out


TREC_QRELS = "qrels.txt"
TREC_QUERIES = "queries.tsv"
TREC_RUNS = "runs"
NO_HIT = "NO_HIT"  # the one document of a question that had no hit, in a run file


def _trec_id(value: str) -> str:
    # TREC files are whitespace-separated: whitespace inside an id is percent-encoded, the same in both files.
    return "".join(f"%{ord(c):02X}" if c.isspace() or c == "%" else c for c in value)


def write_trec(folder: str, rankings: dict[str, list[list[str]]], relevant: list[set[str]],
               questions: list[str]) -> dict[str, Any]:
    """``qrels.txt`` (``qid 0 docid 1``), ``queries.tsv`` (``qid<TAB>question``, the questions' texts, one line
    each, tabs and newlines in them turned to spaces) and ``runs/<mode>.trec`` (``qid Q0 docid rank score <mode>``)
    for trec_eval, pytrec_eval or ranx. Question ``i`` is ``q<i>``, in the report's order. The score column is the
    ranking's own order (the first of k hits scores k): IR tools re-sort by score and break ties by document id,
    and the searcher's scores do tie (BM25, fusion), so writing them would let a tool reorder what was measured.
    A question with no hit at all (BM25 over a question of stopwords only) gets one line of a document no qrel
    names, ``NO_HIT``: without a line, trec_eval (without ``-c``) and pytrec_eval would leave the question out of
    their means, where the report counts it as 0."""
    import os

    os.makedirs(os.path.join(folder, TREC_RUNS), exist_ok=True)
    with open(os.path.join(folder, TREC_QRELS), "w", encoding="utf-8") as f:
        for i, rel in enumerate(relevant):
            f.writelines(f"q{i} 0 {_trec_id(doc)} 1\n" for doc in sorted(rel))
    with open(os.path.join(folder, TREC_QUERIES), "w", encoding="utf-8") as f:
        f.writelines(f"q{i}\t{' '.join(q.split())}\n" for i, q in enumerate(questions))
    runs = {}
    for mode, ranked in rankings.items():
        name = f"{TREC_RUNS}/{mode.replace(' ', '-')}.trec"
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            for i, ranking in enumerate(ranked):
                f.writelines(f"q{i} Q0 {_trec_id(doc)} {rank + 1} {len(ranking) - rank} {mode.replace(' ', '-')}\n"
                             for rank, doc in enumerate(ranking or [NO_HIT]))
        runs[mode] = name
    return {"qrels": TREC_QRELS, "queries": TREC_QUERIES, "runs": runs}


def report_markdown(report: dict[str, Any]) -> str:
    columns = [f"recall@{k}" for k in REPORT_KS] + ["mrr@10", "ndcg@10"]
    comparison = report.get("comparison")
    extra = []
    if comparison:
        extra = ["Δ mrr@10 vs best (95% CI)"] + (["Δ mrr@10 vs zero-shot (95% CI)"] if comparison["zero_shot"]
                                                  else [])
    lines = [f"Retrieval of {report['judgements']['evaluated']} held-out questions in {report['index']['count']} "
             f"passages ({report['index']['factory']}, model {report['model']['path']}).", "",
             "| mode | " + " | ".join(columns + extra) + " |", "|---|" + "---:|" * len(columns + extra)]
    notes = []
    if report.get("reranking"):
        r = report["reranking"]
        notes.append(f"`+rerank`: the first {r['candidates']} hits re-ordered by the cross-encoder "
                     f"{r['reranker']['path']} ({r['pairs_scored']} pairs scored in {r['seconds']:.1f} s).")
    if report.get("zero_shot"):
        notes.append(f"`zero-shot`: dense search with the starting model, {report['zero_shot']['model']}, before "
                     "fine-tuning (the passages embedded again with it).")
    if comparison:
        notes.append(f"Differences: {comparison['method']}; an interval that excludes 0 is a difference these "
                     "questions support.")
    if notes:
        lines[1:1] = [" ".join(notes), ""]

    def interval(against: str, mode: str) -> str:
        if mode == comparison[against.replace("vs_", "")]:
            return "—"
        c = comparison[against][mode]
        if c["ci95"] is None:
            return f"{c['difference']:+.4f} (one question: no interval)"
        return f"{c['difference']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"

    for mode, metrics in report["modes"].items():
        cells = [f"{metrics[c]:.4f}" for c in columns]
        if comparison:
            cells += [interval("vs_best", mode)] + ([interval("vs_zero_shot", mode)] if comparison["zero_shot"]
                                                    else [])
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_recall(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ks = list(range(1, CURVE_MAX_K + 1))
    for mode, metrics in report["modes"].items():
        ax.plot(ks, metrics["recall_curve"], label=f"{mode} (R@10 {metrics['recall@10']:.3f})", linewidth=2)
    ax.set_xscale("log")
    ax.set_xlabel("k (passages retrieved)")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{report['judgements']['evaluated']} held-out questions, {report['index']['count']} passages")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def rerank_rankings(e, searcher, questions: list[str], rankings: dict[str, list[list[int]]]) -> dict[str, Any]:
    """Each mode's ranking with its first ``e.rerank_candidates`` passages re-ordered by the cross-encoder (the rest
    keep their place after them), as ``"<mode>+rerank"``. A (question, passage) pair found by several modes is
    scored once."""
    from denseqa.rerank import Reranker, rerank_order

    reranker = Reranker(e.reranker, batch_size=e.batch_size)
    n = e.rerank_candidates
    pairs: dict[tuple[int, int], int] = {}  # (question, passage position) -> row in the scores
    for ranking in rankings.values():
        for q, row in enumerate(ranking):
            for p in row[:n]:
                pairs.setdefault((q, p), len(pairs))
    texts = searcher.docstore.column("text")
    started = time.time()
    scores = reranker.scores([(questions[q], texts[p].as_py()) for q, p in pairs])
    seconds = time.time() - started
    reranked = {}
    for mode, ranking in rankings.items():
        reranked[f"{mode}+rerank"] = [
            [row[:n][i] for i in rerank_order(np.array([scores[pairs[(q, p)]] for p in row[:n]]))] + row[n:]
            for q, row in enumerate(ranking)]
    logger.info("re-ranked the first %d hits of %s: %d distinct pairs scored in %.1f s", n, ", ".join(rankings),
                len(pairs), seconds)
    return {"reranker": reranker.describe(), "candidates": n, "pairs_scored": len(pairs),
            "seconds": round(seconds, 2), "rankings": reranked}
