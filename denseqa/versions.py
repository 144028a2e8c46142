"""Versions of an index folder: what a live update publishes, and what readers resolve.

A fresh build writes an index folder (:mod:`denseqa.index`); it is version 1. Each update
(:mod:`denseqa.drivers.update_index`) writes the next version as a complete index folder of its own,
``versions/<n>/``, published like any output (assembled aside, renamed into place), then points ``CURRENT.json`` at
it: one atomic file write (a rename locally, a single PUT on an object store) is the moment the new version
becomes the index. A reader resolves the folder it is given through ``CURRENT.json`` once, then reads that version
only, so it never mixes files of two versions.

The previous version is kept (a replica that is loading it while the pointer moves still finds its files, and it
is the rollback); older ones are removed after a new one is published.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from denseqa import storage
from denseqa.errors import InputError
from denseqa.index import (
    BM25_DIR,
    DELETED_FILE,
    DOCSTORE_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    TUNING_QUESTIONS_FILE,
    VECTORS_FILE,
)

logger = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT.json"
VERSIONS_DIR = "versions"
KEEP_VERSIONS = 2  # the current one and its predecessor
# The files of version 1, which sits in the root folder itself (its manifest last: it marks the folder complete).
ROOT_VERSION_FILES = (INDEX_FILE, VECTORS_FILE, TUNING_QUESTIONS_FILE, DELETED_FILE, DOCSTORE_FILE, BM25_DIR,
                      MANIFEST_FILE)


def current_pointer(root: str) -> dict | None:
    """``{"version": n, "folder": "versions/<n>"}`` of an updated index, None for one never updated."""
    return storage.read_json(storage.join(root, CURRENT_FILE))


def resolve_index(root: str) -> str:
    """The folder holding the current version of the index at ``root`` (``root`` itself until its first update).

    ``<root>/versions/000001`` names version 1 itself, which is ``root``'s own files: resolved to ``root`` without
    following ``CURRENT.json`` (see :func:`pinned_version`)."""
    version_one_of = _version_one_root(root)
    if version_one_of is not None:
        return version_one_of
    pointer = current_pointer(root)
    return storage.join(root, *pointer["folder"].split("/")) if pointer else root


def pinned_version(path: str) -> str:
    """A name for the version of the index at ``path`` that is current now, which goes on naming that version
    after later updates: what a service's replicas are told to load, so that one started after an update (a
    scale-up, a replacement) loads the version the others serve until the service is swapped. The current
    version's folder once the index has been updated; before, ``<root>/versions/000001``, since ``root`` itself
    would follow the first update. A version, by either name, names itself."""
    if version_root(path) is not None:
        return path.rstrip("/")
    if current_pointer(path) is None:
        return storage.join(path, *version_folder(1).split("/"))
    return resolve_index(path)


def version_root(path: str) -> str | None:
    """The index whose version ``path`` names (``<root>/versions/<n>`` of an updated index, or version 1's name
    ``<root>/versions/000001``); None for a path that names an index itself."""
    one = _version_one_root(path)  # looked up once: on an object store each lookup is a request
    if one is not None:
        return one
    parent, _, name = path.rstrip("/").rpartition("/")
    if not (parent.endswith(f"/{VERSIONS_DIR}") and len(name) == 6 and name.isdigit()):
        return None
    root = parent[: -len(f"/{VERSIONS_DIR}")]
    # An index of the user's own under a folder named versions/ is not one: only an updated index has versions.
    return root if current_pointer(root) is not None else None


def names_version_one(path: str) -> bool:
    """Whether ``path`` is the name :func:`pinned_version` gives version 1 (``<root>/versions/000001``)."""
    return _version_one_root(path) is not None


def _version_one_root(path: str) -> str | None:
    # Version 1 has no folder of its own (updates write versions 2 and up): the name is version 1's unless a
    # complete index of the user's own sits at that very path.
    suffix = f"/{version_folder(1)}"
    trimmed = path.rstrip("/")
    if not trimmed.endswith(suffix) or storage.exists(storage.join(trimmed, MANIFEST_FILE)):
        return None
    return trimmed[: -len(suffix)]


def version_folder(n: int) -> str:
    return f"{VERSIONS_DIR}/{n:06d}"


def next_version(root: str) -> tuple[int, str]:
    """(number, absolute folder) of the version an update of ``root`` writes next."""
    pointer = current_pointer(root)
    n = (pointer["version"] if pointer else 1) + 1
    return n, storage.join(root, *version_folder(n).split("/"))


def publish_version(root: str, n: int) -> None:
    """Make version ``n`` (already complete in its folder) the current one, then remove versions older than its
    predecessor."""
    storage.write_json(storage.join(root, CURRENT_FILE), {"version": n, "folder": version_folder(n)})
    logger.info("%s: version %d is now current", root, n)
    old = n - KEEP_VERSIONS  # the version that just fell out of those kept
    if old == 1:  # version 1 is the root folder's own files: the manifest goes first, so it stops loading
        for name in reversed(ROOT_VERSION_FILES):
            storage.remove(storage.join(root, name))
    elif old > 1:
        storage.remove(storage.join(root, *version_folder(old).split("/")))


@contextmanager
def one_update_at_a_time(root: str) -> Iterator[None]:
    """Hold ``root``'s update lock: a second update of the same index is refused while this one runs. Two at once
    would both write version n + 1 (each removing the other's staging folder as a killed job's), and the one
    published last would silently drop the other's changes.

    A local folder only: an ``flock`` on the folder itself, released when this block ends or the process dies (a
    killed update leaves nothing to clean up). An object store has no such lock: updates of a URI index must not
    overlap, which the scheduler that runs them (one job at a time) has to ensure.
    """
    if storage.is_uri(root) or not os.path.isdir(root):  # a missing folder is refused, in one line, by the update
        yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{root}: another update of this index is running; run this one once it has "
                             "published its version") from None
        except OSError as e:  # a file system without flock (some network mounts): say so, and go on
            logger.warning("%s: cannot lock the folder (%s): make sure no other update of it runs meanwhile", root, e)
        yield
    finally:
        os.close(fd)  # releases the lock
