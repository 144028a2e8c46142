"""Stage 2b, train the reranker: a cross-encoder fine-tuned with Ray Train on the pairs and their hard negatives.

The second stage of retrieve-and-rerank (:mod:`denseqa.rerank`): a model that reads a question and a passage
together and gives one relevance score. It starts from an encoder checkpoint (default: the bundled
all-MiniLM-L6-v2, with a new one-output head) and learns listwise: each question's answer against its hard
negatives and a few answers of other pairs of the batch, through a softmax cross-entropy over their scores
(sentence-transformers' cross-encoder ``MultipleNegativesRankingLoss``; with hard negatives this is the localized
contrastive estimation of Gao et al., 2021, "Rethink Training of BERT Rerankers in Multi-Stage Retrieval Pipeline").

Positives alone cannot train it: with only right answers to score it learns to say "relevant" to everything. The
negatives come from ``mine-negatives`` (BM25, or ``--mine.method dense`` with a trained bi-encoder: the passages the
first stage actually retrieves), as ``negative_1..n`` columns of the training data.

Everything but the model, the loss and the evaluation is the bi-encoder's (:mod:`denseqa.train`): the same Ray
Train loop, DDP, checkpoints, resume and record. Nothing is gathered across workers: a cross-encoder scores pairs,
so each worker scores its own, and DDP averages the gradients. Evaluation: sentence-transformers'
``CrossEncoderRerankingEvaluator`` (MRR@10, nDCG@10, MAP) over held-out questions, each with its answers among the
BM25 top candidates of every answer of the data.
"""

from __future__ import annotations

from typing import Any

import torch

from denseqa.config import JobConfig
from denseqa.errors import InputError
from denseqa.logs import logger
from denseqa.train import TrainPlan, hard_negatives_record

METRICS = ("mrr@10", "ndcg@10")
# Options of the bi-encoder's loss (train section) that a cross-encoder has no use for: given to the reranker,
# they are refused, never silently ignored. Its own are rerank.in_batch_negatives and rerank.loss_scale.
BI_ENCODER_ONLY = ("scale", "gather", "mask_duplicates", "cached_loss", "mini_batch_size", "directions",
                   "partition_mode", "hardness_mode", "hardness_strength", "distill", "distill_weight",
                   "distill_temperature")


def load_cross_encoder(model_cfg, device: str | None = None):
    """The starting cross-encoder: an encoder checkpoint (a sentence-transformers or plain Hugging Face folder) with
    a one-output classification head on top (new, randomly initialised, unless the checkpoint is a reranker)."""
    from sentence_transformers import CrossEncoder

    from denseqa.model import resolve_model_source

    source = resolve_model_source(model_cfg.model)
    try:
        return CrossEncoder(source, num_labels=1, max_length=model_cfg.max_seq_length, device=device)
    except OSError as e:
        raise InputError(f"model {model_cfg.model or source!r}: cannot be loaded as a cross-encoder "
                         f"({' '.join(str(e).split())})") from None


def cross_encoder_loss(model, forward, in_batch_negatives: int, scale: float):
    """sentence-transformers' cross-encoder MultipleNegativesRankingLoss, scoring through ``forward`` (the DDP
    wrapper, so that the backward pass synchronises the gradients)."""
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss
    from sentence_transformers.util import batch_to_device

    class DistributedCrossEncoderLoss(MultipleNegativesRankingLoss):
        def call_model_with_pairs(self, pairs, prompt=None, task=None):
            features = batch_to_device(self.model.preprocess(pairs, prompt=prompt, task=task), self.model.device)
            # The loss in fp32, as the bi-encoder's: under bf16 autocast the scores come out bf16, where the
            # sigmoid of a logit above ~6 rounds to 1.0 (no gradient) and close logits tie.
            return forward(features)["scores"].squeeze(1).float()

        def get_in_batch_negatives(self, anchors, candidates):
            if self.num_negatives == 0:  # hard negatives only
                return iter(())
            return in_batch_negative_draws(anchors, candidates, self.num_negatives)

    return DistributedCrossEncoderLoss(model, num_negatives=in_batch_negatives, scale=scale)


