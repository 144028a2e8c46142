"""Records of how an output was made: versions of what is installed, and peak memory that survives an exec."""

from __future__ import annotations

import json
import subprocess
import sys

from denseqa.provenance import package_versions, peak_memory_mb


def test_versions_leave_out_a_package_that_is_not_installed_instead_of_failing():
    found = package_versions(("torch", "no-such-package-denseqa"))
    assert set(found) == {"python", "torch"} and found["torch"]


def test_peak_memory_of_a_process_started_by_exec_is_its_own_not_its_parents():
    # Given a parent that holds ~400 MB, When it execs a small Python, Then the child reports its own peak:
    # getrusage's ru_maxrss would carry the parent's ~400 MB over the exec
    code = ("import os, sys; big = bytearray(400 * 2**20); big[::4096] = b'x' * len(big[::4096]); "
            "os.execv(sys.executable, [sys.executable, '-c', "
            "'import json; from denseqa.provenance import peak_memory_mb; print(json.dumps(peak_memory_mb()))'])")
    child = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert child["rss"] < 300, child
    assert peak_memory_mb()["rss"] > 0


def test_peak_memory_without_proc_reads_ru_maxrss_in_the_platforms_unit(monkeypatch):
    import builtins
    import resource

    from denseqa import provenance

    # Given a system without /proc whose getrusage says 300 MiB: in KiB on the BSDs, in bytes on macOS
    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(builtins, "open", no_proc)
    for platform, ru_maxrss in (("darwin", 300 * 2**20), ("freebsd14", 300 * 1024)):
        monkeypatch.setattr(provenance.sys, "platform", platform)
        monkeypatch.setattr(provenance.resource, "getrusage",
                            lambda who, value=ru_maxrss: type("Usage", (), {"ru_maxrss": value})())
        # Then both report 300 MiB
        assert provenance.peak_rss_mb() == 300.0, platform
    assert resource.getrusage  # the real one is back after the test (monkeypatch)
