"""The loss in one process: equal to sentence-transformers' MNRL without duplicates, and masking as specified."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from denseqa.losses import DuplicateMaskedMultipleNegativesRankingLoss, duplicate_labels
from denseqa.texts import text_hashes


def _embeddings(n: int, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def test_text_hashes_are_stable_and_equal_for_equal_texts():
    h = text_hashes(["a", "b", "a"])
    assert h.dtype == torch.int64 and h[0] == h[2] and h[0] != h[1]
    assert text_hashes(["a"])[0] == h[0]  # no per-process salt, unlike hash()


def test_world_size_one_equals_sentence_transformers_mnrl():
    # Given distinct texts, so nothing is masked
    q, a = _embeddings(8)
    questions, answers = [f"q{i}" for i in range(8)], [f"a{i}" for i in range(8)]
    ours = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0, gather_across_devices=True)
    theirs = MultipleNegativesRankingLoss(None, scale=20.0, gather_across_devices=True)
    # When both compute the loss from the same embeddings in a single process
    mine = ours.compute_loss_from_embeddings([q, a], duplicate_labels(questions, answers))
    ref = theirs.compute_loss_from_embeddings([q, a], labels=None)
    # Then they agree
    torch.testing.assert_close(mine, ref)


def test_under_bf16_autocast_the_scores_and_the_loss_stay_fp32():
    # Given embeddings and a loss computed inside bf16 autocast, as train.precision bf16 runs the step
    q, a = _embeddings(32, d=64)
    questions, answers = [f"q{i}" for i in range(32)], [f"a{i}" for i in range(32)]
    loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0)
    labels = duplicate_labels(questions, answers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_fn.compute_loss_from_embeddings([q, a], labels)
        # (what autocast would have made of the scores: bf16 matrix products)
        rounded = MultipleNegativesRankingLoss(None, scale=20.0).compute_loss_from_embeddings([q, a], labels=None)
    # Then it is the fp32 loss, not the bf16-rounded one
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, loss_fn.compute_loss_from_embeddings([q, a], labels))
    assert abs(float(rounded) - float(under_autocast)) > 1e-4


def _masked_reference(q, a, questions, answers, scale=20.0):
    """Cross-entropy over cos-sim logits where equal answers (or answers of equal questions) are removed."""
    sim = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(a, dim=-1).T * scale
    n = len(questions)
    for i in range(n):
        for j in range(n):
            if i != j and (answers[i] == answers[j] or questions[i] == questions[j]):
                sim[i, j] = -torch.inf
    return torch.nn.functional.cross_entropy(sim, torch.arange(n))


@pytest.mark.parametrize("duplicate", ["answer", "question"])
def test_duplicate_texts_are_not_negatives(duplicate):
    # Given a batch where slot 5 repeats slot 1's answer (or question)
    q, a = _embeddings(6, seed=1)
    questions, answers = [f"q{i}" for i in range(6)], [f"a{i}" for i in range(6)]
    if duplicate == "answer":
        answers[5] = answers[1]
    else:
        questions[5] = questions[1]
    loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0)
    plain = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0, mask_duplicates=False)
    # When the loss is computed with masking on and off
    masked = loss_fn.compute_loss_from_embeddings([q, a], duplicate_labels(questions, answers))
    unmasked = plain.compute_loss_from_embeddings([q, a], None)
    # Then the masked loss equals the reference with those two logits removed, and differs from the plain one
    torch.testing.assert_close(masked, _masked_reference(q, a, questions, answers))
    assert not torch.allclose(masked, unmasked)


def test_hard_negative_equal_to_the_answer_is_masked():
    questions, answers = [f"q{i}" for i in range(4)], [f"a{i}" for i in range(4)]
    negatives = ["n0", "a1", "n2", "n3"]  # row 1's hard negative is its own answer text
    loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0)
    mask = loss_fn._duplicate_mask([text_hashes(x) for x in (questions, answers, negatives)], torch.arange(4))
    assert mask.shape == (4, 8)
    assert mask[1, 4 + 1] and mask.sum() == 1


def test_a_second_right_answer_is_masked_in_whichever_column_its_text_stands():
    # Given q1 asked twice (answers B and C), where C is also q9's answer and row 3's hard negative
    questions, answers, negatives = ["q1", "q1", "q9", "q7"], ["B", "C", "C", "D"], ["x", "y", "z", "C"]
    loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0)
    # When the candidates that are no negatives are marked
    mask = loss_fn._duplicate_mask([text_hashes(x) for x in (questions, answers, negatives)], torch.arange(4))
    # Then for either q1 row every C is masked (answer columns 1 and 2, row 3's negative), and the other row's B
    assert mask[0].nonzero().flatten().tolist() == [1, 2, 4 + 3]
    assert mask[1].nonzero().flatten().tolist() == [0, 2, 4 + 3]
    # And q9's own C stays its target while q1's C (the same text) and row 3's negative C are masked
    assert mask[2].nonzero().flatten().tolist() == [1, 4 + 3]
    assert not mask[3].any()


def test_masking_without_the_text_hashes_as_labels_is_an_error_not_a_silent_unmasked_loss():
    q, a = _embeddings(4)
    loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0)
    with pytest.raises(ValueError, match="no labels were given"):
        loss_fn.compute_loss_from_embeddings([q, a], None)
    # Hashes of one column only, or not hashes at all, are refused too
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        loss_fn.compute_loss_from_embeddings([q, a], text_hashes([f"q{i}" for i in range(4)]))
    with pytest.raises(ValueError, match="int64"):
        loss_fn.compute_loss_from_embeddings([q, a], torch.zeros(4, 2))


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
def test_the_losses_train_unchanged_inside_sentence_transformers_trainer(tiny_model_dir, tmp_path, cached):
    # Given real pairs in which one answer repeats, with their hashes as the dataset's label column
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    from denseqa.losses import CachedDuplicateMaskedMultipleNegativesRankingLoss

    from .conftest import real_pairs

    pairs = real_pairs(32, seed=3)
    questions, answers = pairs.column("question").to_pylist(), pairs.column("answer").to_pylist()
    answers[5] = answers[1]
    labels = duplicate_labels(questions, answers).tolist()
    dataset = Dataset.from_dict({"question": questions, "answer": answers, "label": labels})
    model = SentenceTransformer(tiny_model_dir, device="cpu")
    model.max_seq_length = 32
    loss = (CachedDuplicateMaskedMultipleNegativesRankingLoss(model, mini_batch_size=4) if cached
            else DuplicateMaskedMultipleNegativesRankingLoss(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                                                max_steps=3, learning_rate=1e-3, report_to=[], save_strategy="no",
                                                logging_steps=1, use_cpu=True, dataloader_drop_last=True)
    # When sentence-transformers' trainer runs a few steps with the loss
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    result = trainer.train()
    # Then it trained: a finite loss over 3 steps, and the weights moved
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())


# ---------------------------------------------------------------- sentence-transformers' MNRL options (issue 19)

ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
OPTIONS = {
    "symmetric": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "symmetric_joint": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="joint"),
    "gte": dict(directions=ALL_DIRECTIONS, partition_mode="joint"),
    "hardness_in_batch": dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
    "hardness_hard": dict(hardness_mode="hard_negatives", hardness_strength=5.0),
    "gte_hardness_all": dict(directions=ALL_DIRECTIONS, hardness_mode="all_negatives", hardness_strength=5.0),
}


@pytest.mark.parametrize("negatives", [0, 2], ids=["pairs", "two_negatives"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_equals_sentence_transformers_own_loss_when_nothing_repeats(option, negatives):
    # Given distinct texts, so nothing is masked, and the same embeddings
    q, a = _embeddings(8, seed=3)
    extra = [_embeddings(8, seed=10 + k)[0] for k in range(negatives)]
    texts = [[f"{c}{i}" for i in range(8)] for c in ["q", "a", *[f"n{k}_" for k in range(negatives)]]]
    ours = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0, **OPTIONS[option])
    theirs = MultipleNegativesRankingLoss(None, scale=20.0, gather_across_devices=True, **OPTIONS[option])
    # Then the masked loss equals sentence-transformers' loss with the same option
    torch.testing.assert_close(ours.compute_loss_from_embeddings([q, a, *extra], duplicate_labels(*texts)),
                               theirs.compute_loss_from_embeddings([q, a, *extra], labels=None))


def _options_reference(q, a, negatives, questions, answers, negative_texts, directions, partition_mode,
                       hardness_mode=None, hardness_strength=0.0, scale=20.0):
    """The loss written candidate by candidate: for pair i, each direction's candidates minus those that are the
    same as pair i (equal question or answer text; a copy of the answer among the documents)."""
    def cos(x, y):
        return float(torch.nn.functional.cosine_similarity(x, y, dim=0))

    n = len(questions)
    doc_vectors = [a[j] for j in range(n)] + [neg[j] for neg in negatives for j in range(n)]
    doc_texts = list(answers) + [t for column in negative_texts for t in column]
    doc_pair = list(range(n)) * (1 + len(negatives))
    losses = []
    for i in range(n):
        same = [questions[j] == questions[i] or answers[j] == answers[i] for j in range(n)]
        terms = {"query_to_doc": []}
        for c, (vec, text, j) in enumerate(zip(doc_vectors, doc_texts, doc_pair, strict=True)):
            positive = c == i
            if not positive and (text == answers[i] or (c < n and same[j])):
                continue
            logit = scale * cos(q[i], vec)
            own = j == i
            if not positive and hardness_mode in ("in_batch_negatives", "all_negatives") and not own:
                logit += hardness_strength * cos(q[i], vec)
            if own and not positive and hardness_mode in ("hard_negatives", "all_negatives"):
                logit += hardness_strength * cos(q[i], vec)
            terms["query_to_doc"].append(logit)
        if "query_to_query" in directions:
            terms["query_to_query"] = [scale * cos(q[i], q[j]) for j in range(n) if j != i and not same[j]]
        if "doc_to_query" in directions:
            terms["doc_to_query"] = [scale * cos(q[j], a[i]) for j in range(n) if j == i or not same[j]]
        if "doc_to_doc" in directions:
            candidates = enumerate(zip(doc_vectors, doc_texts, doc_pair, strict=True))
            terms["doc_to_doc"] = [scale * cos(vec, a[i]) for c, (vec, text, j) in candidates
                                   if j != i and text != answers[i] and not (c < n and same[j])]
        positive = scale * cos(q[i], a[i])
        if partition_mode == "joint":
            log_z = torch.logsumexp(torch.tensor([x for t in terms.values() for x in t]), 0)
        else:
            log_z = torch.stack([torch.logsumexp(torch.tensor(t), 0) for t in terms.values()]).mean()
        losses.append(log_z - positive)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_masks_duplicates_in_every_direction(option):
    # Given a batch where pair 5 repeats pair 1's answer, pair 6 repeats pair 2's question, and pair 0's hard
    # negative is pair 3's answer text
    q, a = _embeddings(8, seed=4)
    negative = _embeddings(8, seed=5)[0]
    questions, answers = [f"q{i}" for i in range(8)], [f"a{i}" for i in range(8)]
    negative_texts = [f"n{i}" for i in range(8)]
    answers[5], questions[6], negative_texts[0] = answers[1], questions[2], answers[3]
    options = {"directions": ("query_to_doc",), "partition_mode": "joint", **OPTIONS[option]}
    loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0, **options)
    unmasked = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0, mask_duplicates=False, **options)
    # When the loss is computed with masking
    masked = loss_fn.compute_loss_from_embeddings([q, a, negative],
                                                  duplicate_labels(questions, answers, negative_texts))
    # Then it equals the candidate-by-candidate reference, and differs from the unmasked loss
    reference = _options_reference(q, a, [negative], questions, answers, [negative_texts], **options)
    torch.testing.assert_close(masked, reference.to(masked.dtype), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(masked, unmasked.compute_loss_from_embeddings([q, a, negative]))


# ---------------------------------------------------------------- distillation from a cross-encoder (issue 19)


@pytest.mark.parametrize("distill", ["margin_mse", "kl"])
def test_distillation_adds_sentence_transformers_own_term_to_the_masked_loss(distill):
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MarginMSELoss
    from sentence_transformers.util import pairwise_cos_sim

    from denseqa.losses import LossLabels

    # Given pairs with two hard negatives each, and a teacher's logits for the answer and both negatives
    q, a = _embeddings(6, seed=7)
    negatives = [_embeddings(6, seed=8 + k)[0] for k in range(2)]
    texts = [[f"{c}{i}" for i in range(6)] for c in ("q", "a", "n", "m")]
    teacher = torch.randn(6, 3, generator=torch.Generator().manual_seed(9)) * 4
    embeddings, hashes = [q, a, *negatives], duplicate_labels(*texts)
    loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0, distill=distill, distill_weight=0.5,
                                                          distill_temperature=2.0)
    # When the combined loss is computed
    combined = loss_fn.compute_loss_from_embeddings(embeddings, LossLabels(hashes, teacher))
    # Then it is the masked MNRL plus the weight times sentence-transformers' own term on scale * cos
    plain = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0)
    mnrl = plain.compute_loss_from_embeddings(embeddings, hashes)

    def logits(x, y):
        return 20.0 * pairwise_cos_sim(x, y)

    theirs = MarginMSELoss(None, similarity_fct=logits) if distill == "margin_mse" else \
        DistillKLDivLoss(None, similarity_fct=logits, temperature=2.0)
    torch.testing.assert_close(combined, mnrl + 0.5 * theirs.compute_loss_from_embeddings(embeddings, teacher))
    # And the term pulls toward the teacher: agreeing with it costs less than contradicting it
    student = torch.stack([logits(q, d) for d in [a, *negatives]], dim=1).detach()
    agree = loss_fn.compute_loss_from_embeddings(embeddings, LossLabels(hashes, student))
    disagree = loss_fn.compute_loss_from_embeddings(embeddings, LossLabels(hashes, -student))
    assert agree < disagree


def test_distillation_without_teacher_scores_or_negatives_is_an_error():
    from denseqa.losses import LossLabels

    q, a = _embeddings(4)
    n = _embeddings(4, seed=2)[0]
    hashes = duplicate_labels(*[[f"{c}{i}" for i in range(4)] for c in "qan"])
    loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0, distill="kl")
    with pytest.raises(ValueError, match="needs each pair's hard negatives and the teacher's scores.*no teacher"):
        loss_fn.compute_loss_from_embeddings([q, a, n], hashes)
    with pytest.raises(ValueError, match="no hard negatives"):
        loss_fn.compute_loss_from_embeddings([q, a], LossLabels(hashes[:, :2], torch.zeros(4, 1)))
    with pytest.raises(ValueError, match=r"teacher scores must be \(4, 2\)"):
        loss_fn.compute_loss_from_embeddings([q, a, n], LossLabels(hashes, torch.zeros(4, 3)))


def test_the_gathered_hashes_are_contiguous_as_nccl_requires(monkeypatch):
    # Given a 2-column label matrix, whose columns are strided views, and a gather that checks what NCCL checks
    import denseqa.losses as losses

    seen = []

    def nccl_like_all_gather(tensor):
        seen.append(tensor.is_contiguous())
        if not tensor.is_contiguous():
            raise ValueError("Tensors must be contiguous")
        return tensor

    monkeypatch.setattr(losses, "all_gather", nccl_like_all_gather)
    q, a = _embeddings(4, seed=3)
    loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(None, scale=20.0, gather_across_devices=True)
    # When the loss gathers the hashes
    loss = loss_fn.compute_loss_from_embeddings([q, a], duplicate_labels([f"q{i}" for i in range(4)],
                                                                         [f"a{i}" for i in range(4)]))
    # Then every gathered hash column was contiguous
    assert seen and all(seen) and torch.isfinite(loss)


def test_the_rerankers_loss_is_computed_in_fp32_under_bf16_autocast(tiny_cross_encoder_dir):
    # Given the reranker's loss over a real (tiny) cross-encoder whose forward pass runs under bf16 autocast
    from sentence_transformers import CrossEncoder

    from denseqa.train_reranker import cross_encoder_loss

    model = CrossEncoder(tiny_cross_encoder_dir, device="cpu")
    loss_fn = cross_encoder_loss(model, model, in_batch_negatives=1, scale=10.0)
    pairs = [("how do I list files", "ls lists a folder"), ("what edits text", "nano is a text editor")]
    # When the scores the loss works on are computed under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = loss_fn.call_model_with_pairs(pairs)
        loss = loss_fn([[q for q, _ in pairs], [p for _, p in pairs]], None)
    # Then they and the loss are fp32 (in bf16 a sigmoid above ~0.996 is 1.0, and its gradient 0)
    assert scores.dtype == torch.float32 and loss.dtype == torch.float32


def test_the_rerankers_in_batch_negatives_are_never_an_answer_of_the_question():
    from denseqa.train_reranker import in_batch_negative_draws

    # Given a batch where q1 is asked twice (answers A and B) and row 3 repeats C, q2's answer, as its own
    anchors, answers, hard = ["q1", "q1", "q2", "q3"], ["A", "B", "C", "C"], ["n0", "n1", "n2", "n3"]
    torch.manual_seed(0)
    for _ in range(200):
        # When 3 in-batch negatives are drawn per question
        draws = list(in_batch_negative_draws(anchors, [answers, hard], num_negatives=3))
        assert len(draws) == 3 and all(len(d) == 4 for d in draws)
        per_row = [{d[i] for d in draws} for i in range(4)]
        # Then no question gets one of its own answers, nor its own hard negative (its slot)
        assert not per_row[0] & {"A", "B", "n0"} and not per_row[1] & {"A", "B", "n1"}
        assert not per_row[2] & {"C", "n2"} and not per_row[3] & {"C", "n3"}
    # And drawing all of them gives each question every other text of the batch but its answers
    every = list(in_batch_negative_draws(anchors, [answers, hard], num_negatives=None))
    assert len(every) == 6 and {d[0] for d in every} == {"C", "n1", "n2", "n3"}  # with repeats: 4 texts in 6 draws
