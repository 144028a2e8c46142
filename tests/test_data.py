"""Ray Data ingest: cleaning counts, a deterministic held-out split by question, and the training columns."""

from __future__ import annotations

import pytest

import denseqa.data as data
from denseqa.config import DataConfig
from denseqa.data import load_qa_data


@pytest.mark.parametrize("local_sort_max_rows", [100_000, 0], ids=["sorted-here", "sorted-by-ray-data"])
def test_split_is_deterministic_grouped_by_question_and_counts_drops(ray_local, qa_parquet, monkeypatch,
                                                                      local_sort_max_rows):
    monkeypatch.setattr(data, "LOCAL_SORT_MAX_ROWS", local_sort_max_rows)
    # Given 60 pairs where questions repeat in threes, plus 3 rows with empty texts
    questions = [f"question {i // 3}" for i in range(60)] + ["", None, "q"]
    answers = [f"answer {i}" for i in range(60)] + ["a", "b", "  "]
    path = qa_parquet(Q=questions, A=answers)
    # (8 held out cuts through a question's three rows: the cut moves to the end of that question)
    cfg = DataConfig(path=path, question_column="Q", answer_column="A", heldout_size=8, split_seed=3)
    # When it is loaded twice
    first, second = load_qa_data(cfg), load_qa_data(cfg)
    # Then the drops are counted, the split has the asked size rounded up to whole questions, is the same both
    # times, and no held-out question appears in training (repeats of a question stay on one side)
    assert first.counts == {"read": 63, "dropped": 3, "heldout": 9, "train": 51}
    assert first.heldout == second.heldout
    train_rows = first.train.take_all()
    assert set(train_rows[0]) == {"question", "answer"}
    assert [r["answer"] for r in train_rows] == [r["answer"] for r in second.train.take_all()]
    heldout_questions = {q for q, _ in first.heldout}
    assert not heldout_questions & {r["question"] for r in train_rows}
    assert len({a for _, a in first.heldout} | {r["answer"] for r in train_rows}) == 60
    # And another seed gives another split
    other = load_qa_data(DataConfig(path=path, question_column="Q", answer_column="A", heldout_size=8, split_seed=4))
    assert {q for q, _ in other.heldout} != heldout_questions


def test_distillation_names_the_file_of_a_folder_that_lacks_the_teacher_scores(tmp_path):
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from denseqa.data import teacher_columns
    from denseqa.errors import InputError

    # Given a folder of mined pairs where only the first file has the teacher's scores
    pairs = {"question": ["q"], "answer": ["a"], "negative_1": ["n"]}
    pq.write_table(pa.table({**pairs, "teacher_answer": [1.0], "teacher_negative_1": [0.5]}), tmp_path / "0.parquet")
    pq.write_table(pa.table(pairs), tmp_path / "1.parquet")
    files = [str(tmp_path / "0.parquet"), str(tmp_path / "1.parquet")]
    # When distillation checks them, Then the second file is named, in one line, not a pyarrow KeyError
    with pytest.raises(InputError, match=r"1\.parquet: train.distill needs the teacher's scores and column "
                                         r"'teacher_answer' is missing"):
        teacher_columns(pafs.LocalFileSystem(), files, ["negative_1"], str(tmp_path))


def test_each_workers_batches_are_the_same_on_every_load(ray_local, tmp_path):
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .conftest import real_pairs

    # Given 400 real pairs in 4 files, 40 of their questions asked again in another file with another answer,
    # loaded by three jobs one after the other (a run, then a run resumed by a new job)
    pairs = real_pairs(400, seed=5).select(["question", "answer"])
    repeats = pa.table({"question": pairs.column("question").slice(0, 40),
                        "answer": pairs.column("answer").slice(360, 40)}).cast(pairs.schema)
    path = tmp_path / "pairs"
    path.mkdir()
    for i in range(4):
        pq.write_table(pa.concat_tables([pairs.slice(100 * i, 100), repeats.slice(10 * (3 - i), 10)]),
                       path / f"part-{i}.parquet")

    def batches_per_worker() -> list[list[str]]:
        # What train_loop_per_worker reads: two workers' shares of the training split, in shuffled batches of 8
        shards = load_qa_data(DataConfig(path=str(path), heldout_size=40)).train.streaming_split(2, equal=True)
        out: list[list[str]] = [[], []]

        def consume(rank: int) -> None:
            for b in shards[rank].iter_batches(batch_size=8, drop_last=True, batch_format="numpy",
                                               local_shuffle_buffer_size=64, local_shuffle_seed=42):
                out[rank].append("|".join(b["question"]))

        threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    # When each load's training split is read as the two workers of a run read it
    first = batches_per_worker()
    # Then every load gives each worker the same batches in the same order (the sort's block boundaries are fixed,
    # not sampled), so the batches a checkpoint skips on resume are the ones it trained on
    assert len(first[0]) == len(first[1]) >= 20
    assert batches_per_worker() == first and batches_per_worker() == first


def test_the_sort_in_this_process_makes_the_blocks_ray_datas_sort_makes(ray_local, tmp_path, monkeypatch):
    """The split's sort runs in the job's process up to data.LOCAL_SORT_MAX_ROWS rows read, and in Ray Data's tasks
    above: the two must give the same held-out pairs and the same training rows in the same blocks, or a run's
    batches would depend on its data's size."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from .conftest import real_pairs

    # Given 330 real pairs with hard negatives in 3 files (one of large strings), 30 of their questions asked again
    # with another answer, and 3 rows with an empty text
    pairs = real_pairs(300, seed=8).select(["question", "answer"])
    pairs = pairs.append_column("negative_1", pairs.column("answer").take(list(range(1, 300)) + [0]))
    repeats = pa.table({"question": pairs.column("question").slice(0, 30), "answer": pairs.column("answer")
                        .slice(200, 30), "negative_1": pairs.column("answer").slice(100, 30)})
    blanks = pa.table({"question": ["", None, "q"], "answer": ["a", "b", " "], "negative_1": ["n", "n", "n"]})
    path = tmp_path / "pairs"
    path.mkdir()
    pq.write_table(pairs.slice(0, 150), path / "part-0.parquet")
    pq.write_table(pa.concat_tables([pairs.slice(150), blanks.cast(pairs.schema)]), path / "part-1.parquet")
    pq.write_table(repeats.cast(pa.schema([(c, pa.large_string()) for c in repeats.column_names])),
                   path / "part-2.pq")  # (a suffix Ray Data skips unless told)
    # (blocks of 50 rows: 7 key ranges, as a 350,000-row file would have)
    monkeypatch.setattr(data, "ROWS_PER_SORTED_BLOCK", 50)
    cfg = DataConfig(path=str(path), heldout_size=40, num_negatives=1)

    def load() -> tuple[dict, list, list[list[dict]]]:
        loaded = data.load_qa_data(cfg)
        blocks = [t.to_pylist() for t in ray.get(loaded.train.to_arrow_refs()) if t.num_rows]
        return loaded.counts, loaded.heldout, blocks

    # When it is loaded with the sort here (333 rows read), and with Ray Data's sort (the limit set below them)
    here = load()
    monkeypatch.setattr(data, "LOCAL_SORT_MAX_ROWS", 0)
    in_ray_data = load()
    # Then the counts, the held-out pairs and each block of training rows are the same
    assert here[0] == in_ray_data[0] and here[0]["read"] == 333 and here[0]["dropped"] == 3
    assert here[1] == in_ray_data[1]
    assert len(here[2]) >= 6 and here[2] == in_ray_data[2]
