"""Staged outputs: a folder appears complete at its path, or not at all, locally and behind a URI."""

from __future__ import annotations

import json

import pytest

from denseqa import storage


@pytest.mark.parametrize("as_uri", [False, True], ids=["local", "file-uri"])
def test_a_staged_output_is_published_whole_only_when_its_block_ends_without_error(tmp_path, as_uri):
    out = tmp_path / "report"
    output = f"file://{out}" if as_uri else str(out)
    # Given an earlier complete output, When a new one fails half-written, Then the earlier one is untouched
    with storage.staged_output(output, marker="done.json") as staging:
        storage.write_json(storage.join(staging, "part.json"), {"v": 1})
        storage.write_json(storage.join(staging, "done.json"), {"v": 1})
    with pytest.raises(ZeroDivisionError), storage.staged_output(output, marker="done.json") as staging:
        storage.write_json(storage.join(staging, "part.json"), {"v": 2})
        raise ZeroDivisionError("the job failed half-way")
    assert json.loads((out / "part.json").read_text()) == {"v": 1}
    # When a second one completes, Then it replaces the first, and no staging folder is left beside it
    with storage.staged_output(output, marker="done.json") as staging:
        storage.write_json(storage.join(staging, "done.json"), {"v": 3})
    assert sorted(p.name for p in out.iterdir()) == ["done.json"]
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_an_output_without_its_marker_is_not_published_and_a_killed_jobs_staging_is_cleared(tmp_path):
    out = tmp_path / "index"
    stale = tmp_path / ".index.staging-killed"  # what a SIGKILLed job leaves
    (stale / "output").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="manifest.json"), storage.staged_output(str(out), "manifest.json") as s:
        storage.write_json(storage.join(s, "other.json"), {})
    assert not out.exists() and not stale.exists()


def test_writers_elsewhere_write_a_uri_in_place_and_the_marker_comes_last(tmp_path):
    out = tmp_path / "negatives"
    with storage.staged_output(f"file://{out}", "record.json", writers_elsewhere=True) as staging:
        assert staging == f"file://{out}"
        storage.write_json(storage.join(staging, "pairs.json"), {})
        assert not (out / "record.json").exists()
        storage.write_json(storage.join(staging, "record.json"), {})
    assert sorted(p.name for p in out.iterdir()) == ["pairs.json", "record.json"]
