"""Stage 2's objective: MultipleNegativesRankingLoss over the global batch, with duplicate texts masked out.

sentence-transformers' :class:`MultipleNegativesRankingLoss` (``gather_across_devices=True``) already scores each
worker's questions against the answers of every worker and lets gradients flow back through the gather
(``util.all_gather_with_grad``). What no library does is keep duplicates from acting as negatives *across*
devices: real Q/A data repeats answers (two FAQ entries with one answer) and questions (two packages with one
synopsis), and a copy of the right answer in another slot would be pushed away as if it were wrong. Here each
text travels with a 64-bit hash, given to the loss as its ``labels`` (one row per pair, one column per text
column: :func:`duplicate_labels`); the labels are gathered next to the embeddings and equal texts are removed
from each softmax. Because the hashes are the labels, the losses run unchanged inside sentence-transformers'
``SentenceTransformerTrainer`` (a ``label`` column of the dataset holds them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    DistillKLDivLoss,
    MarginMSELoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.util import all_gather, all_gather_with_grad, cos_sim, get_rank, pairwise_cos_sim
from torch import Tensor

from denseqa.texts import text_hashes


class LossLabels(NamedTuple):
    """The labels of a step with distillation: the texts' hashes (:func:`duplicate_labels`, or None without
    masking) and the teacher's scores, float (B, 1 + num_negatives): each pair's answer, then its hard negatives."""

    hashes: Tensor | None
    teacher_scores: Tensor | None


def _split_labels(labels: Tensor | LossLabels | None) -> tuple[Tensor | None, Tensor | None]:
    # A plain tensor is the hashes alone: what sentence-transformers' trainer passes from a dataset's label column.
    return (labels.hashes, labels.teacher_scores) if isinstance(labels, LossLabels) else (labels, None)


def duplicate_labels(*columns: Sequence[str]) -> Tensor:
    """The labels of the duplicate-masked losses: int64 (B, C), row i holding the text hashes of pair i's
    question, answer and hard negatives (``columns`` in the order the loss gets their embeddings)."""
    return torch.stack([text_hashes(column) for column in columns], dim=1)


class DuplicateMaskedMultipleNegativesRankingLoss(MultipleNegativesRankingLoss):
    def __init__(
        self,
        model: SentenceTransformer,
        scale: float = 20.0,
        gather_across_devices: bool = True,
        mask_duplicates: bool = True,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        distill: str | None = None,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
    ) -> None:
        """
        sentence-transformers' MultipleNegativesRankingLoss (InfoNCE with in-batch negatives, the candidates of
        each question gathered from every worker by its own ``gather_across_devices``), plus what it lacks:
        candidates that are duplicates of the right answer, on any worker, are not negatives.

        For question ``i`` of the global batch, with answers ``a_1..a_N`` of all ``N = B * world_size`` pairs
        (and optional hard negatives), the loss is ``-log softmax(scale * cos(q_i, a_j))_i`` over every ``j``
        that is not masked. ``a_j`` (j != i) is masked when its text equals ``a_i``'s, or when its question's
        text equals ``q_i``'s (then ``a_j`` answers ``q_i`` too).

        Gradients: the gather keeps the autograd graph (``all_gather_with_grad``), so the gradient of every
        worker's loss reaches the worker that produced each answer embedding. Each worker's loss is the mean over
        its own ``B`` questions; DDP averages gradients over workers, so the update equals that of one process
        computing the loss over all ``N`` pairs.

        Args:
            model: the SentenceTransformer being trained.
            scale: inverse temperature of the softmax (``scale = 1 / temperature``).
            gather_across_devices: score against the answers of every worker, not only the local ones.
            mask_duplicates: mask out duplicate answers and answers of duplicate questions; then the labels must be
                the texts' hashes (:func:`duplicate_labels`), and a call without them is an error.
            directions, partition_mode, hardness_mode, hardness_strength: sentence-transformers' options, with its
                meaning: the symmetric loss (``("query_to_doc", "doc_to_query")``, ``"per_direction"``; Günther et
                al. 2024), GTE's improved contrastive loss (all four directions, ``"joint"``; Li et al. 2023) and
                hardness weighting of the negatives' logits (Lan et al. 2025). Each direction's candidates are
                masked as the answers are: a question is not a negative of its own answer's pair when its text, or
                its answer's text, equals the pair's; nor an answer in ``doc_to_doc`` when its text equals the
                pair's answer or it answers the pair's question.
            distill: add a term that teaches the bi-encoder a cross-encoder teacher's scores of each question's
                answer and hard negatives (the labels are then :class:`LossLabels`): ``"margin_mse"``, MarginMSE
                (Hofstätter et al. 2020) on the differences between the answer's score and each negative's, or
                ``"kl"``, the KL divergence from the teacher's softmax over them (as FlagEmbedding's distillation).
                Computed by sentence-transformers' :class:`MarginMSELoss` and :class:`DistillKLDivLoss` on the
                student's scores ``scale * cos`` (the logits MNRL uses), from each worker's own pairs: the term is a
                mean over pairs with nothing gathered, so DDP's averaging makes it the global batch's mean.
            distill_weight: the loss is MNRL + ``distill_weight`` * the term.
            distill_temperature: of the KL term, dividing both the student's and the teacher's scores.

        References:
            - Henderson et al. 2017, "Efficient Natural Language Response Suggestion for Smart Reply"
              (in-batch negatives), https://arxiv.org/abs/1705.00652
            - Karpukhin et al. 2020, "Dense Passage Retrieval for Open-Domain Question Answering" (DPR),
              https://arxiv.org/abs/2004.04906
            - Qu et al. 2021, "RocketQA" (cross-batch negatives across GPUs), https://arxiv.org/abs/2010.08191
            - Li et al. 2023, "Towards General Text Embeddings with Multi-stage Contrastive Learning" (GTE),
              https://arxiv.org/abs/2308.03281
            - Günther et al. 2024, "Jina Embeddings 2" (symmetric loss), https://arxiv.org/abs/2310.19923
            - Lan et al. 2025, "LLaVE" (hardness-weighted contrastive loss), https://arxiv.org/abs/2503.04812
            - Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
              Distillation" (MarginMSE), https://arxiv.org/abs/2010.02666

        Requirements:
            1. (question, answer) pairs, optionally with hard negatives (question, answer, negative_1, ...).
            2. Every worker passes the same batch size (the gather needs equal shapes).

        Inputs:
            +-----------------------------------------+--------+
            | Texts                                   | Labels |
            +=========================================+========+
            | (question, answer) pairs                | hashes |
            +-----------------------------------------+--------+
            | (question, answer, negative_1, ...)     | hashes |
            +-----------------------------------------+--------+

            hashes: int64 (B, number of text columns), :func:`duplicate_labels`; None with
            ``mask_duplicates=False``.

        Relations:
            - Equals :class:`sentence_transformers.losses.MultipleNegativesRankingLoss` with
              ``gather_across_devices`` and the same options when no text repeats within the global batch.
        """
        # sentence-transformers validates the options (and refuses the ill-defined ones: "per_direction" with a
        # same-type direction, which never contains the positive).
        super().__init__(model, scale=scale, similarity_fct=cos_sim, gather_across_devices=gather_across_devices,
                         directions=tuple(directions), partition_mode=partition_mode, hardness_mode=hardness_mode,
                         hardness_strength=hardness_strength)
        self.mask_duplicates = mask_duplicates
        self.distill, self.distill_weight, self.distill_temperature = distill, distill_weight, distill_temperature
        self.distillation = _distillation_loss(model, distill, scale, distill_temperature)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor],
                                     labels: Tensor | LossLabels | None = None) -> Tensor:
        """``embeddings`` = [questions (B, d), answers (B, d), negatives_k (B, d)...] of this worker;
        ``labels`` = their texts' hashes, int64 (B, len(embeddings)) (:func:`duplicate_labels`), or with
        ``distill`` a :class:`LossLabels` that adds the teacher's scores."""
        hashes, teacher_scores = _split_labels(labels)
        # Under bf16 autocast (train.precision) the encoder runs in bf16, but the scores stay fp32: a bf16 score
        # times scale 20 is rounded to steps of 1/16 to 1/8, coarse for a softmax over near-duplicate answers.
        with torch.autocast(embeddings[0].device.type, enabled=False):
            return self._fp32_loss([e.float() for e in embeddings], hashes, teacher_scores)

    def _fp32_loss(self, embeddings: list[Tensor], hashes: Tensor | None, teacher_scores: Tensor | None) -> Tensor:
        loss = -self.log_likelihoods(embeddings, hashes).mean()
        if self.distillation is None:
            return loss
        if teacher_scores is None or len(embeddings) < 3:
            raise ValueError(f"distill={self.distill!r} needs each pair's hard negatives and the teacher's scores of "
                             "its answer and negatives (LossLabels.teacher_scores); got "
                             + ("no teacher scores" if teacher_scores is None else "no hard negatives"))
        if tuple(teacher_scores.shape) != (embeddings[0].size(0), len(embeddings) - 1):
            raise ValueError(f"teacher scores must be ({embeddings[0].size(0)}, {len(embeddings) - 1}): the answer's "
                             f"and each hard negative's; got {tuple(teacher_scores.shape)}")
        teacher_scores = teacher_scores.to(device=embeddings[0].device, dtype=embeddings[0].dtype)
        return loss + self.distill_weight * self.distillation.compute_loss_from_embeddings(embeddings, teacher_scores)

    def log_likelihoods(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """(B,) each local question's log-probability of its own answer: the loss is minus their mean.

        Written out here, not delegated to sentence-transformers, because its loss has no place for a mask; the
        steps are its own (the same matrices, penalties, scaling and normalisers), with masking added."""
        queries, docs = embeddings[0], list(embeddings[1:])
        batch_size = queries.size(0)
        hashes = self._column_hashes(labels, len(embeddings), batch_size) if self.mask_duplicates else None
        all_queries, offset = queries, 0
        if self.gather_across_devices:
            # Gathered with autograd: the backward pass sends each slice's gradient back to its worker.
            docs = [all_gather_with_grad(d) for d in docs]
            if {"query_to_query", "doc_to_query"} & set(self.directions):
                all_queries = all_gather_with_grad(queries)
            if hashes is not None:
                # NCCL gathers only contiguous tensors (gloo copies), and each column of the labels is a strided
                # view: found on the first GPU run, where this raised "Tensors must be contiguous".
                hashes = [all_gather(h.to(queries.device).contiguous()) for h in hashes]
            # This worker's questions sit at rows [rank * B, (rank + 1) * B) of the global batch.
            offset = get_rank() * batch_size
        global_batch = docs[0].size(0)
        rows = torch.arange(batch_size, device=queries.device)
        positive_cols = rows + offset
        docs_all = torch.cat(docs, dim=0)  # (N * (1 + num_negatives), d)
        own_answers = docs[0][positive_cols]  # (B, d)

        # One (B, candidates) matrix per direction, and where its candidates are not negatives.
        sims, masks = {}, {}
        sims["query_to_doc"] = self.similarity_fct(queries, docs_all)
        masks["query_to_doc"] = same_pair = None
        if hashes is not None:
            masks["query_to_doc"] = self._duplicate_mask(hashes, positive_cols)
            same_pair = self._same_pair_mask(hashes, positive_cols)  # (B, N)
        own_pair = torch.zeros(batch_size, global_batch, dtype=torch.bool, device=queries.device)
        own_pair[rows, positive_cols] = True
        if "query_to_query" in self.directions:
            sims["query_to_query"] = self.similarity_fct(queries, all_queries)
            masks["query_to_query"] = own_pair if same_pair is None else own_pair | same_pair
        if "doc_to_query" in self.directions:
            sims["doc_to_query"] = self.similarity_fct(all_queries, own_answers).T
            masks["doc_to_query"] = same_pair
        if "doc_to_doc" in self.directions:
            sims["doc_to_doc"] = self.similarity_fct(docs_all, own_answers).T
            own_docs = own_pair.repeat(1, len(docs))  # the pair's answer and its own hard negatives
            duplicates = masks["query_to_doc"]
            masks["doc_to_doc"] = own_docs if duplicates is None else own_docs | duplicates

        penalty = self._hardness_penalty(sims["query_to_doc"], own_pair, len(docs))
        for direction in sims:
            sims[direction] = sims[direction] * self.scale
            if direction == "query_to_doc" and penalty is not None:
                sims[direction] = sims[direction] + penalty
            if masks[direction] is not None:
                sims[direction] = sims[direction].masked_fill(masks[direction], -torch.inf)

        if self.partition_mode == "joint":
            # The positive sits in query_to_doc, the first block: at its own column of the concatenation.
            return torch.log_softmax(torch.cat(list(sims.values()), dim=1), dim=1)[rows, positive_cols]
        log_z = torch.stack([torch.logsumexp(s, dim=1) for s in sims.values()]).mean(dim=0)
        return sims["query_to_doc"][rows, positive_cols] - log_z

    def _hardness_penalty(self, query_to_doc: Tensor, own_pair: Tensor, doc_columns: int) -> Tensor | None:
        """``hardness_strength * stop_grad(cos)`` on the negatives the hardness mode names, 0 elsewhere (Lan et al.
        2025, Eq. 5); None when hardness weighting is off. ``own_pair``: (B, N), True at each pair's answer."""
        if self.hardness_mode is None or self.hardness_strength == 0.0:
            return None
        penalty = self.hardness_strength * query_to_doc.detach()
        positive = torch.zeros_like(penalty, dtype=torch.bool)
        positive[:, :own_pair.size(1)] = own_pair
        own = own_pair.repeat(1, doc_columns)  # the pair's answer and its own hard negatives
        if self.hardness_mode == "hard_negatives":
            keep = own & ~positive
        elif self.hardness_mode == "in_batch_negatives":
            keep = ~own
        else:  # all_negatives
            keep = ~positive
        return penalty.masked_fill(~keep, 0.0)

    @staticmethod
    def _column_hashes(labels: Tensor | None, columns: int, batch_size: int) -> list[Tensor]:
        if labels is None:
            raise ValueError("mask_duplicates is on but no labels were given: pass the texts' hashes as labels "
                             "(denseqa.losses.duplicate_labels), or set mask_duplicates=False")
        if labels.dtype != torch.int64 or tuple(labels.shape) != (batch_size, columns):
            raise ValueError(f"labels must be int64 text hashes of shape ({batch_size}, {columns}), one column per "
                             f"text column; got {labels.dtype} {tuple(labels.shape)}")
        return list(labels.unbind(dim=1))

    @staticmethod
    def _same_pair_mask(hashes: list[Tensor], positive_cols: Tensor) -> Tensor:
        """(B, N) True where another pair of the global batch has the local pair's question or answer text: its
        question asks the same thing, so it is no negative of this pair in the query directions."""
        question_hashes, answer_hashes = hashes[0], hashes[1]
        mask = (question_hashes.unsqueeze(0) == question_hashes[positive_cols].unsqueeze(1)) | (
            answer_hashes.unsqueeze(0) == answer_hashes[positive_cols].unsqueeze(1))
        mask[torch.arange(len(positive_cols), device=mask.device), positive_cols] = False
        return mask

    @staticmethod
    def _duplicate_mask(hashes: list[Tensor], positive_cols: Tensor) -> Tensor:
        """(B, N * (1 + num_negatives)) True where a candidate must not count as a negative."""
        question_hashes, answer_hashes = hashes[0], hashes[1]  # (N,) each
        doc_hashes = torch.cat(hashes[1:])  # (N * (1 + nn),)
        # The right answers of a pair are the answers of every pair with its question (its own among them), and
        # a candidate is one of them when its text is, in whichever column it stands: a repeated question's second
        # answer may also be another pair's answer or hard negative. So a (question, candidate text) is masked when
        # it is one of the batch's (question, answer) pairs: one int64 key per pair (wrapping arithmetic mixes the
        # two hashes), looked up with isin, in (B, N * (1 + nn)) memory like the similarities themselves.
        right_pairs = _pair_keys(question_hashes, answer_hashes).unique()
        mask = torch.isin(_pair_keys(question_hashes[positive_cols].unsqueeze(1), doc_hashes.unsqueeze(0)),
                          right_pairs)
        # The pair's own answer stays: it is the target.
        mask[torch.arange(len(positive_cols), device=mask.device), positive_cols] = False
        return mask

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "gather_across_devices": self.gather_across_devices,
                "mask_duplicates": self.mask_duplicates, "directions": list(self.directions),
                "partition_mode": self.partition_mode, "hardness_mode": self.hardness_mode,
                "hardness_strength": self.hardness_strength,
                **({"distill": self.distill, "distill_weight": self.distill_weight,
                    "distill_temperature": self.distill_temperature} if self.distill else {})}


