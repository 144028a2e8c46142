"""The evaluation report's statistics (issue 19, part 4): per-question reciprocal ranks, the paired bootstrap
intervals, and TREC files that trec_eval (here pytrec_eval) reads back into the report's own figures."""

from __future__ import annotations

import numpy as np
import pytest

from denseqa.eval import compare_modes, paired_interval, reciprocal_ranks, retrieval_metrics, write_trec


def _rankings(seed: int, n: int = 300, docs: int = 50, skill: float = 0.5):
    """n questions, each with 1-2 relevant docs among `docs`, ranked by a system that puts a relevant one first
    with probability `skill`, else shuffles."""
    rng = np.random.default_rng(seed)
    relevant, ranked = [], []
    for i in range(n):
        rel = {f"d{i % docs}"} | ({f"d{(i + 7) % docs}"} if i % 3 == 0 else set())
        order = [f"d{j}" for j in rng.permutation(docs)]
        if rng.random() < skill:
            first = sorted(rel)[0]
            order.remove(first)
            order.insert(0, first)
        relevant.append(rel)
        ranked.append(order[:20])
    return ranked, relevant


def test_trec_files_read_by_pytrec_eval_give_the_reports_figures(tmp_path):
    import pytrec_eval

    # Given two systems' rankings (ids with a space and a percent sign, which TREC files cannot hold as they are)
    good, relevant = _rankings(0, skill=0.7)
    weak, _ = _rankings(1, skill=0.2)
    good = [[doc.replace("d1", "d 1%") for doc in row] for row in good]
    weak = [[doc.replace("d1", "d 1%") for doc in row] for row in weak]
    relevant = [{doc.replace("d1", "d 1%") for doc in rel} for rel in relevant]
    questions = [f"question {i}\twith a tab" for i in range(len(relevant))]
    written = write_trec(str(tmp_path), {"dense": good, "zero-shot": weak}, relevant, questions)
    assert written == {"qrels": "qrels.txt", "queries": "queries.tsv",
                       "runs": {"dense": "runs/dense.trec", "zero-shot": "runs/zero-shot.trec"}}
    lines = (tmp_path / "queries.tsv").read_text().splitlines()
    assert len(lines) == len(questions) and lines[3] == "q3\tquestion 3 with a tab"

    # When trec_eval's measures are computed from the files alone
    def read(path):
        table = {}
        for line in (tmp_path / path).read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                table.setdefault(parts[0], {})[parts[2]] = int(parts[3])
            else:
                table.setdefault(parts[0], {})[parts[2]] = float(parts[4])
        return table

    qrels = read(written["qrels"])
    for mode, ranked in (("dense", good), ("zero-shot", weak)):
        run = read(written["runs"][mode])
        top10 = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for q, docs in run.items()}
        at10 = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "ndcg_cut.10", "recall.10"}).evaluate(top10)
        at100 = pytrec_eval.RelevanceEvaluator(qrels, {"recall.100"}).evaluate(run)
        ours = retrieval_metrics(ranked, relevant)
        # Then they equal the report's, question by question for MRR@10
        rr = reciprocal_ranks(ranked, relevant)
        np.testing.assert_allclose([at10[f"q{i}"]["recip_rank"] for i in range(len(ranked))], rr, atol=1e-12)
        assert ours["mrr@10"] == pytest.approx(rr.mean(), abs=1e-9)
        assert ours["ndcg@10"] == pytest.approx(np.mean([v["ndcg_cut_10"] for v in at10.values()]), abs=1e-6)
        assert ours["recall@10"] == pytest.approx(np.mean([v["recall_10"] for v in at10.values()]), abs=1e-9)
        assert ours["recall@100"] == pytest.approx(np.mean([v["recall_100"] for v in at100.values()]), abs=1e-9)


