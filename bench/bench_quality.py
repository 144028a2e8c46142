"""The full recipe, measured (issue 19, part 5): an ablation on the Debian English evaluation, on one machine.

The split and corpus of bench_index.py, bench_negatives.py and bench_rerank.py: 2,000 pairs held out by question,
searched among 10,000 answers. To keep a 2-core machine's day for it, training uses the held-out pairs plus
``--train-pairs`` (8,000) others of the data: the held-out split is the same (it takes the pairs with the
smallest split keys, and those are all in the subset), and 100 steps of 32 see 3,200 pairs anyway. Each
bi-encoder trains ``--steps`` (100) steps of ``--batch-size`` (32) from the bundled all-MiniLM-L6-v2, learning
rate ``--learning-rate`` (3e-5), 128 tokens, 1 worker with 2 torch threads. The rows:

1. zero-shot: the bundled model, untrained;
2. in-batch negatives;
3. + one BM25 hard negative per pair (mine-negatives);
4. + distillation: a reranker (train-reranker on the mined pairs, ``--reranker-steps``) scores every mined
   pair's answer and negative (the teacher step of ``denseqa run --distill-reranker``), and the bi-encoder trains
   with MNRL + MarginMSE on those scores;
5. row 4's hybrid (dense + Kiwi/regex BM25, RRF);
6. row 5 re-ranked: its first ``--rerank-candidates`` hits re-ordered by the reranker;
7. against: sentence-transformers' own ``SentenceTransformerTrainer`` with ``MultipleNegativesRankingLoss`` at
   the same steps and batch (in-batch negatives: compare with row 2).

With ``--second-round-steps N``, row 3's model mines one negative per pair from its own rankings (``mine-negatives
--mine.method dense``) and trains N more steps from where it stopped on them: the second round of ANCE (Xiong et al.
2021) and Tevatron's recipes, aimed at the near-siblings the first round still confuses. Its row follows row 3.
``--second-round-negatives 1,3`` gives a round-2 row for each count of mined negatives per pair (default 1).

With ``--bm25-variant NAME "ARGS"`` (repeatable), row 3 trains again from the bundled model on the same mined pairs
with ``ARGS`` added to its training command (a loss option, say), and gets a row of its own compared with row 3.
``{bm25}`` in ``ARGS`` is row 3's model folder: ``"--model {bm25} --max-steps 200 --max-seq-length 256"`` trains on
from it instead.

With ``--index-max-seq-length N``, every trained dense row is indexed again at N tokens (training stays at 128
unless a variant's ``ARGS`` say otherwise) and gets a row of its own beside it. ``--batch-size`` above 32 wants
``--cached-loss`` (GradCache), whose memory stays that of a 32-text slice.

Each row: MRR@10, Recall@1/10 and the difference from the row above with its 95% paired bootstrap interval (from
the TREC runs the evaluations write, per question), and the wall time of each part. Every finished part is kept in
``--work`` and reused, so an interrupted run goes on where it stopped.

    python bench/bench_quality.py --work /tmp/bench/quality

Needs ../shared/data. Results go to bench/results/quality.json after each part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from bench_negatives import DATA, REPO, corpus_of, denseqa  # noqa: E402 (bench/, this script's folder)
from results_file import ResultsFile  # noqa: E402

sys.path.insert(0, str(REPO))
HELDOUT = 2000


def subset(work: Path, train_pairs: int) -> Path:
    """The held-out pairs of the full data's split, plus ``train_pairs`` others (seeded)."""
    from denseqa.config import DataConfig
    from denseqa.texts import split_key

    path = work / "subset.parquet"
    if path.exists():
        return path
    table = pq.read_table(DATA)
    seed = DataConfig().split_seed
    keys = np.array([split_key(q, seed) for q in table.column("question").to_pylist()], dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    held, rest = order[:HELDOUT], order[HELDOUT:]
    # A question on both sides of the cut goes with the held-out ones, as the split keeps a question's rows together.
    rest = rest[keys[rest] != keys[held[-1]]]
    picked = np.random.default_rng(0).choice(rest, train_pairs, replace=False)
    pq.write_table(table.take(np.sort(np.concatenate([held, picked]))), path)
    return path


class Ablation:
    def __init__(self, work: Path, results: ResultsFile, args: argparse.Namespace) -> None:
        self.work, self.results, self.args = work, results, args
        self.data = str(subset(work, args.train_pairs))
        self.split = ["--heldout-size", str(HELDOUT), "--heldout-max", str(HELDOUT)]
        # Every row trains exactly --steps: as many epochs as that takes, since mining keeps only the pairs that got
        # all their negatives, and one epoch of them can be shorter than --steps.
        epochs = -(-args.steps * args.batch_size // args.train_pairs) + 1
        self.train_args = ["--max-steps", str(args.steps), "--epochs", str(epochs),
                           "--eval-every-steps", str(args.eval_every_steps or args.steps),
                           "--batch-size", str(args.batch_size), "--max-seq-length", "128",
                           "--learning-rate", str(args.learning_rate),
                           "--num-workers", "1", "--cpus-per-worker", "1", "--torch-threads", str(os.cpu_count()),
                           "--log-every-steps", "20"]
        if args.cached_loss:
            # GradCache (Gao et al. 2021): a large batch in 32-text slices, so its memory stays that of one slice.
            self.train_args += ["--cached-loss", "--mini-batch-size", "32"]

    def timed(self, key: str, make, done: Path) -> Path:
        """Run ``make()`` unless ``done`` exists; the part's wall time is kept in the results."""
        if not done.exists():
            started = time.time()
            make()
            self.results.save(f"seconds/{key}", round(time.time() - started, 1))
        return done.parent

    def train(self, name: str, data: str, *extra: str) -> Path:
        out = self.work / name

        def make():
            shutil.rmtree(str(out) + ".run", ignore_errors=True)
            denseqa("train", "--data", data, "--output", str(out), "--overwrite", *self.split, *self.train_args,
                    *extra)
        self.timed(name, make, out / "denseqa.json")
        # The held-out metrics at each of training's evaluations (the 2,000 held-out questions among their own
        # answers, not the 10,000 of the table): with --eval-every-steps, the learning curve.
        record = json.loads((out / "denseqa.json").read_text())
        self.results.save(f"curve/{name}", {
            "precision": record["training"]["precision"], "pairs_per_s": record["training"]["pairs_per_s"],
            "heldout": [{"step": e["step"], **{k: round(e["metrics"][k], 4) for k in ("mrr@10", "recall@10")}}
                        for e in record["metrics"]["history"]]})
        return out

    def mine(self, name: str = "mined", *extra: str, negatives: int = 1) -> str:
        out = self.work / name
        self.timed(name, lambda: denseqa("mine-negatives", "--data", self.data, *self.split, "--mine.output",
                                         str(out), "--mine.overwrite", "--mine.num-negatives", str(negatives),
                                         *extra),
                   out / "negatives.json")
        return str(out)

    def reranker(self, mined: str) -> Path:
        out = self.work / "reranker"

        def make():
            shutil.rmtree(str(out) + ".run", ignore_errors=True)
            denseqa("train-reranker", "--data", mined, "--output", str(out), "--overwrite", *self.split,
                    "--max-steps", str(self.args.reranker_steps), "--eval-every-steps", str(self.args.reranker_steps),
                    "--batch-size", "16", "--max-seq-length", "128", "--learning-rate", "5e-5",
                    "--in-batch-negatives", "2", "--num-workers", "1", "--cpus-per-worker", "1",
                    "--torch-threads", str(os.cpu_count()))
        return self.timed("reranker", make, out / "denseqa.json")

    def teacher(self, mined: str, reranker: Path) -> str:
        from denseqa.config import COMMAND_SECTIONS, JobConfig
        from denseqa.drivers.mine_negatives import run_teacher_scoring

        out = self.work / "taught"
        self.timed("teacher", lambda: run_teacher_scoring(JobConfig.from_dict(
            {"data": {"path": mined}, "mine": {"teacher": str(reranker), "output": str(out), "overwrite": True}},
            "bench", COMMAND_SECTIONS["mine-negatives"])), out / "negatives.json")
        return str(out)

    def sentence_transformers_trainer(self, heldout: Path) -> Path:
        """MNRL through SentenceTransformerTrainer on the same training pairs (the held-out ones removed)."""
        out = self.work / "st-trainer"

        def make():
            from datasets import Dataset
            from sentence_transformers import (
                SentenceTransformer,
                SentenceTransformerTrainer,
                SentenceTransformerTrainingArguments,
            )
            from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

            from denseqa.model import bundled_model_path

            held = set(pq.read_table(heldout).column("question").to_pylist())
            table = pq.read_table(self.data, columns=["question", "answer"])
            rows = [r for r in table.to_pylist() if r["question"] not in held]
            model = SentenceTransformer(str(bundled_model_path()), device="cpu")
            model.max_seq_length = 128
            arguments = SentenceTransformerTrainingArguments(
                output_dir=str(self.work / "st-trainer.run"), max_steps=self.args.steps,
                per_device_train_batch_size=self.args.batch_size, learning_rate=self.args.learning_rate,
                warmup_ratio=0.1,
                batch_sampler="no_duplicates", save_strategy="no", report_to=[], seed=42, logging_steps=20)
            SentenceTransformerTrainer(model=model, args=arguments, train_dataset=Dataset.from_list(rows),
                                       loss=MultipleNegativesRankingLoss(model)).train()
            model.save(str(out))
            (out / "trained.json").write_text(json.dumps({"steps": self.args.steps}))
        return self.timed("st-trainer", make, out / "trained.json")

    def evaluate(self, name: str, model: Path | None, heldout: Path, max_seq_length: int = 128) -> dict:
        """Index the corpus with ``model`` (the bundled one if None), truncating at ``max_seq_length`` tokens, and
        evaluate it on the held-out questions."""
        index, report_dir = self.work / f"index-{name}", self.work / f"eval-{name}"
        corpus = self.work / "corpus.parquet"
        if not corpus.exists():
            pq.write_table(corpus_of(pq.read_table(heldout), self.args.corpus), corpus)
        model_args = [*(["--model", str(model)] if model else []), "--max-seq-length", str(max_seq_length)]
        self.timed(f"index-{name}", lambda: denseqa(
            "build-index", "--corpus", str(corpus), "--from-answers", "--output", str(index), "--overwrite",
            "--factory", "Flat", *model_args), index / "manifest.json")
        self.timed(f"eval-{name}", lambda: denseqa(
            "evaluate", "--index", str(index), "--queries", str(heldout), "--output", str(report_dir),
            "--overwrite", "--no-zero-shot"), report_dir / "eval.json")
        return json.loads((report_dir / "eval.json").read_text()) | {"folder": str(report_dir)}

    def reranked(self, report: dict, mode: str, reranker: Path) -> np.ndarray:
        """Per-question MRR@10 of ``mode``'s ranking with its first ``--rerank-candidates`` hits re-ordered by the
        reranker (only this mode: the evaluation job's --reranker re-ranks every mode, three times the pairs)."""
        path = self.work / f"rerank-{mode}.npy"
        if not path.exists():
            from denseqa.eval import reciprocal_ranks as per_question
            from denseqa.rerank import Reranker, rerank_order
            from denseqa.texts import text_id

            started = time.time()
            qids, questions, relevant, ranked = trec(report, mode)
            texts = {text_id(t): t for t in pq.read_table(self.work / "corpus.parquet").column("answer").to_pylist()}
            model = Reranker(str(reranker))
            n = self.args.rerank_candidates
            orders = []
            for qid in qids:
                head = ranked[qid][:n]
                scores = model.scores([(questions[qid], texts[doc]) for doc in head])
                orders.append([head[i] for i in rerank_order(scores)] + ranked[qid][n:])
            np.save(path, per_question(orders, [relevant[q] for q in qids]))
            self.results.save(f"seconds/rerank-{mode}", round(time.time() - started, 1))
        return np.load(path)


def trec(report: dict, mode: str) -> tuple[list[str], dict[str, str], dict[str, set[str]], dict[str, list[str]]]:
    """A report's TREC files read back: question ids in order, their texts, relevant ids and ``mode``'s ranking."""
    folder, files = Path(report["folder"]), report["trec"]
    relevant: dict[str, set[str]] = {}
    for line in (folder / files["qrels"]).read_text().splitlines():
        q, _, doc, _ = line.split()
        relevant.setdefault(q, set()).add(doc)
    questions = dict(line.split("\t", 1) for line in (folder / files["queries"]).read_text().splitlines())
    ranked: dict[str, list[str]] = {q: [] for q in questions}
    for line in (folder / files["runs"][mode]).read_text().splitlines():
        q, _, doc, _, _, _ = line.split()
        ranked[q].append(doc)
    return sorted(questions, key=lambda q: int(q[1:])), questions, relevant, ranked


def table_row(label: str, mode: str, metrics: dict) -> dict:
    """One row of the ablation table: an evaluation mode's MRR@10 and Recall@1/10, rounded."""
    return {"row": label, "mode": mode, **{k: round(metrics[k], 4) for k in ("mrr@10", "recall@1", "recall@10")}}


def reciprocal_ranks(report: dict, mode: str) -> np.ndarray:
    """Per-question MRR@10 from the report's TREC run, in the report's question order."""
    from denseqa.eval import reciprocal_ranks as per_question

    qids, _, relevant, ranked = trec(report, mode)
    return per_question([ranked[q] for q in qids], [relevant.get(q, set()) for q in qids])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/bench/quality")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every-steps", type=int, default=None,
                        help="held-out evaluation inside training every this many steps (default: at the end only); "
                        "its log is the learning curve")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-5)
    parser.add_argument("--cached-loss", action="store_true",
                        help="train the bi-encoders with the cached loss (GradCache), for batches above 32")
    parser.add_argument("--train-pairs", type=int, default=8000)
    parser.add_argument("--corpus", type=int, default=10_000)
    parser.add_argument("--reranker-steps", type=int, default=200)
    parser.add_argument("--rerank-candidates", type=int, default=20)
    parser.add_argument("--upto", default="st-trainer", help="stop after this row: zero-shot, in-batch, bm25, "
                                                             "distill, st-trainer")
    parser.add_argument("--index-max-seq-length", type=int, default=None,
                        help="also index each trained row's model at this many tokens (training stays at 128) and "
                        "add a row for it")
    parser.add_argument("--second-round-steps", type=int, default=0,
                        help="after the BM25-negatives row: mine a negative per pair with its model and train this "
                        "many more steps from it (0: no such row)")
    parser.add_argument("--second-round-negatives", default=[1], type=lambda text: [int(n) for n in text.split(",")],
                        help="negatives mined per pair for round 2, comma-separated: a round-2 row for each "
                        "(default 1)")
    parser.add_argument("--bm25-variant", nargs=2, action="append", default=[], metavar=("NAME", "ARGS"),
                        help="train the BM25-negatives row again with these training arguments added (repeatable); "
                        "{bm25} in ARGS stands for that row's model folder, e.g. \"--model {bm25} --max-steps 200\" "
                        "trains on from it")
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "quality.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ADDRESS", "local")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(args.results)
    ablation = Ablation(work, results, args)
    order = ["zero-shot", "in-batch", "bm25", "distill", "st-trainer"]
    wanted = order[:order.index(args.upto) + 1]

    in_batch = ablation.train("in-batch", ablation.data)
    heldout = in_batch / "heldout.parquet"
    reports = {"zero-shot": ablation.evaluate("zero-shot", None, heldout)}
    rows = [("zero-shot", "zero-shot", "dense"), ("in-batch", "in-batch", "dense")]
    reports["in-batch"] = ablation.evaluate("in-batch", in_batch, heldout)
    if "bm25" in wanted:
        mined = ablation.mine()
        first = ablation.train("bm25", mined)
        reports["bm25"] = ablation.evaluate("bm25", first, heldout)
        rows.append(("+ BM25 negatives", "bm25", "dense"))
        for negatives in args.second_round_negatives if args.second_round_steps else []:
            # One negative keeps the first round-2 run's folder names, so its finished parts are reused.
            suffix = "" if negatives == 1 else f"-neg{negatives}"
            mined_again = ablation.mine(f"mined-round2{suffix}", "--mine.method", "dense", "--model", str(first),
                                        negatives=negatives)
            second = ablation.train(f"round2{suffix}", mined_again, "--model", str(first),
                                    "--max-steps", str(args.second_round_steps),
                                    "--eval-every-steps", str(args.second_round_steps))
            reports[f"round2{suffix}"] = ablation.evaluate(f"round2{suffix}", second, heldout)
            each = "" if negatives == 1 else f" ({negatives} per pair)"
            rows.append((f"+ round 2: its own mined negatives{each}, {args.second_round_steps} more steps",
                         f"round2{suffix}", "dense"))
    variants = []
    for name, extra in args.bm25_variant if "bm25" in wanted else []:
        trained = ablation.train(f"bm25-{name}", mined, *extra.replace("{bm25}", str(first)).split())
        reports[f"bm25-{name}"] = ablation.evaluate(f"bm25-{name}", trained, heldout)
        variants.append((f"+ BM25 negatives, {name} ({extra})", f"bm25-{name}", "dense"))
    if "distill" in wanted:
        reranker = ablation.reranker(mined)
        taught = ablation.teacher(mined, reranker)
        student = ablation.train("distill", taught, "--distill", "margin_mse")
        reports["distill"] = ablation.evaluate("distill", student, heldout)
        rows += [("+ distillation (MarginMSE)", "distill", "dense"), ("hybrid", "distill", "hybrid")]
    table = []
    previous = None
    from denseqa.eval import paired_interval

    for label, report, mode in rows:
        metrics = reports[report]["modes"][mode]
        per_question = reciprocal_ranks(reports[report], mode)
        row = table_row(label, mode, metrics)
        if previous is not None:
            row["vs_previous"] = paired_interval(per_question, previous)
        previous = per_question
        table.append(row)
    if "distill" in wanted:
        per_question = ablation.reranked(reports["distill"], "hybrid", reranker)
        table.append({"row": f"+ rerank (first {args.rerank_candidates})", "mode": "hybrid+rerank",
                      "mrr@10": round(float(per_question.mean()), 4),
                      "vs_previous": paired_interval(per_question, previous)})
    if "st-trainer" in wanted:
        reports["st-trainer"] = ablation.evaluate("st-trainer", ablation.sentence_transformers_trainer(heldout),
                                                  heldout)
        metrics = reports["st-trainer"]["modes"]["dense"]
        table.append(table_row("SentenceTransformerTrainer, in-batch (compare: in-batch)", "dense", metrics) | {
                      "vs_in_batch": paired_interval(reciprocal_ranks(reports["st-trainer"], "dense"),
                                                     reciprocal_ranks(reports["in-batch"], "dense"))})
    for label, report, mode in variants:
        table.append(table_row(f"{label} (compare: + BM25 negatives)", mode, reports[report]["modes"][mode]) | {
                     "vs_bm25": paired_interval(reciprocal_ranks(reports[report], mode),
                                                reciprocal_ranks(reports["bm25"], mode))})
    if args.index_max_seq_length:
        # The same models, their passages truncated later: 15 % of the corpus's answers are longer than 128 tokens,
        # and a wrong first hit's answer is twice as often one of them (bench/quality_errors.py).
        longer = args.index_max_seq_length
        built_on_bm25 = {report for _label, report, _mode in rows + variants if report.startswith("round2")}
        built_on_bm25 |= {report for _label, report, _mode in variants}
        for label, report, _mode in [row for row in rows + variants
                                     if row[2] == "dense" and row[1] != "zero-shot"]:
            name = f"{report}-{longer}"
            reports[name] = ablation.evaluate(name, work / report, heldout, longer)
            metrics, at_longer = reports[name]["modes"]["dense"], reciprocal_ranks(reports[name], "dense")
            row = table_row(f"{label}, indexed at {longer} tokens (compare: {label})", "dense", metrics) | {
                "vs_128_tokens": paired_interval(at_longer, reciprocal_ranks(reports[report], "dense"))}
            if report in built_on_bm25:
                # What builds on the BM25-negatives row is judged against it at the same passage length too.
                row["vs_bm25_same_tokens"] = paired_interval(at_longer,
                                                             reciprocal_ranks(reports[f"bm25-{longer}"], "dense"))
            table.append(row)
    results.save("ablation", {"questions": reports["zero-shot"]["judgements"]["evaluated"], "corpus": args.corpus,
                              "steps": args.steps, "batch_size": args.batch_size, "train_pairs": args.train_pairs,
                              "learning_rate": args.learning_rate, "cached_loss": args.cached_loss,
                              "second_round_steps": args.second_round_steps,
                              "second_round_negatives": args.second_round_negatives,
                              "bm25_variants": dict(args.bm25_variant),
                              "table": table})


if __name__ == "__main__":
    main()
