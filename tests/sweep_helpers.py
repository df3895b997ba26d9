"""Helpers for tests that run sweep scripts as a user would: a subprocess per command."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep_cmd(name: str, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "sweeps" / f"{name}.py"), "--smoke",
            "--mlflow-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--storage-path", str(workdir / "ray_results"),
            "--cache-dir", str(workdir / "cache"), *extra]


def run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def runs(workdir: Path, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], max_results=5000)


def by_stage(all_runs: list) -> Counter:
    return Counter((r.data.tags.get("sall.stage"), r.info.status) for r in all_runs)
