"""The gathered negatives matrix across 2 real Ray Train workers (gloo) is exact, with and without GradCache.

Two workers each hold B pairs. After one step, their loss and their (DDP-averaged) parameter gradients must
equal a single process computing the loss over the concatenated 2B pairs. With the gather off they must differ,
which shows the test can tell. With a duplicate answer text in the two workers' batches, the pair must not be a
negative: the distributed loss equals the single-process loss with that logit masked out.

Issue 6: with hard negatives (one per pair, one of them a copy of another pair's answer, which must be masked),
the cached loss (mini-batches of 3 texts, so batches split unevenly) gives the same loss and gradients as the
plain loss, and both equal the single-process loss over the whole global batch.

Issue 19: sentence-transformers' loss options (GTE's four directions with hardness weighting; the symmetric loss
under GradCache) and the distillation term (KL; MarginMSE under GradCache) give the single-process loss and
gradients too, duplicates across workers masked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from denseqa.config import ModelConfig
from denseqa.distributed import all_reduce_mean, ddp_kwargs
from denseqa.losses import (
    CachedDuplicateMaskedMultipleNegativesRankingLoss,
    DuplicateMaskedMultipleNegativesRankingLoss,
)
from denseqa.model import freeze_parameters_without_grad, load_model
from denseqa.train import contrastive_loss

from .conftest import real_pairs

B = 4
SCENARIOS = {
    "gather": dict(gather=True, duplicate=False),
    "no_gather": dict(gather=False, duplicate=False),
    "duplicate": dict(gather=True, duplicate=True),
    "negatives": dict(gather=True, duplicate=False, negatives=True),
    "cached_negatives": dict(gather=True, duplicate=False, negatives=True, cached=True),
    # Issue 19: sentence-transformers' options, with duplicates across workers masked in every direction
    "gte_hardness": dict(gather=True, duplicate=True, negatives=True, options="gte_hardness"),
    "cached_symmetric": dict(gather=True, duplicate=True, cached=True, options="symmetric"),
    # Issue 19: distillation of a teacher's scores on top of the gathered, masked loss
    "distill_kl": dict(gather=True, duplicate=True, negatives=True, options="distill_kl"),
    "cached_distill_margin": dict(gather=True, duplicate=True, negatives=True, cached=True, options="distill_margin"),
}
LOSS_OPTIONS = {
    "gte_hardness": dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                         hardness_mode="all_negatives", hardness_strength=5.0),
    "symmetric": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "distill_kl": dict(distill="kl", distill_weight=0.5, distill_temperature=2.0),
    "distill_margin": dict(distill="margin_mse", distill_weight=0.1),
}
# A teacher's logits of each of the 2B pairs' answer and hard negative.
TEACHER = torch.linspace(-3.0, 5.0, 4 * B).reshape(2 * B, 2).flip(0)
MINI_BATCH = 3


def _batch(duplicate: bool) -> tuple[list[str], list[str]]:
    table = real_pairs(2 * B, seed=7)
    questions, answers = table.column("question").to_pylist(), table.column("answer").to_pylist()
    if duplicate:
        answers[B + 1] = answers[2]  # worker 1, slot 1 repeats worker 0, slot 2's answer
    return questions, answers


def _negatives() -> list[list[str]]:
    """One hard negative per pair: answers of other real pairs; worker 1's first repeats worker 0's answer 1."""
    negatives = real_pairs(4 * B, seed=7).column("answer").to_pylist()[2 * B:]
    negatives[B] = _batch(False)[1][1]
    return [negatives]


def _worker(config: dict) -> None:
    """One step per scenario on each Ray Train worker; rank 0 writes loss and gradients to disk."""
    import ray.train
    import ray.train.torch


    rank = ray.train.get_context().get_world_rank()
    results = {}
    for name, scenario in SCENARIOS.items():
        model = load_model(ModelConfig(model=config["model_dir"], max_seq_length=48), device="cpu")
        freeze_parameters_without_grad(model)
        forward = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs())
        options = LOSS_OPTIONS.get(scenario.get("options"), {})
        if scenario.get("cached"):
            loss_fn = CachedDuplicateMaskedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=MINI_BATCH,
                                                                        **options)
            loss_fn.model = forward
        else:
            loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(model, scale=20.0,
                                                                  gather_across_devices=scenario["gather"], **options)
        questions, answers = _batch(scenario["duplicate"])
        mine = slice(rank * B, (rank + 1) * B)
        negatives = [column[mine] for column in _negatives()] if scenario.get("negatives") else []
        teacher = TEACHER[mine] if "distill" in options else None
        loss = contrastive_loss(forward, model, loss_fn, questions[mine], answers[mine], negatives, teacher)
        loss.backward()
        results[f"{name}/loss"] = np.float64(all_reduce_mean(loss))
        for n, p in model.named_parameters():
            if p.grad is not None:
                results[f"{name}/{n}"] = p.grad.detach().numpy().copy()
    np.savez(f"{config['out_dir']}/rank{rank}.npz", **results)


def _single_process(model_dir: str, duplicate: bool, negatives: bool = False,
                    mask: bool = True, options: str | None = None) -> tuple[float, dict[str, np.ndarray]]:
    model = load_model(ModelConfig(model=model_dir, max_seq_length=48), device="cpu")
    freeze_parameters_without_grad(model)
    loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(model, scale=20.0, gather_across_devices=True,
                                                          mask_duplicates=mask, **LOSS_OPTIONS.get(options, {}))
    questions, answers = _batch(duplicate)
    # all 2B pairs in one process
    teacher = TEACHER if "distill" in LOSS_OPTIONS.get(options, {}) else None
    loss = contrastive_loss(model, model, loss_fn, questions, answers, _negatives() if negatives else [], teacher)
    loss.backward()
    return float(loss.detach()), {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def two_worker_results(ray_local, tiny_model_dir, tmp_path_factory):
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp_path_factory.mktemp("grads")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"model_dir": tiny_model_dir, "out_dir": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(storage_path=str(out / "ray"), name="grads"),
    )
    trainer.fit()
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]


def _grads(results: dict, scenario: str) -> dict[str, np.ndarray]:
    prefix = f"{scenario}/"
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix) and not k.endswith("/loss")}


def test_gathered_loss_and_gradients_equal_single_process(two_worker_results, tiny_model_dir):
    # Given the loss over all 2B pairs in one process
    ref_loss, ref_grads = _single_process(tiny_model_dir, duplicate=False)
    for rank, results in enumerate(two_worker_results):
        # Then each worker's all-reduced loss equals it
        assert float(results["gather/loss"]) == pytest.approx(ref_loss, rel=1e-5)
        # And every trainable parameter's gradient equals it (DDP averaged), not just some
        grads = _grads(results, "gather")
        assert set(grads) == set(ref_grads)
        for name, g in grads.items():
            np.testing.assert_allclose(g, ref_grads[name], rtol=1e-4, atol=1e-7, err_msg=f"rank {rank}: {name}")


def test_without_gather_the_loss_and_gradients_differ(two_worker_results, tiny_model_dir):
    ref_loss, ref_grads = _single_process(tiny_model_dir, duplicate=False)
    results = two_worker_results[0]
    # Each worker sees B - 1 negatives instead of 2B - 1: an easier task, a lower loss
    assert float(results["no_gather/loss"]) < ref_loss - 1e-3
    grads = _grads(results, "no_gather")
    assert any(not np.allclose(g, ref_grads[n], rtol=1e-3, atol=1e-6) for n, g in grads.items())


def test_duplicate_answer_across_workers_is_masked(two_worker_results, tiny_model_dir):
    # Given worker 1 holds worker 0's answer text in another slot
    masked_loss, masked_grads = _single_process(tiny_model_dir, duplicate=True)
    # The single-process reference with masking off would count it as a negative, and differs
    model = load_model(ModelConfig(model=tiny_model_dir, max_seq_length=48), device="cpu")
    unmasked = DuplicateMaskedMultipleNegativesRankingLoss(model, scale=20.0, mask_duplicates=False)
    questions, answers = _batch(duplicate=True)
    with torch.no_grad():
        unmasked_loss = float(contrastive_loss(model, model, unmasked, questions, answers))
    assert abs(unmasked_loss - masked_loss) > 1e-4
    # Then the distributed loss and gradients equal the masked single-process ones
    for results in two_worker_results:
        assert float(results["duplicate/loss"]) == pytest.approx(masked_loss, rel=1e-5)
        for name, g in _grads(results, "duplicate").items():
            np.testing.assert_allclose(g, masked_grads[name], rtol=1e-4, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("scenario", ["negatives", "cached_negatives"])
def test_hard_negatives_cached_or_not_give_the_single_process_loss_and_gradients(two_worker_results, tiny_model_dir,
                                                                                 scenario):
    # Given the single-process loss over the 2B pairs and their 2B hard negatives (the repeated answer masked)
    ref_loss, ref_grads = _single_process(tiny_model_dir, duplicate=False, negatives=True)
    unmasked_loss, _ = _single_process(tiny_model_dir, duplicate=False, negatives=True, mask=False)
    without_negatives, _ = _single_process(tiny_model_dir, duplicate=False)
    # (the negatives and the masking both change the loss, so matching it means both were applied)
    assert abs(ref_loss - unmasked_loss) > 1e-4 and abs(ref_loss - without_negatives) > 1e-3
    # Then each worker, with the plain loss and with GradCache in mini-batches of 3, matches it
    _assert_every_worker_matches(two_worker_results, scenario, ref_loss, ref_grads)


def _assert_every_worker_matches(two_worker_results, scenario: str, ref_loss: float,
                                 ref_grads: dict[str, np.ndarray]) -> None:
    """Each worker's all-reduced loss and every parameter's (DDP-averaged) gradient equal the reference's."""
    for rank, results in enumerate(two_worker_results):
        assert float(results[f"{scenario}/loss"]) == pytest.approx(ref_loss, rel=1e-5)
        grads = _grads(results, scenario)
        assert set(grads) == set(ref_grads)
        scale = _largest(ref_grads)
        for name, g in grads.items():
            _assert_close_gradients(g, ref_grads[name], scale, f"rank {rank}: {name}")


