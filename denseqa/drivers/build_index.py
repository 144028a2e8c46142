"""The build-index job: config -> checks (corpus, model, factory) -> embed the corpus with a Ray Data actor pool ->
choose, build and tune the FAISS index -> publish the folder, ``manifest.json`` last.

Read :func:`run_build_index` top to bottom. How the index is chosen, built, sharded and tuned is
:mod:`denseqa.index`'s; the embedding is :mod:`denseqa.embed`'s.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from denseqa import storage, tracking
from denseqa.config import IndexConfig, JobConfig
from denseqa.errors import InputError
from denseqa.index import (
    BM25_DIR,
    DOCSTORE_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PARTITIONS_DIR,
    RECALL_AT,
    REFINE_K_FACTOR,
    VECTORS_FILE,
    Layout,
    assemble_docstore,
    build_fastest,
    check_factory,
    save_tuning_questions,
    shard_ranges,
    write_docstore,
)
from denseqa.provenance import package_versions, peak_rss_mb, utc_now
from denseqa.redaction import masked
from denseqa.texts import non_blank

logger = logging.getLogger(__name__)


def tuning_questions(cfg: JobConfig) -> list[str] | None:
    """A seeded sample of distinct questions to tune on: from --tune-questions, else (with --from-answers) the
    corpus's own question column when it has one, else None (tune on corpus vectors)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from denseqa.data import resolve_parquet_files

    column = cfg.corpus.question_column
    path = cfg.index.tune_questions or (cfg.corpus.path if cfg.corpus.from_answers else None)
    if not path:
        return None
    fs, files = resolve_parquet_files(path)
    if any(column not in pq.read_schema(f, filesystem=fs).names for f in files):
        if cfg.index.tune_questions:
            raise InputError(f"{path}: column {column!r} missing; name the question column with --question-column")
        return None
    values = pa.chunked_array([pq.read_table(f, columns=[column], filesystem=fs).column(column).cast(pa.string())
                               for f in files])
    values = values.filter(non_blank(values))
    distinct = pc.unique(values).to_pylist()
    if not distinct:
        return None
    rng = np.random.default_rng(cfg.index.seed + 2)
    picked = rng.choice(len(distinct), size=min(len(distinct), cfg.index.tune_queries), replace=False)
    return [distinct[i] for i in sorted(picked)]


def resolve_bm25_tokenizer(icfg: IndexConfig, texts: list[str], model_cfg) -> IndexConfig:
    """The index settings with ``bm25_tokenizer`` auto resolved over a sample of the corpus, once (every partition
    and every later update cuts text the same way); and the warning when the model never learnt the corpus's
    language, logged here because it is the same sample."""
    from denseqa.bm25 import resolve_tokenizer
    from denseqa.language import language_mismatch
    from denseqa.model import describe_model, resolve_model_source

    mismatch = language_mismatch(texts, resolve_model_source(model_cfg.model), describe_model(model_cfg))
    if mismatch:
        logger.warning("%s", mismatch)
    if not icfg.bm25:
        return icfg
    tokenizer = resolve_tokenizer(icfg.bm25_tokenizer, texts)
    logger.info("BM25 tokenizer: %s%s", tokenizer, " (auto: the corpus is Korean)" if tokenizer == "kiwi" and
                icfg.bm25_tokenizer == "auto" else "")
    return icfg.model_copy(update={"bm25_tokenizer": tokenizer})


