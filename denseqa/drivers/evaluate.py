"""The evaluate job: config -> checks -> search the held-out questions in a built index with every mode it
supports (and re-ranked, with --reranker) -> publish eval.json, eval.md, recall.png.

The metrics, judgements and report formats are :mod:`denseqa.eval`'s; the searcher is the service's
(:class:`denseqa.search.Searcher`), so what is measured is what is served.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from denseqa import storage
from denseqa.errors import InputError
from denseqa.eval import (
    CURVE_MAX_K,
    REPORT_JSON,
    REPORT_MD,
    REPORT_PNG,
    load_judgements,
    plot_recall,
    report_markdown,
    rerank_rankings,
    retrieval_metrics,
)
from denseqa.model import Encoder, query_model_config
from denseqa.search import Searcher, read_manifest

logger = logging.getLogger(__name__)


def run_evaluation(cfg) -> dict[str, Any]:
    """Search the held-out questions with every mode the index supports; write eval.json, eval.md, recall.png."""
    e = cfg.eval
    if not e.index:
        raise InputError("no index given: pass --index FOLDER (written by build-index)")
    if not e.queries:
        raise InputError("no queries given: pass --queries PARQUET (e.g. heldout.parquet in the model folder)")
    output = storage.output_folder(e.output or e.index.rstrip("/") + ".eval", e.overwrite, "the report", "report")
    manifest = read_manifest(e.index)
    encoder = None
    if e.model:
        encoder = Encoder.load(query_model_config(manifest["model"], model=e.model))
    searcher = Searcher(e.index, encoder=encoder)
    judgements = load_judgements(e, searcher)

    modes = ["dense"] + (["bm25", "hybrid"] if searcher.bm25 is not None else [])
    started = time.time()
    vectors = searcher.encode(judgements.questions, e.batch_size)
    encode_seconds = time.time() - started
    rankings, seconds = {}, {}
    ids = searcher.docstore.column("id").to_pylist()
    for mode in modes:
        t0 = time.time()
        _, positions = searcher.rank(judgements.questions, CURVE_MAX_K, mode, vectors=vectors)
        seconds[mode] = round(time.time() - t0 + (encode_seconds if mode != "bm25" else 0), 3)
        rankings[mode] = [[p for p in row.tolist() if p >= 0] for row in positions]
    reranking = None
    if e.reranker:
        reranking = rerank_rankings(e, searcher, judgements.questions, rankings)
        rankings.update(reranking.pop("rankings"))
    results = {}
    for mode, ranking in rankings.items():
        results[mode] = retrieval_metrics([[ids[p] for p in row] for row in ranking], judgements.relevant)
        logger.info("%s: %s", mode, " ".join(f"{k} {v:.4f}" for k, v in results[mode].items() if k != "recall_curve"))
    report = {
        "index": {"path": e.index, "count": manifest["count"], "factory": manifest["index"]["factory"],
                  "search": {k: manifest["index"]["search"].get(k) for k in ("param", "value", "recall")}},
        "model": {k: (encoder.describe() if encoder else manifest["model"])[k] for k in ("path", "weights_sha256")},
        "queries": e.queries,
        "judgements": judgements.counts,
        "modes": results,
        "seconds": seconds,
        "reranking": reranking,
        "config": cfg.to_dict(),
        "notes": None if searcher.bm25 is not None else "index built without BM25: bm25 and hybrid not evaluated",
    }
    with storage.staged_output(output, marker=REPORT_JSON) as staging:
        report["markdown"] = report_markdown(report)
        with open(os.path.join(staging, REPORT_MD), "w") as f:
            f.write(report["markdown"])
        plot_recall(report, os.path.join(staging, REPORT_PNG))
        with open(os.path.join(staging, REPORT_JSON), "w") as f:
            json.dump(report, f, indent=2)
    report["output"] = output
    return report