def test_the_paired_interval_holds_the_difference_and_excludes_zero_only_for_a_real_one():
    good, relevant = _rankings(0, skill=0.7)
    weak, _ = _rankings(1, skill=0.3)
    noise, _ = _rankings(2, skill=0.7)
    a, b, c = (reciprocal_ranks(r, relevant) for r in (good, weak, noise))
    real = paired_interval(a, b)
    assert real["difference"] == pytest.approx(a.mean() - b.mean(), abs=1e-6)
    assert 0 < real["ci95"][0] < real["difference"] < real["ci95"][1]
    same_skill = paired_interval(a, c)
    assert same_skill["ci95"][0] < 0 < same_skill["ci95"][1]
    assert paired_interval(a, a) == {"difference": 0.0, "ci95": [0.0, 0.0]}
    # Seeded: the same report twice has the same intervals
    assert paired_interval(a, b) == real
    # One question (--max-queries 1): its difference, and no interval rather than an error
    assert compare_modes({"dense": np.array([1.0]), "bm25": np.array([0.5])}, None)["vs_best"]["bm25"] == \
        {"difference": -0.5, "ci95": None}


def test_a_question_without_any_hit_counts_in_the_trec_tools_means_as_in_the_report(tmp_path):
    import pytrec_eval

    # Given BM25 finding nothing for the second question (stopwords only)
    ranked, relevant = [["a", "b"], []], [{"b"}, {"c"}]
    written = write_trec(str(tmp_path), {"bm25": ranked}, relevant, ["first", "the of"])
    qrels = {f"q{i}": {doc: 1 for doc in rel} for i, rel in enumerate(relevant)}
    run: dict = {}
    for line in (tmp_path / written["runs"]["bm25"]).read_text().splitlines():
        qid, _, doc, _, score, _ = line.split()
        run.setdefault(qid, {})[doc] = float(score)
    # When pytrec_eval reads the run, Then both questions are in its mean, as in the report's (0.5 + 0) / 2
    measured = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run)
    assert set(measured) == {"q0", "q1"} and measured["q1"]["recip_rank"] == 0.0
    assert np.mean([m["recip_rank"] for m in measured.values()]) == retrieval_metrics(ranked, relevant)["mrr@10"]


def test_every_mode_is_compared_with_the_best_and_with_the_starting_model():
    good, relevant = _rankings(0, skill=0.7)
    per_query = {"dense": reciprocal_ranks(good, relevant),
                 "bm25": reciprocal_ranks(_rankings(3, skill=0.5)[0], relevant),
                 "zero-shot": reciprocal_ranks(_rankings(4, skill=0.3)[0], relevant)}
    comparison = compare_modes(per_query, "zero-shot")
    assert comparison["best"] == "dense" and set(comparison["vs_best"]) == {"bm25", "zero-shot"}
    assert set(comparison["vs_zero_shot"]) == {"dense", "bm25"}
    assert comparison["vs_zero_shot"]["dense"]["ci95"][0] > 0  # fine-tuning's gain, surely above zero
    assert all(c["difference"] < 0 for c in comparison["vs_best"].values())
    assert "vs_zero_shot" not in compare_modes(per_query, None)


def test_held_out_pairs_in_parts_of_different_string_and_id_types_are_read_as_one(tmp_path):
    """check_schema accepts string and large_string parts, int32 and int64 ids, and an all-null part; joining them
    must too (it used to fail in concat_tables with a traceback)."""
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from denseqa.config import EvalConfig
    from denseqa.eval import load_judgements

    folder = tmp_path / "heldout"
    folder.mkdir()
    pq.write_table(pa.table({"question": pa.array(["q1", "q2"], pa.string()),
                             "answer": pa.array(["a1", "a2"], pa.string()),
                             "pid": pa.array([1, 2], pa.int32())}), folder / "part-0.parquet")
    pq.write_table(pa.table({"question": pa.array(["q3"], pa.large_string()),
                             "answer": pa.array([None], pa.null()),
                             "pid": pa.array([3], pa.int64())}), folder / "part-1.parquet")
    searcher = SimpleNamespace(docstore=pa.table({"id": ["1", "2", "3"], "text": ["a1", "a2", "a3"]}),
                               deleted=np.zeros(0, dtype=np.int64))
    by_text = load_judgements(EvalConfig(index="idx", queries=str(folder)), searcher)
    assert by_text.questions == ["q1", "q2"] and by_text.relevant == [{"1"}, {"2"}]
    by_id = load_judgements(EvalConfig(index="idx", queries=str(folder), relevant_id_column="pid"), searcher)
    assert by_id.questions == ["q1", "q2", "q3"] and by_id.relevant == [{"1"}, {"2"}, {"3"}]