def run_build_index(cfg: JobConfig) -> dict[str, Any]:
    """Embed the corpus with Ray Data (a small one in this process), build and tune the FAISS index, publish the
    folder. Returns the manifest."""

    from denseqa.cluster import check_reachable_by_every_node
    from denseqa.corpus import check_corpus, load_corpus, sample_texts
    from denseqa.embed import (
        DONE_FILE,
        check_precision,
        embed_corpus,
        embed_in_driver,
        embedding_identity,
        embeds_in_driver,
        recorded_passage_model,
        resolve_precision,
    )
    from denseqa.model import Encoder, check_model_source
    from denseqa.onnx_backend import resolve_backend
    from denseqa.resources import embeds_on_gpu, model_actors

    started = time.time()
    icfg = cfg.index
    tracking.check_store(cfg.mlflow)
    if icfg.upsert or icfg.delete or icfg.sync or icfg.swap:
        given = ", ".join(f"--{k}" for k in ("upsert", "delete", "sync", "swap") if getattr(icfg, k))
        raise InputError(f"{given}: these change an existing index: pass it with --update INDEX")
    output = storage.output_folder(icfg.output, icfg.overwrite, "the index", noun="index")
    check_model_source(cfg.model.model)
    check_precision(cfg.embed.precision, cfg.model.backend)
    checked = check_corpus(cfg.corpus)  # cheap checks first: footers and ids, no model, no Ray
    icfg = resolve_bm25_tokenizer(icfg, sample_texts(cfg.corpus, checked), cfg.model)
    # For the manifest (weights hash, dimension, prompts, backend) and the checks that need the model.
    encoder = Encoder.load(cfg.model.model_copy(update={"backend": "torch"}), device="cpu")
    check_factory(icfg, encoder.dimension)
    if cfg.model.backend not in (None, "torch"):  # given: an unexportable model fails before Ray starts
        encoder.run_on_onnx_runtime(cfg.model.backend, cfg.model)
    corpus = load_corpus(cfg.corpus, checked)  # starts or joins Ray
    # The embedding actors write shards there, and a sharded build's tasks read them, on any node.
    check_reachable_by_every_node(output, "index folder", icfg.shared_filesystem)
    in_driver = embeds_in_driver(cfg.embed, corpus.rows, embeds_on_gpu(cfg.embed.use_gpu))
    building = output.rstrip("/") + ".building"
    shards_dir = storage.join(building, "embeddings")
    # Without finished embeddings to reuse the actors will be needed: a cluster that cannot hold them is told so
    # now, not after the model's export and the tuning questions' encoding (a rebuild beside a deployed service).
    pool = None
    if not in_driver and not storage.exists(storage.join(shards_dir, DONE_FILE)):
        e = cfg.embed
        pool = model_actors("embedding", e.use_gpu, e.actors, e.cpus_per_actor, e.torch_threads)
    # The backend the actors run (as given, else torch on GPU and the CPU default on CPU), fixed here: the driver's
    # encoder exports it once, into the cache the actors read, and the manifest describes it.
    model_cfg = cfg.model.model_copy(update={"backend": resolve_backend(
        cfg.model.backend, "cuda" if embeds_on_gpu(cfg.embed.use_gpu) else "cpu")})
    if model_cfg.backend != encoder.backend["name"]:
        encoder.run_on_onnx_runtime(model_cfg.backend, cfg.model)
    precision = resolve_precision(cfg.embed.precision, model_cfg.backend, embeds_on_gpu(cfg.embed.use_gpu))
    # The passages' precision beside the queries' backend: bf16 passages are embedded by torch, the queries by
    # model.backend in fp32.
    model_info = {**encoder.describe(), "passage_precision": precision}
    questions = tuning_questions(cfg)
    question_vectors = encoder.encode_queries(questions) if questions else None
    del encoder

    identity, expected = embedding_identity(model_info, corpus), recorded_passage_model(model_info)
    if in_driver:
        embedding = embed_in_driver(corpus, model_cfg, cfg.embed, shards_dir, identity, precision, expected)
    else:
        embedding = embed_corpus(corpus, model_cfg, cfg.embed, shards_dir, identity, precision, pool, expected)

    with storage.staged_output(output, marker=MANIFEST_FILE) as staging:
        d = model_info["dimension"]
        if icfg.partitions == 1:
            layout = assemble_docstore(shards_dir, os.path.join(staging, DOCSTORE_FILE), corpus.derived_ids,
                                       icfg.add_batch_size)
            built = write_index_folder(staging, layout, d, icfg, question_vectors)
        else:
            layout = assemble_docstore(shards_dir, None, corpus.derived_ids, icfg.add_batch_size)
            built = write_partitions(staging, layout, d, icfg, question_vectors, model_info)
        n = built["count"]
        manifest = {
            "format": FORMAT_VERSION,
            "version": 1,
            "output": masked(output),
            "model": model_info,
            "dimension": d,
            "metric": "inner_product",
            "normalize": model_info["normalize"],
            "count": n,
            "corpus": {"path": masked(corpus.path), "files": len(corpus.files), "rows_read": corpus.rows,
                       "dropped_empty": corpus.rows - embedding["rows"], "repeated_merged": embedding["rows"] - n,
                       "derived_ids": corpus.derived_ids},
            "index": built["index"],
            "bm25": built["bm25"],
            "build": {"embedding": embedding, "index_seconds": built["seconds"],
                      "total_seconds": round(time.time() - started, 2), "driver_peak_rss_mb": peak_rss_mb(),
                      "embeddings_kept": masked(shards_dir) if icfg.keep_embeddings else None},
            "config": cfg.to_record(),
            "versions": package_versions(),
            "created": utc_now(),
        }
        write_partition_manifests(staging, manifest, built.get("partitions", []))
        storage.write_json(os.path.join(staging, MANIFEST_FILE), manifest)
    if not icfg.keep_embeddings:
        storage.remove(building)
    tuning = manifest["index"]["search"]
    searched = (f"{tuning['param']}={tuning['value']}, recall@{RECALL_AT} {tuning['recall']:.4f} on "
                f"{tuning['queries']}") if tuning["param"] else "exact search"
    logger.info("index written to %s: %d vectors, %s, %s, %.1f s", output, n, manifest["index"]["factory"],
                searched, time.time() - started)
    tracking.log_job(cfg.mlflow, "build-index", started, cfg.to_record(),
                     metrics={"passages": n, "seconds": round(time.time() - started, 2),
                              "passages_per_s": embedding.get("passages_per_s") or 0.0,
                              **({f"search_recall_at_{RECALL_AT}": tuning["recall"]} if tuning["param"] else {})},
                     artifacts=[storage.join(output, MANIFEST_FILE)],
                     tags={"denseqa.output": output, "denseqa.factory": manifest["index"]["factory"]})
    return manifest


