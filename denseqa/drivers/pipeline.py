"""The run job (``denseqa run``, ``jobs/pipeline.py``): every step that is not up to date, in one run folder, then
deploy and query the endpoint once.

What a step depends on, and whether its output is still the one it made, is :mod:`denseqa.run_folder`'s; each
step is another driver run with the pipeline's config (its owned keys filled in from the run folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from typing import Any

import yaml

from denseqa import faults, storage, tracking
from denseqa.auth import bearer_header
from denseqa.config import COMMAND_SECTIONS, EvalConfig, JobConfig, OutputConfig, TrainConfig
from denseqa.errors import InputError
from denseqa.provenance import utc_now
from denseqa.redaction import masked, masked_values
from denseqa.run_folder import (
    CONFIG_FILE,
    MARKERS,
    STATE_FILE,
    RunFolder,
    best_mode,
    changed_inputs,
    corpus_config,
    decide,
    files_fingerprint,
    mining_method,
    output_fingerprint,
    resolved_config,
    step_inputs,
    summarize,
    summary_text,
)
from denseqa.train import HELDOUT_FILE

logger = logging.getLogger(__name__)


def _embed_config(cfg: JobConfig):
    if cfg.embed.use_gpu is not None:
        return cfg.embed
    # On an autoscaling cluster the GPU nodes may all be gone when this step starts: follow training's choice
    # rather than "GPUs if the cluster has some now", so the autoscaler brings them up for the embedding too.
    return cfg.embed.model_copy(update={"use_gpu": cfg.train.use_gpu})


def check_training_fits(cfg: JobConfig) -> None:
    """Training's workers with the CPUs (or GPUs) run_training will ask for, plus one CPU for Ray Data's reads, must
    fit the cluster (free now, or within its autoscaler's node types). Checked before training reads its data,
    which needs the CPUs too."""
    from denseqa.cluster import check_can_schedule
    from denseqa.resources import cpus_per_worker_default

    t = cfg.train
    per_worker = t.cpus_per_worker or cpus_per_worker_default(t.num_workers, t.use_gpu)
    check_can_schedule("training", t.num_workers, per_worker, 1 if t.use_gpu else 0)


def run_train_step(cfg: JobConfig, run: RunFolder, key: str, step: str = "train", fresh: bool = False) -> None:
    """Training, or the first round of --negatives model (in-batch negatives only), or the reranker. The second
    round starts from the same model as the first, with the mined negatives: the same number of steps either way.
    The reranker starts from the same encoder too, and trains on the mined negatives with the train section's
    settings. ``fresh`` (--force): from the start, whatever checkpoints a run of the same inputs left."""
    from denseqa.drivers.train import run_training
    from denseqa.train_reranker import BI_ENCODER_ONLY, RerankerTask

    checkpoints = storage.join(run / ("train-reranker" if step == "reranker" else "train"), key[:12])
    if fresh:  # the same inputs name the same folder: resumed, a finished run would only publish itself again
        storage.remove(checkpoints)
    resume = storage.exists(storage.join(checkpoints, "checkpoint_manager_snapshot.json"))
    if resume:
        logger.info("%s: continuing the interrupted training in %s", step, checkpoints)
    data = cfg.data  # without --negatives, negative columns the data already has are used (data.num_negatives)
    if step == "round1":
        data = cfg.data.model_copy(update={"num_negatives": 0})
    elif cfg.pipeline.negatives != "none":
        data = cfg.data.model_copy(update={"path": run.output("mine")})
    train = cfg.train
    if step == "train" and cfg.pipeline.distill_reranker:  # the mined pairs with the reranker's scores
        data = cfg.data.model_copy(update={"path": run.output("teacher")})
        train = cfg.train.model_copy(update={"distill": cfg.train.distill or "margin_mse"})
    output = OutputConfig(output=run.output(step), run_dir=checkpoints, resume=resume, overwrite=True,
                          shared_filesystem=cfg.pipeline.shared_filesystem)
    if step == "reranker":
        # The train section's loss options are the bi-encoder's: the reranker gets the rest (it refuses those).
        train = TrainConfig(**cfg.train.model_dump(exclude=set(BI_ENCODER_ONLY)))
        run_training(JobConfig(data=data, model=cfg.model, train=train, rerank=cfg.rerank, output=output,
                               used=COMMAND_SECTIONS["train-reranker"]), task=RerankerTask)
        return
    run_training(JobConfig(data=data, model=cfg.model, train=train, output=output, used=COMMAND_SECTIONS["train"]))


def run_teacher_step(cfg: JobConfig, run: RunFolder) -> None:
    """The reranker's scores of every mined pair's answer and negatives: the distillation targets."""
    from denseqa.drivers.mine_negatives import run_teacher_scoring

    mine = cfg.mine.model_copy(update={"teacher": run.output("reranker"), "output": run.output("teacher"),
                                       "overwrite": True, "shared_filesystem": cfg.pipeline.shared_filesystem})
    run_teacher_scoring(JobConfig(data=cfg.data.model_copy(update={"path": run.output("mine")}), model=cfg.model,
                                  mine=mine, embed=_embed_config(cfg), used=COMMAND_SECTIONS["mine-negatives"]))


def run_mine_step(cfg: JobConfig, run: RunFolder) -> None:
    from denseqa.drivers.mine_negatives import run_mining

    method = mining_method(cfg)
    model = cfg.model.model_copy(update={"model": run.output("round1")}) if method == "dense" else cfg.model
    mine = cfg.mine.model_copy(update={"method": method, "output": run.output("mine"), "overwrite": True,
                                       "shared_filesystem": cfg.pipeline.shared_filesystem})
    run_mining(JobConfig(data=cfg.data.model_copy(update={"num_negatives": 0}), model=model, mine=mine,
                         embed=_embed_config(cfg), used=COMMAND_SECTIONS["mine-negatives"]))


# Index inputs that may change while the index is updated live rather than rebuilt: the corpus's files (and its
# path); the model, the index settings and how the corpus is read stay.
UPDATABLE_INDEX_INPUTS = {"corpus files", "corpus.path"}


def index_updatable(inputs: dict[str, Any], record: dict | None, fingerprint: str | None) -> bool:
    """Whether the index step can update the existing index instead of rebuilding it: it exists as recorded, and
    only the corpus changed."""
    if record is None or fingerprint is None or fingerprint != record.get("fingerprint"):
        return False
    if inputs.get("index.partitions", 1) > 1:  # partitions are not updated live (yet): rebuilt
        return False
    changed = set(changed_inputs(inputs, record.get("inputs", {})))
    return bool(changed) and changed <= UPDATABLE_INDEX_INPUTS


def run_index_step(cfg: JobConfig, run: RunFolder, update: bool = False) -> None:
    """Build the index; or, with ``update``, bring the existing one to the corpus as it is now (a live update that
    embeds only new or changed passages, deletes the ones gone, and publishes a new version)."""
    from denseqa.drivers.build_index import run_build_index
    from denseqa.drivers.update_index import run_update_index

    # The fine-tuned model carries its prompts (denseqa.json); the pipeline's own model keys still apply.
    model = cfg.model.model_copy(update={"model": run.output("train")})
    corpus = corpus_config(cfg)
    if update:
        logger.info("index: only the corpus changed: updating %s live instead of rebuilding it", run.output("index"))
        index = cfg.index.model_copy(update={"update": run.output("index"), "upsert": corpus.path, "sync": True,
                                             "shared_filesystem": cfg.pipeline.shared_filesystem})
        run_update_index(JobConfig(corpus=corpus, model=model, embed=_embed_config(cfg), index=index,
                                   used=COMMAND_SECTIONS["build-index"]))
        return
    index = cfg.index.model_copy(update={"output": run.output("index"), "overwrite": True, "sync": False,
                                         "swap": False, "shared_filesystem": cfg.pipeline.shared_filesystem})
    run_build_index(JobConfig(corpus=corpus, model=model, embed=_embed_config(cfg), index=index,
                              used=COMMAND_SECTIONS["build-index"]))


def run_evaluate_step(cfg: JobConfig, run: RunFolder) -> dict[str, Any]:
    from denseqa.drivers.evaluate import run_evaluation

    evaluation = EvalConfig(index=run.output("index"), queries=storage.join(run.output("train"), HELDOUT_FILE),
                            max_queries=cfg.eval.max_queries, batch_size=cfg.eval.batch_size,
                            reranker=run.output("reranker") if cfg.pipeline.reranker else None,
                            rerank_candidates=cfg.eval.rerank_candidates, zero_shot=cfg.eval.zero_shot,
                            output=run.output("evaluate"), overwrite=True)
    return run_evaluation(JobConfig(eval=evaluation, used=COMMAND_SECTIONS["evaluate"]))


def deploy_mode(cfg: JobConfig, run: RunFolder) -> str:
    """The service's default search mode: --default-mode if given, else the mode the evaluation found best (on an
    English model over Korean text, BM25 or hybrid, not dense), said in the log with the figures behind it."""
    report = storage.read_json(storage.join(run.output("evaluate"), MARKERS["evaluate"]))
    figures = ", ".join(f"{mode} {m['mrr@10']:.3f}" for mode, m in report["modes"].items() if "+" not in mode)
    if cfg.serve.default_mode:
        logger.info("serving with default mode %s (given; evaluation MRR@10: %s)", cfg.serve.default_mode, figures)
        return cfg.serve.default_mode
    mode = best_mode(report)
    logger.info("serving with default mode %s, the evaluation's best (MRR@10: %s)", mode, figures)
    return mode


def run_serve_step(cfg: JobConfig, run: RunFolder, mode: str) -> str:
    from denseqa.drivers.serve import deploy, serve_config_for

    reranker = run.output("reranker") if cfg.pipeline.reranker else None
    serve_cfg = JobConfig(serve=cfg.serve.model_copy(update={"index": run.output("index"), "reranker": reranker,
                                                             "default_mode": mode}), used=("serve",))
    return deploy(serve_config_for(serve_cfg), cfg.serve.timeout_s)


def run_pipeline(cfg: JobConfig) -> dict[str, Any]:
    """Run every step that is not up to date, deploy, query the endpoint once; returns the summary it prints.

    When no cluster was running and this process started a local Ray, it stays in the foreground afterwards
    (the service lives as long as that Ray), like ``denseqa serve``.
    """
    from denseqa.cluster import check_reachable_by_every_node, connect
    from denseqa.model import check_model_source

    p = cfg.pipeline
    if not p.run_dir:
        raise InputError("no run folder given: pass --run-dir FOLDER (a local path or a URI such as s3://...)")
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and not (storage.is_uri(p.run_dir) or os.path.isabs(
            os.path.expanduser(p.run_dir))):  # set by Ray in the driver of a submitted job
        raise InputError(f"run folder {p.run_dir!r} is a relative path: a submitted job runs in a temporary copy of "
                         "its working directory, so give an absolute path or a URI")
    run = RunFolder(storage.absolute(p.run_dir))
    if not cfg.data.path:
        raise InputError("no training data given: pass --data PARQUET (question/answer pairs)")
    check_model_source(cfg.model.model)
    if cfg.train.distill and not p.distill_reranker:
        raise InputError(f"train.distill {cfg.train.distill} needs a teacher's scores of the mined pairs: pass "
                         "--distill-reranker (with --negatives and --reranker), which chains them")
    files_fingerprint(cfg.data.path)  # a missing data or corpus path fails here, before Ray starts
    files_fingerprint(corpus_config(cfg).path)
    if p.deploy:  # a bad Serve config or API key is found now, not after the training and the index
        from denseqa.drivers.serve import check_serving_inputs

        check_serving_inputs(cfg)
    started_here = connect(may_start_local=True)
    check_reachable_by_every_node(run.root, "run folder", p.shared_filesystem)

    storage.write_bytes(run / CONFIG_FILE, yaml.safe_dump(resolved_config(cfg), sort_keys=False).encode())
    logger.info("run folder %s (resolved config in %s)", run.root, CONFIG_FILE)
    with tracking.pipeline_run(cfg.mlflow, run.root, os.path.basename(run.root.rstrip("/"))) as tracked:
        if tracked is not None:
            tracked.params(cfg.to_record())
        ran = run_steps(cfg, run)
        summary = summarize(run, ran)
        if tracked is not None:
            tracked.metrics({f"{mode}/{k}": v for mode, m in summary["eval"]["modes"].items() for k, v in m.items()})
            tracked.artifacts([run / CONFIG_FILE, run / STATE_FILE])
            summary["mlflow"] = f"run {tracked.run_id}, experiment {cfg.mlflow.experiment!r} in " \
                                f"{masked(tracking.tracking_uri(cfg.mlflow, tracking.local_store(run.root)))}"
        if p.deploy:
            summary["default_mode"] = deploy_mode(cfg, run)
            url = run_serve_step(cfg, run, summary["default_mode"])
            query = p.example_query or summary["example_query"]
            from denseqa.drivers.serve import api_key_for

            key, key_source = api_key_for(cfg)
            summary.update(url=url, api_key=key_source, example={"query": query, "rerank": p.reranker, "hits":
                                                                 example_hits(url, query, p.reranker, key)})
            if tracked is not None:
                tracked.tags({"denseqa.endpoint": url, "denseqa.default_mode": summary["default_mode"]})
    print(masked(summary_text(summary)), flush=True)
    if p.deploy and started_here:
        from denseqa.drivers.serve import serve_until_interrupted

        serve_until_interrupted()
    return summary


def run_steps(cfg: JobConfig, run: RunFolder) -> dict[str, dict[str, Any]]:
    """Every step of the run in order, each run or skipped (up to date); returns {step: {"status", "seconds"}}."""
    p = cfg.pipeline
    state = storage.read_json(run / STATE_FILE) or {"steps": {}}
    made, ran = {}, {}
    kill_after = faults.planned("pipeline.kill_after_step", choices=p.steps)  # test-only
    for step in p.steps:
        inputs = masked_values(step_inputs(cfg, step, made))  # recorded in the state file
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
        record = state["steps"].get(step)
        why = decide(step, inputs, record, output_fingerprint(run, step), p.forced)
        if why is None:
            logger.info("%s: up to date, skipped (%s made from the same inputs on %s)", step, run.output(step),
                        record["finished"])
            ran[step] = {"status": "skipped", "seconds": None}
        else:
            logger.info("%s: running (%s)", step, why)
            if step in ("round1", "train", "reranker"):
                check_training_fits(cfg)
            started = time.time()
            if step in ("round1", "train", "reranker"):
                run_train_step(cfg, run, key, step, fresh=step in p.forced)
            elif step == "mine":
                run_mine_step(cfg, run)
            elif step == "teacher":
                run_teacher_step(cfg, run)
            elif step == "index":
                run_index_step(cfg, run, update=step not in p.forced and index_updatable(
                    inputs, record, output_fingerprint(run, step)))
            else:
                run_evaluate_step(cfg, run)
            state["steps"][step] = {
                "inputs": inputs, "output": masked(run.output(step)), "fingerprint": output_fingerprint(run, step),
                "finished": utc_now(),
                "seconds": round(time.time() - started, 1), "why": why,
            }
            storage.write_json(run / STATE_FILE, state)
            ran[step] = {"status": "ran", "seconds": state["steps"][step]["seconds"]}
        made[step] = state["steps"][step]["fingerprint"]
        if kill_after == step:
            faults.kill_self(f"killing the pipeline after {step}")
    return ran


def example_hits(url: str, query: str, rerank: bool, key: str | None) -> list[dict[str, Any]] | None:
    """The deployed service's top 3 for the run's example query; None, with a warning, when the service refuses
    it (a query beyond its limits): the run and its service are done, and the summary says where they are."""
    try:
        return query_endpoint(url, query, 3, rerank, key)
    except urllib.error.HTTPError as e:
        logger.warning("the example query %r was refused by the service: HTTP %d %s", query, e.code,
                       e.read().decode(errors="replace")[:300])
    except (OSError, ValueError) as e:  # unreachable, timed out, or not JSON
        logger.warning("the example query %r got no answer from the service: %s", query, e)
    return None


def query_endpoint(url: str, query: str, k: int, rerank: bool = False, key: str | None = None) -> list[dict[str, Any]]:
    """POST the query to the deployed service over HTTP, as any client would (with its API key, unless None)."""
    body = {"query": query, "k": k, **({"rerank": True} if rerank else {})}
    request = urllib.request.Request(f"{url}/search", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json",
                                              **(bearer_header(key) if key is not None else {})})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["results"][0]["hits"]
