"""A sweep's teacher and student killed mid-epoch (SIGKILL of their Ray workers): Ray retries the
teacher and Tune the trial, both continue from their checkpoints into the same MLflow runs, and end
with the very weights an uninterrupted run trains. On the shared Ray head."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from sweep_helpers import run, runs, seed_store, sweep_cmd

pytestmark = pytest.mark.slow


def _kill_when(shared_ray, sweep: subprocess.Popen, ready, title: str, timeout: float = 240) -> list[int]:
    """SIGKILL this Ray's workers titled `title` as soon as `ready()` (polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = shared_ray.workers(title) if ready() else []
        if pids:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            return pids
        assert sweep.poll() is None, "the sweep ended before its worker could be killed"
        time.sleep(0.05)
    raise AssertionError(f"no {title} worker with a checkpoint in time")


def _weights_hash(path: Path) -> str:
    """The hash of the weights a cached teacher or student holds (not its timings)."""
    from checkpoint_helpers import state_hash

    from sall.chain import load_artifact

    return state_hash(load_artifact(path)["state"])


def test_a_teacher_and_a_student_killed_mid_epoch_resume_to_the_uninterrupted_weights(tmp_path, shared_ray):
    """One trial (T=8) and its two teachers, 6 epochs each: every teacher worker is SIGKILLed once
    a teacher checkpoint exists, then the trial's worker once a student checkpoint does. Ray retries
    the teachers and Tune the trial; both continue from their checkpoints into the same MLflow runs.
    The same command again changes nothing, and the weights equal an uninterrupted chain's."""
    from sall.chain import run_chain
    from sall.config import config_from_dict
    from tracking import schema as sc

    epochs = ("--teacher-epochs", "6", "--student-epochs", "6", "--max-failures", "2")
    cmd = [*sweep_cmd("temperature", tmp_path, "--folds", "0", "--temperatures", "8", "--no-baseline", *epochs)]
    cmd += shared_ray.flags
    seed_store(cmd)
    sweep = subprocess.Popen(
        cmd, cwd=tmp_path, env=shared_ray.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    ckpts = tmp_path / "cache" / "checkpoints"
    _kill_when(shared_ray, sweep, lambda: any(ckpts.glob("teacher-*.ckpt")), "ray::_remote_build")
    _kill_when(shared_ray, sweep, lambda: any(ckpts.glob("student-*.ckpt")), "ray::ImplicitFunc")
    out, _ = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, out[-3000:]
    before = runs(tmp_path, "sall-temperature")
    again = run(cmd, tmp_path, env=shared_ray.env)
    assert again.returncode == 0, again.stderr[-3000:]
    rs = runs(tmp_path, "sall-temperature")
    assert sorted(r.info.run_id for r in rs) == sorted(r.info.run_id for r in before)  # the rerun added nothing

    stages = Counter((r.data.tags[sc.TAG_STAGE], r.info.status) for r in rs)
    assert stages == Counter({("student", "FINISHED"): 1, ("teacher", "FINISHED"): 2, ("teachers", "FINISHED"): 1,
                              ("sweep", "FINISHED"): 1}), stages  # fmt: skip
    (student,) = [r for r in rs if r.data.tags[sc.TAG_STAGE] == sc.STAGE_STUDENT]
    teachers = [r for r in rs if r.data.tags[sc.TAG_STAGE] == sc.STAGE_TEACHER]
    assert int(student.data.tags[sc.TAG_RESUMES]) >= 1 and int(student.data.tags[sc.TAG_ATTEMPTS]) >= 2
    assert max(int(t.data.tags[sc.TAG_RESUMES]) for t in teachers) >= 1
    assert all(float(r.data.tags[sc.TAG_EPOCHS_LOST]) <= 1 for r in [student, *teachers])
    assert not list(ckpts.glob("*.ckpt"))  # finished models keep no checkpoint
    (parent,) = [r for r in rs if r.data.tags[sc.TAG_STAGE] == sc.STAGE_SWEEP]
    spent = {k: sum(r.data.metrics[k] for r in [student, *teachers]) for k in ("cost/spent_s", "cost/lost_s")}
    assert spent["cost/lost_s"] > 0  # the work the kills threw away, counted on the sweep run
    assert parent.data.metrics["cost/spent_s"] == pytest.approx(spent["cost/spent_s"])
    assert parent.data.metrics["cost/lost_s"] == pytest.approx(spent["cost/lost_s"])

    # the same trial, never interrupted, in this process (one thread, as in the trial) into another cache
    from mlflow.tracking import MlflowClient

    config = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").download_artifacts(
        student.info.run_id, sc.CONFIG_JSON, str(tmp_path)
    )
    cfg = config_from_dict(json.loads(Path(config).read_text()))
    assert cfg.threads == 1
    run_chain(cfg, tmp_path / "twin")
    for kind in ("teachers", "students"):
        files = sorted((tmp_path / "cache" / kind).glob("*.pt"))
        assert files and [f.name for f in files] == sorted(f.name for f in (tmp_path / "twin" / kind).glob("*.pt"))
        for f in files:
            assert _weights_hash(f) == _weights_hash(tmp_path / "twin" / kind / f.name), f.name
