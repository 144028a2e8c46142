"""Stage 2a, mine: hard negatives for each training pair, written next to it as ``negative_1..negative_n``.

In-batch negatives are mostly easy: a random answer rarely looks like the right one. DPR (Karpukhin et al., 2020,
https://arxiv.org/abs/2004.04906, Table 3) adds one BM25 negative per question, an answer that shares the
question's words but is not its answer; ANCE (Xiong et al., 2021, https://arxiv.org/abs/2007.00808) and RocketQA
(Qu et al., 2021, https://arxiv.org/abs/2010.08191) mine them with the model being trained (a first round, then
mining, then a second round). Both kinds come from the same procedure here:

1. the candidate answers are the distinct answers of the *training* pairs (held-out answers never become
   negatives, so evaluation stays clean);
2. a retriever ranks them for every training question: BM25 (bm25s), or the model through an exact FAISS index
   built by this project's own build-index job (its Ray Data actor pool does the embedding);
3. false-negative control, as in sentence-transformers' ``mine_hard_negatives``: candidates whose text equals
   the pair's answer or any answer of the same question are never negatives; the top ``range_min`` ranks are
   skipped; a candidate must score at most ``positive - |positive| * relative_margin``; then the best-ranked
   (or a seeded random choice) ``num_negatives`` of what is left are taken. A pair for which too few candidates
   pass keeps empty slots; training drops such pairs and counts them.

The questions are mined by a Ray Data actor pool (each actor holds the retriever once), so a data set of
millions of pairs is mined across the cluster. The output folder holds ``pairs/``, parquet files with the input's
question and answer columns plus the negative columns (held-out pairs included, without negatives, so that the
training job's held-out split finds the same pairs), and ``negatives.json``, the record, written last. Train on
the folder itself (``--data OUTPUT``).

With ``mine.teacher`` (a cross-encoder: the reranker train-reranker wrote, or any), the same actors score each
pair's answer and negatives with it, as columns ``teacher_answer``, ``teacher_negative_1..n``: the targets of the
bi-encoder's distillation term (``train.distill``; FlagEmbedding's knowledge distillation, MarginMSE).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from denseqa.config import MineConfig
from denseqa.data import ANSWER, QUESTION
from denseqa.texts import split_key

logger = logging.getLogger(__name__)

RECORD_FILE = "negatives.json"
PAIRS_DIR = "pairs"  # the parquet files, apart from the record, so that any parquet reader opens the folder
# Per-row statistics, summed by the driver and dropped before writing.
SKIPPED_COLUMN, COMPLETE_COLUMN = "_skipped_by_margin", "_complete"


def negative_column_names(n: int) -> list[str]:
    return [f"negative_{i}" for i in range(1, n + 1)]


def teacher_column_names(n: int) -> list[str]:
    """The teacher's scores of a pair's answer and of its ``n`` negatives (``mine.teacher``, for distillation)."""
    return ["teacher_answer", *(f"teacher_{c}" for c in negative_column_names(n))]


TEACHER_SECONDS_COLUMN = "_teacher_seconds"


def select_negatives(scores: np.ndarray, positions: np.ndarray, positives: set[int], cfg: MineConfig,
                     rng: np.random.Generator | None = None) -> tuple[list[int], int]:
    """The negatives of one question from its ranked candidates, and how many the margin rejected.

    ``scores``/``positions``: the retriever's ranking, best first (position -1: empty slot). ``positives``: the
    positions of the question's answers (the pair's and those of other pairs with the same question text).
    Ranks are counted without the positives, so ``range_min`` means "skip that many wrong-looking candidates".
    A positive that is not among the ranked candidates scores below all of them, so with a margin (taken below
    the lowest-scoring positive) none qualifies.
    """
    ranked = [(float(s), int(p)) for s, p in zip(scores, positions, strict=True) if p >= 0]
    positive_scores = [s for s, p in ranked if p in positives]
    window = [(s, p) for s, p in ranked if p not in positives][cfg.range_min:cfg.range_max]
    skipped = 0
    if cfg.relative_margin is not None:
        if len(positive_scores) == len(positives):
            lowest = min(positive_scores)  # the harder positive, as mine_hard_negatives does
            threshold = lowest - abs(lowest) * cfg.relative_margin
            kept = [(s, p) for s, p in window if s <= threshold]
        else:
            kept = []
        skipped, window = len(window) - len(kept), kept
    chosen = [p for _, p in window]
    if cfg.sampling == "random" and len(chosen) > cfg.num_negatives:
        picked = np.sort((rng or np.random.default_rng(cfg.seed)).choice(len(chosen), cfg.num_negatives,
                                                                         replace=False))
        chosen = [chosen[i] for i in picked]  # kept in rank order
    return chosen[:cfg.num_negatives], skipped


def same_answer_key(text: str) -> str:
    """What two answers share when one is the other to a model: the same words, up to case and spacing."""
    return " ".join(text.split()).casefold()


class NegativeMiner:
    """A Ray Data actor: ranks the candidate answers for a batch of training pairs and fills their negatives."""

    def __init__(self, cfg: dict, texts, retriever: dict, other_answers, torch_threads: int | None) -> None:
        import ray

        from denseqa.logs import setup_logging

        setup_logging()
        self.cfg = MineConfig(**cfg)

        def resolve(value):  # large arguments come through the object store, once per node
            return ray.get(value) if isinstance(value, ray.ObjectRef) else value

        self.other_answers: dict[str, list[str]] = resolve(other_answers)  # question -> all its answers
        if torch_threads:  # the query encoder's or the teacher's forward passes use the cores Ray Data leaves idle
            import torch

            torch.set_num_threads(torch_threads)
        if retriever["kind"] == "bm25":
            self.bm25 = resolve(retriever["index"])
            self.texts: list[str] = resolve(texts)
            self.searcher = None
        else:
            from denseqa.search import Searcher

            self.searcher = Searcher(retriever["index_dir"], device=retriever["device"])
            self.texts = self.searcher.docstore.column("text").to_pylist()
        # A candidate that differs from a positive in case or spacing only is that positive to the model (an uncased
        # tokenizer, stripped input), scores as it does, and would pass any margin: it is a positive, never a negative.
        self.positions_of: dict[str, list[int]] = {}
        for i, t in enumerate(self.texts):
            self.positions_of.setdefault(same_answer_key(t), []).append(i)
        self.teacher = None
        if self.cfg.teacher:
            from denseqa.rerank import Reranker

            self.teacher = Reranker(self.cfg.teacher, device=retriever.get("device"),
                                    batch_size=self.cfg.teacher_batch_size)

    def rank(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.searcher is None:
            return self.bm25.search(questions, k)
        return self.searcher.rank(questions, k, mode="dense")

    def __call__(self, batch: pa.Table) -> pa.Table:
        questions = batch.column(QUESTION).to_pylist()
        answers = batch.column(ANSWER).to_pylist()
        positives = [{i for a in [answer, *self.other_answers.get(q, ())] for i in self.positions_of.get(
                      same_answer_key(a), ())} for q, answer in zip(questions, answers, strict=True)]
        # Room for the positives on top of range_max, so they never push a candidate out of the window.
        scores, positions = self.rank(questions, self.cfg.range_max + max(map(len, positives), default=1))
        n = self.cfg.num_negatives
        columns: list[list[str | None]] = [[] for _ in range(n)]
        skipped = []
        for q, s, p, own in zip(questions, scores, positions, positives, strict=True):
            rng = np.random.default_rng([self.cfg.seed, split_key(q, self.cfg.seed)])
            # Each question's own depth, not the batch's: a positive ranked below it must count as unranked
            # whatever else the batch holds, or the margin's check would depend on how the pairs were batched.
            depth = self.cfg.range_max + max(len(own), 1)
            chosen, margin_skipped = select_negatives(s[:depth], p[:depth], own, self.cfg, rng)
            skipped.append(margin_skipped)
            for i in range(n):
                columns[i].append(self.texts[chosen[i]] if i < len(chosen) else None)
        out = batch.select([QUESTION, ANSWER])
        for name, values in zip(negative_column_names(n), columns, strict=True):
            out = out.append_column(name, pa.array(values, type=pa.string()))
        complete = [int(v is not None) for v in columns[-1]]
        if self.teacher is not None:
            out = with_teacher_scores(self.teacher, out, questions, answers, columns)
        out = out.append_column(SKIPPED_COLUMN, pa.array(skipped, type=pa.int64()))
        return out.append_column(COMPLETE_COLUMN, pa.array(complete, type=pa.int64()))


def with_teacher_scores(teacher, out: pa.Table, questions: list[str], answers: list[str],
                        negatives: list[list[str | None]]) -> pa.Table:
    """``out`` with the teacher's raw scores (logits) of each pair's answer and negatives as float columns
    (:func:`teacher_column_names`; null for a pair without all its negatives, which training drops), and the
    seconds the teacher took (on the first row, summed by the driver)."""
    import time

    rows = [i for i in range(len(questions)) if all(column[i] is not None for column in negatives)]
    passages = [answers, *negatives]
    started = time.perf_counter()
    flat = teacher.scores([(questions[i], column[i]) for column in passages for i in rows], logits=True)
    seconds = time.perf_counter() - started
    scores = flat.reshape(len(passages), len(rows)) if rows else np.zeros((len(passages), 0), np.float32)
    out = out.drop_columns([c for c in teacher_column_names(len(negatives)) if c in out.column_names])
    for name, values in zip(teacher_column_names(len(negatives)), scores, strict=True):
        column = [None] * len(questions)
        for i, value in zip(rows, values.tolist(), strict=True):
            column[i] = value
        out = out.append_column(name, pa.array(column, type=pa.float32()))
    timing = [0.0] * len(questions)
    if timing:
        timing[0] = seconds
    return out.append_column(TEACHER_SECONDS_COLUMN, pa.array(timing, type=pa.float64()))


class TeacherScorer:
    """A Ray Data actor: adds a teacher's scores to pairs mined earlier (``pairs/`` of a mine-negatives output),
    for a teacher trained after the mining (the pipeline's reranker, trained on those very negatives)."""

    def __init__(self, teacher: str, batch_size: int, device: str, question_column: str, answer_column: str,
                 negative_columns: list[str], torch_threads: int | None = None) -> None:
        from denseqa.logs import setup_logging
        from denseqa.rerank import Reranker

        setup_logging()
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.teacher = Reranker(teacher, device=device, batch_size=batch_size)
        self.question_column, self.answer_column = question_column, answer_column
        self.negative_columns = negative_columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        return with_teacher_scores(self.teacher, batch, batch.column(self.question_column).to_pylist(),
                                   batch.column(self.answer_column).to_pylist(),
                                   [batch.column(c).to_pylist() for c in self.negative_columns])
