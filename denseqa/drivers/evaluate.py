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

from denseqa import storage, tracking
from denseqa.config import ModelConfig
from denseqa.errors import InputError
from denseqa.eval import (
    CURVE_MAX_K,
    REPORT_JSON,
    REPORT_MD,
    REPORT_PNG,
    compare_modes,
    load_judgements,
    plot_recall,
    reciprocal_ranks,
    report_markdown,
    rerank_rankings,
    retrieval_metrics,
    write_trec,
)
from denseqa.model import Encoder, describe_model, passage_encoder, query_model_config, resolve_model_source
from denseqa.redaction import masked_values
from denseqa.search import Searcher, read_manifest
from denseqa.train import RECORD_FILE

logger = logging.getLogger(__name__)

# The zero-shot row embeds the corpus again in the evaluating process: up to this many passages (minutes on a CPU,
# not hours); beyond, an index of its own built by the Ray Data job is the way.
ZERO_SHOT_MAX_PASSAGES = 200_000


def run_evaluation(cfg) -> dict[str, Any]:
    """Search the held-out questions with every mode the index supports; write eval.json, eval.md, recall.png."""
    job_started = time.time()
    e = cfg.eval
    tracking.check_store(cfg.mlflow)
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
    zero_shot = None
    start, start_name = starting_model(manifest["model"]) if e.zero_shot and not e.model else (None, None)
    live_count = searcher.docstore.num_rows - len(searcher.deleted)
    if start is not None and live_count > ZERO_SHOT_MAX_PASSAGES:
        logger.info("zero-shot row skipped: %d passages are more than this process embeds again (%d); evaluate an "
                    "index built with the starting model %s instead", live_count, ZERO_SHOT_MAX_PASSAGES, start_name)
        start = None
    if start is not None:
        t0 = time.time()
        rankings["zero-shot"], precision = zero_shot_ranking(start, manifest["model"], searcher,
                                                             judgements.questions, e.batch_size)
        seconds["zero-shot"] = round(time.time() - t0, 3)
        zero_shot = {"model": start_name, "seconds": seconds["zero-shot"], "passage_precision": precision}
    results, per_query, ranked_ids = {}, {}, {}
    for mode, ranking in rankings.items():
        ranked_ids[mode] = [[ids[p] for p in row] for row in ranking]
        results[mode] = retrieval_metrics(ranked_ids[mode], judgements.relevant)
        per_query[mode] = reciprocal_ranks(ranked_ids[mode], judgements.relevant)
        logger.info("%s: %s", mode, " ".join(f"{k} {v:.4f}" for k, v in results[mode].items() if k != "recall_curve"))
    comparison = compare_modes(per_query, "zero-shot" if zero_shot else None)
    report = {
        "index": {"path": masked_values(e.index), "count": manifest["count"], "factory": manifest["index"]["factory"],
                  "search": {k: manifest["index"]["search"].get(k) for k in ("param", "value", "recall")}},
        "model": {k: (encoder.describe() if encoder else manifest["model"])[k] for k in ("path", "weights_sha256")},
        "queries": masked_values(e.queries),
        "judgements": judgements.counts,
        "modes": results,
        "seconds": seconds,
        "torch_threads": torch_threads(),
        "reranking": reranking,
        "zero_shot": zero_shot,
        "comparison": comparison,
        "config": cfg.to_record(),
        "notes": None if searcher.bm25 is not None else "index built without BM25: bm25 and hybrid not evaluated",
    }
    with storage.staged_output(output, marker=REPORT_JSON) as staging:
        report["trec"] = write_trec(staging, ranked_ids, judgements.relevant, judgements.questions)
        report["markdown"] = report_markdown(report)
        with open(os.path.join(staging, REPORT_MD), "w") as f:
            f.write(report["markdown"])
        plot_recall(report, os.path.join(staging, REPORT_PNG))
        with open(os.path.join(staging, REPORT_JSON), "w") as f:
            json.dump(report, f, indent=2)
    report["output"] = output
    tracking.log_job(cfg.mlflow, "evaluate", job_started, cfg.to_record(),
                     metrics={f"{mode}/{k}": v for mode, values in results.items() for k, v in values.items()
                              if k != "recall_curve"},
                     artifacts=[storage.join(output, name) for name in (REPORT_MD, REPORT_JSON, REPORT_PNG)],
                     tags={"denseqa.output": output, "denseqa.index": e.index})
    return report


def torch_threads() -> int:
    """The torch threads this process encoded with (see :func:`denseqa.resources.job_driver_threads`)."""
    import torch

    return torch.get_num_threads()


def starting_model(recorded: dict) -> tuple[ModelConfig | None, str | None]:
    """The model an index's model was fine-tuned from, as its ``denseqa.json`` records it, encoded as the index's
    model is (its prompts, length and backend), and its name; (None, None) when the model was not trained by
    denseqa, or by a version that did not record it."""
    record = storage.join(recorded["path"], RECORD_FILE)
    trained = storage.read_json(record) if storage.exists(record) else None
    if not trained or "base_model" not in trained or trained.get("kind") != "bi-encoder":
        return None, None
    base = trained["base_model"]  # None: the bundled model
    return (query_model_config(recorded, model=resolve_model_source(base)),
            describe_model(ModelConfig(model=base)))


def zero_shot_ranking(start: ModelConfig, recorded: dict, searcher: Searcher, questions: list[str],
                      batch_size: int) -> tuple[list[list[int]], str]:
    """Each question's first :data:`CURVE_MAX_K` docstore positions by exact dense search with ``start``, over
    the index's live passages embedded again with it, as build-index would embed them here (``recorded``'s
    passage precision where this process's CPU multiplies bf16 natively, else fp32; the queries by the backend
    the service runs); and the passages' precision."""
    import faiss
    import numpy as np
    import torch

    from denseqa.resources import native_bf16

    encoder = Encoder.load(start)
    # An index embedded in bf16 on GPUs is evaluated on a CPU head that may only emulate bf16 (slower than fp32)
    precision = recorded.get("passage_precision", "fp32") if native_bf16(torch.device("cpu")) else "fp32"
    passages = passage_encoder(encoder, start, precision)
    live = np.setdiff1d(np.arange(searcher.docstore.num_rows), searcher.deleted)
    texts = searcher.docstore.column("text").take(live).to_pylist()
    logger.info("zero-shot: embedding %d passages with the starting model %s (%s)", len(texts), describe_model(start),
                "bf16 autocast (torch)" if precision == "bf16" else f"fp32 ({encoder.backend['name']})")
    index = faiss.IndexFlatIP(encoder.dimension)
    index.add(passages.encode_passages(texts, batch_size))
    _, found = index.search(encoder.encode_queries(questions, batch_size), min(CURVE_MAX_K, len(texts)))
    return [[int(live[p]) for p in row if p >= 0] for row in found], precision
