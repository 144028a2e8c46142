"""The mine-negatives job: config -> checks -> build the retriever (BM25, or an exact index of the model through
the build-index driver) -> mine with a Ray Data actor pool (few pairs on CPU: in this process) -> publish the pairs
with their negatives -> the record ``negatives.json``, written last. And the pipeline's teacher step: a teacher's
scores added to pairs mined before, the same way.

What is a negative (the false-negative control) is :mod:`denseqa.negatives`'s.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from denseqa import storage, tracking
from denseqa.config import COMMAND_SECTIONS, CorpusConfig, IndexConfig, JobConfig
from denseqa.data import ANSWER, QUESTION, resolve_parquet_files
from denseqa.errors import InputError
from denseqa.logs import configure_ray_data
from denseqa.negatives import (
    COMPLETE_COLUMN,
    PAIRS_DIR,
    RECORD_FILE,
    SKIPPED_COLUMN,
    TEACHER_SECONDS_COLUMN,
    NegativeMiner,
    TeacherScorer,
    negative_column_names,
    teacher_column_names,
)
from denseqa.provenance import utc_now
from denseqa.redaction import masked

logger = logging.getLogger(__name__)


def _rename(batch: pa.Table, question_column: str, answer_column: str) -> pa.Table:
    names = {QUESTION: question_column, ANSWER: answer_column}
    return batch.drop_columns([c for c in batch.column_names if c.startswith("_")]).rename_columns(
        [names.get(c, c) for c in batch.column_names if not c.startswith("_")])


def _repeated_questions(train) -> dict[str, list[str]]:
    """question -> its distinct answers, for the questions that have more than one (all of them are positives)."""
    from ray.data.expressions import col

    # Expressions, not Python lambdas: Ray Data evaluates them on whole Arrow batches.
    counts = train.groupby(QUESTION).count().filter(expr=col("count()") > 1).take_all()
    repeated = sorted({row[QUESTION] for row in counts})
    if not repeated:
        return {}
    answers: dict[str, set[str]] = {}
    for row in train.filter(expr=col(QUESTION).is_in(repeated)).take_all():
        answers.setdefault(row[QUESTION], set()).add(row[ANSWER])
    return {q: sorted(a) for q, a in answers.items()}


def _dense_retriever(cfg: JobConfig, texts: list[str], work: str) -> dict[str, Any]:
    """Embed the candidate answers with build-index's Ray Data job into an exact (Flat) index under ``work`` (a
    local path or a URI, beside the output: on a cluster, every mining actor loads it)."""

    from denseqa.drivers.build_index import run_build_index
    from denseqa.texts import text_id

    corpus_file = storage.join(work, "answers.parquet")
    fs, path = storage.filesystem(corpus_file)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(pa.table({"id": [text_id(t) for t in texts], "text": texts}), path, filesystem=fs)
    index_dir = storage.join(work, "index")
    # Flat: exact inner-product search, so the ranks and the margin are the model's own, not an approximation's.
    run_build_index(JobConfig(corpus=CorpusConfig(path=corpus_file), model=cfg.model, embed=cfg.embed,
                              index=IndexConfig(output=index_dir, factory="Flat", bm25=False, overwrite=True,
                                                shared_filesystem=cfg.mine.shared_filesystem),
                              mlflow=cfg.mlflow, used=COMMAND_SECTIONS["build-index"]))
    return {"kind": "dense", "index_dir": index_dir}


def _in_this_process(actor, table: pa.Table, batch_size: int) -> pa.Table:
    """A Ray Data actor's work (``actor``: an instance of its class) done in this process over ``table``, batch by
    batch, for few pairs on CPU. The actors' own classes (:class:`NegativeMiner`, :class:`TeacherScorer`) give the
    actors' output however the pairs are batched (each question's random draws are seeded by the question, its
    ranking cut at its own depth; a teacher scores each pair alone). Why: an actor is a new process that imports
    torch and loads the retriever and any model (~10 s here) before its first batch, and each Ray Data step around
    it (the reads, the distinct answers, the repeated questions, the counts, the write) takes seconds on 2 cores; a
    few thousand pairs take less to mine or score."""
    return pa.concat_tables([actor(table.slice(start, batch_size)) for start in range(0, table.num_rows, batch_size)])


def _write_here(table: pa.Table, folder: str) -> None:
    """``table`` as the one parquet file of ``folder`` (a local path or a URI), written by this process."""
    fs, path = storage.filesystem(folder)
    fs.create_dir(path, recursive=True)
    pq.write_table(table, f"{path}/part-00000.parquet", filesystem=fs)


class _PairsHere:
    """The training pairs as one table in this process (few pairs on CPU): mined by the actors' own
    :class:`NegativeMiner` here, written as one file by this process (why: :func:`_in_this_process`)."""

    where = "driver"

    def __init__(self, train) -> None:
        import ray

        self.table = pa.concat_tables(ray.get(train.to_arrow_refs()))

    def answers(self) -> list[str]:
        return sorted(set(self.table.column(ANSWER).to_pylist()))

    def repeated_questions(self) -> dict[str, list[str]]:
        """:func:`_repeated_questions` of the table."""
        answers: dict[str, list[str]] = {}
        for question, answer in zip(self.table.column(QUESTION).to_pylist(), self.table.column(ANSWER).to_pylist(),
                                    strict=True):
            answers.setdefault(question, []).append(answer)
        return {q: sorted(set(a)) for q, a in answers.items() if len(a) > 1}

    def mine(self, miner: dict[str, Any], m, cfg: JobConfig, use_gpu: bool) -> pa.Table:
        logger.info("mining %d pairs in this process (at most mine.local_max_pairs: no actor to start)",
                    self.table.num_rows)
        cpu = {**miner, "retriever": {**miner["retriever"], "device": "cpu"}}
        return _in_this_process(NegativeMiner(**cpu, torch_threads=None), self.table, m.batch_size)

    def write(self, mined: pa.Table, heldout: pa.Table, folder: str, names: dict[str, str]) -> None:
        _write_here(_rename(pa.concat_tables([mined, heldout]), **names), folder)


class _PairsInRay:
    """The training pairs as a Ray Dataset: mined by a Ray Data actor pool and written by Ray Data's write tasks,
    on any node, so the output must be storage every node reaches (checked here, before any work)."""

    where = "actors"

    def __init__(self, train, output: str, shared_filesystem: bool | None) -> None:
        from denseqa.cluster import check_reachable_by_every_node

        check_reachable_by_every_node(output, "output folder", shared_filesystem)
        self.dataset = train

    def answers(self) -> list[str]:
        return sorted(self.dataset.unique(ANSWER))

    def repeated_questions(self) -> dict[str, list[str]]:
        return _repeated_questions(self.dataset)

    def mine(self, miner: dict[str, Any], m, cfg: JobConfig, use_gpu: bool):
        import ray
        import ray.data

        from denseqa.resources import model_actors

        pool = model_actors("mining", use_gpu, m.actors, cfg.embed.cpus_per_actor)
        retriever = miner["retriever"]
        # Large arguments go through the object store, once per node.
        kwargs = {**miner, "texts": ray.put(miner["texts"]), "other_answers": ray.put(miner["other_answers"]),
                  "torch_threads": pool.torch_threads,
                  "retriever": {**retriever, "device": "cuda" if pool.use_gpu else "cpu"} | (
                      {"index": ray.put(retriever["index"])} if retriever["kind"] == "bm25" else {})}
        return self.dataset.map_batches(
            NegativeMiner, fn_constructor_kwargs=kwargs, batch_size=m.batch_size, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool.actors), num_cpus=pool.cpus,
            num_gpus=1 if pool.use_gpu else None,
        ).materialize()

    def write(self, mined, heldout: pa.Table, folder: str, names: dict[str, str]) -> None:
        import ray.data

        fs, path = storage.filesystem(folder)
        mined.union(ray.data.from_arrow(heldout)).map_batches(
            _rename, batch_format="pyarrow", fn_kwargs=names).write_parquet(path, filesystem=fs)


def _column_sum(table, column: str) -> float:
    """A column's sum, of a Ray Dataset or of a table in this process."""
    total = pc.sum(table.column(column)).as_py() if isinstance(table, pa.Table) else table.sum(column)
    return total or 0


