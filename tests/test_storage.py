"""Staged outputs: a folder appears complete at its path, or not at all, locally and behind a URI."""

from __future__ import annotations

import json
from pathlib import Path

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


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_replacing_a_published_folder_never_loses_it(tmp_path, monkeypatch, exchange):
    out = tmp_path / "index"
    with storage.staged_output(str(out), marker="done.json") as staging:
        storage.write_json(storage.join(staging, "done.json"), {"v": 1})
    if not exchange:  # a system without renameat2: two renames, the old folder put back if the second fails
        monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    # Given a second output whose move into place fails (on the fallback: the rename that brings it in)
    real_rename, renames = storage.os.rename, []

    def failing_rename_into_place(a, b):
        renames.append((a, b))
        if ".incoming-" in str(a) and str(b) == str(out):
            raise OSError("the disk went away")
        real_rename(a, b)

    if not exchange:
        monkeypatch.setattr(storage.os, "rename", failing_rename_into_place)
        with pytest.raises(OSError, match="went away"), storage.staged_output(str(out), "done.json") as staging:
            storage.write_json(storage.join(staging, "done.json"), {"v": 2})
        # Then the first output is still there, whole, and nothing is left beside it
        assert json.loads((out / "done.json").read_text()) == {"v": 1}
        monkeypatch.setattr(storage.os, "rename", real_rename)  # the fallback works again
    else:  # the exchange itself is what replaces the folder (this kernel and glibc have renameat2)
        real_exchange, exchanged = storage._exchange, []
        monkeypatch.setattr(storage, "_exchange", lambda a, b: exchanged.append(real_exchange(a, b)) or exchanged[-1])
        monkeypatch.setattr(storage.os, "rename", failing_rename_into_place)  # the fallback would fail
    # And a replacement that succeeds is the only folder left
    with storage.staged_output(str(out), marker="done.json") as staging:
        storage.write_json(storage.join(staging, "done.json"), {"v": 3})
    if exchange:
        assert exchanged == [True]
    assert json.loads((out / "done.json").read_text()) == {"v": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


def test_a_copy_into_the_cache_cut_short_leaves_nothing_there(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    monkeypatch.setenv("DENSEQA_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"w" * 1000)
    real_copy = pafs.copy_files

    def cut_short(src, dst, **kwargs):  # writes part of the folder, then the connection drops
        (Path(dst) / "partial").write_bytes(b"p")
        raise OSError("connection reset")

    monkeypatch.setattr(pafs, "copy_files", cut_short)
    with pytest.raises(OSError, match="connection reset"):
        storage.cached_copy(f"file://{source}", "model")
    assert list((tmp_path / "cache" / "folders").iterdir()) == []
    # And the next try copies it whole
    monkeypatch.setattr(pafs, "copy_files", real_copy)
    copy = storage.cached_copy(f"file://{source}", "model")
    assert (tmp_path / "cache" / "folders").exists() and open(f"{copy}/weights.bin", "rb").read() == b"w" * 1000


def _published_at_uri(output: str, version: int) -> None:
    with storage.staged_output(output, marker="done.json") as staging:
        storage.write_json(storage.join(staging, "shards", "part.json"), {"v": version})
        storage.write_json(storage.join(staging, "done.json"), {"v": version})


def _files(folder: Path) -> dict[str, dict]:
    return {str(p.relative_to(folder)): json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))}


def test_an_upload_over_a_uri_cut_short_leaves_the_earlier_folder_whole(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    out = tmp_path / "index"
    _published_at_uri(f"file://{out}", 1)
    real_copy = pafs.copy_files

    def cut_short(src, dst, **kwargs):  # the upload writes one file, then the connection drops
        kwargs["destination_filesystem"].open_output_stream(f"{dst}/shards-partial").close()
        raise OSError("connection reset")

    # Given an earlier complete folder at a URI, When its --overwrite's upload fails half-way
    monkeypatch.setattr(pafs, "copy_files", cut_short)
    with pytest.raises(OSError, match="connection reset"):
        _published_at_uri(f"file://{out}", 2)
    # Then the earlier folder is there, whole, and nothing is left beside it
    assert _files(out) == {"done.json": {"v": 1}, "shards/part.json": {"v": 1}}
    assert [p.name for p in tmp_path.iterdir()] == ["index"]
    # And an upload that completes replaces it, with nothing of the old one left
    monkeypatch.setattr(pafs, "copy_files", real_copy)
    (out / "shards" / "stale.json").write_text("{}")
    _published_at_uri(f"file://{out}", 3)
    assert _files(out) == {"done.json": {"v": 3}, "shards/part.json": {"v": 3}}
    assert [p.name for p in tmp_path.iterdir()] == ["index"]
    # And files beyond one server-side copy's limit (5 GiB on S3) are streamed into place, whole
    monkeypatch.setattr(storage, "SINGLE_COPY_MAX_BYTES", 1)
    _published_at_uri(f"file://{out}", 4)
    assert _files(out) == {"done.json": {"v": 4}, "shards/part.json": {"v": 4}}


def test_a_replacement_in_an_object_store_that_fails_keeps_the_new_folder_whole_beside_it(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    out = tmp_path / "index"
    _published_at_uri(f"file://{out}", 1)
    copied = []

    class StoreFailingMidCopy(pafs.LocalFileSystem):  # an object store that fails on its second server-side copy
        def copy_file(self, source, target):
            copied.append(target)
            if len(copied) == 2:
                raise OSError("503 Slow Down")
            super().copy_file(source, target)

    real_filesystem = storage.filesystem
    monkeypatch.setattr(storage, "filesystem",
                        lambda path: (StoreFailingMidCopy(), real_filesystem(path)[1]) if storage.is_uri(path)
                        else real_filesystem(path))
    # When the new folder, uploaded whole beside the old one, fails to be copied into its place
    with pytest.raises(OSError, match="503 Slow Down") as failed:
        _published_at_uri(f"file://{out}", 2)
    # Then the folder at the output reads as incomplete (no marker), and the error names where the whole new one is
    assert not (out / "done.json").exists()
    incoming = Path(str(failed.value).rsplit("the complete new folder is at ", 1)[1])
    assert incoming.parent == tmp_path and _files(incoming) == {"done.json": {"v": 2}, "shards/part.json": {"v": 2}}
    # And the marker was to be copied last
    assert copied[0].endswith("shards/part.json")


def test_writers_elsewhere_over_an_earlier_uri_folder_write_beside_it_until_complete(tmp_path):
    out = tmp_path / "negatives"
    _published_at_uri(f"file://{out}", 1)
    # Given an earlier folder, When the writers write a new one, Then readers see the earlier one whole meanwhile
    with storage.staged_output(f"file://{out}", "done.json", writers_elsewhere=True) as staging:
        assert staging != f"file://{out}"
        storage.write_json(storage.join(staging, "pairs.json"), {"v": 2})
        assert _files(out) == {"done.json": {"v": 1}, "shards/part.json": {"v": 1}}
        storage.write_json(storage.join(staging, "done.json"), {"v": 2})
    # And after, only the new folder, at the output
    assert _files(out) == {"done.json": {"v": 2}, "pairs.json": {"v": 2}}
    assert [p.name for p in tmp_path.iterdir()] == ["negatives"]
    # When writers fail half-way, Then the folder they would have replaced is untouched, and nothing is left beside
    with pytest.raises(ZeroDivisionError), \
            storage.staged_output(f"file://{out}", "done.json", writers_elsewhere=True) as staging:
        storage.write_json(storage.join(staging, "pairs.json"), {"v": 3})
        raise ZeroDivisionError("a write task failed")
    assert _files(out) == {"done.json": {"v": 2}, "pairs.json": {"v": 2}}
    assert [p.name for p in tmp_path.iterdir()] == ["negatives"]


def test_an_output_that_is_a_file_unwritable_or_an_unknown_uri_is_one_line_before_any_work(tmp_path):
    from denseqa.errors import InputError

    a_file = tmp_path / "notes.txt"
    a_file.write_text("the user's own file")
    # --overwrite replaces an earlier output folder, never another file (it used to be swapped out of sight)
    with pytest.raises(InputError, match=r"notes.txt: exists and is not a folder; pass another --output"):
        storage.output_folder(str(a_file), True, "the model")
    assert a_file.read_text() == "the user's own file"
    with pytest.raises(InputError, match=r"notes.txt/model: cannot write beside it in .*notes.txt"):
        storage.output_folder(str(a_file / "model"), False, "the model")
    with pytest.raises(InputError, match=r"^fiel:///x: not a path or a URI that pyarrow can open"):
        storage.output_folder("fiel:///x", False, "the model")
    # And a folder that does not exist yet is fine, with nothing left in its parent by the check
    assert storage.output_folder(str(tmp_path / "runs" / "model"), False, "the model") == str(tmp_path / "runs" /
                                                                                             "model")
    assert list((tmp_path / "runs").iterdir()) == []
