"""What a trained model folder says about its training: the curves (``training-curves.png``) and the model card
(``README.md``), both drawn from its ``denseqa.json`` record.

The card is sentence-transformers' own (``generate_model_card`` over the model's ``model_card_data``, the card its
trainer writes), filled in from denseqa's record because denseqa's loop is not that trainer, with a section on how
denseqa trained the model: data, loss, negatives, steps and the held-out metrics before and after.
"""

from __future__ import annotations

import json
import os
from typing import Any

from denseqa.redaction import masked

CURVES_FILE = "training-curves.png"
CARD_FILE = "README.md"
# The loss's fully qualified name, which the card links to sentence-transformers' documentation.
_LOSS_CLASSES = {
    "bi-encoder": "sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss",
    "reranker": "sentence_transformers.cross_encoder.losses.MultipleNegativesRankingLoss",
}


def plot_training_curves(record: dict[str, Any], path: str) -> None:
    """The training loss and the held-out metrics over the steps, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    log = record["metrics"].get("log") or []
    history = record["metrics"].get("history") or []
    fig, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    if log:
        loss_ax.plot([e["step"] for e in log], [e["loss"] for e in log], marker="." if len(log) < 50 else None,
                     linewidth=1.5, label="training loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(f"training loss ({record['training']['global_batch_size']} pairs per step)")
    loss_ax.grid(True, alpha=0.3)
    if history:
        for name in history[0]["metrics"]:
            eval_ax.plot([e["step"] for e in history], [e["metrics"][name] for e in history], marker="o",
                         label=name)
        eval_ax.legend(loc="lower right")
    eval_ax.set_xlabel("step")
    eval_ax.set_ylabel("held-out metric")
    eval_ax.set_title(f"held-out ({record['data']['rows'].get('heldout', 0)} pairs)")
    eval_ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_model_card(folder: str, record: dict[str, Any]) -> None:
    """Replace ``folder``'s README.md (until now the starting model's) with a card of this training."""
    from sentence_transformers.base.model_card import generate_model_card

    from denseqa.model import BUNDLED_MODEL_NAME

    if record["kind"] == "reranker":
        from sentence_transformers import CrossEncoder

        model = CrossEncoder(folder, device="cpu")
    else:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(folder, device="cpu")
    data = model.model_card_data
    training, metrics = record["training"], record["metrics"]
    data.model_name = f"{record['model']}, fine-tuned by denseqa ({record['kind']})"
    data.language = record.get("languages") or []
    data.local_files_only = True  # no Hub lookups for the base model's card
    base = record.get("base_model")
    if base is None or not (base.startswith("/") or "://" in base):  # a Hub id (the bundled model's is known)
        data.base_model = base or BUNDLED_MODEL_NAME
    data.train_datasets = [{
        "name": os.path.basename(str(record["data"]["path"]).rstrip("/")) or "question/answer pairs",
        "size": record["data"]["rows"]["train"],
        "columns": ["<code>question</code>", "<code>answer</code>"]
                   + [f"<code>negative_{i}</code>" for i in range(1, _hard_negatives(training) + 1)],
        "loss": {"fullname": _LOSS_CLASSES[record["kind"]],
                 "config_code": "```json\n" + json.dumps(training.get("loss") or {}, indent=4) + "\n```"},
    }]
    train_config = record["config"].get("train", {})
    data.all_hyperparameters = {k: v for k, v in train_config.items() if not isinstance(v, dict)}
    data.non_default_hyperparameters = {k: train_config[k] for k in ("batch_size", "learning_rate", "max_steps",
                                                                     "epochs", "warmup_ratio", "num_workers")
                                        if train_config.get(k) is not None}
    data.training_logs = _training_logs(metrics)
    card = generate_model_card(model)
    section = denseqa_section(record)
    marker = "\n## Training Details"
    card = card.replace(marker, "\n" + section + marker, 1) if marker in card else card + "\n" + section
    with open(os.path.join(folder, CARD_FILE), "w") as f:
        f.write(card)


def _hard_negatives(training: dict[str, Any]) -> int:
    return int((training.get("hard_negatives") or {}).get("per_pair", 0))


def _training_logs(metrics: dict[str, Any]) -> list[dict[str, float]]:
    """The card's "Training Logs" table: the logged losses, with the held-out metrics at the steps evaluated."""
    evals = {e["step"]: e["metrics"] for e in metrics.get("history") or []}
    rows = {e["step"]: {"Epoch": e["epoch"], "Step": e["step"], "Training Loss": round(e["loss"], 4)}
            for e in metrics.get("log") or []}
    for step, values in evals.items():
        row = rows.setdefault(step, {"Epoch": 0.0 if step == 0 else "-", "Step": step, "Training Loss": "-"})
        row.update({f"heldout_{name}": round(value, 4) for name, value in values.items()})
    return [rows[step] for step in sorted(rows)]


