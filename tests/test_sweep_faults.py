"""Faults during a sweep, end to end on the shared Ray head: a trial that fails is retried, reported
and rerun alone; a driver killed mid-sweep is resumed by the same command, every trial once."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from sweep_helpers import run, runs, sweep_cmd

pytestmark = pytest.mark.slow


def test_sigkill_of_the_driver_then_rerun_finishes_every_trial_once(tmp_path, shared_ray):
    # one trial at a time on one fold: the baseline (which trains the teachers), then T=1 and T=8
    # of a few seconds each; the kill falls after the first, so the rerun has trials to finish
    cmd = sweep_cmd("temperature", tmp_path, "--folds", "0", "--max-concurrent-trials", "1")

    def finished_students() -> list:
        return [
            r
            for r in runs(tmp_path, "sall-temperature")
            if r.data.tags.get("sall.stage") == "student" and r.info.status == "FINISHED"
        ]

    cmd = shared_ray.kill_when(cmd, tmp_path, lambda: len(finished_students()) >= 1)  # the head outlives the driver
    finished_before = {r.info.run_id: r.info.end_time for r in finished_students()}
    assert 1 <= len(finished_before) < 3, "the kill came after the last trial: the rerun would resume nothing"
    time.sleep(2)
    out = run(cmd, tmp_path, env=shared_ray.env)
    assert out.returncode == 0, out.stderr[-3000:]
    rs = runs(tmp_path, "sall-temperature")
    students = [r for r in rs if r.data.tags["sall.stage"] == "student"]
    keys = Counter(r.data.tags["sall.config_key"] for r in students)
    assert len(keys) == 3 and set(keys.values()) == {1}  # 3 settings, once each
    assert all(r.info.status == "FINISHED" for r in students)
    for r in students:  # runs finished before the kill were left as they were
        if r.info.run_id in finished_before:
            assert r.info.end_time == finished_before[r.info.run_id]
    assert sum(r.data.tags["sall.stage"] == "sweep" for r in rs) == 1


@pytest.fixture(scope="module")
def failed_then_rerun(tmp_path_factory, shared_ray) -> tuple[Path, object, list, object]:
    """One fold's temperature smoke on the shared Ray with the T=8 trial made to fail (retried once),
    then the same command without the fault. (folder, first run's output, its student runs as they
    were after it, the rerun's output). Two tests read it: the retry, and the teachers that the
    first two trials (baseline and T=1, started together on the head's 2 CPUs) both need."""
    d = tmp_path_factory.mktemp("failing")
    cmd = [*sweep_cmd("temperature", d, "--folds", "0", "--max-failures", "1"), *shared_ray.flags]
    # the fault is set in the driver's environment; the trials run in the head's worker processes
    out = run(cmd, d, env=dict(shared_ray.env, SALL_DEBUG_FAIL="student@T=8"))
    first = [r for r in runs(d, "sall-temperature") if r.data.tags["sall.stage"] == "student"]
    return d, out, first, run(cmd, d, env=shared_ray.env)


def test_a_failing_trial_is_retried_reported_and_rerun_alone(failed_then_rerun):
    d, out, first, again = failed_then_rerun
    assert out.returncode == 1, out.stderr[-3000:]
    assert "1 trial(s) failed" in out.stderr and "T=8 fold0" in out.stderr
    assert "rerun the same command" in out.stderr
    status = {r.data.tags["sall.label"]: r for r in first}
    assert status["T=8"].info.status == "FAILED"
    assert status["T=8"].data.tags["sall.attempts"] == "2"  # retried per FailureConfig(max_failures=1)
    assert "injected failure" in status["T=8"].data.tags["sall.error"]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{d / 'mlflow.db'}")
    assert "error.txt" in [a.path for a in c.list_artifacts(status["T=8"].info.run_id)]
    assert status["baseline"].info.status == "FINISHED" and status["T=1"].info.status == "FINISHED"
    ends = {k: r.info.end_time for k, r in status.items() if k != "T=8"}
    # the same command, now without the fault: only the failed trial runs again
    assert again.returncode == 0, again.stderr[-3000:]
    rs = [r for r in runs(d, "sall-temperature") if r.data.tags["sall.stage"] == "student"]
    assert len(rs) == 3 and all(r.info.status == "FINISHED" for r in rs)
    for r in rs:
        if r.data.tags["sall.label"] != "T=8":
            assert r.info.end_time == ends[r.data.tags["sall.label"]]
        else:
            assert r.data.tags["sall.attempts"] == "3"


def test_two_trials_needing_one_teacher_train_it_once(failed_then_rerun):
    d, _, first, again = failed_then_rerun
    assert again.returncode == 0, again.stderr[-3000:]
    both = {r.data.tags["sall.label"]: r for r in first}
    a, b = both["baseline"], both["T=1"]  # both need the dr and amd teachers of fold 0
    assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time  # concurrent
    students = [r for r in runs(d, "sall-temperature") if r.data.tags["sall.stage"] == "student"]
    teachers = [r for r in runs(d, "sall-temperature") if r.data.tags["sall.stage"] == "teacher"]
    # the sweep's teacher stage trained each once, before the trials, which only load them
    assert Counter(r.data.tags["sall.task"] for r in teachers) == Counter({"dr": 1, "amd": 1})
    assert all(r.data.tags["sall.trained_now"] == "True" for r in teachers)
    assert all(r.data.tags["sall.teachers_trained"] == "none" for r in students)
    assert len(list((d / "cache" / "teachers").glob("*.pt"))) == 2
    for task in ("dr", "amd"):  # every student learnt from the one published copy
        shas = {r.data.tags[f"sall.teacher_sha256.{task}"] for r in students if r.data.tags["sall.label"] != "baseline"}
        assert shas == {next(t.data.tags["sall.teacher_sha256"] for t in teachers if t.data.tags["sall.task"] == task)}