def write_partitions(staging: str, layout: Layout, d: int, icfg: IndexConfig, question_vectors: np.ndarray | None,
                     model_info: dict) -> dict[str, Any]:
    """The passages in ``icfg.partitions`` contiguous ranges, each a complete index folder in
    ``partitions/part-<i>/`` (its FAISS index chosen for the budget of one replica, docstore, BM25), for as many
    searcher deployments; the returned ``index`` entry lists them for the root manifest."""
    started = time.time()
    parts, chosen_because = [], None
    ranges = shard_ranges(layout.count, icfg.partitions)
    for i, (start, stop) in enumerate(ranges):
        folder = f"{PARTITIONS_DIR}/part-{i:03d}"
        path = os.path.join(staging, *folder.split("/"))
        os.makedirs(path)
        part = layout.slice(start, stop)
        write_docstore(part, os.path.join(path, DOCSTORE_FILE), icfg.add_batch_size)
        built = write_index_folder(path, part, d, icfg, question_vectors)
        if i == 0 and not icfg.factory:
            # The first partition's measured pick serves for all: partitions of one corpus are alike, and one kind
            # keeps the root manifest's search entry true of every partition (each is still tuned on its own)
            icfg, chosen_because = icfg.model_copy(update={"factory": built["index"]["factory"]}), \
                f"as partition 0 chose: {built['index']['chosen_because']}"
        elif i > 0 and chosen_because:
            built["index"]["chosen_because"] = chosen_because
        logger.info("partition %d/%d: passages %d to %d, %s", i + 1, len(ranges), start, stop - 1,
                    built["index"]["factory"])
        parts.append({"folder": folder, "number": i, "of": len(ranges), "positions": [start, stop],
                      "count": built["count"], "index": built["index"], "bm25": built["bm25"]})
    first = parts[0]["index"]
    index = {"kind": "partitioned", "factory": first["factory"], "partitions": [
        {k: p[k] for k in ("folder", "positions", "count")} | {"factory": p["index"]["factory"]} for p in parts],
        "memory_budget_gb": icfg.memory_budget_gb, "memory_budget_per": "partition",
        "search": first["search"], "ntotal": layout.count, "deleted": 0}
    # BM25 only where every partition has one (a partition whose texts have no term has none)
    bm25 = {**parts[0]["bm25"], "statistics": "per partition"} if all(p["bm25"] for p in parts) else None
    return {"count": layout.count, "index": index, "bm25": bm25, "partitions": parts,
            "seconds": round(time.time() - started, 2)}


