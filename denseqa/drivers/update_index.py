"""The live update of an index: config -> checks (index, model, upsert and delete files) -> plan -> embed what is
new or changed (Ray Data, as a build) -> write the next version (appended, or compacted) -> publish it
(``CURRENT.json``) -> hot-swap the running service when asked.

``denseqa build-index --update INDEX --upsert new.parquet [--delete ids.parquet] [--swap]``. Read
:func:`run_update_index` top to bottom; the plan and the appending are :mod:`denseqa.updates`', the versions
:mod:`denseqa.versions`'.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from denseqa import storage
from denseqa.config import CorpusConfig, IndexConfig, JobConfig
from denseqa.errors import InputError
from denseqa.index import (
    BM25_DIR,
    DELETED_FILE,
    DOCSTORE_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    VECTORS_FILE,
    load_tuning_questions,
    save_tuning_questions,
)
from denseqa.provenance import package_versions, peak_rss_mb, utc_now
from denseqa.redaction import masked
from denseqa.versions import (
    next_version,
    one_update_at_a_time,
    publish_version,
    resolve_index,
    version_root,
)

logger = logging.getLogger(__name__)

# What an index *is* (its choice and tuning): a compaction rebuilds with the settings the index was built with,
# unless this command sets them.
# Settings added since an index could be built without them: an older index is compacted as it was built.
LEGACY_INDEX_SETTINGS = {"measure_contenders": False, "hnsw_ef_construction": 40}
RECORDED_INDEX_KEYS = ("factory", "memory_budget_gb", "exact_max_vectors", "hnsw_max_vectors", "target_recall",
                       "measure_contenders", "hnsw_ef_construction", "tune_queries", "train_size", "bm25",
                       "bm25_stopwords", "bm25_tokenizer", "seed")


def run_update_index(cfg: JobConfig) -> dict[str, Any]:
    """Apply ``--upsert`` / ``--delete`` to the index at ``--update`` as a new version. Returns its manifest (the
    current one, unchanged, when the files change nothing). One update of an index at a time: refused while
    another runs."""
    with one_update_at_a_time(storage.absolute(cfg.index.update)):
        return _update_index(cfg)


def _update_index(cfg: JobConfig) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from denseqa.corpus import check_corpus, read_corpus_table
    from denseqa.embed import recorded_passage_model
    from denseqa.search import read_manifest
    from denseqa.updates import check_exact_vectors, plan_update

    started = time.time()
    icfg = cfg.index
    if not (icfg.upsert or icfg.delete):
        raise InputError("--update needs --upsert FILE (passages to add or change) and/or --delete FILE (ids)")
    if icfg.sync and not icfg.upsert:
        raise InputError("--sync needs --upsert: the whole corpus, as it is now")
    root = storage.absolute(icfg.update)
    index_root = version_root(root)
    if index_root is not None:
        # What /healthz and a swap report: updated as a root, it would nest versions in a version that the
        # index's own updates later remove, the update with it.
        raise InputError(f"{root}: one version of the index {index_root}; update the index itself: --update "
                         f"{index_root}")
    manifest = read_manifest(root)  # not an index: one line
    current = resolve_index(root)
    if manifest["index"]["kind"] == "partitioned" or manifest.get("partition"):
        raise InputError(f"{root}: a partitioned index (--partitions), or one of its partitions, is not updated "
                         "live yet; build it again")
    check_exact_vectors(root, manifest["index"])
    derived_ids = bool(manifest["corpus"].get("derived_ids"))
    upsert_cfg = cfg.corpus.model_copy(update={"path": icfg.upsert, "from_answers": derived_ids})
    checked = check_corpus(upsert_cfg) if icfg.upsert else None  # columns, types, duplicate ids
    delete_ids = _read_delete_ids(icfg.delete, cfg.corpus.id_column) if icfg.delete else None
    model_cfg, encoder = _checked_model(cfg, manifest, root)

    local = _local_copy(current)
    try:  # the local copy of a remote index goes on every way out: refused, nothing to change, or done
        docstore = pq.read_table(os.path.join(local, DOCSTORE_FILE), columns=["id", "text"])
        deleted = _deleted(local)
        upserts = read_corpus_table(upsert_cfg, checked) if checked else None
        plan = plan_update(docstore, deleted, upserts, delete_ids, icfg.upsert or icfg.delete, sync=icfg.sync)
        counts = plan.counts
        logger.info("update of %s (version %d): %d new, %d changed, %d unchanged, %d deleted", root,
                    manifest.get("version", 1), counts["new"], counts["changed"], counts["unchanged"],
                    counts["deleted"])
        if plan.unknown_deletes:
            logger.warning("%d id(s) to delete are not in the index (first: %s); nothing to delete for them",
                           counts["unknown_deletes"], ", ".join(repr(i) for i in plan.unknown_deletes))
        ntotal = docstore.num_rows + plan.append.num_rows
        all_deleted = np.union1d(deleted, plan.tombstones).astype(np.int64)
        if ntotal - len(all_deleted) == 0:
            raise InputError(f"{icfg.delete or icfg.upsert}: the update would leave no passage in {root}; build a new "
                             "index instead")
        if not plan.append.num_rows and not len(plan.tombstones):
            logger.info("nothing changes: %s stays at version %d", root, manifest.get("version", 1))
            if icfg.swap:  # a run again after its swap failed: the service is swapped to the current version now
                _swap(root)
            return {**manifest, "update": {**counts, "unknown_delete_ids": plan.unknown_deletes, "published": False}}

        version, version_dir = next_version(root)
        work = root.rstrip("/") + ".updating"  # on the index's storage: Ray Data's workers write the embeddings there
        storage.remove(work)
        try:
            # New passages are embedded as the index's were (bf16 ones by torch), here or by Ray Data's actors: an
            # updated index then ranks as a fresh build of the same corpus would (in bf16, up to rounding that depends
            # on the batch a passage was padded in).
            precision = manifest["model"].get("passage_precision", "fp32")
            if plan.append.num_rows <= icfg.update_local_max:
                new_vectors, new_rows, embedding = _embed_here(plan.append, encoder, model_cfg, cfg, precision)
            else:
                new_vectors, new_rows, embedding = _embed(plan.append, work, model_cfg, cfg, precision,
                                                          recorded_passage_model(manifest["model"]))
            del encoder
            with storage.staged_output(version_dir, marker=MANIFEST_FILE) as staging:
                updated = _write_version(local, staging, manifest, docstore, new_rows, new_vectors, all_deleted, cfg,
                                         work)
                updated.update({
                    "version": version, "parent": manifest.get("version", 1), "output": masked(root),
                    "created": utc_now(), "versions": package_versions(),
                    "update": {**counts, "unknown_delete_ids": plan.unknown_deletes,
                               "upsert": icfg.upsert and masked(icfg.upsert),
                               "delete": icfg.delete and masked(icfg.delete),
                               "embedding": embedding, "compacted": updated.pop("compacted"),
                               "seconds": round(time.time() - started, 2), "driver_peak_rss_mb": peak_rss_mb(),
                               "published": True},
                })
                storage.write_json(os.path.join(staging, MANIFEST_FILE), updated)
            publish_version(root, version)
        finally:
            storage.remove(work)
    finally:
        if local != current:
            shutil.rmtree(local, ignore_errors=True)
    logger.info("%s: version %d published in %.1f s (%d live passages, %d deleted kept as tombstones%s)", root,
                version, time.time() - started, updated["count"], updated["index"]["deleted"],
                ", compacted" if updated["update"]["compacted"] else "")
    if icfg.swap:
        _swap(root)
    return updated


def _swap(root: str) -> None:
    from denseqa.drivers.serve import swap_index

    status = swap_index(root)
    logger.info("the running service now serves %s", status["index"])


def _checked_model(cfg: JobConfig, manifest: dict, root: str):
    """The model that embeds the new passages: the index's own (or ``--model``, which must be it), as its config
    (for Ray Data's actors) and loaded here, on the backend that embedded the index."""
    from denseqa.model import Encoder, check_model_source, query_model_config

    model_cfg = query_model_config(manifest["model"], cfg.model.model)
    check_model_source(model_cfg.model)
    encoder = Encoder.load(model_cfg.model_copy(update={"backend": "torch"}), device="cpu")
    if model_cfg.backend not in (None, "torch"):
        encoder.run_on_onnx_runtime(model_cfg.backend, model_cfg)  # exported once, into the cache actors read
    encoder.check_matches(manifest["model"], root)
    return model_cfg, encoder


def _read_delete_ids(path: str, id_column: str):
    """The ids to delete: column ``id_column`` of a parquet, as strings (the docstore's ids are)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from denseqa.data import check_schema, resolve_parquet_files

    fs, files = resolve_parquet_files(path)
    check_schema(fs, files, [id_column], hint="name the id column with --id-column", integer_ok=(id_column,))
    return pa.chunked_array([pq.read_table(f, columns=[id_column], filesystem=fs).column(id_column).cast(pa.string())
                             for f in files]).combine_chunks().drop_null()


def _local_copy(current: str) -> str:
    if not storage.is_uri(current):
        return current
    return storage.download(current, tempfile.mkdtemp(prefix="denseqa-update-"))


def _deleted(folder: str) -> np.ndarray:
    path = os.path.join(folder, DELETED_FILE)
    return np.load(path) if os.path.exists(path) else np.zeros(0, dtype=np.int64)


def _embed_here(rows, encoder, model_cfg, cfg: JobConfig, precision: str):
    """Embed ``rows`` (id, text) in this process at the index's passage ``precision``: (vectors, rows, stats).
    ``encoder`` is the checked one; bf16 passages need the torch model, which it may have swapped for ONNX Runtime."""
    import torch

    from denseqa.model import passage_encoder

    if not rows.num_rows:
        return np.zeros((0, 0), dtype=np.float32), rows, None
    started = time.time()
    encoder = passage_encoder(encoder, model_cfg, precision, device="cpu")
    vectors = encoder.encode_passages(rows.column("text").to_pylist(), cfg.embed.encode_batch_size)
    seconds = time.time() - started
    return vectors, rows, {"rows": rows.num_rows, "seconds": round(seconds, 2), "where": "driver",
                           "precision": precision, "passages_per_s": round(rows.num_rows / max(seconds, 1e-9), 2),
                           "torch_threads": torch.get_num_threads()}


def _embed(rows, work: str, model_cfg, cfg: JobConfig, precision: str, expected: dict):
    """Embed ``rows`` (id, text; more than --update-local-max) with the build's Ray Data pipeline: (vectors, rows in
    the order embedded, stats)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from denseqa.cluster import check_reachable_by_every_node
    from denseqa.corpus import load_corpus
    from denseqa.embed import embed_corpus, embedding_identity, iter_shards, shard_files, vectors_of
    from denseqa.onnx_backend import resolve_backend
    from denseqa.resources import embeds_on_gpu

    fs, path = storage.filesystem(storage.join(work, "upserts.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(rows, path, filesystem=fs)
    corpus = load_corpus(CorpusConfig(path=storage.join(work, "upserts.parquet")))  # starts or joins Ray
    check_reachable_by_every_node(work, "index folder", cfg.index.shared_filesystem)  # the actors write shards
    identity = embedding_identity({"weights_sha256": model_cfg.model}, corpus)  # work is fresh: nothing to reuse
    model_cfg = model_cfg.model_copy(update={"backend": resolve_backend(
        model_cfg.backend, "cuda" if embeds_on_gpu(cfg.embed.use_gpu) else "cpu")})
    shards_dir = storage.join(work, "embeddings")
    stats = embed_corpus(corpus, model_cfg, cfg.embed, shards_dir, identity, precision, expected=expected)
    files = [f for f, _ in shard_files(shards_dir)]
    batches = list(iter_shards(files, shards_dir, ["id", "text", "vector"], cfg.index.add_batch_size))
    vectors = np.concatenate([vectors_of(b) for b in batches])
    embedded = pa.Table.from_batches(batches).select(["id", "text"])
    return vectors, embedded, {**stats, "where": "ray data"}


def _write_version(local: str, staging: str, manifest: dict, docstore, new_rows, new_vectors: np.ndarray,
                   deleted: np.ndarray, cfg: JobConfig, work: str) -> dict[str, Any]:
    """The files of the next version in ``staging`` and its manifest (without the update record): the current
    index with the new vectors appended and the tombstones beside it; compacted when they are too many."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from denseqa.updates import append_vectors, check_exact_vectors, full_vectors, live_positions

    icfg = cfg.index
    recorded = manifest["index"]
    questions = load_tuning_questions(local, recorded.get("tuning_questions"))
    vectors_file = os.path.join(local, VECTORS_FILE) if check_exact_vectors(local, recorded) else None
    index = append_vectors(os.path.join(local, INDEX_FILE), vectors_file, new_vectors, staging, icfg.add_batch_size)
    ntotal = index.ntotal
    rows = pa.concat_tables([docstore, new_rows.cast(docstore.schema)]) if new_rows.num_rows else docstore
    share = len(deleted) / max(ntotal, 1)
    if share > icfg.compact_threshold:
        logger.info("%.1f%% of the vectors are tombstones (over --compact-threshold %.2f): compacting", 100 * share,
                    icfg.compact_threshold)
        live = np.ones(ntotal, dtype=bool)
        live[deleted] = False
        chunks = full_vectors(index, staging, live, icfg.add_batch_size)
        del index  # the chunks hold it until they are read, then the rebuild has the memory to itself
        return _compacted(staging, manifest, rows.filter(pa.array(live)), chunks, questions, cfg, work)
    del index
    save_tuning_questions(staging, questions)  # each version folder is complete
    pq.write_table(rows, os.path.join(staging, DOCSTORE_FILE))
    np.save(os.path.join(staging, DELETED_FILE), deleted)
    bm25 = manifest.get("bm25")
    if bm25:
        from denseqa.bm25 import BM25Index

        started = time.time()
        live = live_positions(ntotal, deleted)
        # BM25's statistics (document frequencies, lengths) are the corpus's: rebuilt over the live texts
        BM25Index.build(rows.column("text").take(live).to_pylist(), bm25.get("stopwords"), positions=live,
                        tokenizer=bm25.get("tokenizer", "regex")).save(os.path.join(staging, BM25_DIR))
        bm25 = {**bm25, "seconds": round(time.time() - started, 2)}
    file_bytes = os.path.getsize(os.path.join(staging, INDEX_FILE))
    return {**manifest, "count": ntotal - len(deleted), "bm25": bm25, "compacted": False,
            "index": {**recorded, "ntotal": ntotal, "deleted": len(deleted), "file_bytes": file_bytes}}


def _compacted(staging: str, manifest: dict, live_rows, chunks, questions: np.ndarray | None, cfg: JobConfig,
               work: str) -> dict[str, Any]:
    """A fresh build of the live passages (:func:`denseqa.drivers.build_index.write_index_folder`), from their
    exact vectors: no passage is embedded again. Tuned on the questions the index was built with, when it kept
    them (``questions``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from denseqa.drivers.build_index import write_index_folder
    from denseqa.embed import VECTOR
    from denseqa.index import assemble_docstore

    shards_dir = storage.join(work, "compaction")
    fs, path = storage.filesystem(shards_dir)
    fs.create_dir(path, recursive=True)
    start = 0
    for i, x in enumerate(chunks):
        part = live_rows.slice(start, len(x))
        column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        pq.write_table(part.append_column(VECTOR, column), f"{path}/part-{i:06d}.parquet", filesystem=fs)
        start += len(x)
    for name in os.listdir(staging):  # the appended files (read above) are replaced by the build's
        path = os.path.join(staging, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    recorded = (manifest.get("config") or {}).get("index") or {}
    settings = {k: recorded[k] for k in RECORDED_INDEX_KEYS if k in recorded}
    if recorded:
        settings = {**{k: v for k, v in LEGACY_INDEX_SETTINGS.items() if k not in recorded}, **settings}
    settings.update({k: getattr(cfg.index, k) for k in cfg.index.model_fields_set if k in RECORDED_INDEX_KEYS})
    if (manifest.get("bm25") or {}).get("tokenizer"):  # the terms the index was cut into, not "auto" again
        settings["bm25_tokenizer"] = manifest["bm25"]["tokenizer"]
    icfg = IndexConfig.model_validate({**settings, "add_batch_size": cfg.index.add_batch_size})
    layout = assemble_docstore(shards_dir, os.path.join(staging, DOCSTORE_FILE), False, icfg.add_batch_size)
    built = write_index_folder(staging, layout, manifest["dimension"], icfg, questions)
    return {**manifest, "count": built["count"], "index": built["index"], "bm25": built["bm25"], "compacted": True}
