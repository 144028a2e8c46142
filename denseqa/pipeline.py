"""The whole run as one job: [round1 → mine →] train [→ reranker] → index → evaluate → serve, in one run folder,
resumable step by step.

Like a build system (make, DVC's lock file), every step records in ``pipeline.json`` what it ran from (its part
of the config, the fingerprint of its input files and of the previous step's output) and the fingerprint of what
it wrote. A step whose recorded inputs equal the current ones, and whose output is still the one it wrote, is
skipped: a run that failed resumes at the step that failed, and changing an index option rebuilds the index but
keeps the model. ``--force STEP`` redoes a step; the steps after it follow, because their input changed. Serving
is never skipped: deploying an unchanged config is a no-op for Ray Serve, and the endpoint is the deliverable.

Run folder (local or a URI; every node must reach it)::

    config.yaml     the resolved config of the latest run
    pipeline.json   per step: inputs, output fingerprint, when, how long
    round1/         with --negatives model: the first-round model (in-batch negatives) that mines the negatives
    negatives/      with --negatives bm25|model: the pairs with their hard negatives (negatives.json, pairs/)
    model/          the fine-tuned model (denseqa.json, heldout.parquet)
    train/<key>/    Ray Train's checkpoints, one folder per training config (an interrupted one resumes)
    reranker/       with --reranker: the cross-encoder trained on the mined negatives (its checkpoints in
                    train-reranker/<key>/)
    index/          the FAISS index folder (manifest.json)
    eval/           eval.md, eval.json, recall.png
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import urllib.request
from typing import Any

import yaml

from denseqa import faults, storage
from denseqa.config import (
    COMMAND_SECTIONS,
    PIPELINE_OWNED,
    CorpusConfig,
    EvalConfig,
    JobConfig,
    OutputConfig,
)
from denseqa.errors import InputError
from denseqa.eval import REPORT_JSON, REPORT_MD
from denseqa.index import MANIFEST_FILE
from denseqa.negatives import RECORD_FILE as NEGATIVES_RECORD
from denseqa.provenance import utc_now
from denseqa.train import HELDOUT_FILE, RECORD_FILE

logger = logging.getLogger(__name__)

STATE_FILE = "pipeline.json"
CONFIG_FILE = "config.yaml"
# The file that marks each step's output complete (written last; see denseqa.storage.publish_folder).
MARKERS = {"round1": RECORD_FILE, "mine": NEGATIVES_RECORD, "train": RECORD_FILE, "reranker": RECORD_FILE,
           "index": MANIFEST_FILE, "evaluate": REPORT_JSON}
OUTPUTS = {"round1": "round1", "mine": "negatives", "train": "model", "reranker": "reranker", "index": "index",
           "evaluate": "eval"}
# Keys that change how a step runs (logging, retries, parallelism) but not what it produces: they are
# left out of its inputs, so changing them redoes nothing. The whole embed section is of this kind.
OPERATIONAL = frozenset({
    "train.log_every_steps", "train.max_failures", "train.torch_threads", "train.cpus_per_worker",
    "train.eval_batch_size", "index.shards", "index.add_batch_size", "eval.batch_size",
    "mine.batch_size", "mine.actors",
})


@dataclasses.dataclass(frozen=True)
class RunFolder:
    root: str

    def __truediv__(self, name: str) -> str:
        return storage.join(self.root, name)

    def output(self, step: str) -> str:
        return self / OUTPUTS[step]


# ------------------------------------------------------------------------------------------------ the plan


def corpus_config(cfg: JobConfig) -> CorpusConfig:
    """The passages to index: corpus.path if given, else the distinct answers of the training data."""
    if cfg.corpus.path:
        return cfg.corpus
    return dataclasses.replace(cfg.corpus, path=cfg.data.path, from_answers=True,
                               text_column=cfg.corpus.text_column or cfg.data.answer_column,
                               question_column=cfg.data.question_column)


def resolved_config(cfg: JobConfig) -> dict[str, Any]:
    """Every key of the run with its value (defaults included), as a config file `run --config` accepts again."""
    return {name: {k: v for k, v in values.items() if f"{name}.{k}" not in PIPELINE_OWNED}
            for name, values in cfg.to_dict().items()}


def files_fingerprint(path: str) -> str:
    """The listing digest (paths, sizes, modification times) of every parquet file behind ``path``."""
    from denseqa.data import resolve_parquet_files

    fs, files = resolve_parquet_files(path)
    return storage.listing_digest(fs.get_file_info(files))


def output_fingerprint(run: RunFolder, step: str) -> str | None:
    """sha256 of the step's marker file (it holds the output's own record), or None while the output is absent."""
    data = storage.read_bytes(storage.join(run.output(step), MARKERS[step]))
    return None if data is None else hashlib.sha256(data).hexdigest()


def _section(cfg: JobConfig, name: str, section: Any = None) -> dict[str, Any]:
    values = dataclasses.asdict(section if section is not None else getattr(cfg, name))
    return {f"{name}.{k}": v for k, v in values.items()
            if f"{name}.{k}" not in OPERATIONAL and f"{name}.{k}" not in PIPELINE_OWNED}


def step_inputs(cfg: JobConfig, step: str, made: dict[str, str | None]) -> dict[str, Any]:
    """Everything a step's output depends on, flat (``section.key`` → value), with ``made`` the fingerprints of the
    outputs of the steps before it."""
    if step in ("round1", "train", "reranker"):
        inputs = {**_section(cfg, "data"), **_section(cfg, "model"), **_section(cfg, "train"),
                  "data files": files_fingerprint(cfg.data.path)}
        if step == "reranker":
            inputs.update(_section(cfg, "rerank"))
        if step != "round1" and cfg.pipeline.negatives != "none":
            inputs["negatives"] = made["mine"]
        return inputs
    if step == "mine":
        inputs = {**_section(cfg, "data"), **_section(cfg, "mine"), "mine.method": mining_method(cfg),
                  "data files": files_fingerprint(cfg.data.path)}
        if cfg.pipeline.negatives == "model":
            inputs.update({**_section(cfg, "model"), "model": made["round1"]})
        return inputs
    if step == "index":
        corpus = corpus_config(cfg)
        return {**_section(cfg, "corpus", corpus), **_section(cfg, "index"), "corpus files": files_fingerprint(
            corpus.path), "model": made["train"]}
    if step == "evaluate":
        inputs = {**_section(cfg, "eval"), "index": made["index"]}
        if cfg.pipeline.reranker:
            inputs["reranker"] = made["reranker"]
        else:
            inputs.pop("eval.rerank_candidates")
        return inputs
    raise ValueError(step)


def decide(step: str, inputs: dict[str, Any], record: dict | None, fingerprint: str | None,
           forced: set[str]) -> str | None:
    """Why ``step`` must run, or None when its output exists and was made from these inputs."""
    if step in forced:
        return "--force"
    if record is None:
        return "not run before"
    if fingerprint is None:
        return "its output is missing"
    if fingerprint != record.get("fingerprint"):
        return "its output was replaced since"
    before = record.get("inputs", {})
    changed = [k for k in sorted(set(inputs) | set(before)) if inputs.get(k) != before.get(k)]
    if changed:
        shown = [f"{k}: {_short(before.get(k))} → {_short(inputs.get(k))}" for k in changed[:3]]
        return "changed " + "; ".join(shown) + (f" (+{len(changed) - 3} more)" if len(changed) > 3 else "")
    return None


def _short(value: Any) -> str:
    return repr(value[:9] + "…" if isinstance(value, str) and len(value) == 64 else value)  # fingerprints: a prefix


# ------------------------------------------------------------------------------------------------ the steps


def mining_method(cfg: JobConfig) -> str:
    return "dense" if cfg.pipeline.negatives == "model" else "bm25"


def _embed_config(cfg: JobConfig):
    if cfg.embed.use_gpu is not None:
        return cfg.embed
    # On an autoscaling cluster the GPU nodes may all be gone when this step starts: follow training's choice
    # rather than "GPUs if the cluster has some now", so the autoscaler brings them up for the embedding too.
    return dataclasses.replace(cfg.embed, use_gpu=cfg.train.use_gpu)


def check_training_fits(cfg: JobConfig) -> None:
    """Training's workers with the CPUs (or GPUs) run_training will ask for, plus one CPU for Ray Data's reads, must
    fit a cluster that cannot grow. Checked before training reads its data, which needs the CPUs too."""
    from denseqa.cluster import check_can_schedule
    from denseqa.resources import cpus_per_worker_default

    t = cfg.train
    per_worker = t.cpus_per_worker or cpus_per_worker_default(t.num_workers, t.use_gpu)
    check_can_schedule("training", 1 + t.num_workers * per_worker, t.num_workers if t.use_gpu else 0)


def run_train_step(cfg: JobConfig, run: RunFolder, key: str, step: str = "train") -> None:
    """Training, or the first round of --negatives model (in-batch negatives only), or the reranker. The second
    round starts from the same model as the first, with the mined negatives: the same number of steps either way.
    The reranker starts from the same encoder too, and trains on the mined negatives with the train section's
    settings."""
    from denseqa.train import run_training
    from denseqa.train_reranker import RerankerTask

    checkpoints = storage.join(run / ("train-reranker" if step == "reranker" else "train"), key[:12])
    resume = storage.exists(storage.join(checkpoints, "checkpoint_manager_snapshot.json"))
    if resume:
        logger.info("%s: continuing the interrupted training in %s", step, checkpoints)
    data = cfg.data  # without --negatives, negative columns the data already has are used (data.num_negatives)
    if step == "round1":
        data = dataclasses.replace(cfg.data, num_negatives=0)
    elif cfg.pipeline.negatives != "none":
        data = dataclasses.replace(cfg.data, path=run.output("mine"))
    output = OutputConfig(output=run.output(step), run_dir=checkpoints, resume=resume, overwrite=True)
    if step == "reranker":
        run_training(JobConfig(data=data, model=cfg.model, train=cfg.train, rerank=cfg.rerank, output=output,
                               used=COMMAND_SECTIONS["train-reranker"]), task=RerankerTask)
        return
    run_training(JobConfig(data=data, model=cfg.model, train=cfg.train, output=output,
                           used=COMMAND_SECTIONS["train"]))


def run_mine_step(cfg: JobConfig, run: RunFolder) -> None:
    from denseqa.negatives import run_mining

    method = mining_method(cfg)
    model = dataclasses.replace(cfg.model, model=run.output("round1")) if method == "dense" else cfg.model
    mine = dataclasses.replace(cfg.mine, method=method, output=run.output("mine"), overwrite=True)
    run_mining(JobConfig(data=dataclasses.replace(cfg.data, num_negatives=0), model=model, mine=mine,
                         embed=_embed_config(cfg), used=COMMAND_SECTIONS["mine-negatives"]))


def run_index_step(cfg: JobConfig, run: RunFolder) -> None:
    from denseqa.index import run_build_index

    # The fine-tuned model carries its prompts (denseqa.json); the pipeline's own model keys still apply.
    model = dataclasses.replace(cfg.model, model=run.output("train"))
    index = dataclasses.replace(cfg.index, output=run.output("index"), overwrite=True)
    run_build_index(JobConfig(corpus=corpus_config(cfg), model=model, embed=_embed_config(cfg), index=index,
                              used=COMMAND_SECTIONS["build-index"]))


def run_evaluate_step(cfg: JobConfig, run: RunFolder) -> dict[str, Any]:
    from denseqa.eval import run_evaluation

    evaluation = EvalConfig(index=run.output("index"), queries=storage.join(run.output("train"), HELDOUT_FILE),
                            max_queries=cfg.eval.max_queries, batch_size=cfg.eval.batch_size,
                            reranker=run.output("reranker") if cfg.pipeline.reranker else None,
                            rerank_candidates=cfg.eval.rerank_candidates, output=run.output("evaluate"),
                            overwrite=True)
    return run_evaluation(JobConfig(eval=evaluation, used=COMMAND_SECTIONS["evaluate"]))


def run_serve_step(cfg: JobConfig, run: RunFolder) -> str:
    from denseqa.serve import deploy, serve_config_for

    reranker = run.output("reranker") if cfg.pipeline.reranker else None
    serve_cfg = JobConfig(serve=dataclasses.replace(cfg.serve, index=run.output("index"), reranker=reranker),
                          used=("serve",))
    return deploy(serve_config_for(serve_cfg), cfg.serve.timeout_s)


# ------------------------------------------------------------------------------------------------ the run


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
    files_fingerprint(cfg.data.path)  # a missing data or corpus path fails here, before Ray starts
    files_fingerprint(corpus_config(cfg).path)
    started_here = connect(may_start_local=True)
    check_reachable_by_every_node(run.root, "run folder", p.shared_filesystem)

    storage.write_bytes(run / CONFIG_FILE, yaml.safe_dump(resolved_config(cfg), sort_keys=False).encode())
    state = storage.read_json(run / STATE_FILE) or {"steps": {}}
    logger.info("run folder %s (resolved config in %s)", run.root, CONFIG_FILE)
    made, ran = {}, {}
    for step in p.steps:
        inputs = step_inputs(cfg, step, made)
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
        record = state["steps"].get(step)
        why = decide(step, inputs, record, output_fingerprint(run, step), p.forced)
        if why is None:
            logger.info("%s: up to date, skipped (%s made from the same inputs on %s)", step, run.output(step),
                        record["finished"])
            ran[step] = "skipped"
        else:
            logger.info("%s: running (%s)", step, why)
            if step in ("round1", "train", "reranker"):
                check_training_fits(cfg)
            started = time.time()
            if step in ("round1", "train", "reranker"):
                run_train_step(cfg, run, key, step)
            elif step == "mine":
                run_mine_step(cfg, run)
            elif step == "index":
                run_index_step(cfg, run)
            else:
                run_evaluate_step(cfg, run)
            state["steps"][step] = {
                "inputs": inputs, "output": run.output(step), "fingerprint": output_fingerprint(run, step),
                "finished": utc_now(),
                "seconds": round(time.time() - started, 1), "why": why,
            }
            storage.write_json(run / STATE_FILE, state)
            ran[step] = f"ran in {state['steps'][step]['seconds']:.0f} s"
        made[step] = state["steps"][step]["fingerprint"]
        if faults.planned("pipeline.kill_after_step") == step:
            faults.kill_self(f"killing the pipeline after {step}")

    summary = summarize(run, ran)
    if p.deploy:
        url = run_serve_step(cfg, run)
        query = p.example_query or summary["example_query"]
        summary.update(url=url, example={"query": query, "rerank": p.reranker,
                                         "hits": query_endpoint(url, query, k=3, rerank=p.reranker)})
    print(summary_text(summary), flush=True)
    if p.deploy and started_here:
        from denseqa.serve import serve_until_interrupted

        serve_until_interrupted()
    return summary


def summarize(run: RunFolder, ran: dict[str, str]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    model = storage.read_json(storage.join(run.output("train"), MARKERS["train"]))
    manifest = storage.read_json(storage.join(run.output("index"), MARKERS["index"]))
    report = storage.read_json(storage.join(run.output("evaluate"), MARKERS["evaluate"]))
    fs, path = storage.filesystem(storage.join(run.output("train"), HELDOUT_FILE))
    heldout = pq.read_table(path, columns=["question"], filesystem=fs).column("question")
    mined = storage.read_json(storage.join(run.output("mine"), MARKERS["mine"])) if "mine" in ran else None
    reranker = storage.read_json(storage.join(run.output("reranker"), MARKERS["reranker"])) if "reranker" in ran \
        else None
    return {
        "run_dir": run.root, "steps": ran,
        "negatives": {"path": run.output("mine"), "method": mined["method"], "per_pair": len(mined["columns"]),
                      "pairs": mined["counts"]["train_pairs"], "complete": mined["counts"]["with_all_negatives"]}
        if mined else None,
        "model": {"path": run.output("train"), "steps": model["training"]["steps"],
                  "heldout_before": model["metrics"]["before"], "heldout_final": model["metrics"]["final"]},
        "reranker": {"path": run.output("reranker"), "steps": reranker["training"]["steps"],
                     "heldout_before": reranker["metrics"]["before"], "heldout_final": reranker["metrics"]["final"]}
        if reranker else None,
        "index": {"path": run.output("index"), "count": manifest["count"], "factory": manifest["index"]["factory"]},
        "eval": {"path": run.output("evaluate"), "report": storage.join(run.output("evaluate"), REPORT_MD),
                 "modes": {mode: {k: v for k, v in m.items() if k != "recall_curve"}
                           for mode, m in report["modes"].items()}},
        "example_query": heldout[0].as_py() if len(heldout) else "how do I search my documents",
    }


def query_endpoint(url: str, query: str, k: int, rerank: bool = False) -> list[dict[str, Any]]:
    """POST the query to the deployed service over HTTP, as any client would."""
    body = {"query": query, "k": k, **({"rerank": True} if rerank else {})}
    request = urllib.request.Request(f"{url}/search", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["results"][0]["hits"]


def summary_text(summary: dict[str, Any]) -> str:
    m, i, e = summary["model"], summary["index"], summary["eval"]
    steps = summary["steps"]
    lines = [f"run folder {summary['run_dir']}"]
    if "round1" in steps:
        lines.append(f"  round1  {summary['run_dir'].rstrip('/')}/round1  ({steps['round1']}; mines the negatives)")
    if summary.get("negatives"):
        n = summary["negatives"]
        lines.append(f"  negatives  {n['path']}  ({steps['mine']}; {n['method']}, {n['per_pair']} per pair for "
                     f"{n['complete']} of {n['pairs']} training pairs)")
    lines.append(f"  model  {m['path']}  ({steps['train']}; {m['steps']} steps)")
    if summary.get("reranker"):
        r = summary["reranker"]
        lines.append(f"  reranker  {r['path']}  ({steps['reranker']}; {r['steps']} steps, held-out re-ranking MRR@10 "
                     f"{r['heldout_before']['mrr@10']:.3f} → {r['heldout_final']['mrr@10']:.3f})")
    lines += [f"  index  {i['path']}  ({steps['index']}; {i['count']} passages, {i['factory']})",
             f"  eval   {e['report']}  ({steps['evaluate']})"]
    for mode, metrics in e["modes"].items():
        lines.append(f"         {mode:14s}" + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if "url" in summary:
        url, example = summary["url"], summary["example"]
        body = json.dumps({"query": example["query"], "k": 3, **({"rerank": True} if example["rerank"] else {})},
                          ensure_ascii=False).replace("'", "'\\''")
        lines += [f"endpoint {url}/search  (OpenAPI docs: {url}/docs)",
                  f"  curl -s {url}/search -H 'content-type: application/json' -d '{body}'",
                  f"  {example['query']!r} →"]
        lines += [f"    {hit.get('rerank_score', hit['score']):.3f}  {hit['id']}  {hit['text'][:90]!r}"
                  for hit in example["hits"]]
    return "\n".join(lines)
