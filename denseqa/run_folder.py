"""The pipeline's run folder: what each step of ``denseqa run`` writes where, and whether a step is up to date.

The steps, [round1 → mine →] train [→ reranker] → index → evaluate → serve, are run by the pipeline driver
(:mod:`denseqa.drivers.pipeline`), resumable step by step.

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
from typing import Any

from denseqa import storage
from denseqa.auth import curl_header
from denseqa.config import OPERATIONAL, PIPELINE_OWNED, CorpusConfig, JobConfig
from denseqa.eval import REPORT_JSON, REPORT_MD
from denseqa.index import MANIFEST_FILE
from denseqa.model_card import CURVES_FILE
from denseqa.negatives import RECORD_FILE as NEGATIVES_RECORD
from denseqa.train import HELDOUT_FILE, RECORD_FILE
from denseqa.versions import resolve_index

STATE_FILE = "pipeline.json"
CONFIG_FILE = "config.yaml"
# The file that marks each step's output complete (written last; see denseqa.storage.publish_folder).
MARKERS = {"round1": RECORD_FILE, "mine": NEGATIVES_RECORD, "reranker": RECORD_FILE, "teacher": NEGATIVES_RECORD,
           "train": RECORD_FILE, "index": MANIFEST_FILE, "evaluate": REPORT_JSON}
OUTPUTS = {"round1": "round1", "mine": "negatives", "reranker": "reranker", "teacher": "teacher", "train": "model",
           "index": "index", "evaluate": "eval"}


@dataclasses.dataclass(frozen=True)
class RunFolder:
    root: str

    def __truediv__(self, name: str) -> str:
        return storage.join(self.root, name)

    def output(self, step: str) -> str:
        return self / OUTPUTS[step]


def corpus_config(cfg: JobConfig) -> CorpusConfig:
    """The passages to index: corpus.path if given, else the distinct answers of the training data."""
    if cfg.corpus.path:
        return cfg.corpus
    return cfg.corpus.model_copy(update={"path": cfg.data.path, "from_answers": True,
                                         "text_column": cfg.corpus.text_column or cfg.data.answer_column,
                                         "question_column": cfg.data.question_column})


def resolved_config(cfg: JobConfig) -> dict[str, Any]:
    """Every key of the run with its value (defaults included), as a config file `run --config` accepts again
    (with the password of a URI in it masked: give it through the tool's environment variable instead)."""
    return {name: {k: v for k, v in values.items() if f"{name}.{k}" not in PIPELINE_OWNED}
            for name, values in cfg.to_record().items()}


def files_fingerprint(path: str) -> str:
    """The listing digest (paths, sizes, modification times) of every parquet file behind ``path``."""
    from denseqa.data import resolve_parquet_files

    fs, files = resolve_parquet_files(path)
    return storage.listing_digest(fs.get_file_info(files))


def output_fingerprint(run: RunFolder, step: str) -> str | None:
    """sha256 of the step's marker file (it holds the output's own record), or None while the output is absent."""
    folder = run.output(step)
    if step == "index":  # an index updated live: its current version's manifest
        folder = resolve_index(folder)
    data = storage.read_bytes(storage.join(folder, MARKERS[step]))
    return None if data is None else hashlib.sha256(data).hexdigest()


def _section(cfg: JobConfig, name: str, section: Any = None) -> dict[str, Any]:
    values = (section if section is not None else getattr(cfg, name)).model_dump()
    return {f"{name}.{k}": v for k, v in values.items()
            if f"{name}.{k}" not in OPERATIONAL and f"{name}.{k}" not in PIPELINE_OWNED}


def step_inputs(cfg: JobConfig, step: str, made: dict[str, str | None]) -> dict[str, Any]:
    """Everything a step's output depends on, flat (``section.key`` → value), with ``made`` the fingerprints of the
    outputs of the steps before it."""
    if step in ("round1", "train", "reranker"):
        # model.backend is how a trained model is run afterwards (the index, the mining), not how it trains.
        model = {k: v for k, v in _section(cfg, "model").items() if k != "model.backend"}
        inputs = {**_section(cfg, "data"), **model, **_section(cfg, "train"),
                  "data files": files_fingerprint(cfg.data.path)}
        if step == "reranker":
            inputs.update(_section(cfg, "rerank"))
        if step != "round1" and cfg.pipeline.negatives != "none":
            inputs["negatives"] = made["mine"]
        if step == "train" and cfg.pipeline.distill_reranker:  # the mined pairs with the reranker's scores
            inputs["negatives"] = made["teacher"]
        return inputs
    if step == "teacher":
        return {"negatives": made["mine"], "teacher": made["reranker"]}
    if step == "mine":
        inputs = {**_section(cfg, "data"), **_section(cfg, "mine"), "mine.method": mining_method(cfg),
                  "data files": files_fingerprint(cfg.data.path)}
        if cfg.pipeline.negatives == "model":
            inputs.update({**_section(cfg, "model"), "model": made["round1"]})
        return inputs
    if step == "index":
        corpus = corpus_config(cfg)
        # The passages' precision (embed) and the backend that embeds them change the vectors, as the model does.
        return {**_section(cfg, "corpus", corpus), **_section(cfg, "index"), **_section(cfg, "embed"),
                "model.backend": cfg.model.backend, "corpus files": files_fingerprint(corpus.path),
                "model": made["train"]}
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
    changed = changed_inputs(inputs, record.get("inputs", {}))
    if changed:
        shown = [f"{k}: {_short(was)} → {_short(inputs[k])}" for k, was in list(changed.items())[:3]]
        return "changed " + "; ".join(shown) + (f" (+{len(changed) - 3} more)" if len(changed) > 3 else "")
    return None


def changed_inputs(inputs: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """The inputs that differ from a step's recorded ones, each with its value then. A key the step no longer reads
    cannot have changed its output; one a record from an older denseqa lacks was that key's default then (the
    behaviour before the key existed): a run folder survives an upgrade."""
    then = {k: before[k] if k in before else _default_of(k) for k in inputs}
    return {k: then[k] for k in sorted(inputs) if inputs[k] != then[k]}


def _default_of(key: str) -> Any:
    """The default of config key ``section.name`` as a step input records it; None for other inputs."""
    section, _, name = key.partition(".")
    field = JobConfig.model_fields.get(section)
    fields = getattr(field.annotation, "model_fields", {}) if field is not None else {}
    return fields[name].get_default(call_default_factory=True) if name in fields else None


def _short(value: Any) -> str:
    return repr(value[:9] + "…" if isinstance(value, str) and len(value) == 64 else value)  # fingerprints: a prefix


def mining_method(cfg: JobConfig) -> str:
    return "dense" if cfg.pipeline.negatives == "model" else "bm25"


def summarize(run: RunFolder, ran: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the run made: each step ({"status": "ran" | "skipped", "seconds"}) and its outputs' key figures."""
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
        "teacher": (storage.read_json(storage.join(run.output("teacher"), MARKERS["teacher"])) or {}).get("teacher")
        if "teacher" in ran else None,
        "model": {"path": run.output("train"), "steps": model["training"]["steps"],
                  "curves": storage.join(run.output("train"), CURVES_FILE),
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


def best_mode(report: dict[str, Any], metric: str = "mrr@10") -> str:
    """The search mode (dense, bm25 or hybrid; re-ranked rows aside, re-ranking is a request's choice) with the
    best ``metric`` in an evaluation report; dense on a tie, the one that needs no lexical index."""
    base = {mode: m[metric] for mode, m in report["modes"].items() if mode in ("dense", "bm25", "hybrid")}
    return max(base, key=lambda mode: (base[mode], mode == "dense"))


def step_figure(step: str, summary: dict[str, Any]) -> str:
    """The one figure that says what a step made, for the pipeline's closing table."""
    if step == "round1":
        return "the model the negatives are mined with"
    if step == "mine" and summary.get("negatives"):
        n = summary["negatives"]
        return f"{n['complete']} of {n['pairs']} pairs with {n['per_pair']} {n['method']} negative(s)"
    if step == "teacher" and summary.get("teacher"):
        t = summary["teacher"]
        rate = f", {t['pairs_per_s_per_actor']} pairs/s per actor" if t.get("pairs_per_s_per_actor") else ""
        return f"{t['pairs_scored']} pairs scored{rate}"
    if step in ("train", "reranker") and summary.get("model" if step == "train" else "reranker"):
        m = summary["model" if step == "train" else "reranker"]
        before = f"{m['heldout_before']['mrr@10']:.3f} → " if m.get("heldout_before") else ""
        return f"held-out MRR@10 {before}{m['heldout_final']['mrr@10']:.3f} ({m['steps']} steps)"
    if step == "index":
        return f"{summary['index']['count']} passages, {summary['index']['factory']}"
    if step == "evaluate":
        modes = {mode: m for mode, m in summary["eval"]["modes"].items() if "+" not in mode and mode != "zero-shot"}
        best = max(modes, key=lambda mode: modes[mode]["mrr@10"])
        return f"best {best} MRR@10 {modes[best]['mrr@10']:.3f}"
    return ""


def summary_text(summary: dict[str, Any]) -> str:
    m, i, e = summary["model"], summary["index"], summary["eval"]
    rows = [("step", "ran", "wall time", "result")]
    for step, done in summary["steps"].items():
        seconds = done.get("seconds")
        rows.append((step, done["status"], f"{seconds:.0f} s" if seconds is not None else "-",
                     step_figure(step, summary)))
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    lines = [f"run folder {summary['run_dir']}"]
    lines += ["  " + "  ".join(cell.ljust(widths[c]) if c < 3 else cell for c, cell in enumerate(row)).rstrip()
              for row in rows]
    lines.append(f"  model     {m['path']}  (training curves: {m['curves']}; model card: README.md)")
    if summary.get("negatives"):
        lines.append(f"  negatives {summary['negatives']['path']}")
    if summary.get("reranker"):
        lines.append(f"  reranker  {summary['reranker']['path']}")
    lines += [f"  index     {i['path']}", f"  eval      {e['report']}"]
    for mode, metrics in e["modes"].items():
        lines.append(f"            {mode:14s}" + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if summary.get("mlflow"):
        lines.append(f"  MLflow    {summary['mlflow']}")
    if "url" in summary:
        url, example = summary["url"], summary["example"]
        body = json.dumps({"query": example["query"], "k": 3, **({"rerank": True} if example["rerank"] else {})},
                          ensure_ascii=False).replace("'", "'\\''")
        lines += [f"endpoint {url}/search  (OpenAPI docs: {url}/docs; default mode {summary['default_mode']})",
                  f"  curl -s {url}/search{curl_header(summary.get('api_key'))} -H 'content-type: application/json' "
                  f"-d '{body}'",
                  f"  {example['query']!r} →"]
        if example["hits"] is None:
            lines.append("    (no answer: see the warning above)")
        lines += [f"    {hit.get('rerank_score', hit['score']):.3f}  {hit['id']}  {hit['text'][:90]!r}"
                  for hit in example["hits"] or []]
    return "\n".join(lines)
