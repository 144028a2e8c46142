"""The train job: config -> checks -> Ray Train -> publish the model folder -> its ``denseqa.json`` record.

What the workers run is the library's (:func:`denseqa.train.train_loop_per_worker`, one task: the bi-encoder's
or :mod:`denseqa.train_reranker`'s); this driver decides everything the ranks must agree on before they start
(the step plan), and publishes the final checkpoint once they are done (the record names the best one by the
held-out metric; the best K are kept in the run folder).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Any

from denseqa import storage, tracking
from denseqa.config import JobConfig
from denseqa.errors import InputError, TrainingError
from denseqa.logs import logger
from denseqa.provenance import package_versions
from denseqa.redaction import masked
from denseqa.run_folder import files_fingerprint
from denseqa.train import (
    HELDOUT_FILE,
    RECORD_FILE,
    STATE_FILE,
    STOPPED_FILE,
    BiEncoderTask,
    TrainingTask,
    TrainPlan,
    TrainState,
    format_metrics,
    make_plan,
    train_loop_per_worker,
)


def run_training(cfg: JobConfig, task: type[TrainingTask] = BiEncoderTask) -> dict[str, Any]:
    """Validate, read the data, train on Ray Train, write the model folder with its ``denseqa.json`` record.

    ``task``: what is trained (:class:`~denseqa.train.BiEncoderTask`, or the reranker's). Returns the record. Raises
    :class:`InputError` (before any worker starts) or :class:`TrainingError`.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from denseqa.cluster import check_reachable_by_every_node
    from denseqa.data import load_qa_data, resolve_parquet_files, sample_strings
    from denseqa.language import language_mismatch
    from denseqa.model import check_model_source, describe_model
    from denseqa.resources import cpus_per_worker_default

    started = time.time()
    task.check_config(cfg)
    tracking.check_store(cfg.mlflow)
    output, run_dir = _resolve_output(cfg)
    t = cfg.train
    # A resumed run takes its checkpoints' data position, schedule and optimizer state as they are: only with the
    # settings they were made under (checked again with the data's counts once they are read).
    # The seeds decide each epoch's order (a checkpoint counts the batches of it done) and the held-out split; the
    # optimizer settings are in the checkpoint's optimizer and schedule, which would override new ones unsaid.
    settings = {"num_workers": t.num_workers, "batch_size": t.batch_size, "precision": t.precision,
                "seed": t.seed, "split_seed": cfg.data.split_seed, "learning_rate": t.learning_rate,
                "weight_decay": t.weight_decay, "warmup_ratio": t.warmup_ratio,
                "data_files": files_fingerprint(cfg.data.path) if cfg.data.path else None}
    check_resumed_plan(cfg, run_dir, settings)
    source = check_model_source(cfg.model.model)
    # validates, then starts or joins Ray through Ray Data
    data = load_qa_data(cfg.data, with_teacher_scores=cfg.train.distill is not None)
    check_reachable_by_every_node(run_dir, "run folder", cfg.output.shared_filesystem)  # workers write checkpoints
    mismatch = language_mismatch(sample_strings(*resolve_parquet_files(cfg.data.path), cfg.data.answer_column),
                                 source, describe_model(cfg.model))
    if mismatch:
        logger.warning("%s", mismatch)
    loop_inputs = task.loop_inputs(cfg, data)

    cpus_per_worker = t.cpus_per_worker or cpus_per_worker_default(t.num_workers, t.use_gpu)
    plan = make_plan(cfg, data.counts["train"], run_dir)
    run_plan = {**settings, "train_pairs": data.counts["train"], "steps_per_epoch": plan.steps_per_epoch,
                "total_steps": plan.total_steps}
    check_resumed_plan(cfg, run_dir, run_plan)
    storage.write_json(storage.join(run_dir, RUN_PLAN_FILE), run_plan)
    logger.info("%s from %s; %d workers, %.2f CPUs each%s; run folder %s", task.kind, describe_model(cfg.model),
                t.num_workers, cpus_per_worker, " + 1 GPU each" if t.use_gpu else "", run_dir)

    storage_path, name = run_dir.rstrip("/").rsplit("/", 1)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "plan": dataclasses.asdict(plan), "task": task,
                           "inputs": loop_inputs},
        # CPU workers spread over the nodes: packed (Ray's default) on a fixed-size cluster, 1-CPU workers would
        # share one node's cores and leave the others idle. GPU workers stay packed, for NCCL within a node.
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy="PACK" if t.use_gpu else "SPREAD"),
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
    logger.info("%s written to %s (held-out %s)", task.kind, output, format_metrics(record["metrics"]["final"]))
    track_training(cfg, record, started, output)
    return record


