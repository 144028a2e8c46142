"""Stage 2, train: fine-tune the bi-encoder with Ray Train (DDP) and gathered in-batch negatives.

Read it top to bottom: :class:`TrainingTask` is what the loop needs of a model to train, :class:`BiEncoderTask`
the bi-encoder's (model, loss, evaluation); :func:`train_step` is one optimizer step and
:func:`train_loop_per_worker` what every worker runs around it (resume, evaluation, checkpoints). The driver that
plans the steps, starts the workers and publishes the model is :mod:`denseqa.drivers.train`. The reranker
(:mod:`denseqa.train_reranker`) is another task run by the same loop and driver.

The cross-device part is in :mod:`denseqa.losses`: each worker embeds its own B questions and B answers, the
answers of all workers are gathered with autograd, and each question is scored against all ``B * world_size``
of them. Two rules keep the collectives from hanging: every rank runs the same number of same-sized steps
(Ray Data's equal split, full batches only, and a step count fixed by the driver), and every decision to stop
is taken by all ranks together (the loss is all-reduced before anyone acts on it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from denseqa import distributed, faults, storage
from denseqa.config import JobConfig
from denseqa.errors import InputError
from denseqa.logs import logger, setup_logging
from denseqa.provenance import peak_memory_mb
from denseqa.resources import native_bf16, torch_threads_default

RECORD_FILE = "denseqa.json"
HELDOUT_FILE = "heldout.parquet"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_states.pt"  # every rank's torch generator states, in rank order
FAILURE_MARKER = ".injected_failure_done"
STOPPED_FILE = "stopped.json"  # written by rank 0 when the run stops early (non-finite loss)


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class TrainPlan:
    """Numbers the driver fixes before the workers start, so that every rank agrees on them."""

    world_size: int
    steps_per_epoch: int
    total_steps: int
    eval_every_steps: int
    run_dir: str


def make_plan(cfg: JobConfig, train_pairs: int, run_dir: str) -> TrainPlan:
    t = cfg.train
    world = t.num_workers
    # Ray Data's equal split gives each rank floor(n / world) rows; only full batches are used.
    steps_per_epoch = (train_pairs // world) // t.batch_size
    if steps_per_epoch == 0:
        raise InputError(
            f"{cfg.data.path}: {train_pairs} training pairs are fewer than one global batch "
            f"(batch_size {t.batch_size} x num_workers {world}); lower --batch-size or add data"
        )
    total = steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total = min(total, t.max_steps)
    return TrainPlan(
        world_size=world,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        eval_every_steps=t.eval_every_steps or steps_per_epoch,
        run_dir=run_dir,
    )


@dataclass
class TrainState:
    """Everything a checkpoint needs to resume exactly, besides model and optimizer tensors."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed: the data position
    attempts: list[dict[str, int]] = field(default_factory=list)  # one per (re)start: start_step, steps_run
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step": s, "metrics": {...}}
    # Every log_every_steps: {"step", "epoch", "loss", "learning_rate", "pairs_per_s"}, rank 0's (the training
    # curves, the model card's training logs and the MLflow metrics are drawn from it).
    log: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0  # wall time of the training steps (data included, evaluation excluded)
    peak_memory_mb: list[dict[str, float]] = field(default_factory=list)  # per rank, at the last checkpoint
    torch_threads: list[int] = field(default_factory=list)  # per rank, in the last attempt
    precision: str = ""  # the autocast precision the last attempt ran (train.precision resolved)


# ---------------------------------------------------------------------------------------------- one step


def contrastive_loss(forward, model, loss_fn, questions: list[str], answers: list[str],
                     negatives: Sequence[list[str]] = (), teacher_scores: torch.Tensor | None = None) -> torch.Tensor:
    """This worker's loss for one step: its questions against the (gathered) answers and hard negatives of the
    global batch. ``negatives``: one list of B texts per hard-negative column; ``teacher_scores``: with
    distillation, the teacher's scores of each pair's answer and negatives, (B, 1 + len(negatives))."""
    from denseqa.losses import CachedDuplicateMaskedMultipleNegativesRankingLoss, LossLabels, duplicate_labels
    from denseqa.model import embed_texts

    columns = [questions, answers, *negatives]
    labels = duplicate_labels(*columns).to(model.device) if loss_fn.mask_duplicates else None
    if loss_fn.distill:
        labels = LossLabels(labels, teacher_scores)
    if isinstance(loss_fn, CachedDuplicateMaskedMultipleNegativesRankingLoss):
        # Tokenized here, embedded inside the loss mini-batch by mini-batch (twice: see the loss).
        features = [{k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                     for k, v in model.preprocess(c).items()} for c in columns]
        return loss_fn(features, labels)
    embeddings = [embed_texts(forward, model, c) for c in columns]  # (B, d) each
    return loss_fn.compute_loss_from_embeddings(embeddings, labels)