def _largest(grads: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(g).max()) for g in grads.values())


def _assert_close_gradients(actual: np.ndarray, desired: np.ndarray, scale: float, name: str) -> None:
    """Equal up to float32 summation order: GradCache re-embeds mini-batches trimmed to their own padding, so an
    entry may differ by ~1e-7 absolute (and the attention key biases, whose true gradient is 0, hold noise of
    1e-12); the absolute tolerance is 1e-5 of the largest gradient entry of the model."""
    np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_cached_and_plain_losses_give_equal_gradients_on_each_worker(two_worker_results):
    for results in two_worker_results:
        plain, cached = _grads(results, "negatives"), _grads(results, "cached_negatives")
        assert set(plain) == set(cached) and plain
        for name in plain:
            _assert_close_gradients(cached[name], plain[name], _largest(plain), name)


@pytest.mark.parametrize("scenario", ["gte_hardness", "cached_symmetric", "distill_kl", "cached_distill_margin"])
def test_sentence_transformers_loss_options_give_the_single_process_loss_and_gradients(two_worker_results,
                                                                                     tiny_model_dir, scenario):
    # Given the single-process loss over the 2B pairs with the same option (GTE's four directions with hardness
    # weighting and hard negatives; the symmetric loss, cached), worker 1 repeating worker 0's answer text
    spec = SCENARIOS[scenario]
    kwargs = dict(duplicate=True, negatives=spec.get("negatives", False), options=spec["options"])
    ref_loss, ref_grads = _single_process(tiny_model_dir, **kwargs)
    unmasked_loss, _ = _single_process(tiny_model_dir, mask=False, **kwargs)
    plain_loss, _ = _single_process(tiny_model_dir, duplicate=True, negatives=spec.get("negatives", False))
    # (masking and the option both change it, so matching it means both were applied across workers)
    assert abs(ref_loss - unmasked_loss) > 1e-4 and abs(ref_loss - plain_loss) > 1e-3
    # Then each worker's loss and gradients equal it: the gathered questions carry their gradients back too
    _assert_every_worker_matches(two_worker_results, scenario, ref_loss, ref_grads)