def _teacher_record(teacher: str, scored, pairs: int, columns: list[str]) -> dict[str, Any]:
    """What the teacher scored and how fast: the cost of distillation's targets."""
    seconds = float(_column_sum(scored, TEACHER_SECONDS_COLUMN))
    logger.info("teacher %s scored %d (question, passage) pairs, %.1f pairs/s per scoring process (actor, or this "
                "one)", teacher, pairs, pairs / seconds if seconds else float("nan"))
    return {"path": teacher, "scores": "logits", "columns": columns, "pairs_scored": pairs,
            "actor_seconds": round(seconds, 2),
            "pairs_per_s_per_actor": round(pairs / seconds, 1) if seconds else None}


def _check_teacher(teacher: str) -> None:
    from denseqa.rerank import resolve_reranker

    try:  # a bi-encoder folder would be "converted" with a random head: refused before Ray starts
        resolve_reranker(teacher)
    except InputError as e:
        raise InputError(f"mine.teacher: {e}") from None


def run_teacher_scoring(cfg: JobConfig) -> dict[str, Any]:
    """Score the pairs of a mine-negatives output (``cfg.data.path``) with ``cfg.mine.teacher`` into a new one
    (``cfg.mine.output``): the same pairs and negatives, with the teacher columns. For a teacher trained after
    the mining, on those negatives (the pipeline's reranker). Returns the new record.

    As in :func:`run_mining`, up to ``mine.local_max_pairs`` training pairs on CPU are scored in this process by the
    actors' own :class:`TeacherScorer` and written as one file; more go through a Ray Data actor pool."""
    import ray.data

    from denseqa.cluster import check_reachable_by_every_node, connect
    from denseqa.resources import embeds_on_gpu, model_actors

    started = time.time()
    m = cfg.mine
    tracking.check_store(cfg.mlflow)
    _check_teacher(m.teacher)
    mined = storage.read_json(storage.join(cfg.data.path, RECORD_FILE))
    output = storage.output_folder(m.output, m.overwrite, "the pairs with their teacher scores")
    fs, files = resolve_parquet_files(storage.join(cfg.data.path, PAIRS_DIR))
    if cfg.embed.use_gpu is None:
        connect(may_start_local=True)  # whether the cluster has GPUs is Ray's to say
    use_gpu = embeds_on_gpu(cfg.embed.use_gpu)
    # The same rule as the mining's: a folder mined in the job's process is scored in it too
    in_driver = not use_gpu and mined["counts"]["train_pairs"] <= m.local_max_pairs
    scorer = {"teacher": m.teacher, "batch_size": m.teacher_batch_size, "question_column": cfg.data.question_column,
              "answer_column": cfg.data.answer_column, "negative_columns": mined["columns"]}
    if in_driver:
        pairs = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])
        logger.info("teacher scoring %d pairs in this process (at most mine.local_max_pairs training pairs: no actor "
                    "to start)", pairs.num_rows)
        scored = _in_this_process(TeacherScorer(**scorer, device="cpu"), pairs, m.batch_size)
    else:
        configure_ray_data()
        pairs = ray.data.read_parquet(files, filesystem=fs)
        check_reachable_by_every_node(output, "output folder", m.shared_filesystem)  # write tasks run on any node
        pool = model_actors("teacher", use_gpu, m.actors, cfg.embed.cpus_per_actor)
        scored = pairs.map_batches(
            TeacherScorer, fn_constructor_kwargs={**scorer, "device": "cuda" if pool.use_gpu else "cpu",
                                                  "torch_threads": pool.torch_threads},
            batch_size=m.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=pool.actors),
            num_cpus=pool.cpus, num_gpus=1 if pool.use_gpu else None,
        ).materialize()
    columns = teacher_column_names(len(mined["columns"]))
    teacher = _teacher_record(m.teacher, scored, mined["counts"]["with_all_negatives"] * (1 + len(mined["columns"])),
                              columns)
    with storage.staged_output(output, marker=RECORD_FILE, writers_elsewhere=not in_driver) as staging:
        pairs_dir = storage.join(staging, PAIRS_DIR)
        if in_driver:
            _write_here(scored.drop_columns([TEACHER_SECONDS_COLUMN]), pairs_dir)
        else:
            fs, path = storage.filesystem(pairs_dir)
            scored.drop_columns([TEACHER_SECONDS_COLUMN]).write_parquet(path, filesystem=fs)
        record = {**mined, "teacher": teacher, "scored_from": masked(cfg.data.path), "output": masked(output),
                  "scored_in": "driver" if in_driver else "actors",
                  "seconds": round(mined["seconds"] + time.time() - started, 1), "created": utc_now()}
        storage.write_json(storage.join(staging, RECORD_FILE), record)
    tracking.log_job(cfg.mlflow, "teacher-scores", started, cfg.to_record(),
                     metrics={"pairs_scored": teacher["pairs_scored"], "pairs_per_s_per_actor":
                              teacher.get("pairs_per_s_per_actor") or 0.0},
                     artifacts=[storage.join(output, RECORD_FILE)], tags={"denseqa.output": output})
    return record