def denseqa_section(record: dict[str, Any]) -> str:
    """How denseqa trained this model, in Markdown (the card's own section)."""
    training, metrics, rows = record["training"], record["metrics"], record["data"]["rows"]
    loss = training.get("loss") or {}
    lines = [
        "## How denseqa trained this model",
        "",
        f"- **Started from:** {record.get('base_model') or 'the bundled all-MiniLM-L6-v2'}",
        f"- **Data:** `{masked(record['data']['path'])}`: {rows.get('train', 0):,} training pairs, "
        f"{rows.get('heldout', 0):,} held out (split by question; the held-out pairs are in `heldout.parquet`)",
        f"- **Loss:** {loss.get('name', record['kind'])}"
        + (f" + {loss['distill']['term']} distillation (weight {loss['distill']['weight']})"
           if loss.get("distill") else ""),
        f"- **Negatives:** {_negatives_text(training)}",
        f"- **Steps:** {training['steps']} of {training['global_batch_size']} pairs ({training['workers']} "
        f"worker{'s' if training['workers'] != 1 else ''}), {training['train_seconds']:.0f} s of training, "
        f"{training['pairs_per_s']} pairs/s",
        "",
    ]
    before, final = metrics.get("before"), metrics.get("final")
    if final:
        lines += ["| held-out | " + " | ".join(final) + " |", "|---|" + "---|" * len(final)]
        if before:
            lines.append("| before training | " + " | ".join(f"{before[k]:.4f}" for k in final) + " |")
        lines.append(f"| after {training['steps']} steps | " + " | ".join(f"{final[k]:.4f}" for k in final) + " |")
        lines.append("")
    lines += [f"The loss and held-out metrics over the steps: [{CURVES_FILE}]({CURVES_FILE}). Everything about the "
              "run (config, versions, the held-out metrics at each evaluation) is in `denseqa.json`.", "",
              "Load it from this folder:", "", "```python"]
    if record["kind"] == "reranker":
        lines += ["from sentence_transformers import CrossEncoder", "",
                  'model = CrossEncoder("path/to/this/folder")',
                  'scores = model.predict([("a question", "a passage")])']
    else:
        prompts = record.get("prompts") or {}
        query = f', prompt="{prompts["query"]}"' if prompts.get("query") else ""
        passage = f', prompt="{prompts["passage"]}"' if prompts.get("passage") else ""
        lines += ["from sentence_transformers import SentenceTransformer", "",
                  'model = SentenceTransformer("path/to/this/folder")',
                  f'questions = model.encode(["a question"]{query}, normalize_embeddings=True)',
                  f'passages = model.encode(["a passage"]{passage}, normalize_embeddings=True)']
    lines += ["```", "", "or serve a search over your passages with it: `denseqa build-index --model "
              "path/to/this/folder ...`, then `denseqa serve`.", ""]
    return "\n".join(lines)


def _negatives_text(training: dict[str, Any]) -> str:
    hard = training.get("hard_negatives") or {}
    text = f"{training.get('negatives_per_question', 'in-batch')} per question"
    if not hard.get("per_pair"):
        return text + " (the other pairs' answers in the gathered batch)"
    mined = hard.get("mined") or {}
    method = f", mined by {mined['method']}" if mined.get("method") else ""
    return text + f", of which {hard['per_pair']} hard negative(s) per pair{method}"