def track_training(cfg: JobConfig, record: dict[str, Any], started: float, output: str) -> None:
    """The training as an MLflow run: the config, rank 0's loss, learning rate and pairs/s at every logged step,
    the held-out metrics at every evaluation, and the record, curves and model card."""
    from denseqa.model_card import CARD_FILE, CURVES_FILE

    metrics = record["metrics"]
    series = [{k: v for k, v in row.items() if k != "epoch"} for row in metrics.get("log") or []]
    series += [{"step": e["step"], **{f"heldout/{k}": v for k, v in e["metrics"].items()}}
               for e in metrics.get("history") or []]
    job = "train-reranker" if record["kind"] == "reranker" else "train"
    tracking.log_job(cfg.mlflow, job, started, cfg.to_record(),
                     series=series, artifacts=[storage.join(output, name) for name in (RECORD_FILE, CURVES_FILE,
                                                                                        CARD_FILE)],
                     tags={"denseqa.output": output, "denseqa.base_model": record.get("base_model") or "bundled"})


def _root_cause(error: Exception) -> str:
    """The last 'SomeError: message' line of a worker's traceback, which names what actually went wrong."""
    lines = [line.strip() for line in str(error).splitlines()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b.*:", line)]
    return causes[-1] if causes else next((line for line in lines if line), type(error).__name__)


# What a run was planned with (the driver writes it when the run starts): a resumed run must match it.
RUN_PLAN_FILE = "run_plan.json"


def check_resumed_plan(cfg: JobConfig, run_dir: str, now: dict[str, Any]) -> None:
    """With ``--resume``: refuse, in one line, settings that differ from those the run was planned with. A checkpoint
    holds a data position in batches, a learning-rate schedule over the total steps and an optimizer (and fp16's
    gradient scaler) state: under another batch size, number of workers, data or precision, the resumed run would
    repeat or skip pairs and jump in its schedule (or fail in the workers). A run folder from before this file
    existed is not checked."""
    if not cfg.output.resume:
        return
    then = storage.read_json(storage.join(run_dir, RUN_PLAN_FILE)) or {}
    for key, value in now.items():
        if key in then and then[key] != value:
            raise InputError(f"{run_dir}: --resume with {key} {value!r}, but the run was made with {then[key]!r}: "
                             f"its checkpoints hold a data position, schedule and optimizer of that plan; resume with "
                             "the same settings and data, or start a new run (another --run-dir)")


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
    from denseqa.language import model_languages
    from denseqa.model import describe_model, resolve_model_source

    metric = cfg.train.checkpoint_metric
    trained = [e for e in state.evals if e["step"] > 0]
    best = max(trained, key=lambda e: e["metrics"][metric]) if trained else None
    top, training = task.record(cfg, data, plan)
    return {
        "kind": task.kind,
        "model": describe_model(cfg.model),
        # The model training started from (None: the bundled one), for the evaluation's zero-shot row, and the
        # languages it was trained on, for the language check of the jobs that use this one.
        "base_model": _portable_model_name(cfg.model.model),
        "languages": model_languages(resolve_model_source(cfg.model.model)),
        **top,
        "data": {"path": masked(cfg.data.path), "files": len(data.files), "rows": data.counts},
        "training": {
            "steps": state.step, "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch,
            "epochs": cfg.train.epochs, "workers": plan.world_size,
            "global_batch_size": plan.world_size * cfg.train.batch_size,
            **training,
            "attempts": state.attempts, "run_dir": masked(run_dir), "train_seconds": round(state.train_seconds, 2),
            "peak_memory_mb_per_worker": state.peak_memory_mb,
            "torch_threads_per_worker": state.torch_threads,
            "precision": state.precision,
            "pairs_per_s": round(sum(a["steps_run"] for a in state.attempts) * plan.world_size
                                 * cfg.train.batch_size / max(state.train_seconds, 1e-9), 2),
        },
        "metrics": {
            "before": state.evals[0]["metrics"] if state.evals and state.evals[0]["step"] == 0 else None,
            "final": state.evals[-1]["metrics"] if state.evals else None,
            "best": best, "ranked_by": metric, "history": state.evals, "log": state.log,
        },
        "config": cfg.to_record(),
        "versions": package_versions(),
        "wall_time_s": round(wall_s, 1),
        "output": masked(output),
    }


def _portable_model_name(name: str | None) -> str | None:
    """``model.model`` as a later job elsewhere finds it: a local folder by its absolute path (the evaluation runs
    in another directory); None (the bundled model), a hub id or a URI as given."""
    if name and not storage.is_uri(name) and os.path.exists(os.path.expanduser(name)):
        return os.path.abspath(os.path.expanduser(name))
    return name


def publish_model(model_dir: str, output: str, record: dict, heldout: list[tuple[str, str]]) -> None:
    """Write the model folder, its held-out pairs (``heldout.parquet``, for the evaluation job: questions this
    model never trained on), its training curves and model card (README.md), and its record ``denseqa.json``,
    atomically (see :func:`denseqa.storage.publish_folder`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from denseqa.model_card import CURVES_FILE, plot_training_curves, write_model_card

    with storage.staged_output(output, marker=RECORD_FILE) as staging:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        plot_training_curves(record, os.path.join(staging, CURVES_FILE))
        write_model_card(staging, record)
        pq.write_table(pa.table({"question": [q for q, _ in heldout], "answer": [a for _, a in heldout]}),
                       os.path.join(staging, HELDOUT_FILE))
        with open(os.path.join(staging, RECORD_FILE), "w") as f:
            json.dump(record, f, indent=2)