def in_batch_negative_draws(anchors: list[str], candidates: list[list[str]], num_negatives: int | None):
    """sentence-transformers' in-batch negatives for the cross-encoder (``num_negatives`` other candidates of the
    batch per question, drawn at random; one list per draw), without the texts that answer the question: the answers
    of every pair in the batch that asks it. sentence-transformers leaves out only the pair's own slot, so a
    repeated question (or a repeated answer) would be taught that a right answer is wrong.

    A question whose batch holds fewer other texts than ``num_negatives`` draws them with repeats; one whose every
    other text answers it gets sentence-transformers' own draw (the batch has nothing else to offer)."""
    import torch

    batch_size, columns = len(anchors), len(candidates)
    flat = [text for column in candidates for text in column]
    others = ~torch.eye(batch_size, dtype=torch.bool).repeat(1, columns)  # sentence-transformers' mask
    answers_of: dict[str, set[str]] = {}
    for question, answer in zip(anchors, candidates[0], strict=True):
        answers_of.setdefault(question, set()).add(answer)
    right = torch.tensor([[text in answers_of[question] for text in flat] for question in anchors], dtype=torch.bool)
    valid = others & ~right
    valid[valid.sum(dim=1) == 0] = others[valid.sum(dim=1) == 0]
    wanted = len(flat) - columns if num_negatives is None else min(num_negatives, len(flat) - columns)
    rows = [torch.multinomial(row.float(), wanted, replacement=int(row.sum()) < wanted) for row in valid]
    for draw in torch.stack(rows).T:
        yield [flat[i] for i in draw.tolist()]


def reranking_samples(cfg: JobConfig, data) -> list[dict[str, Any]]:
    """Held-out questions for ``CrossEncoderRerankingEvaluator``: each with its answers (``positive``) and the BM25
    top ``rerank.eval_candidates`` among every distinct answer of the data (``documents``, ranked). A seeded sample
    of ``rerank.eval_questions`` questions."""
    import numpy as np
    import pyarrow as pa
    import ray

    from denseqa.bm25 import BM25Index

    answers_of: dict[str, list[str]] = {}
    for question, answer in data.heldout:
        answers_of.setdefault(question, []).append(answer)
    questions = list(answers_of)
    r = cfg.rerank
    if len(questions) > r.eval_questions:
        pick = np.sort(np.random.default_rng(cfg.data.split_seed).choice(len(questions), r.eval_questions,
                                                                          replace=False))
        questions = [questions[i] for i in pick]
    train_answers = pa.concat_tables(ray.get(data.train.select_columns(["answer"]).to_arrow_refs()))
    corpus = list(dict.fromkeys([*train_answers.column("answer").to_pylist(), *(a for _, a in data.heldout)]))
    _, positions = BM25Index.build(corpus).search(questions, r.eval_candidates)
    rng = np.random.default_rng(cfg.data.split_seed)
    samples = []
    for question, row in zip(questions, positions, strict=True):
        documents = [corpus[p] for p in row.tolist() if p >= 0]
        # A question that shares words with fewer answers than that gets random others after them: every question
        # is ranked among the same number of candidates (and the evaluator needs two at least).
        while len(documents) < min(r.eval_candidates, len(corpus)):
            extra = corpus[int(rng.integers(len(corpus)))]
            if extra not in documents:
                documents.append(extra)
        samples.append({"query": question, "positive": answers_of[question], "documents": documents})
    logger.info("reranker evaluation: %d held-out questions, %d BM25 candidates each among %d answers",
                len(samples), r.eval_candidates, len(corpus))
    return samples


