"""Helpers for tests that run sweep scripts as a user would: a subprocess per command."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep_cmd(name: str, workdir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "sweeps" / f"{name}.py"),
        "--smoke",
        "--mlflow-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--storage-path",
        str(workdir / "ray_results"),
        "--cache-dir",
        str(workdir / "cache"),
        *extra,
    ]


def _template_store() -> Path:
    """An empty MLflow sqlite store with MLflow's schema already migrated, made once per machine
    and MLflow version: creating one runs MLflow's migrations, about 3-6 s per sweep on 2 cores."""
    import mlflow
    from filelock import FileLock

    path = Path(tempfile.gettempdir()) / f"sall-tests-empty-mlflow-{mlflow.__version__}.db"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            mlflow.MlflowClient(f"sqlite:///{tmp}").search_experiments()
            os.replace(tmp, path)
    return path


def seed_store(cmd: list[str]) -> None:
    """Give a sweep command's new sqlite store the migrated empty schema, so the tests do not pay
    MLflow's migrations in every sweep. Dry runs are left alone (they must create nothing), and
    the temperature contract test runs with seed=False, so a store made from nothing stays covered."""
    if "--dry-run" in cmd or "--mlflow-uri" not in cmd:
        return
    uri = cmd[cmd.index("--mlflow-uri") + 1]
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        shutil.copyfile(_template_store(), uri[len("sqlite:///") :])


def run(
    cmd: list[str], cwd: Path, timeout: int = 600, seed: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command as a user would; a sweep's new MLflow store starts from the migrated template
    unless `seed` is False. `env`: the environment (default this process's), e.g. a cluster's."""
    if seed:
        seed_store(cmd)
    env = dict(env or os.environ, PYTHONUNBUFFERED="1")
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


def kill_when(
    cmd: list[str], cwd: Path, ready: Callable[[], bool], timeout: float = 240, env: dict[str, str] | None = None
) -> None:
    """Start a sweep, wait until `ready()` (polled every second), then SIGKILL its driver only,
    as a crash would. Fails the test if the sweep ends first or `ready` never holds."""
    import pytest

    seed_store(cmd)
    env = dict(env or os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if ready():
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            time.sleep(1)
        else:
            pytest.fail("the sweep did not get far enough in time")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass(frozen=True)
class SharedRay:
    """A running single-node Ray that sweep commands join with `flags` in `env` (see the
    `shared_ray` fixture); `marker` is in the environment of every process it starts."""

    env: dict[str, str]
    marker: str = ""
    flags: tuple[str, ...] = ("--address", "auto")

    def workers(self, title: str) -> list[int]:
        """This Ray's worker processes whose title starts with `title`: Ray retitles a worker
        `ray::<function>` while it runs a task, `ray::<Actor>` for an actor's process. Only this
        head's processes: another test session's Ray may run the same tasks beside it."""
        from test_local_cluster import local

        out = []
        for pid in local.session_members([], self.marker):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(title.encode()):
                    out.append(pid)
        return out

    def run(self, cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
        return run([*cmd, *self.flags], cwd, env=self.env, **kw)

    def kill_when(
        self, cmd: list[str], cwd: Path, ready: Callable[[], bool], env: dict[str, str] | None = None, **kw
    ) -> list[str]:
        """kill_when on this Ray (`env` added to its environment); returns the command as run (with
        the address), for the rerun."""
        cmd = [*cmd, *self.flags]
        kill_when(cmd, cwd, ready, env={**self.env, **(env or {})}, **kw)
        return cmd
