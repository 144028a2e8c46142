"""Stage 2, train: fine-tune the bi-encoder with Ray Train (DDP) and gathered in-batch negatives.

Read it top to bottom: :class:`BiEncoderTask` says what is trained (model, loss, evaluation);
:func:`train_loop_per_worker` is what every worker runs, one optimizer step per global batch; :func:`run_training`
is the driver (validate, read data, plan the steps, start the workers, write the model). The reranker
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
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from denseqa import faults, storage
from denseqa.config import JobConfig
from denseqa.errors import InputError, TrainingError
from denseqa.logs import logger, setup_logging
from denseqa.provenance import package_versions, peak_memory_mb

RECORD_FILE = "denseqa.json"
HELDOUT_FILE = "heldout.parquet"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
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
    torch_threads: int
    run_dir: str


def make_plan(cfg: JobConfig, train_pairs: int, run_dir: str, cpus_per_worker: float) -> TrainPlan:
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
        torch_threads=t.torch_threads or max(1, math.floor(cpus_per_worker)),
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
    train_seconds: float = 0.0  # wall time of the training steps (data included, evaluation excluded)
    peak_memory_mb: list[dict[str, float]] = field(default_factory=list)  # per rank, at the last checkpoint


# ---------------------------------------------------------------------------------------------- one step


def contrastive_loss(forward, model, loss_fn, questions: list[str], answers: list[str],
                     negatives: Sequence[list[str]] = ()) -> torch.Tensor:
    """This worker's loss for one step: its questions against the (gathered) answers and hard negatives of the
    global batch. ``negatives``: one list of B texts per hard-negative column."""
    from denseqa.losses import CachedDuplicateMaskedMultipleNegativesRankingLoss, duplicate_labels
    from denseqa.model import embed_texts

    columns = [questions, answers, *negatives]
    labels = duplicate_labels(*columns).to(model.device) if loss_fn.mask_duplicates else None
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

    if not t.cached_loss:
        return DuplicateMaskedMultipleNegativesRankingLoss(model, scale=t.scale, gather_across_devices=t.gather,
                                                           mask_duplicates=t.mask_duplicates)
    loss = CachedDuplicateMaskedMultipleNegativesRankingLoss(model, scale=t.scale, gather_across_devices=t.gather,
                                                             mask_duplicates=t.mask_duplicates,
                                                             mini_batch_size=t.mini_batch_size)
    loss.model = forward  # the replayed forward passes go through DDP, which synchronises the gradients once
    return loss


def negatives_per_question(t, world_size: int, hard_negatives: int) -> int:
    """Candidates that are not the question's answer: every other answer of the (global) batch, and every hard
    negative of it (the pair's own and the other pairs')."""
    pairs = (world_size if t.gather else 1) * t.batch_size
    return pairs * (1 + hard_negatives) - 1


def _all_reduce_mean(value: torch.Tensor) -> float:
    import torch.distributed as dist

    value = value.detach().float().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def _all_gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _broadcast(obj: Any) -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def ddp_kwargs() -> dict[str, bool]:
    """No buffer sync inside forward: BERT's position_ids buffer would be broadcast there, which raises an
    in-place-modification error on the second forward pass of a step (sentence-transformers turns it off too).
    torch 2.13 renamed the option; all ranks load the same weights, so the sync at wrap time is harmless."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def build_optimizer(model, cfg) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (Loshchilov & Hutter, 2019, as in BERT)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate)


# ---------------------------------------------------------------------------------------------- the task


