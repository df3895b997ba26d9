"""The artifact store: hit, miss, an interrupted write, a corrupt entry, concurrent builders."""

import multiprocessing as mp
import time
from pathlib import Path

import pytest

import sall.store as store_mod
from sall.errors import SallError
from sall.store import ArtifactStore


def writer(text: str):
    def build(tmp: Path) -> None:
        tmp.write_text(text)

    return build


def test_miss_then_hit(tmp_path):
    s = ArtifactStore(tmp_path)
    calls = []

    def build(tmp):
        calls.append(1)
        tmp.write_text("teacher")

    a = s.get_or_build("teachers", "k1", ".pt", build)
    b = s.get_or_build("teachers", "k1", ".pt", build)
    assert a.built and not b.built and len(calls) == 1
    assert b.path.read_text() == "teacher"
    c = s.get_or_build("teachers", "k2", ".pt", build)
    assert c.built and len(calls) == 2


def test_interrupted_write_is_never_read(tmp_path, monkeypatch):
    s = ArtifactStore(tmp_path)

    def crash(tmp):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(store_mod, "_BEFORE_RENAME", crash)
    with pytest.raises(KeyboardInterrupt):
        s.get_or_build("teachers", "k", ".pt", writer("half"))
    monkeypatch.setattr(store_mod, "_BEFORE_RENAME", None)
    final = s.path("teachers", "k", ".pt")
    assert not final.exists()
    assert not list(final.parent.glob("*.tmp"))  # the temporary file is cleaned up
    got = s.get_or_build("teachers", "k", ".pt", writer("whole"))
    assert got.built and got.path.read_text() == "whole"


def test_build_that_raises_leaves_nothing(tmp_path):
    s = ArtifactStore(tmp_path)

    def bad(tmp):
        tmp.write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        s.get_or_build("teachers", "k", ".pt", bad)
    assert not s.exists("teachers", "k", ".pt")


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, capsys):
    s = ArtifactStore(tmp_path)
    p = s.get_or_build("teachers", "k", ".pt", writer("good")).path
    p.write_text("bitrot")
    got = s.get_or_build("teachers", "k", ".pt", writer("good again"))
    assert got.built and got.path.read_text() == "good again"
    assert "corrupt" in capsys.readouterr().err


def _slow_build(root: str, out: str) -> None:
    s = ArtifactStore(root)

    def build(tmp):
        with open(out, "a") as f:
            f.write("built\n")
        time.sleep(1.0)
        tmp.write_text("teacher")

    s.get_or_build("teachers", "shared", ".pt", build)


def test_two_processes_build_once(tmp_path):
    out = tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_slow_build, args=(str(tmp_path / "cache"), str(out))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert out.read_text().count("built") == 1


def test_unwritable_cache_dir(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SallError, match="cache dir .* cannot be written"):
        ArtifactStore(f / "sub")


def test_absent_cache_dir_is_created_by_the_first_write_only(tmp_path):
    root = tmp_path / "a" / "cache"
    s = ArtifactStore(root)
    assert not root.exists(), "a store that was never written to leaves no folder behind"
    assert s.get_or_build("teachers", "k", ".pt", writer("t")).built
    assert (root / "teachers" / "k.pt").read_text() == "t"


# ----------------------------------------------------------------------- a full disk

_FULL_DISK_SCRIPT = r"""
import resource, sys
from sall.cli import guarded
from sall.store import ArtifactStore

limit = int(sys.argv[2])
if limit:  # a file-size limit: writes past it fail with EFBIG (Python ignores SIGXFSZ)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
store = ArtifactStore(sys.argv[1])


def build(tmp):  # what a teacher build does (sall.chain._save): ~4 MB of serialised weights, one write
    tmp.write_bytes(bytes(4 << 20))


sys.exit(guarded(lambda: store.get_or_build("teachers", "dr-abc", ".pt", build) and 0, False))
"""


def _assert_full_disk_error(out, root: Path) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"error: cache dir '{root}' is full (") and "teachers/dr-abc.pt" in lines[0]
    entries = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    assert entries == ["locks/teachers-dr-abc.lock"], f"a partial entry was left: {entries}"


def _full_disk_run(root: Path, limit: int):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, str(root), str(limit)], capture_output=True, text=True, timeout=120
    )


def test_full_disk_by_file_size_limit_is_one_error_and_no_partial_entry(tmp_path):
    """RLIMIT_FSIZE makes every write past 256 KiB fail as on a full disk (works without root)."""
    root = tmp_path / "cache"
    _assert_full_disk_error(_full_disk_run(root, 256 * 1024), root)


def test_full_disk_on_a_tiny_tmpfs_is_one_error_and_no_partial_entry(tmp_path):
    """A real full file system (ENOSPC): a 256 KiB tmpfs; needs the right to mount (root)."""
    import os
    import subprocess

    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root); the file-size-limit test covers the same path")
    try:
        root = mnt / "cache"
        out = _full_disk_run(root, 0)
        _assert_full_disk_error(out, root)
        assert "No space left on device" in out.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