def build_loss(model, forward, t):
    """The step's loss: MNRL over the gathered batch with duplicates masked, with gradient caching when
    train.cached_loss is on."""
    from denseqa.losses import (
        CachedDuplicateMaskedMultipleNegativesRankingLoss,
        DuplicateMaskedMultipleNegativesRankingLoss,
    )

    options = dict(scale=t.scale, gather_across_devices=t.gather, mask_duplicates=t.mask_duplicates,
                   directions=tuple(t.directions), partition_mode=t.partition_mode, hardness_mode=t.hardness_mode,
                   hardness_strength=t.hardness_strength, distill=t.distill, distill_weight=t.distill_weight,
                   distill_temperature=t.distill_temperature)
    if not t.cached_loss:
        return DuplicateMaskedMultipleNegativesRankingLoss(model, **options)
    loss = CachedDuplicateMaskedMultipleNegativesRankingLoss(model, mini_batch_size=t.mini_batch_size, **options)
    loss.model = forward  # the replayed forward passes go through DDP, which synchronises the gradients once
    return loss


def negatives_per_question(t, world_size: int, hard_negatives: int) -> int:
    """Candidates that are not the question's answer: every other answer of the (global) batch, and every hard
    negative of it (the pair's own and the other pairs')."""
    pairs = (world_size if t.gather else 1) * t.batch_size
    return pairs * (1 + hard_negatives) - 1


def build_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (Loshchilov & Hutter, 2019, as in BERT)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


# ---------------------------------------------------------------------------------------------- the task


class TrainingTask(Protocol):
    """What :func:`train_loop_per_worker` needs of the model it trains; :class:`BiEncoderTask` and
    :class:`denseqa.train_reranker.RerankerTask` are the two. The loop, checkpoints, resume and the driver are the
    same for both. The instance methods run on every worker; the class methods run in the driver, before the
    workers start and after they finish."""

    kind: ClassVar[str]  # "bi-encoder" or "reranker": the record's kind and the log's wording

    def __init__(self, cfg: JobConfig, loop_inputs: dict[str, Any], device: torch.device) -> None: ...

    def load(self) -> tuple[torch.nn.Module, list[str]]:
        """The model to train, and the names of the parameters frozen because they get no gradient (DDP would
        fail on them)."""
        ...

    @staticmethod
    def reload(path: str) -> torch.nn.Module:
        """A checkpoint's model, whose weights are copied into the one being trained."""
        ...

    def prepare(self, model: torch.nn.Module, forward: torch.nn.Module) -> None:
        """Build the loss (through ``forward``, the DDP-wrapped model) and the evaluator."""
        ...

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """This worker's loss for one batch of its shard."""
        ...

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Held-out metrics (run on rank 0's share inside sentence-transformers' distributed evaluation)."""
        ...

    def describe(self, world: int) -> str:
        """One line for the log: what a step of ``world`` workers trains on."""
        ...

    @classmethod
    def check_config(cls, cfg: JobConfig) -> None:
        """Refuse options this task cannot use, before Ray starts."""
        ...

    @classmethod
    def loop_inputs(cls, cfg: JobConfig, data) -> dict[str, Any]:
        """What every worker's task is built from, besides the config (sent once, with the loop config)."""
        ...

    @classmethod
    def record(cls, cfg: JobConfig, data, plan: TrainPlan) -> tuple[dict[str, Any], dict[str, Any]]:
        """(top-level fields, training fields) of the model's record that are particular to this task."""
        ...