class BiEncoderTask:
    """What the training loop trains: a bi-encoder, with gathered in-batch (and hard) negatives, evaluated by
    retrieval among the held-out answers. :mod:`denseqa.train_reranker` has the cross-encoder's counterpart.

    The loop (:func:`train_loop_per_worker`), checkpoints, resume and the driver are the same for both; a task says
    how to load the model, what one step's loss is and how to evaluate it. The class methods run in the driver.
    """

    kind = "bi-encoder"

    def __init__(self, cfg: JobConfig, loop_config: dict[str, Any], device: torch.device) -> None:
        self.cfg, self.t, self.device = cfg, cfg.train, device
        self.heldout = [tuple(p) for p in loop_config["heldout"]]
        self.negative_columns = loop_config["negative_columns"]

    def load(self):
        """The model to train, with its dead parameters frozen (``self.frozen``: their names)."""
        from denseqa.model import freeze_parameters_without_grad, load_model, prompts_of

        model = load_model(self.cfg.model, device=str(self.device))
        self.query_prompt, self.passage_prompt = prompts_of(self.cfg.model)
        self.frozen = freeze_parameters_without_grad(model)
        return model

    @staticmethod
    def reload(path: str):
        """A checkpoint's model, whose weights are copied into the one being trained."""
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(path, device="cpu")

    def prepare(self, model, forward) -> None:
        """The loss (through ``forward``, the DDP wrapper) and the held-out evaluator."""
        from denseqa.eval import build_evaluator

        self.model, self.forward, self.loss_fn = model, forward, build_loss(model, forward, self.t)
        self.evaluator = build_evaluator(self.heldout, batch_size=self.t.eval_batch_size,
                                         query_prompt=self.query_prompt, passage_prompt=self.passage_prompt)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        questions = [self.query_prompt + q for q in batch["question"]]
        answers = [self.passage_prompt + a for a in batch["answer"]]
        negatives = [[self.passage_prompt + n for n in batch[c]] for c in self.negative_columns]
        return contrastive_loss(self.forward, self.model, self.loss_fn, questions, answers, negatives)

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
        return {"heldout": data.heldout, "negative_columns": data.negative_columns}

    @classmethod
    def record(cls, cfg: JobConfig, data, plan: TrainPlan) -> tuple[dict[str, Any], dict[str, Any]]:
        """(top-level fields, training fields) of the record that are particular to this task."""
        from denseqa.model import prompts_of

        t = cfg.train
        training = {
            "negatives_per_question": negatives_per_question(t, plan.world_size, len(data.negative_columns)),
            "hard_negatives": _hard_negatives_record(cfg, data),
            "loss": {"name": "CachedDuplicateMaskedMultipleNegativesRankingLoss" if t.cached_loss
                     else "DuplicateMaskedMultipleNegativesRankingLoss", "cached": t.cached_loss,
                     **({"mini_batch_size": t.mini_batch_size} if t.cached_loss else {})},
        }
        return {"prompts": dict(zip(("query", "passage"), prompts_of(cfg.model), strict=True))}, training


# ---------------------------------------------------------------------------------------------- the worker


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
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
    torch.set_num_threads(plan.torch_threads)
    torch.manual_seed(t.seed)
    device = ray.train.torch.get_device()

    # Model, frozen dead parameters (DDP fails on them), optimizer, schedule.
    task = loop_config["task"](cfg, loop_config, device)
    model = task.load()
    optimizer = build_optimizer(model, t)
    warmup = int(t.warmup_ratio * plan.total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, plan.total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)

    # Resume: after a worker failure Ray Train hands back the latest checkpoint of this run.
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, task.reload, model, optimizer, scheduler, scaler)
        if state.batch_in_epoch >= plan.steps_per_epoch:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    state.attempts.append({"start_step": state.step, "steps_run": 0})
    attempt = state.attempts[-1]

    forward = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs())
    task.prepare(model, forward)
    shard = ray.train.get_dataset_shard("train")

    def run_eval() -> dict[str, float]:
        # Every rank encodes (or scores) a share of the held-out texts; rank 0 computes the metrics.
        model.eval()
        metrics: dict[str, float] = {}
        with torch.no_grad(), distributed_evaluation(model) as runs_evaluator:
            if runs_evaluator:
                metrics = task.evaluate(model)
        model.train()
        return _broadcast(metrics)

    def save_and_report(metrics: dict[str, float]) -> None:
        state.evals.append({"step": state.step, "metrics": metrics})
        state.peak_memory_mb = _all_gather_objects(peak_memory_mb(device))  # every rank is here: a collective
        report = {"step": state.step, "epoch": state.epoch, **{f"eval_{k}": v for k, v in metrics.items()}}
        if not is_rank_zero:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory() as tmp:
            _save_checkpoint(tmp, model, optimizer, scheduler, scaler, state)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_step{state.step:07d}")

    if is_rank_zero:
        logger.info("training the %s: %s; %d steps (%d per epoch), eval every %d; frozen without gradient: %s",
                    task.kind, task.describe(world), plan.total_steps, plan.steps_per_epoch, plan.eval_every_steps,
                    ", ".join(task.frozen) or "none")
    if state.step == 0:
        baseline = run_eval()
        state.evals.append({"step": 0, "metrics": baseline})
        if is_rank_zero:
            logger.info("held-out before training: %s", _fmt(baseline))

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

            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = task.loss(batch)
            if faults.planned_step("train.nan_at_step") == state.step + 1:
                loss = loss * float("nan")
            # All ranks see the same mean loss, so they all stop together on a NaN (no rank left waiting).
            mean_loss = _all_reduce_mean(loss)
            if not math.isfinite(mean_loss):
                stop_reason = f"loss became {mean_loss} at step {state.step + 1}"
                break

            # GradCache embeds its mini-batches again inside backward(): they need the first pass's autocast.
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None and t.cached_loss):
                scaler.scale(loss).backward()
            if t.max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
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
                if is_rank_zero:
                    logger.info("step %d/%d | epoch %d | loss %.4f | %.1f pairs/s | lr %.2e | eta %s",
                                state.step, plan.total_steps, state.epoch + 1, mean_loss, pairs_per_s,
                                scheduler.get_last_lr()[0], _fmt_seconds(eta))
                ray.train.report({"step": state.step, "epoch": state.epoch, "loss": mean_loss,
                                  "pairs_per_s": pairs_per_s})
            if state.step % plan.eval_every_steps == 0 or state.step == plan.total_steps:
                metrics = run_eval()
                if is_rank_zero:
                    logger.info("held-out at step %d: %s", state.step, _fmt(metrics))
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