def run_mining(cfg: JobConfig) -> dict[str, Any]:
    """Mine hard negatives for the training pairs of ``cfg.data``; write them with the pairs. Returns the record."""
    from denseqa.bm25 import BM25Index
    from denseqa.data import load_qa_data
    from denseqa.model import check_model_source, describe_model
    from denseqa.resources import embeds_on_gpu

    started = time.time()
    m = cfg.mine
    tracking.check_store(cfg.mlflow)
    output = storage.output_folder(m.output, m.overwrite, "the pairs with their hard negatives")
    if m.method == "dense":
        check_model_source(cfg.model.model)
    if m.teacher:
        _check_teacher(m.teacher)
    # Existing negative columns (a mined file mined again) are ignored: the output gets this run's.
    data = load_qa_data(cfg.data.model_copy(update={"num_negatives": 0}))
    # BM25 needs no GPU; a teacher scoring the pairs does the work a GPU is for.
    use_gpu = embeds_on_gpu(cfg.embed.use_gpu if m.method == "dense" or m.teacher else False)
    # Few pairs on CPU: mined and written in this process; more by Ray Data's actors and tasks
    in_driver = not use_gpu and data.counts["train"] <= m.local_max_pairs
    pairs = _PairsHere(data.train) if in_driver else _PairsInRay(data.train, output, m.shared_filesystem)
    texts = pairs.answers()
    if len(texts) < 2:
        raise InputError(f"{cfg.data.path}: {len(texts)} distinct training answer(s); mining needs other answers "
                         "to take negatives from")
    other_answers = pairs.repeated_questions()
    logger.info("mining %d %s negative(s) per pair for %d training pairs among %d distinct answers (ranks %d..%d%s)",
                m.num_negatives, m.method, data.counts["train"], len(texts), m.range_min, m.range_max,
                f", relative margin {m.relative_margin}" if m.relative_margin is not None else "")

    # Beside the output, local or URI alike: the dense index there must be reachable from every mining actor.
    work = output.rstrip("/") + ".work"
    try:
        if m.method == "bm25":
            bm25 = BM25Index.build(texts, m.bm25_stopwords, tokenizer=m.bm25_tokenizer)
            logger.info("BM25 tokenizer: %s%s", bm25.tokenizer, " (auto)" if m.bm25_tokenizer == "auto" else "")
            retriever = {"kind": "bm25", "index": bm25}
        else:
            retriever = _dense_retriever(cfg, texts, work)
        miner = {"cfg": m.model_dump(), "texts": texts, "retriever": retriever, "other_answers": other_answers}
        mined = pairs.mine(miner, m, cfg, use_gpu)
        columns = negative_column_names(m.num_negatives)
        scores = teacher_column_names(m.num_negatives) if m.teacher else []
        complete = int(_column_sum(mined, COMPLETE_COLUMN))
        teacher = _teacher_record(m.teacher, mined, complete * (1 + m.num_negatives), scores) if m.teacher else None
        counts = {"train_pairs": data.counts["train"], "with_all_negatives": complete,
                  "without_all_negatives": data.counts["train"] - complete,
                  "heldout_pairs_without_negatives": data.counts["heldout"], "candidates": len(texts),
                  "questions_with_several_answers": len(other_answers),
                  "skipped_by_margin": int(_column_sum(mined, SKIPPED_COLUMN))}
        heldout = pa.table({
            QUESTION: [q for q, _ in data.heldout], ANSWER: [a for _, a in data.heldout],
            **{c: pa.nulls(len(data.heldout), pa.string()) for c in columns},
            **{c: pa.nulls(len(data.heldout), pa.float32()) for c in scores}})
        internal = [SKIPPED_COLUMN, COMPLETE_COLUMN, *([TEACHER_SECONDS_COLUMN] if m.teacher else [])]
        names = {"question_column": cfg.data.question_column, "answer_column": cfg.data.answer_column}
        # Ray Data's write tasks (the actor path) write the pairs on any node: the staging must be storage they all
        # reach. Mined in this process, the pairs are written here.
        with storage.staged_output(output, marker=RECORD_FILE, writers_elsewhere=not in_driver) as staging:
            pairs.write(mined.drop_columns(internal), heldout, storage.join(staging, PAIRS_DIR), names)
            record = {
                "method": m.method,
                "model": describe_model(cfg.model) if m.method == "dense" else None,
                "options": {k: v for k, v in m.model_dump().items() if k not in ("output", "overwrite")},
                "columns": columns,
                "teacher": teacher,
                "counts": counts,
                "data": {"path": masked(cfg.data.path), "rows": data.counts},
                "config": cfg.to_record(),
                "seconds": round(time.time() - started, 1),
                "created": utc_now(),
                "mined_in": pairs.where,
                "output": masked(output),
            }
            storage.write_json(storage.join(staging, RECORD_FILE), record)
    finally:
        storage.remove(work)
    logger.info("hard negatives written to %s: %d of %d training pairs have all %d (%d candidates rejected by the "
                "margin), %.1f s", output, complete, data.counts["train"], m.num_negatives,
                counts["skipped_by_margin"], record["seconds"])
    tracking.log_job(cfg.mlflow, "mine-negatives", started, cfg.to_record(),
                     metrics={k: v for k, v in counts.items()} | {"seconds": record["seconds"]},
                     artifacts=[storage.join(output, RECORD_FILE)], tags={"denseqa.output": output})
    return record
