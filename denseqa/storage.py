"""Local paths and URIs (s3://, gs://, ...) through pyarrow filesystems, and atomic publication of output folders.

Every output of denseqa (a model, an index, a report) is assembled in a local staging folder and then published
so that a reader never sees it half-written: locally by a rename on the same filesystem; on an object store (no
atomic rename) by uploading everything and writing the folder's marker file (its record or manifest) last, which
readers check for. A folder that replaces an earlier one is first written whole beside it, so a failed upload
loses neither.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """An absolute local path (``~`` expanded), or the URI unchanged."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def filesystem(path: str):
    """(pyarrow filesystem, path in it) for a local path or a URI; one line for a URI pyarrow cannot read (an
    unknown scheme, a malformed address)."""
    import pyarrow.fs as pafs

    if not is_uri(path):
        return pafs.LocalFileSystem(), absolute(path)
    try:
        return pafs.FileSystem.from_uri(path)
    except ValueError as e:  # pyarrow's ArrowInvalid
        from denseqa.errors import InputError
        from denseqa.redaction import masked

        raise InputError(f"{masked(path)}: not a path or a URI that pyarrow can open ({masked(str(e))})") from None


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names]) if is_uri(base) else os.path.join(base, *names)


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def is_nonempty_dir(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return False
    return bool(fs.get_file_info(pafs.FileSelector(p, recursive=False)))


def output_folder(path: str | None, overwrite: bool, what: str, noun: str = "output") -> str:
    """The absolute output folder of a job; one line when none is given, or when it holds something and
    ``overwrite`` is off (an earlier result is never replaced by accident)."""
    from denseqa.errors import InputError

    if not path:
        raise InputError(f"no output given: pass --output FOLDER for {what}")
    output = absolute(path)
    if is_nonempty_dir(output) and not overwrite:
        raise InputError(f"{output}: {noun} folder exists and is not empty; pass --overwrite or another --output")
    if exists(output) and not is_dir(output):  # --overwrite replaces an earlier output, never some other file
        raise InputError(f"{output}: exists and is not a folder; pass another --output")
    if is_uri(output):
        _incoming_sibling(output)  # a bucket's root is refused now, not when the result is published
    else:  # found now, not when the result is published after the work
        parent = os.path.dirname(output)
        try:
            os.makedirs(parent, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".denseqa-write-check-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise InputError(f"{output}: cannot write beside it in {parent} ({e.strerror or e})") from None
    return output


def write_bytes(path: str, data: bytes) -> None:
    """Write a file atomically: a reader sees the old content or the new, never a part.

    Locally through a temporary file renamed over the target; an object store's single PUT is atomic already.
    """
    if is_uri(path):
        import pyarrow.fs as pafs

        fs, p = filesystem(path)
        if isinstance(fs, pafs.LocalFileSystem):  # file:// URIs; object stores have no folders to create
            fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(data)
        return
    path = absolute(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a plain write would not
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_bytes(path: str) -> bytes | None:
    """The file's content, or None when it does not exist."""
    if not exists(path):
        return None
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2).encode())


def read_json(path: str) -> Any:
    """The parsed JSON file, or None when it does not exist."""
    data = read_bytes(path)
    return None if data is None else json.loads(data)


def remove(path: str) -> None:
    """Delete a file or a folder tree if it exists."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


def download(path: str, local_dir: str) -> str:
    """A local folder with the content of ``path``: the path itself when local, else a copy into ``local_dir``."""
    if not is_uri(path):
        return absolute(path)
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    pafs.copy_files(p, local_dir, source_filesystem=fs)
    return local_dir


def listing_digest(infos) -> str:
    """sha256 over the (path, size, modification time) of the files among pyarrow FileInfos: replacing a file
    changes it, reading one does not."""
    import pyarrow.fs as pafs

    listing = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def cache_root() -> str:
    """This node's denseqa cache: ``$DENSEQA_CACHE``, default ``~/.cache/denseqa`` (copies of remote folders,
    ONNX exports of read-only models)."""
    return os.path.expanduser(os.environ.get("DENSEQA_CACHE", "~/.cache/denseqa"))


def cached_copy(uri: str, what: str) -> str:
    """A local copy of the folder at ``uri``, for what needs local files (a model for transformers).

    Kept under ``$DENSEQA_CACHE`` (default ``~/.cache/denseqa``) and keyed by the folder's listing (paths, sizes,
    modification times), so a folder replaced at the same URI is fetched again; concurrent callers on one node
    (embedding actors) each copy into a private folder and the first rename wins.
    """
    import pyarrow.fs as pafs

    from denseqa.errors import InputError

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (FileNotFoundError, OSError) as e:
        raise InputError(f"{what} {uri!r}: cannot be listed ({e})") from None
    if not any(i.type == pafs.FileType.File for i in infos):
        raise InputError(f"{what} {uri!r}: no files there")
    key = hashlib.sha256(f"{uri}\n{listing_digest(infos)}".encode()).hexdigest()[:20]
    root = os.path.join(cache_root(), "folders")
    target = os.path.join(root, key)
    if os.path.isdir(target):
        return target
    os.makedirs(root, exist_ok=True)
    incoming = tempfile.mkdtemp(prefix=f".{key}.incoming-", dir=root)
    try:
        pafs.copy_files(path, incoming, source_filesystem=fs)
    except BaseException:  # a copy cut short stays out of the cache
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    try:
        os.rename(incoming, target)
    except OSError:  # another process finished the same copy first
        shutil.rmtree(incoming, ignore_errors=True)
    return target


def publish_folder(staging: str, output: str, marker: str) -> None:
    """Move the complete local folder ``staging`` to ``output`` so that no reader ever sees a partial folder.

    Locally: copy next to ``output`` (same filesystem), then rename into place; a previous folder is swapped out
    and removed after. For a URI, upload everything except ``marker`` first, then ``marker``: its presence marks
    a complete folder. An earlier folder at the URI is kept whole until the new one is uploaded beside it, then
    replaced (:func:`_replace_in_store`). ``staging`` is consumed.
    """
    if is_uri(output):
        import pyarrow.fs as pafs

        fs, path = filesystem(output)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            incoming = path  # nothing to lose: upload in place, the marker last
        else:  # the old folder stays whole until the new one is complete beside it
            incoming = _incoming_sibling(output)[1]
        marker_file = os.path.join(staging, marker)
        with open(marker_file, "rb") as f:
            marker_bytes = f.read()
        os.remove(marker_file)
        try:
            if isinstance(fs, pafs.LocalFileSystem):  # file:// URIs: copy_files creates subfolders, not the target
                fs.create_dir(incoming, recursive=True)
            pafs.copy_files(staging, incoming, destination_filesystem=fs)
            with fs.open_output_stream(f"{incoming.rstrip('/')}/{marker}") as f:
                f.write(marker_bytes)
        except BaseException:
            if incoming != path:  # a cut-short upload beside the old folder; the old one is untouched
                _delete_quietly(fs, incoming)
            raise
        if incoming != path:
            _replace_in_store(fs, incoming, path, marker)
        shutil.rmtree(staging, ignore_errors=True)
        return
    output = absolute(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    incoming = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.incoming-", dir=parent)
    os.rmdir(incoming)
    # A rename within one filesystem is atomic; a move from /tmp to another disk would be a copy.
    shutil.move(staging, incoming)
    if not os.path.exists(output):
        os.rename(incoming, output)
    elif _exchange(incoming, output):  # one step: a reader sees the old folder or the new one, never neither
        shutil.rmtree(incoming, ignore_errors=True)  # now the old one
    else:
        retired = incoming.replace(".incoming-", ".old-")
        try:
            os.rename(output, retired)
            try:
                os.rename(incoming, output)
            except OSError:
                os.rename(retired, output)  # the old folder back where it was: nothing already written is lost
                raise
        except OSError:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        shutil.rmtree(retired, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux's renameat2 with RENAME_EXCHANGE); False where the system or the filesystem
    cannot. By hand through ctypes: Python's os module has no renameat2, and no library we depend on wraps it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):  # not glibc >= 2.28, or not Linux
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _incoming_sibling(output: str) -> tuple[str, str]:
    """A fresh (URI, filesystem path) beside the folder at the URI ``output``, for a replacement to be written
    whole before the old folder is touched. One line for an output at a bucket's root, which has no beside."""
    import uuid

    from denseqa.errors import InputError

    fs, path = filesystem(output)
    parent, _, name = path.rstrip("/").rpartition("/")
    if not name or (not parent and not path.startswith("/")):  # a bucket's root (a local top folder is fine)
        raise InputError(f"{output}: an output at a URI must be a folder inside a bucket, not the bucket itself")
    tag = f".{name}.incoming-{uuid.uuid4().hex[:12]}"
    return f"{output.rstrip('/').rpartition('/')[0]}/{tag}", f"{parent}/{tag}"