def _save_checkpoint(path: str, model, optimizer, scheduler, scaler, state: TrainState) -> None:
    model.save(os.path.join(path, "model"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict()}, os.path.join(path, OPTIMIZER_FILE))
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump(dataclasses.asdict(state), f, indent=1)


def _load_checkpoint(checkpoint, reload, model, optimizer, scheduler, scaler) -> TrainState:
    with checkpoint.as_directory() as path:
        # Copy the weights into the existing modules: the frozen flags and the optimizer's parameters stay valid.
        saved = reload(os.path.join(path, "model"))
        model.load_state_dict(saved.state_dict())
        tensors = torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
        optimizer.load_state_dict(tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        scaler.load_state_dict(tensors["scaler"])
        with open(os.path.join(path, STATE_FILE)) as f:
            state = TrainState(**json.load(f))
    logger.info("resumed from checkpoint at step %d (epoch %d, batch %d)", state.step, state.epoch + 1,
                state.batch_in_epoch)
    return state


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _fmt_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------- the driver


def run_training(cfg: JobConfig, task=BiEncoderTask) -> dict[str, Any]:
    """Validate, read the data, train on Ray Train, write the model folder with its ``denseqa.json`` record.

    ``task``: what is trained (:class:`BiEncoderTask`, or the reranker's). Returns the record. Raises
    :class:`InputError` (before any worker starts) or :class:`TrainingError`.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from denseqa.data import load_qa_data
    from denseqa.model import check_model_source, describe_model
    from denseqa.resources import cpus_per_worker_default

    started = time.time()
    task.check_config(cfg)
    output, run_dir = _resolve_output(cfg)
    check_model_source(cfg.model.model)
    data = load_qa_data(cfg.data)  # validates, then starts or joins Ray through Ray Data
    loop_inputs = task.loop_inputs(cfg, data)

    t = cfg.train
    cpus_per_worker = t.cpus_per_worker or cpus_per_worker_default(t.num_workers, t.use_gpu)
    plan = make_plan(cfg, data.counts["train"], run_dir, cpus_per_worker)
    logger.info("%s from %s; %d workers, %.2f CPUs each%s; run folder %s", task.kind, describe_model(cfg.model),
                t.num_workers, cpus_per_worker, " + 1 GPU each" if t.use_gpu else "", run_dir)

    storage_path, name = run_dir.rstrip("/").rsplit("/", 1)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "plan": dataclasses.asdict(plan), "task": task, **loop_inputs},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute=f"eval_{t.checkpoint_metric}",
                checkpoint_score_order="max",
            ),
        ),
        datasets={"train": data.train},
    )
    storage.remove(storage.join(run_dir, STOPPED_FILE))  # left by an earlier attempt that this one resumes
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(f"training failed (after {t.max_failures} restarts allowed): {_root_cause(e)}; "
                            f"checkpoints are in {run_dir}, continue with --resume") from None
    stopped = storage.read_json(storage.join(run_dir, STOPPED_FILE))
    if stopped:
        last = result.checkpoint.path if result.checkpoint else "none"
        raise TrainingError(f"{stopped['reason']}; training stopped, the last good checkpoint is {last}")
    if result.checkpoint is None:
        raise TrainingError(f"training finished without a checkpoint in {run_dir}")

    with result.checkpoint.as_directory() as checkpoint_dir:
        with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
            state = TrainState(**json.load(f))
        record = _make_record(cfg, task, data, plan, state, run_dir, output, time.time() - started)
        publish_model(os.path.join(checkpoint_dir, "model"), output, record, data.heldout)
    logger.info("%s written to %s (held-out %s)", task.kind, output, _fmt(record["metrics"]["final"]))
    return record


def _root_cause(error: Exception) -> str:
    """The last 'SomeError: message' line of a worker's traceback, which names what actually went wrong."""
    lines = [line.strip() for line in str(error).splitlines()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b.*:", line)]
    return causes[-1] if causes else next((line for line in lines if line), type(error).__name__)


def _resolve_output(cfg: JobConfig) -> tuple[str, str]:
    out = cfg.output
    output = storage.output_folder(out.output, out.overwrite, "the trained model")
    run_dir = storage.absolute(out.run_dir or output.rstrip("/") + ".run")
    has_run = storage.exists(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
    if has_run and not out.resume:
        raise InputError(f"{run_dir}: run folder already holds a run; pass --resume to continue it, "
                         "or choose another --run-dir")
    if out.resume and not has_run:
        raise InputError(f"{run_dir}: --resume given but this run folder holds no run to continue")
    return output, run_dir


def _make_record(cfg, task, data, plan: TrainPlan, state: TrainState, run_dir: str, output: str,
                 wall_s: float) -> dict:
    from denseqa.model import describe_model

    metric = cfg.train.checkpoint_metric
    trained = [e for e in state.evals if e["step"] > 0]
    best = max(trained, key=lambda e: e["metrics"][metric]) if trained else None
    top, training = task.record(cfg, data, plan)
    return {
        "kind": task.kind,
        "model": describe_model(cfg.model),
        **top,
        "data": {"path": cfg.data.path, "files": len(data.files), "rows": data.counts},
        "training": {
            "steps": state.step, "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
            "epochs": cfg.train.epochs, "workers": plan.world_size,
            "global_batch_size": plan.world_size * cfg.train.batch_size,
            **training,
            "attempts": state.attempts, "run_dir": run_dir, "train_seconds": round(state.train_seconds, 2),
            "peak_memory_mb_per_worker": state.peak_memory_mb,
            "pairs_per_s": round(sum(a["steps_run"] for a in state.attempts) * plan.world_size
                                 * cfg.train.batch_size / max(state.train_seconds, 1e-9), 2),
        },
        "metrics": {
            "before": state.evals[0]["metrics"] if state.evals and state.evals[0]["step"] == 0 else None,
            "final": state.evals[-1]["metrics"] if state.evals else None,
            "best": best, "ranked_by": metric, "history": state.evals,
        },
        "config": cfg.to_dict(),
        "versions": package_versions(),
        "wall_time_s": round(wall_s, 1),
        "output": output,
    }


def mining_record(cfg, data) -> dict[str, Any] | None:
    """The mine-negatives record of the training data, when it is such an output folder and has negatives."""
    from denseqa.negatives import RECORD_FILE as MINED_RECORD

    if not data.negative_columns:
        return None
    try:  # a mine-negatives output folder holds its record; a file or a glob does not
        return storage.read_json(storage.join(cfg.data.path, MINED_RECORD))
    except (OSError, ValueError):
        return None


def check_mining_split(cfg, data) -> None:
    """Warn when the negatives were mined under another held-out split: then some held-out answers may have been
    negatives of training questions, and the pairs held out at mining time (which have no negatives) are dropped
    from training."""
    mined = mining_record(cfg, data)
    if mined is None:
        return
    then, now = mined["config"]["data"], dataclasses.asdict(cfg.data)
    if mined["data"]["rows"]["heldout"] != data.counts["heldout"] or then["split_seed"] != now["split_seed"]:
        logger.warning("%s: the negatives were mined with %d held-out pairs (split seed %d), this training holds "
                       "out %d (seed %d): mine with the same data.heldout_* and split_seed so that evaluation stays "
                       "clean", cfg.data.path, mined["data"]["rows"]["heldout"], then["split_seed"],
                       data.counts["heldout"], now["split_seed"])


def _hard_negatives_record(cfg, data) -> dict[str, Any]:
    """Which hard negatives training used: the columns, and how they were mined (the miner's record, if the data
    is a mine-negatives output)."""
    if not data.negative_columns:
        return {"per_pair": 0}
    mined = mining_record(cfg, data)
    return {"per_pair": len(data.negative_columns), "columns": data.negative_columns,
            "pairs_without_them": data.counts.get("without_negatives", 0),
            "mined": {k: mined[k] for k in ("method", "model", "options", "counts") if k in mined} if mined else None}


def publish_model(model_dir: str, output: str, record: dict, heldout: list[tuple[str, str]]) -> None:
    """Write the model folder, its held-out pairs (``heldout.parquet``, for the evaluation job: questions this
    model never trained on) and its record ``denseqa.json``, atomically (see :func:`denseqa.storage.publish_folder`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.staged_output(output, marker=RECORD_FILE) as staging:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        pq.write_table(pa.table({"question": [q for q, _ in heldout], "answer": [a for _, a in heldout]}),
                       os.path.join(staging, HELDOUT_FILE))
        with open(os.path.join(staging, RECORD_FILE), "w") as f:
            json.dump(record, f, indent=2)