def write_partition_manifests(staging: str, manifest: dict, parts: list[dict]) -> None:
    """Each partition folder's manifest: the index's, with the partition's own count, index and BM25, so that it
    loads as an index of its own (what its searcher deployment serves)."""
    for part in parts:
        storage.write_json(os.path.join(staging, *part["folder"].split("/"), MANIFEST_FILE), {
            **manifest, "output": f"{manifest['output']}/{part['folder']}", "count": part["count"],
            "index": part["index"], "bm25": part["bm25"],
            "partition": {k: part[k] for k in ("number", "of", "positions")}})


def write_index_folder(staging: str, layout: Layout, d: int, icfg: IndexConfig,
                       question_vectors: np.ndarray | None) -> dict[str, Any]:
    """From the embedded passages of ``layout`` (their docstore already in ``staging``) to the other files of an
    index folder but the manifest: FAISS index chosen, built and tuned, the full vectors when the codes are lossy,
    BM25. Returns the manifest's ``count``, ``index`` and ``bm25`` entries and the seconds taken. A fresh build, each
    partition of one and an update's compaction all come through here, so a compacted index is a fresh build of
    its live passages."""
    started = time.time()
    n = layout.count
    built = build_fastest(staging, layout, d, icfg, question_vectors)
    choice = built.choice
    vectors = refine = None
    if built.vectors_bytes is not None:
        vectors = {"file": VECTORS_FILE, "file_bytes": built.vectors_bytes}
        if choice.refine:
            refine = {"file": VECTORS_FILE, "k_factor": REFINE_K_FACTOR, "memory_mapped": True,
                      "file_bytes": built.vectors_bytes}
    bm25_info = _build_bm25(staging, icfg) if icfg.bm25 else None
    return {
        "count": n,
        "index": {"factory": choice.factory, "kind": choice.kind, "chosen_because": choice.reason,
                  "memory_budget_gb": icfg.memory_budget_gb, "estimated_bytes": choice.estimated_bytes,
                  "file_bytes": built.file_bytes, "ntotal": n, "deleted": 0, "vectors": vectors, "refine": refine,
                  "shards": len(shard_ranges(n, icfg.shards)), "search": built.tuning,
                  "contenders": built.contenders,
                  "tuning_questions": save_tuning_questions(staging, question_vectors)},
        "bm25": bm25_info,
        "seconds": round(time.time() - started, 2),
    }


def _build_bm25(staging: str, cfg: IndexConfig) -> dict[str, Any] | None:
    import pyarrow.parquet as pq

    from denseqa.bm25 import BM25Index, NoTerms

    started = time.time()
    texts = pq.read_table(os.path.join(staging, DOCSTORE_FILE), columns=["text"]).column("text").to_pylist()
    try:
        bm25 = BM25Index.build(texts, cfg.bm25_stopwords, tokenizer=cfg.bm25_tokenizer)
    except NoTerms as e:  # the dense index is built already: publish it, without the modes BM25 would give
        logger.warning("BM25: %s; the index is built without it (dense search only; --bm25-stopwords none keeps "
                       "every word)", e)
        return None
    bm25.save(os.path.join(staging, BM25_DIR))
    return {"library": "bm25s", "tokenizer": bm25.tokenizer, "stopwords": cfg.bm25_stopwords,
            "seconds": round(time.time() - started, 2)}