# S3's limit on one server-side copy (CopyObject): larger objects are streamed, a multipart upload.
SINGLE_COPY_MAX_BYTES = 5 << 30


def _replace_in_store(fs, incoming: str, path: str, marker: str) -> None:
    """Replace the folder ``path`` of an object store by the complete folder ``incoming`` beside it.

    An object store has no rename, so this copies object by object (a server-side copy on S3 and GCS: nothing
    passes through this machine), with the marker removed first and written last, so that readers never take
    the mixed folder for a complete one. If a step fails, the complete new folder is still at ``incoming`` and
    the error names it: nothing written is lost.
    """
    import pyarrow.fs as pafs

    sizes = {i.path: i.size for i in fs.get_file_info(pafs.FileSelector(incoming, recursive=True))
             if i.type == pafs.FileType.File}
    marker_path = f"{incoming.rstrip('/')}/{marker}"
    try:
        fs.delete_dir(path)  # the marker with it: the folder reads as incomplete from here on
        for source in [f for f in sizes if f != marker_path] + [marker_path]:
            target = f"{path.rstrip('/')}/{source[len(incoming.rstrip('/')) + 1:]}"
            if isinstance(fs, pafs.LocalFileSystem):  # file:// URIs: a copy does not create folders
                fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            if sizes[source] < SINGLE_COPY_MAX_BYTES:
                fs.copy_file(source, target)
            else:  # one CopyObject is capped at 5 GiB on S3 (Arrow makes no multipart copy): a streamed one
                with fs.open_input_stream(source) as src, fs.open_output_stream(target) as dst:
                    while chunk := src.read(64 << 20):
                        dst.write(chunk)
    except Exception as e:
        raise OSError(f"{path}: replacing it failed ({e}); the complete new folder is at {incoming}") from e
    _delete_quietly(fs, incoming)