class BiEncoderTask:
    """What the training loop trains by default: a bi-encoder, with gathered in-batch (and hard) negatives,
    evaluated by retrieval among the held-out answers (a :class:`TrainingTask`)."""

    kind = "bi-encoder"

    def __init__(self, cfg: JobConfig, loop_inputs: dict[str, Any], device: torch.device) -> None:
        from denseqa.model import prompts_of

        self.cfg, self.t, self.device = cfg, cfg.train, device
        self.heldout = [tuple(p) for p in loop_inputs["heldout"]]
        self.negative_columns = loop_inputs["negative_columns"]
        self.teacher_columns = loop_inputs.get("teacher_columns", [])
        self.query_prompt, self.passage_prompt = prompts_of(cfg.model)

    def load(self) -> tuple[torch.nn.Module, list[str]]:
        from denseqa.model import freeze_parameters_without_grad, load_model

        model = load_model(self.cfg.model, device=str(self.device))
        return model, freeze_parameters_without_grad(model)

    @staticmethod
    def reload(path: str):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(path, device="cpu")

    def prepare(self, model, forward) -> None:
        from denseqa.eval import build_evaluator

        self.model, self.forward, self.loss_fn = model, forward, build_loss(model, forward, self.t)
        self.evaluator = build_evaluator(self.heldout, batch_size=self.t.eval_batch_size,
                                         query_prompt=self.query_prompt, passage_prompt=self.passage_prompt)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        questions = [self.query_prompt + q for q in batch["question"]]
        answers = [self.passage_prompt + a for a in batch["answer"]]
        negatives = [[self.passage_prompt + n for n in batch[c]] for c in self.negative_columns]
        teacher_scores = torch.tensor(list(zip(*(batch[c] for c in self.teacher_columns), strict=True)),
                                      dtype=torch.float32) if self.teacher_columns else None
        return contrastive_loss(self.forward, self.model, self.loss_fn, questions, answers, negatives, teacher_scores)

    def evaluate(self, model) -> dict[str, float]:
        from denseqa.eval import evaluate

        return evaluate(model, self.evaluator)

    def describe(self, world: int) -> str:
        t, n = self.t, len(self.negative_columns)
        return (f"{world} workers x {t.batch_size} pairs = global batch {world * t.batch_size}"
                + (f" (+{n} hard negative{'s' * (n > 1)} each)" if n else "")
                + f", so {negatives_per_question(t, world, n)} negatives per question"
                + (" (gathered across workers)" if t.gather and world > 1 else "") + "; "
                + (f"cached loss, mini-batches of {t.mini_batch_size}" if t.cached_loss else "uncached loss"))

    # -- in the driver

    @classmethod
    def check_config(cls, cfg: JobConfig) -> None:
        pass

    @classmethod
    def loop_inputs(cls, cfg: JobConfig, data) -> dict[str, Any]:
        check_mining_split(cfg, data)
        if cfg.train.hardness_mode == "hard_negatives" and not data.negative_columns:
            raise InputError(f"{cfg.data.path}: train.hardness_mode hard_negatives weighs the mined negatives, and "
                             "these pairs have none (mine-negatives writes them; or use in_batch_negatives)")
        return {"heldout": data.heldout, "negative_columns": data.negative_columns,
                "teacher_columns": data.teacher_columns}

    @classmethod
    def record(cls, cfg: JobConfig, data, plan: TrainPlan) -> tuple[dict[str, Any], dict[str, Any]]:
        from denseqa.model import prompts_of

        t = cfg.train
        training = {
            "negatives_per_question": negatives_per_question(t, plan.world_size, len(data.negative_columns)),
            "hard_negatives": hard_negatives_record(cfg, data),
            "loss": {"name": "CachedDuplicateMaskedMultipleNegativesRankingLoss" if t.cached_loss
                     else "DuplicateMaskedMultipleNegativesRankingLoss", "cached": t.cached_loss,
                     "directions": list(t.directions), "partition_mode": t.partition_mode,
                     "hardness_mode": t.hardness_mode, "hardness_strength": t.hardness_strength,
                     "distill": {"term": t.distill, "weight": t.distill_weight, "temperature": t.distill_temperature,
                                 "teacher": teacher_record(cfg, data)} if t.distill else None,
                     **({"mini_batch_size": t.mini_batch_size} if t.cached_loss else {})},
        }
        return {"prompts": dict(zip(("query", "passage"), prompts_of(cfg.model), strict=True))}, training


# ---------------------------------------------------------------------------------------------- one step


