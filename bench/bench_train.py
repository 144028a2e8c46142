"""Training benchmarks for BENCHMARKS.md (issue 2), all measured in one run on one machine.

1. Throughput (pairs/s) of denseqa's Ray Train job at its defaults against sentence-transformers' own
   ``SentenceTransformerTrainer`` at its own (same model, data and batch size), on pairs sampled at random.
2. The cost of the cross-device gather: 2 workers with gather on and off.
3. Held-out Recall@10 and MRR@10 before and after a short training on the Debian English data.

    python bench/bench_train.py --out bench/results/train.json

Needs the `bench` extra (pip install -e '.[bench]') and ../shared/data. Throughput excludes evaluation
and start-up on both sides: denseqa's figure is the record's `pairs_per_s` (training steps only, data loading
included), the baseline's is steps * batch / `train_runtime` of ``trainer.train()`` without evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "debian-packages-en.parquet"


def denseqa_run(data: str, out: str, *args: str) -> dict:
    from denseqa.cli import main

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out + ".run", ignore_errors=True)
    rc = main(["train", "--data", data, "--output", out, *args])
    assert rc == 0, f"denseqa train failed with {rc}"
    return json.loads((Path(out) / "denseqa.json").read_text())


def sentence_transformers_run(data: str, steps: int, batch_size: int, max_seq_length: int | None = None,
                              threads: int | None = None, bf16: bool = False) -> dict:
    """pairs/s and peak RSS of ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` on the same pairs,
    in a fresh process (so its memory is its own). ``None``: the library's default (the model's max_seq_length,
    torch's threads)."""
    import subprocess
    import sys

    args = json.dumps({"data": data, "steps": steps, "batch_size": batch_size, "max_seq_length": max_seq_length,
                       "threads": threads, "bf16": bf16})
    out = subprocess.run([sys.executable, __file__, "--sentence-transformers-baseline", args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _sentence_transformers_baseline(args: dict) -> None:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    from denseqa.model import bundled_model_path
    from denseqa.provenance import peak_rss_mb

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    table = pq.read_table(args["data"], columns=["question", "answer"])
    dataset = Dataset.from_dict({"anchor": table.column("question").to_pylist(),
                                 "positive": table.column("answer").to_pylist()})
    model = SentenceTransformer(str(bundled_model_path()), device="cpu")
    if args["max_seq_length"]:
        model.max_seq_length = args["max_seq_length"]
    with tempfile.TemporaryDirectory() as tmp:
        training_args = SentenceTransformerTrainingArguments(
            output_dir=tmp, max_steps=args["steps"], per_device_train_batch_size=args["batch_size"],
            learning_rate=2e-5, warmup_ratio=0.1, logging_steps=10_000, save_strategy="no", report_to=[],
            dataloader_drop_last=True, use_cpu=True, seed=42, bf16=args.get("bf16", False),
        )
        trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset,
                                             loss=MultipleNegativesRankingLoss(model))
        metrics = trainer.train().metrics
    print(json.dumps({"pairs_per_s": round(args["steps"] * args["batch_size"] / metrics["train_runtime"], 2),
                      "peak_rss_mb": peak_rss_mb(), "torch_threads": torch.get_num_threads(),
                      "max_seq_length": model.max_seq_length}))


def step_times(data: str, steps: int, batch_size: int) -> dict:
    """Seconds per optimizer step in this one process, no Ray: denseqa's step (its loss on its own tokenisation,
    ``denseqa.train.contrastive_loss``) against sentence-transformers' MNRL on the trainer's features, the same
    batches, model and threads (torch's default). Separates what the library computes from what Ray adds."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from denseqa.losses import DuplicateMaskedMultipleNegativesRankingLoss
    from denseqa.model import bundled_model_path
    from denseqa.train import contrastive_loss

    table = pq.read_table(data, columns=["question", "answer"])
    questions, answers = table.column("question").to_pylist(), table.column("answer").to_pylist()
    out = {}
    for side in ("sentence_transformers_mnrl", "denseqa"):
        torch.manual_seed(0)
        model = SentenceTransformer(str(bundled_model_path()), device="cpu")
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
        if side == "denseqa":
            loss_fn = DuplicateMaskedMultipleNegativesRankingLoss(model, gather_across_devices=False)
        else:
            loss_fn = MultipleNegativesRankingLoss(model)
        seconds = []
        for step in range(steps):
            q, a = (c[step * batch_size:(step + 1) * batch_size] for c in (questions, answers))
            started = time.perf_counter()
            if side == "denseqa":
                loss = contrastive_loss(model, model, loss_fn, q, a)
            else:
                loss = loss_fn([model.preprocess(q), model.preprocess(a)], None)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - started)
        out[side] = {"first_step_s": round(seconds[0], 2),
                     "mean_step_s_after_first": round(float(np.mean(seconds[1:])), 2)}
    out["threads"] = torch.get_num_threads()
    return out


def random_sample(rows: int, path: Path, seed: int = 0) -> None:
    """``rows`` pairs drawn at random from the English Debian set, as a new user would sample their data."""
    import numpy as np

    full = pq.read_table(DATA)
    picked = np.sort(np.random.default_rng(seed).choice(full.num_rows, size=rows, replace=False))
    pq.write_table(full.take(picked), path)


def main() -> None:
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--sentence-transformers-baseline":
        _sentence_transformers_baseline(json.loads(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000, help="pairs sampled at random for the throughput runs")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per throughput run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-length", type=int, default=128, help="of the gather and quality runs")
    p.add_argument("--quality-steps", type=int, default=300, help="steps of the short training (0: skip)")
    p.add_argument("--heldout", type=int, default=1000, help="held-out pairs for the quality figures")
    p.add_argument("--parts", default="throughput,gather,quality", help="comma-separated parts to run")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = Path(tempfile.mkdtemp(prefix="denseqa-bench-"))
    sample = work / "sample.parquet"
    random_sample(a.rows, sample)
    common = ["--batch-size", str(a.batch_size), "--max-seq-length", str(a.max_seq_length),
              "--max-steps", str(a.steps), "--eval-every-steps", str(a.steps), "--heldout-size", "50",
              "--log-every-steps", "10"]
    machine = f"{platform.node()} {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    results: dict = {"machine": machine,
                     "settings": vars(a), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    parts = set(a.parts.split(","))
    threads = os.cpu_count() or 1
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(key: str, value: dict) -> None:
        results[key] = value
        print(json.dumps({key: value}, indent=1), flush=True)
        out.write_text(json.dumps(results, indent=1))  # after each part, so a long run keeps what it measured

    # 1. What a user gets: `jobs/train.py --data --output --max-steps` and nothing else, against the trainer
    #    with the same model and batch and its own defaults (the model's max_seq_length, torch's threads).
    if "throughput" in parts:
        st = sentence_transformers_run(str(sample), a.steps, a.batch_size)
        one = denseqa_run(str(sample), str(work / "one"), "--max-steps", str(a.steps))
        save("throughput", {
            "rows": a.rows, "steps": a.steps, "batch_size": a.batch_size,
            "sentence_transformers_trainer": st,
            "denseqa": {"pairs_per_s": one["training"]["pairs_per_s"],
                        "peak_rss_mb_per_worker": [m["rss"] for m in one["training"]["peak_memory_mb_per_worker"]],
                        "torch_threads_per_worker": one["training"]["torch_threads_per_worker"],
                        "workers": one["training"]["workers"], "wall_time_s": one["wall_time_s"],
                        "precision": one["training"]["precision"]},
            "ratio": round(one["training"]["pairs_per_s"] / st["pairs_per_s"], 3),
        })

    # 1a. each side in the other's precision, hand-set: the trainer with bf16 autocast (its `bf16=True`), denseqa
    #     with fp32 (its default before train.precision auto)
    if "precision" in parts:
        st = sentence_transformers_run(str(sample), a.steps, a.batch_size, bf16=True)
        fp32 = denseqa_run(str(sample), str(work / "fp32"), "--max-steps", str(a.steps), "--precision", "fp32")
        save("precision", {"sentence_transformers_trainer_bf16": {**st, "flags": "bf16=True"},
                           "denseqa_fp32": {"flags": "--precision fp32",
                                            "pairs_per_s": fp32["training"]["pairs_per_s"],
                                            "peak_rss_mb_per_worker": [m["rss"] for m in
                                                                       fp32["training"]["peak_memory_mb_per_worker"]]}})

    # 1b. the same job with the torch threads of the old default (a worker's logical CPUs: 1 here), hand-set
    if "one_thread" in parts:
        one = denseqa_run(str(sample), str(work / "one-thread"), "--max-steps", str(a.steps),
                          "--torch-threads", "1")
        peaks = [m["rss"] for m in one["training"]["peak_memory_mb_per_worker"]]
        save("one_thread", {"flags": "--torch-threads 1", "pairs_per_s": one["training"]["pairs_per_s"],
                            "peak_rss_mb_per_worker": peaks})

    # 1c. the same step in one plain process: is a gap in the library or in what runs around it?
    if "step" in parts:
        save("step", {"steps": 8, "batch_size": a.batch_size, **step_times(str(sample), 8, a.batch_size)})

    # 2. gather on and off with 2 workers (1 thread each: one core per worker on this machine)
    if "gather" in parts:
        two = {}
        for gather in ("--gather", "--no-gather"):
            r = denseqa_run(str(sample), str(work / f"two{gather}"), *common, "--num-workers", "2", gather,
                            "--torch-threads", "1")
            two[gather.lstrip("-")] = r["training"]["pairs_per_s"]
        save("gather_2_workers", {"gather_pairs_per_s": two["gather"], "no_gather_pairs_per_s": two["no-gather"],
                                  "gather_cost": round(1 - two["gather"] / two["no-gather"], 3)})

    # 3. quality before/after a short training on the whole English data set (held-out pairs excluded)
    for part, flags in (("quality", ()), ("quality_fp32", ("--precision", "fp32"))):
        if part not in parts or not a.quality_steps:
            continue
        r = denseqa_run(str(DATA), str(work / "quality"), "--batch-size", str(a.batch_size), "--max-seq-length",
                        str(a.max_seq_length), "--max-steps", str(a.quality_steps), "--eval-every-steps",
                        str(a.quality_steps), "--heldout-size", str(a.heldout), "--heldout-max", str(a.heldout),
                        "--num-workers", "1", "--cpus-per-worker", "1", "--torch-threads", str(threads),
                        "--learning-rate", "3e-5", "--log-every-steps", "25", *flags)
        save(part, {"data": str(DATA.name), "rows": r["data"]["rows"], "steps": r["training"]["steps"],
                    "precision": r["training"]["precision"], "flags": " ".join(flags),
                    "global_batch_size": r["training"]["global_batch_size"],
                    "before": r["metrics"]["before"], "after": r["metrics"]["final"],
                    "wall_time_s": r["wall_time_s"], "train_seconds": r["training"]["train_seconds"]})

    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