def _delete_quietly(fs, path: str) -> None:
    try:
        fs.delete_dir(path)
    except OSError:  # a leftover beside the output; never the reason a published output fails
        pass


@contextmanager
def staged_output(output: str, marker: str, writers_elsewhere: bool = False) -> Iterator[str]:
    """Where a job writes an output folder so that it appears complete or not at all: the one way every stage
    (model, index, report, negatives) publishes.

    Yields a folder to write into, which :func:`join` and :func:`write_json` accept; ``marker`` (the folder's
    record or manifest) must be written last. When the block ends without an error the folder is published at
    ``output`` (:func:`publish_folder`); on an error nothing is published and the staging is removed.

    Locally the staging sits next to ``output``, on its filesystem, so that publishing is a rename (and a staging
    folder that a killed job left for the same output is removed first). For a URI it
    is a local temporary folder uploaded at the end, unless ``writers_elsewhere`` (Ray Data tasks on other nodes
    write into it): then they write at the URI itself, or beside an earlier folder there, which the new one
    replaces once complete; the marker written last is what tells readers that the folder is complete (an
    object store has no rename).
    """
    if is_uri(output) and writers_elsewhere:
        fs, path = filesystem(output)
        if not exists(output):
            try:
                yield output
                if not exists(join(output, marker)):
                    raise RuntimeError(f"{output}: the staged output was not completed with its {marker}")
            except BaseException:
                _delete_quietly(fs, path)  # a part of a folder that was not there before
                raise
            return
        # An earlier folder is there: the writers write a fresh folder beside it, which replaces it once complete.
        incoming_uri, incoming = _incoming_sibling(output)
        try:
            yield incoming_uri
            if not exists(join(incoming_uri, marker)):
                raise RuntimeError(f"{output}: the staged output was not completed with its {marker}")
        except BaseException:
            _delete_quietly(fs, incoming)
            raise
        _replace_in_store(fs, incoming, path, marker)
        return
    parent = tempfile.gettempdir() if is_uri(output) else os.path.dirname(absolute(output))
    prefix = f".{os.path.basename(output.rstrip('/'))}.staging-"
    os.makedirs(parent, exist_ok=True)
    if not is_uri(output):  # left by a job killed while writing this output (SIGKILL runs no cleanup)
        for stale in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")):
            shutil.rmtree(stale, ignore_errors=True)
    staging_root = tempfile.mkdtemp(prefix=prefix, dir=parent)
    staging = os.path.join(staging_root, "output")
    os.makedirs(staging)
    try:
        yield staging
        if not os.path.exists(os.path.join(staging, marker)):
            raise RuntimeError(f"{output}: the staged output was not completed with its {marker}")
        publish_folder(staging, output, marker=marker)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