@dataclass
class Optimization:
    """What a step updates besides the model: optimizer, schedule, fp16 loss scaler, and the autocast dtype."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    device: torch.device


def train_step(task: TrainingTask, batch: dict[str, Any], model, opt: Optimization, t, step: int) -> float:
    """One optimizer step on this worker's share of one global batch; returns the loss averaged over the ranks.

    A non-finite mean loss takes no step: every rank sees the same mean, so all of them stop together and none is
    left waiting in a collective.
    """
    autocast = opt.amp_dtype is not None
    with torch.autocast(opt.device.type, dtype=opt.amp_dtype, enabled=autocast):
        loss = task.loss(batch)
    if faults.planned_step("train.nan_at_step") == step + 1:
        loss = loss * float("nan")
    mean_loss = distributed.all_reduce_mean(loss)
    if not math.isfinite(mean_loss):
        return mean_loss
    # GradCache embeds its mini-batches again inside backward(): they need the first pass's autocast.
    with torch.autocast(opt.device.type, dtype=opt.amp_dtype, enabled=autocast and t.cached_loss):
        opt.scaler.scale(loss).backward()
    if t.max_grad_norm is not None:
        opt.scaler.unscale_(opt.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    return mean_loss


def resolve_precision(configured: str, device: torch.device) -> str:
    """``train.precision`` as this run will use it. ``auto`` is bf16 when every rank's device computes it natively
    (:func:`denseqa.resources.native_bf16`), else fp32: all ranks must agree, since the gathered embeddings and the
    collectives of the step must match across them. Called on every rank (it is a collective)."""
    if configured != "auto":
        return configured
    return "bf16" if all(distributed.all_gather_objects(native_bf16(device))) else "fp32"


# ---------------------------------------------------------------------------------------------- the worker


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: build the task's model, resume from Ray Train's checkpoint if there is
    one, then one :func:`train_step` per global batch, with evaluation and a checkpoint every
    ``plan.eval_every_steps``."""
    import ray.train
    import ray.train.torch
    from sentence_transformers.util.distributed import distributed_evaluation
    from transformers import get_linear_schedule_with_warmup

    setup_logging()
    cfg = JobConfig.from_dict(loop_config["config"])
    plan = TrainPlan(**loop_config["plan"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    is_rank_zero = rank == 0
    if not t.use_gpu:
        # Threads are per node, not per logical CPU: the workers on this node share its cores (see resources).
        torch.set_num_threads(t.torch_threads or torch_threads_default(ctx.get_local_world_size()))
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device()

    # Model, frozen dead parameters (DDP fails on them), optimizer, schedule.
    task: TrainingTask = loop_config["task"](cfg, loop_config["inputs"], device)
    model, frozen = task.load()
    optimizer = build_optimizer(model, t)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(t.warmup_ratio * plan.total_steps), plan.total_steps)
    precision = resolve_precision(t.precision, device)
    opt = Optimization(optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                       {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision), device)

    # Resume: after a worker failure Ray Train hands back the latest checkpoint of this run.
    state, saved_rng = TrainState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, saved_rng = _load_checkpoint(checkpoint, task.reload, model, opt)
        if state.batch_in_epoch >= plan.steps_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    state.attempts.append({"start_step": state.step, "steps_run": 0})
    state.torch_threads = distributed.all_gather_objects(torch.get_num_threads())
    state.precision = precision
    attempt = state.attempts[-1]

    forward = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=distributed.ddp_kwargs())
    task.prepare(model, forward)
    shard = ray.train.get_dataset_shard("train")
    if checkpoint is not None:
        # Last, after everything that builds modules and may draw from the generator: the next step's dropout
        # masks are then the ones the uninterrupted run drew.
        restore_rng_state(saved_rng, rank, world, t.seed + state.step, device)

    def run_eval() -> dict[str, float]:
        # Every rank encodes (or scores) a share of the held-out texts; rank 0 computes the metrics.
        model.eval()
        metrics: dict[str, float] = {}
        with torch.no_grad(), distributed_evaluation(model) as runs_evaluator:
            if runs_evaluator:
                metrics = task.evaluate(model)
        model.train()
        return distributed.broadcast(metrics)

    def save_and_report(metrics: dict[str, float]) -> None:
        state.evals.append({"step": state.step, "metrics": metrics})
        # One collective for both (every rank is here): each rank's peak memory and its generators' states.
        gathered = distributed.all_gather_objects((peak_memory_mb(device), rng_state(device)))
        state.peak_memory_mb = [peak for peak, _ in gathered]
        rng_states = [rng for _, rng in gathered]
        report = {"step": state.step, "epoch": state.epoch, **{f"eval_{k}": v for k, v in metrics.items()}}
        if not is_rank_zero:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory() as tmp:
            _save_checkpoint(tmp, model, opt, state, rng_states)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_step{state.step:07d}")

    if is_rank_zero:
        logger.info("training the %s: %s; %d steps (%d per epoch), eval every %d; torch threads per worker %s; "
                    "precision %s; frozen without gradient: %s", task.kind, task.describe(world), plan.total_steps,
                    plan.steps_per_epoch, plan.eval_every_steps, ",".join(map(str, state.torch_threads)), precision,
                    ", ".join(frozen) or "none")
    if state.step == 0:
        baseline = run_eval()
        state.evals.append({"step": 0, "metrics": baseline})
        if is_rank_zero:
            logger.info("held-out before training: %s", format_metrics(baseline))

    model.train()
    stop_reason = None
    clock, seconds_timed = time.time(), 0.0  # this attempt's training time, for pairs/s and ETA
    while state.step < plan.total_steps and stop_reason is None:
        # A fixed per-epoch seed makes the batch order reproducible, so a resumed run sees the same batches.
        batches = shard.iter_batches(
            batch_size=t.batch_size, drop_last=True, batch_format="numpy",
            local_shuffle_buffer_size=t.batch_size * 8, local_shuffle_seed=t.seed + state.epoch,
        )
        for batch_index, batch in enumerate(batches):
            if batch_index < state.batch_in_epoch:
                continue  # consumed before the checkpoint this run resumed from
            if state.step >= plan.total_steps:
                break
            _maybe_fail_once(plan, state, rank, world)
            mean_loss = train_step(task, batch, model, opt, t, state.step)
            if not math.isfinite(mean_loss):
                stop_reason = f"loss became {mean_loss} at step {state.step + 1}"
                break
            state.step += 1
            state.batch_in_epoch = batch_index + 1
            attempt["steps_run"] += 1
            now = time.time()
            seconds_timed += now - clock
            state.train_seconds += now - clock
            clock = now

            if state.step % t.log_every_steps == 0 or state.step == plan.total_steps:
                pairs_per_s = attempt["steps_run"] * world * t.batch_size / max(seconds_timed, 1e-9)
                eta = (plan.total_steps - state.step) * seconds_timed / attempt["steps_run"]
                learning_rate = scheduler.get_last_lr()[0]
                state.log.append({"step": state.step, "epoch": round(state.epoch + state.batch_in_epoch
                                                                     / plan.steps_per_epoch, 4),
                                  "loss": mean_loss, "learning_rate": learning_rate, "pairs_per_s": pairs_per_s})
                if is_rank_zero:
                    logger.info("step %d/%d | epoch %d | loss %.4f | %.1f pairs/s | lr %.2e | eta %s",
                                state.step, plan.total_steps, state.epoch + 1, mean_loss, pairs_per_s,
                                learning_rate, _fmt_seconds(eta))
                ray.train.report({"step": state.step, "epoch": state.epoch, "loss": mean_loss,
                                  "pairs_per_s": pairs_per_s})
            if state.step % plan.eval_every_steps == 0 or state.step == plan.total_steps:
                metrics = run_eval()
                if is_rank_zero:
                    logger.info("held-out at step %d: %s", state.step, format_metrics(metrics))
                save_and_report(metrics)
                clock = time.time()  # evaluation and checkpointing are not training throughput
        else:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    if stop_reason is not None and is_rank_zero:
        logger.error("stopping: %s", stop_reason)
        # Ray Train's result carries the metrics of the last checkpoint only, so the reason goes in a file.
        storage.write_json(storage.join(plan.run_dir, STOPPED_FILE), {"step": state.step + 1, "reason": stop_reason})