class RerankerTask:
    """What the training loop (:func:`denseqa.train.train_loop_per_worker`) trains for a cross-encoder (a
    :class:`denseqa.train.TrainingTask`)."""

    kind = "reranker"

    def __init__(self, cfg: JobConfig, loop_inputs: dict[str, Any], device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.samples = loop_inputs["samples"]
        self.negative_columns = loop_inputs["negative_columns"]

    def load(self) -> tuple[torch.nn.Module, list[str]]:
        from sentence_transformers.util import batch_to_device

        from denseqa.model import freeze_parameters_without_grad

        model = load_cross_encoder(self.cfg.model, device=str(self.device))

        def probe() -> torch.Tensor:
            features = batch_to_device(model.preprocess([("a probe question", "a probe passage")]), model.device)
            return model(features)["scores"].float().sum()

        return model, freeze_parameters_without_grad(model, probe)

    @staticmethod
    def reload(path: str):
        from sentence_transformers import CrossEncoder

        return CrossEncoder(path, device="cpu")

    def prepare(self, model, forward) -> None:
        from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

        r = self.cfg.rerank
        self.loss_fn = cross_encoder_loss(model, forward, r.in_batch_negatives, r.loss_scale)
        # Positives always among the candidates (the evaluator's default): it measures the re-ranking alone, which
        # is what training changes; the first stage's misses are the first stage's (the evaluation job shows both).
        self.evaluator = CrossEncoderRerankingEvaluator(self.samples, at_k=10, always_rerank_positives=True,
                                                        name="heldout", batch_size=self.cfg.train.eval_batch_size,
                                                        write_csv=False)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        columns = [list(batch["question"]), list(batch["answer"]), *(list(batch[c]) for c in self.negative_columns)]
        return self.loss_fn(columns, None)

    def evaluate(self, model) -> dict[str, float]:
        raw = self.evaluator(model)
        return {"mrr@10": float(raw["heldout_mrr@10"]), "ndcg@10": float(raw["heldout_ndcg@10"]),
                "map": float(raw["heldout_map"]), "bm25_mrr@10": float(raw["heldout_base_mrr@10"])}

    def describe(self, world: int) -> str:
        t, r, n = self.cfg.train, self.cfg.rerank, len(self.negative_columns)
        return (f"{world} workers x {t.batch_size} questions, each scored against its answer, {n} hard "
                f"negative{'s' * (n > 1)} and {r.in_batch_negatives} answers of other pairs of its batch")

    # -- in the driver

    @classmethod
    def check_config(cls, cfg: JobConfig) -> None:
        """Refused before Ray starts: options the reranker has no use for, and data without hard negatives."""
        from denseqa.data import negative_columns, resolve_parquet_files

        if cfg.train.cached_loss:
            raise InputError("train.cached_loss: the reranker has no cached loss (each pair is one forward pass, "
                             "a batch is bounded by train.batch_size); remove it")
        given = [key for key in BI_ENCODER_ONLY if key in cfg.train.model_fields_set and key != "cached_loss"]
        if given:
            raise InputError(f"train.{given[0]}: an option of the bi-encoder's loss, which the reranker does not use "
                             "(its own: rerank.in_batch_negatives, rerank.loss_scale); remove it")
        if cfg.train.checkpoint_metric not in METRICS:
            raise InputError(f"train.checkpoint_metric must be one of {', '.join(METRICS)} for the reranker, got "
                             f"{cfg.train.checkpoint_metric!r}")
        if not cfg.data.path:
            raise InputError("no data given: pass --data PATH (Q/A pairs with hard negatives, from mine-negatives)")
        fs, files = resolve_parquet_files(cfg.data.path)
        if not negative_columns(fs, files, cfg.data.num_negatives):
            raise InputError(
                f"{cfg.data.path}: no hard negatives to train on ("
                f"{'--num-negatives 0' if cfg.data.num_negatives == 0 else 'no columns negative_1..n'}): a "
                "cross-encoder cannot learn "
                "from positives alone; mine them first (denseqa mine-negatives --data ... --mine.output DIR, BM25 or "
                "--mine.method dense --model.model A_TRAINED_BI_ENCODER) and train on DIR, or use denseqa run "
                "--negatives bm25 --reranker")

    @classmethod
    def loop_inputs(cls, cfg: JobConfig, data) -> dict[str, Any]:
        return {"samples": reranking_samples(cfg, data), "negative_columns": data.negative_columns}

    @classmethod
    def record(cls, cfg: JobConfig, data, plan: TrainPlan) -> tuple[dict[str, Any], dict[str, Any]]:
        r = cfg.rerank
        questions = len({q for q, _ in data.heldout})
        training = {
            "loss": {"name": "MultipleNegativesRankingLoss (cross-encoder)",
                     "in_batch_negatives": r.in_batch_negatives, "scale": r.loss_scale},
            "candidates_per_question": 1 + len(data.negative_columns) + r.in_batch_negatives,
            "hard_negatives": hard_negatives_record(cfg, data),
            "evaluation": {"questions": min(questions, r.eval_questions), "candidates": r.eval_candidates,
                           "first_stage": "bm25 over every answer of the data", "positives_always_included": True},
        }
        return {}, training
