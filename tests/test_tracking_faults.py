"""The tracking server dies in the middle of a sweep: the trials that need it fail after their
retry, the sweep ends with one line saying what happened, and once the server is back the same
command finishes what was left, with no run logged twice."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store: Path, port: int, log: Path):
    """A real `mlflow server` on 127.0.0.1:port over a SQLite file, in its own session."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--serve-artifacts",
           "--artifacts-destination", str(store / "artifacts")]  # fmt: skip
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # its GenAI job runner triples start-up
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=store, env=env)
    try:
        deadline = time.time() + 120
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _students(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("sall-temperature")
    runs = [] if exp is None else c.search_runs([exp.experiment_id], max_results=500)
    return [r for r in runs if r.data.tags.get("sall.stage") == "student"]


def test_the_tracking_server_dying_mid_sweep_fails_clearly_and_a_rerun_finishes(tmp_path, shared_ray):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(ROOT / "sweeps" / "temperature.py"), "--smoke", "--folds", "0", "--mlflow-uri", uri,
           "--storage-path", str(tmp_path / "ray"), "--cache-dir", str(tmp_path / "cache"), "--max-failures", "1",
           "--student-epochs", "6", *shared_ray.flags]  # fmt: skip
    # few, quick retries: in the driver, and (forwarded by the sweep's runtime_env) in its trials
    env = dict(shared_ray.env, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0")
    with mlflow_server(tmp_path, port, tmp_path / "mlflow1.log"):
        sweep = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while not any(r.info.status == "RUNNING" for r in _students(uri)):  # a trial is training
            assert sweep.poll() is None and time.time() < deadline, sweep.communicate()[1][-3000:]
            time.sleep(0.5)
    # the server is dead now
    _, err = sweep.communicate(timeout=600)
    assert sweep.returncode != 0
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"MLflow at {uri} stopped answering" in last, err[-3000:]

    with mlflow_server(tmp_path, port, tmp_path / "mlflow2.log"):  # back, with the same store
        again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr[-3000:]
        students = _students(uri)
    keys = Counter(r.data.tags["sall.config_key"] for r in students)
    assert len(keys) == 3 and set(keys.values()) == {1}  # every setting once: no run logged twice
    assert all(r.info.status == "FINISHED" for r in students)
