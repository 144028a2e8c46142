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
    mask = loss_fn._duplicate_mask([text_hashes(x) for x in (questions, answers, negatives)],
                                   torch.arange(4), global_batch=4)
    assert mask.shape == (4, 8)
    assert mask[1, 4 + 1] and mask.sum() == 1


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
