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