def _pair_keys(question_hashes: Tensor, text_hashes: Tensor) -> Tensor:
    """One int64 key per (question, text) pair of 64-bit hashes (broadcast); int64 products wrap, which mixes them."""
    return question_hashes * 1_000_003 + text_hashes


def _distillation_loss(model, distill: str | None, scale: float, temperature: float):
    """sentence-transformers' distillation loss for ``distill``, scoring with ``scale * cos``; None for none."""
    if distill is None:
        return None

    def logits(a: Tensor, b: Tensor) -> Tensor:  # one score per row pair (B,): the student's logits
        return scale * pairwise_cos_sim(a, b)

    if distill == "margin_mse":
        return MarginMSELoss(model, similarity_fct=logits)
    if distill == "kl":
        return DistillKLDivLoss(model, similarity_fct=logits, temperature=temperature)
    raise ValueError(f"distill must be margin_mse, kl or None, got {distill!r}")


class CachedDuplicateMaskedMultipleNegativesRankingLoss(CachedMultipleNegativesRankingLoss):
    def __init__(
        self,
        model: SentenceTransformer,
        scale: float = 20.0,
        gather_across_devices: bool = True,
        mask_duplicates: bool = True,
        mini_batch_size: int = 32,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        distill: str | None = None,
        distill_weight: float = 1.0,
        distill_temperature: float = 1.0,
    ) -> None:
        """
        :class:`DuplicateMaskedMultipleNegativesRankingLoss` with gradient caching: the batch is embedded in
        mini-batches of ``mini_batch_size`` texts, so a worker's memory holds the activations of one mini-batch
        (plus one embedding per text), whatever its batch size. The price is a second forward pass.

        How (Gao et al. 2021): (1) embed every mini-batch without gradients; (2) compute the loss over the whole
        (gathered) batch from those embeddings and back-propagate it to the embeddings only, caching their
        gradients; (3) during ``loss.backward()``, embed each mini-batch again with gradients, replaying (1)'s
        random state, and back-propagate the cached gradients through it. Steps (1) and (3) are
        sentence-transformers' (:class:`~sentence_transformers.losses.CachedMultipleNegativesRankingLoss`); step (2)
        is this project's masked, gathered loss, so the gradients equal the uncached loss's.

        Args:
            model: the SentenceTransformer being trained. Set ``.model`` to its DDP wrapper afterwards, so that
                the re-embedding in (3) goes through DDP's gradient synchronisation.
            scale, gather_across_devices, mask_duplicates, directions, partition_mode, hardness_mode,
                hardness_strength, distill, distill_weight, distill_temperature: as
                :class:`DuplicateMaskedMultipleNegativesRankingLoss` (the distillation term is computed in step
                (2) from the same cached embeddings, so its gradient reaches the model through the replay too).
            mini_batch_size: texts per forward pass.

        References:
            - Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
              (GradCache), https://arxiv.org/abs/2101.06983

        Inputs: tokenized features of (question, answer, negative_1, ...), as returned by ``model.preprocess``, and
        the labels of :class:`DuplicateMaskedMultipleNegativesRankingLoss`.
        """
        options = dict(directions=tuple(directions), partition_mode=partition_mode, hardness_mode=hardness_mode,
                       hardness_strength=hardness_strength)
        super().__init__(model, scale=scale, similarity_fct=cos_sim, mini_batch_size=mini_batch_size,
                         gather_across_devices=gather_across_devices, **options)
        self.masked = DuplicateMaskedMultipleNegativesRankingLoss(model, scale=scale,
                                                                  gather_across_devices=gather_across_devices,
                                                                  mask_duplicates=mask_duplicates, distill=distill,
                                                                  distill_weight=distill_weight,
                                                                  distill_temperature=distill_temperature, **options)

    @property
    def mask_duplicates(self) -> bool:
        return self.masked.mask_duplicates

    @property
    def distill(self) -> str | None:
        return self.masked.distill

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | LossLabels | None = None, *,
                       with_backward: bool = False) -> Tensor:
        """Step (2): the gathered, masked loss from the mini-batch embeddings of each column."""
        embeddings = [torch.cat(column) for column in reps]
        loss = self.masked.compute_loss_from_embeddings(embeddings, labels)
        if with_backward:
            loss.backward()  # to the embeddings only: they are leaves here
            loss = loss.detach()
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return {**self.masked.get_config_dict(), "mini_batch_size": self.mini_batch_size}