def _maybe_fail_once(plan: TrainPlan, state: TrainState, rank: int, world: int) -> None:
    """Test-only (fault train.fail_at_step): the last rank dies once at the start of that step; a marker in the
    run folder (local or URI) makes it once."""
    if faults.planned_step("train.fail_at_step") != state.step + 1 or rank != world - 1:
        return
    marker = storage.join(plan.run_dir, FAILURE_MARKER)
    if storage.exists(marker):
        return
    storage.write_bytes(marker, b"")
    # Die only once Ray Train has committed every checkpoint reported so far: a report still in flight at a
    # crash is dropped (the run then resumes from the one before), which would make the test's expectation racy.
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED,
                                           timeout_s=120)
    logger.warning("test-only failure injection: worker of rank %d exits at step %d", rank, state.step + 1)
    os._exit(1)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch generator states: the CPU one, and the device's where it is an accelerator."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_state(saved: list[dict[str, torch.Tensor]] | None, rank: int, world: int, fallback_seed: int,
                      device: torch.device) -> None:
    """Put back this rank's generator states from the checkpoint, so that a resumed run draws the dropout masks
    the uninterrupted run would have drawn. A checkpoint without them (an older denseqa), or from another number
    of workers, reseeds from the step instead: not exact, but it does not replay the first steps' masks."""
    if saved is not None and len(saved) == world and ("cuda" in saved[rank]) == (device.type == "cuda"):
        torch.set_rng_state(saved[rank]["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(saved[rank]["cuda"], device)
        return
    logger.warning("the checkpoint holds no random-generator state for rank %d of %d; reseeding from step: "
                   "dropout will not replay the uninterrupted run's exactly", rank, world)
    torch.manual_seed(fallback_seed)


def _save_checkpoint(path: str, model, opt: Optimization, state: TrainState,
                     rng_states: list[dict[str, torch.Tensor]]) -> None:
    model.save(os.path.join(path, "model"))
    # Saving writes a model card, and for a model that has none (a plain Hugging Face checkpoint such as
    # klue/roberta-base) sentence-transformers encodes example texts for it, and encode() leaves the model in eval
    # mode: rank 0 then trained on without dropout after its first checkpoint, unlike the other ranks.
    model.train()
    torch.save({"optimizer": opt.optimizer.state_dict(), "scheduler": opt.scheduler.state_dict(),
                "scaler": opt.scaler.state_dict()}, os.path.join(path, OPTIMIZER_FILE))
    torch.save(rng_states, os.path.join(path, RNG_FILE))
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump(dataclasses.asdict(state), f, indent=1)


def _load_checkpoint(checkpoint, reload, model, opt: Optimization
                     ) -> tuple[TrainState, list[dict[str, torch.Tensor]] | None]:
    with checkpoint.as_directory() as path:
        # Copy the weights into the existing modules: the frozen flags and the optimizer's parameters stay valid.
        saved = reload(os.path.join(path, "model"))
        model.load_state_dict(saved.state_dict())
        tensors = torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
        opt.optimizer.load_state_dict(tensors["optimizer"])
        opt.scheduler.load_state_dict(tensors["scheduler"])
        opt.scaler.load_state_dict(tensors["scaler"])
        with open(os.path.join(path, STATE_FILE)) as f:
            state = TrainState(**json.load(f))
        rng_file = os.path.join(path, RNG_FILE)
        rng_states = torch.load(rng_file, weights_only=True) if os.path.exists(rng_file) else None
    logger.info("resumed from checkpoint at step %d (epoch %d, batch %d)", state.step, state.epoch + 1,
                state.batch_in_epoch)
    return state, rng_states


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------- hard negatives


def mining_record(cfg, data) -> dict[str, Any] | None:
    """The mine-negatives record of the training data, when it is such an output folder and has negatives."""
    from denseqa.negatives import RECORD_FILE as MINED_RECORD

    if not data.negative_columns:
        return None
    try:  # a mine-negatives output folder holds its record; a file or a glob does not
        return storage.read_json(storage.join(cfg.data.path, MINED_RECORD))
    except (OSError, ValueError):
        return None


def teacher_record(cfg, data) -> dict[str, Any] | None:
    """Which teacher scored the training data's negatives (the miner's record of it), for the model's record."""
    mined = mining_record(cfg, data)
    return (mined or {}).get("teacher")


def check_mining_split(cfg, data) -> None:
    """Warn when the negatives were mined under another held-out split: then some held-out answers may have been
    negatives of training questions, and the pairs held out at mining time (which have no negatives) are dropped
    from training."""
    mined = mining_record(cfg, data)
    if mined is None:
        return
    then, now = mined["config"]["data"], cfg.data.model_dump()
    if mined["data"]["rows"]["heldout"] != data.counts["heldout"] or then["split_seed"] != now["split_seed"]:
        logger.warning("%s: the negatives were mined with %d held-out pairs (split seed %d), this training holds "
                       "out %d (seed %d): mine with the same data.heldout_* and split_seed so that evaluation stays "
                       "clean", cfg.data.path, mined["data"]["rows"]["heldout"], then["split_seed"],
                       data.counts["heldout"], now["split_seed"])


def hard_negatives_record(cfg, data) -> dict[str, Any]:
    """Which hard negatives training used: the columns, and how they were mined (the miner's record, if the data
    is a mine-negatives output)."""
    if not data.negative_columns:
        return {"per_pair": 0}
    mined = mining_record(cfg, data)
    return {"per_pair": len(data.negative_columns), "columns": data.negative_columns,
            "pairs_without_them": data.counts.get("without_negatives", 0),
            "mined": {k: mined[k] for k in ("method", "model", "options", "counts") if k in mined} if mined else None}
