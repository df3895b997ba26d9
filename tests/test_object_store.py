"""The artifact store in a real S3 server (Ceph's RADOS Gateway, started by cluster/services.py):
nodes that share no disk build an artifact once, read only verified bytes, and a dead lease holder
blocks the others only until its lease expires. Bad object-store settings are one line."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from service_fixtures import services

from sall.errors import SallError
from sall.object_store import ObjectStore
from sall.store import open_store

ROOT = Path(__file__).resolve().parents[1]


def _node_store(uri: str, env: dict, mirror_root: str, lease_ttl: float | None = None) -> ObjectStore:
    """The store as a node with its own disk sees it: its own mirror folder. (`env` goes into the
    environment: call it in a child process, or with `env` already set there.)"""
    os.environ.update(env)
    tempfile.tempdir = mirror_root
    try:
        return ObjectStore(uri, lease_ttl=lease_ttl)
    finally:
        tempfile.tempdir = None


def _build_counting(uri: str, env: dict, mirror: str, key: str, out: str, hold_s: float) -> None:
    """A 'node': get_or_build one artifact, appending to `out` when it built it."""
    s = _node_store(uri, env, mirror)

    def build(tmp: Path) -> None:
        time.sleep(hold_s)
        tmp.write_bytes(b"teacher weights")

    got = s.get_or_build("teachers", key, ".pt", build)
    with open(out, "a") as f:
        f.write(f"{int(got.built)} {got.sha256}\n")


def _hold_lease_forever(uri: str, env: dict, mirror: str, name: str, ready: str) -> None:
    s = _node_store(uri, env, mirror, lease_ttl=3)
    with s.exclusive(name):
        Path(ready).write_text("held")
        time.sleep(600)


@pytest.fixture
def s3(s3_bucket, monkeypatch):
    """(a prefix in a new bucket of the real S3 server, its environment, also set in this process)."""
    env = services.env_for_s3(s3_bucket)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return f"s3://{s3_bucket['s3']['bucket']}/t-{uuid.uuid4().hex[:8]}", env


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_build_once_and_read_the_same_bytes(s3, tmp_path):
    uri, env = s3
    out = tmp_path / "built.txt"
    ctx = mp.get_context("spawn")
    nodes = [
        ctx.Process(target=_build_counting, args=(uri, env, str(tmp_path / f"node{i}"), "k1", str(out), 2.0))
        for i in range(2)
    ]
    for p in nodes:
        p.start()
    for p in nodes:
        p.join(120)
        assert p.exitcode == 0
    lines = out.read_text().split()
    built, shas = lines[0::2], lines[1::2]
    assert sorted(built) == ["0", "1"]  # one node built it, the other waited and read it
    assert len(set(shas)) == 1
    assert not list((tmp_path / "node0").rglob("*.tmp")) and not list((tmp_path / "node1").rglob("*.tmp"))


@pytest.mark.slow
def test_a_corrupt_object_is_detected_and_rebuilt(s3, tmp_path):
    uri, env = s3
    a = _node_store(uri, env, str(tmp_path / "a"))
    first = a.get_or_build("teachers", "k", ".pt", lambda tmp: tmp.write_bytes(b"good"))
    assert first.built
    a._write(a._key("teachers", "k", ".pt"), b"bitrot")  # the object changes under its checksum
    b = _node_store(uri, env, str(tmp_path / "b"))
    again = b.get_or_build("teachers", "k", ".pt", lambda tmp: tmp.write_bytes(b"good again"))
    assert again.built and again.path.read_bytes() == b"good again"


@pytest.mark.slow
def test_a_dead_lease_holder_blocks_others_only_until_its_lease_expires(s3, tmp_path):
    uri, env = s3
    ready = tmp_path / "ready"
    ctx = mp.get_context("spawn")
    holder = ctx.Process(target=_hold_lease_forever, args=(uri, env, str(tmp_path / "h"), "teachers-k", str(ready)))
    holder.start()
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert ready.exists()
    os.kill(holder.pid, signal.SIGKILL)  # the node dies holding the lease
    holder.join(10)
    other = _node_store(uri, env, str(tmp_path / "o"), lease_ttl=3)
    t0 = time.time()
    got = other.get_or_build("teachers", "k", ".pt", lambda tmp: tmp.write_bytes(b"w"))
    assert got.built
    assert time.time() - t0 < 30  # the lease expired; it did not block forever


def _sweep_cmd(tmp_path: Path, cache: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "sweeps" / "temperature.py"),
        "--smoke",
        "--folds",
        "0",
        "--mlflow-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--storage-path",
        str(tmp_path / "ray"),
        "--cache-dir",
        cache,
    ]


def _one_line_error(tmp_path: Path, cache: str, env: dict) -> str:
    out = subprocess.run(
        _sweep_cmd(tmp_path, cache),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, **env},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()  # nothing written
    return errors[0]


@pytest.mark.slow
def test_a_bucket_that_does_not_exist_is_one_line(s3_service, tmp_path):
    line = _one_line_error(tmp_path, "s3://no-such-bucket-here/cache", services.env_for_s3(s3_service))
    assert "--cache-dir" in line and "bucket that does not exist" in line


@pytest.mark.slow
def test_wrong_credentials_are_one_line(s3_service, tmp_path):
    env = {**services.env_for_s3(s3_service), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    line = _one_line_error(tmp_path, f"s3://{s3_service['s3']['bucket']}/cache", env)
    assert "--cache-dir" in line and "refused the credentials" in line


def test_an_unreachable_endpoint_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:  # a port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    env.update(AWS_ENDPOINT_URL_S3=env["AWS_ENDPOINT_URL"], AWS_EC2_METADATA_DISABLED="true")
    line = _one_line_error(tmp_path, "s3://bucket/cache", env)
    assert "cannot be reached" in line and f"127.0.0.1:{port}" in line


def test_an_unsupported_scheme_is_one_line(tmp_path):
    with pytest.raises(SallError, match="unsupported scheme 'ftp://'"):
        open_store("ftp://host/cache")
