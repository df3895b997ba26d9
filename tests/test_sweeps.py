"""Sweeps end to end: every script with --smoke on a real local Ray and a real MLflow store."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from sweep_helpers import by_stage, run, runs, sweep_cmd

pytestmark = pytest.mark.slow


# The grid scripts are grid definitions over one runner (sweeps/runner.py: run_sweep); what is
# theirs is their flags, their grid and its --smoke trim. Those run here in-process: every trial
# of each script's smoke grid through the real chain, with one shared cache (teachers trained
# once across scripts, as on a machine that runs them all). The runner's Ray and MLflow path is
# the same for every script and runs end to end in the temperature tests below and in
# tests/test_search.py. (As subprocess sweeps on a shared Ray these four took about 150 s; each
# paid about 30 s of start-up, connect and review for a few seconds of trials.)
SMOKE_GRIDS = {"ablation": 3, "data_ratio": 3, "sample_caps": 4, "task_count": 3}  # trials on one fold


@pytest.fixture(scope="module")
def grid_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("grid_cache")


@pytest.mark.parametrize("sweep,n_trials", SMOKE_GRIDS.items())
def test_every_trial_of_each_smoke_grid_runs(sweep, n_trials, grid_cache, capsys):
    import importlib

    from sall.chain import run_chain
    from sweeps import runner as rn

    script = importlib.import_module(f"sweeps.{sweep}")
    argv = ["--smoke", "--folds", "0", "--cache-dir", str(grid_cache), "--dry-run"]
    assert (
        rn.run_sweep(sweep, script.__doc__, script.grid, script.add_args, getattr(script, "smoke", None), argv=argv)
        == 0
    )  # the script's flags and grid pass the preflight
    assert f"{n_trials} trials" in capsys.readouterr().out
    args = rn.build_parser(sweep, script.__doc__, script.add_args).parse_args(argv)
    _, base = rn.sweep_setup(args)
    grid = script.grid(args, base)
    trials = rn.expand(getattr(script, "smoke", lambda g: g)(grid), [0], rn.sweep_seeds(args))
    assert len(trials) == n_trials
    for t in trials:
        result = run_chain(t.cfg, grid_cache)
        assert set(result.test) == set(t.cfg.tasks), t.label
        assert all(0 <= m["acc"] <= 1 for m in result.test.values()), t.label


def test_temperature_smoke_logs_the_contract(temperature_smoke):
    tmp_path, _ = temperature_smoke  # the sweep created its own MLflow store
    rs = runs(tmp_path, "sall-temperature")
    counts = by_stage(rs)
    assert counts[("sweep", "FINISHED")] == 1
    assert counts[("student", "FINISHED")] == 9  # baseline, T=1, T=8 x 3 folds
    assert counts[("teacher", "FINISHED")] == 2 * 3  # tasks x folds
    parent = next(r for r in rs if r.data.tags["sall.stage"] == "sweep").info.run_id
    teacher_ids = {r.info.run_id for r in rs if r.data.tags["sall.stage"] == "teacher"}
    for r in rs:
        if r.data.tags["sall.stage"] != "student":
            continue
        assert r.data.tags["mlflow.parentRunId"] == parent
        assert {"sall.trial_key", "sall.fold", "sall.sweep"} <= set(r.data.tags)
        assert r.data.tags["sall.teacher.dr"] in teacher_ids
        assert {"test/dr/acc", "test/amd/kappa", "val/dr/acc", "train/amd/loss"} <= set(r.data.metrics)
        assert r.data.params["temperature"] in ("1.0", "8.0")
        assert r.data.tags["sall.precision"].startswith("fp32 (cpu ")  # amp=auto: bf16 is measured for no CPU yet
    # three folds of one setting share its trial key
    keys = Counter(r.data.tags["sall.trial_key"] for r in rs if r.data.tags["sall.stage"] == "student")
    assert sorted(keys.values()) == [3, 3, 3]
    # rerunning the same command runs nothing again and logs nothing twice
    again = run(sweep_cmd("temperature", tmp_path), tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert by_stage(runs(tmp_path, "sall-temperature")) == counts


def test_dry_run_lists_trials_and_teachers(tmp_path):
    out = run(sweep_cmd("temperature", tmp_path, "--dry-run"), tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "9 trials; 6 teachers: 6 to train" in out.stdout
    assert "[reuse]" in out.stdout
    assert not (tmp_path / "mlflow.db").exists()
