"""sweeps/search.py: the temperature search (Optuna + ASHA on one fold, the best confirmed on folds).

Fast: per-epoch validation leaves the experiment unchanged, the early-stop bookkeeping on a real
MLflow store, the pick, bad flags and the dry run, the search trace figure. Slow: one real search
(local Ray, real MLflow) killed with SIGKILL once a candidate is booked, then resumed by the same
command; every slow test reads that one store (2 sweep runs in all).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
from sweep_helpers import run, runs, sweep_cmd
from test_train import _fit

from analysis import figures as fg
from sall.config import from_preset
from sweeps import search as se
from tracking import client as tr
from tracking import schema as sc

EXP = "sall-search"


# ---------------------------------------------------------------------------------------------
# fast
def test_validating_every_epoch_changes_neither_the_key_nor_the_weights():
    cfg = from_preset("cpu")
    assert cfg.replace(validate_every_epoch=True).key() == cfg.key()
    _, once = _fit("last")
    _, every = _fit("last", validate_every_epoch=True)
    assert ["val/dr/acc" in h for h in once.history] == [False, False, False, True]
    assert all("val/dr/acc" in h for h in every.history)
    assert once.history[-1]["val/dr/acc"] == every.history[-1]["val/dr/acc"]
    for k, v in once.state.items():  # measuring validation does not touch training
        assert torch.equal(v, every.state[k]), k


def _candidate_run(u: str) -> str:
    c = tr.client(u)
    exp = tr.ensure_experiment(u, EXP)
    return c.create_run(exp, tags={sc.TAG_STAGE: sc.STAGE_CANDIDATE}).info.run_id


def test_pick_breaks_ties_by_the_lower_temperature_whatever_the_order():
    rows = [
        dict(temperature=t, epoch=e, score=sc_)
        for t, e, sc_ in ((9.0, 3, 0.5), (2.0, 3, 0.5), (4.0, 3, 0.6), (1.5, 1, 0.9), (3.0, 3, 0.5))
    ]
    assert se.pick(rows, 3) == [4.0, 2.0, 3.0]  # furthest epoch, best score, then the lower T
    assert se.pick(rows[::-1], 3) == se.pick(rows, 3)


def test_book_marks_stopped_and_complete_candidates_once(tmp_path):
    u = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stopped, complete = _candidate_run(u), _candidate_run(u)
    for rid, epoch in ((stopped, 2), (complete, 6)):
        result = {"mlflow_run_id": rid, "epoch": epoch, se.METRIC: 0.5 + epoch / 100, "temperature": 3.17}
        row = se.book(u, result, epochs=6)
        assert row["stopped"] == (epoch < 6) and row["epoch"] == epoch
        assert se.book(u, result, epochs=6) == row  # booked again after a resume: nothing changes
    c = tr.client(u)
    for rid, flag, epoch in ((stopped, "1", "2"), (complete, "0", "6")):
        r = c.get_run(rid)
        assert r.info.status == "FINISHED"
        assert (r.data.tags[sc.TAG_STOPPED], r.data.tags[sc.TAG_FINAL_EPOCH]) == (flag, epoch)
        assert len(c.get_metric_history(rid, "search/score")) == 1


def _search_parent(tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A search's parent run in a fresh store: (the sweep settings a candidate gets, the tags of
    a candidate that a killed driver's trial `lost_1` opened under it)."""
    u = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tr.ensure_experiment(u, EXP)
    parent = tr.client(u).create_run(exp, tags={sc.TAG_STAGE: sc.STAGE_SWEEP}).info.run_id
    sw = dict(mlflow_uri=u, experiment_id=exp, parent_run_id=parent)
    return sw, {sc.TAG_STAGE: sc.STAGE_CANDIDATE, sc.TAG_PARENT: parent, sc.TAG_CANDIDATE: "lost_1"}


def test_a_run_a_killed_driver_lost_is_adopted_by_its_t_or_closed(tmp_path):
    sw, tags = _search_parent(tmp_path)
    u, exp, parent = sw["mlflow_uri"], sw["experiment_id"], sw["parent_run_id"]
    c = tr.client(u)
    cfg = from_preset("cpu", temperature=3.17)
    lost = c.create_run(exp, tags={**tags, sc.TAG_CONFIG_KEY: cfg.key()}).info.run_id
    other = c.create_run(exp, tags={**tags, sc.TAG_CONFIG_KEY: "another-t"}).info.run_id
    assert se._earlier_run(sw, cfg.replace(temperature=5.0), "new_1") is None
    assert se._earlier_run(sw, cfg, "new_2").info.run_id == lost  # proposed again: adopted
    assert c.get_run(lost).data.tags[sc.TAG_CANDIDATE] == "new_2"
    assert se.close_orphans(u, exp, parent, booked={lost}) == 1  # never proposed again: closed
    r = c.get_run(other)
    assert (r.info.status, r.data.tags[sc.TAG_LOST]) == ("KILLED", "1")
    assert c.get_run(lost).info.status == "RUNNING"


def test_a_booked_candidate_the_snapshot_lost_is_adopted_not_trained_again(tmp_path):
    """Tune's state lags the bookings (a snapshot every ~10 s), so a kill can lose a candidate that
    was already booked; the restored searcher proposes its T again. The booked run is adopted (and
    replayed by `replay`), before an unfinished run of the same T, and a stopped one keeps its
    final epoch: nothing is trained twice and the search still counts --num-samples candidates."""
    sw, tags = _search_parent(tmp_path)
    u, exp = sw["mlflow_uri"], sw["experiment_id"]
    c = tr.client(u)
    cfg = from_preset("cpu", temperature=3.17)
    unfinished = c.create_run(exp, tags={**tags, sc.TAG_CONFIG_KEY: cfg.key()}).info.run_id
    booked = c.create_run(exp, tags={**tags, sc.TAG_CONFIG_KEY: cfg.key()}).info.run_id
    se.book(u, {"mlflow_run_id": booked, "epoch": 1, se.METRIC: 0.4, "temperature": 3.17}, epochs=6)
    earlier = se._earlier_run(sw, cfg, "restored_7")
    assert earlier.info.run_id == booked and earlier.data.tags[sc.TAG_FINAL_EPOCH] == "1"
    assert c.get_run(booked).data.tags[sc.TAG_CANDIDATE] == "restored_7"
    assert c.get_run(unfinished).data.tags[sc.TAG_CANDIDATE] == "lost_1"  # left for close_orphans
    assert se._earlier_run(sw, cfg.replace(temperature=3.18), "new_8") is None  # another T: a new run


def test_pick_prefers_the_survivors_then_the_score():
    rows = [
        dict(temperature=t, epoch=e, score=s)
        for t, e, s in ((2.0, 6, 0.70), (5.0, 2, 0.90), (8.0, 6, 0.75), (8.0, 6, 0.74), (30.0, 6, 0.60))
    ]
    assert se.pick(rows, 2) == [8.0, 2.0]
    assert se.pick(rows, 10) == [8.0, 2.0, 30.0, 5.0]  # a temperature is confirmed once


def test_score_is_validation_only():
    m = {"val/dr/acc": 0.6, "val/amd/acc": 0.8, "train/dr/loss": 9.0}
    assert se.score(m, "mean", ("dr", "amd")) == pytest.approx(0.7)
    assert se.score(m, "amd", ("dr", "amd")) == 0.8
    with pytest.raises(RuntimeError, match="validation every epoch"):
        se.score({"train/dr/loss": 1.0}, "dr", ("dr",))


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--metric", "glaucoma"], "--metric 'glaucoma'"),
        (["--num-samples", "0"], "--num-samples 0"),
        (["--top", "5"], "--top 5"),
        (["--grace", "3"], "--grace 3"),
        (["--reduction-factor", "1"], "--reduction-factor 1.0"),
        (["--t-min", "5", "--t-max", "2"], "--t-min 5.0 / --t-max 2.0"),
        (["--t-max", "nan"], "--t-max nan"),
        (["--search-fold", "3"], "--search-fold 3"),
        (["--num-samples", "x"], "--num-samples: invalid int value: 'x'"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(tmp_path, capsys, flags, named):
    assert _main(dry_run_argv(tmp_path, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and named in err and "\n" not in err, err
    assert not (tmp_path / "mlflow.db").exists()


def dry_run_argv(tmp_path: Path, *flags: str) -> list[str]:
    """A smoke search's --dry-run into a store and cache under tmp_path, plus `flags`."""
    return [
        "--smoke",
        "--dry-run",
        "--cache-dir",
        str(tmp_path / "c"),
        "--mlflow-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        *flags,
    ]


def _main(argv: list[str]) -> int:
    """The script's exit code, in-process (argparse exits; the rest returns)."""
    try:
        return se.main(argv)
    except SystemExit as e:
        return int(e.code)


def test_dry_run_plans_the_search_and_the_confirmation(tmp_path, capsys):
    code = _main(dry_run_argv(tmp_path))
    out = capsys.readouterr().out
    assert code == 0
    assert "search: 4 candidates, T log-uniform in [1, 50] on fold 0" in out
    assert "then the top 2 on folds 0,1,2" in out
    assert "T search" in out and "T=picked" in out and "6 teachers: 6 to train" in out
    assert not (tmp_path / "mlflow.db").exists()


def _hand_store(d: Path) -> str:
    """A grid experiment (SALL at T=2, 8 on folds 0, 1) and a search experiment (3 candidates on
    fold 0, one stopped), with the tags and metrics the sweeps write."""
    u = f"sqlite:///{d / 'mlflow.db'}"
    c = tr.client(u)
    grid = c.create_experiment("sall-temperature")
    for t, fold in ((2.0, 0), (8.0, 0), (8.0, 1)):
        cfg = from_preset("cpu", fold=fold, temperature=t)
        rid = c.create_run(
            grid,
            tags={
                sc.TAG_STAGE: sc.STAGE_STUDENT,
                sc.TAG_FOLD: str(fold),
                sc.TAG_LABEL: f"T={t:g}",
                sc.TAG_TRIAL_KEY: cfg.trial_key(),
            },
        ).info.run_id
        tr.log_params(u, rid, cfg.params())
        tr.log_metrics(u, rid, {"val_best/dr/acc": 0.5 + t / 100 + fold, "val_best/amd/acc": 0.7})
        c.set_terminated(rid, "FINISHED")
    search = c.create_experiment(EXP)
    for t, score, epoch in ((3.0, 0.61, 6), (20.0, 0.40, 2), (9.5, 0.63, 6)):
        rid = c.create_run(
            search, tags={sc.TAG_STAGE: sc.STAGE_CANDIDATE, sc.TAG_FOLD: "0", sc.TAG_SEARCH_METRIC: "mean"}
        ).info.run_id
        tr.log_params(u, rid, {"temperature": str(t)})
        se.book(u, {"mlflow_run_id": rid, "epoch": epoch, se.METRIC: score, "temperature": t}, epochs=6)
    return u


def test_search_trace_is_drawn_over_the_grid_curve_of_its_fold(tmp_path):
    u = _hand_store(tmp_path)
    cands = fg.search_candidates(u, EXP)
    assert sorted((c.temperature, c.stopped, c.epoch) for c in cands) == [
        (3.0, False, 6),
        (9.5, False, 6),
        (20.0, True, 2),
    ]
    grid = fg.grid_settings(u, "sall-temperature")
    assert fg._grid_curve(grid, 0, "mean") == ([2.0, 8.0], [pytest.approx(0.61), pytest.approx(0.64)])
    assert fg._grid_curve(grid, 1, "dr") == ([8.0], [pytest.approx(1.58)])
    assert fg.search_candidates(u, "no-such-experiment") == [] and fg.grid_settings(u, "nope") == []
    png = fg.fig_search(cands, grid, [9.5], tmp_path)
    assert png.name == "fig_search_trace.png" and png.stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# slow: one real search, killed once a candidate is booked, then resumed
# lr 0.02: smoke students learn enough to differ; reduction 2 (ASHA stops the lower half at
# epochs 1 and 2): some candidates stop; one at a time: the kill falls between two candidates
SEARCH_FLAGS = (
    "--folds",
    "0",
    "--lr",
    "0.02",
    "--student-epochs",
    "3",
    "--num-samples",
    "6",
    "--reduction-factor",
    "2",
    "--max-concurrent-trials",
    "1",
)
N = 6


def _candidates(d: Path) -> list:
    return [r for r in runs(d, EXP) if r.data.tags.get(sc.TAG_STAGE) == sc.STAGE_CANDIDATE]


@pytest.fixture(scope="module")
def searched(tmp_path_factory, shared_ray) -> tuple[Path, dict[str, int], subprocess.CompletedProcess]:
    """(store dir, {run id: end time} of the candidates booked before the kill, the rerun).

    The killed run snapshots Tune's state only once, at its start (TUNE_GLOBAL_CHECKPOINT_S): the
    worst case of Tune's ~10 s snapshots, made certain. The kill then loses every candidate booked
    so far, two at least, as a crash between snapshots does, and the resume has to find them in
    MLflow instead of training them again (CI once ran 8 candidates of 6 before it did)."""
    d = tmp_path_factory.mktemp("search")
    cmd = shared_ray.kill_when(
        sweep_cmd("search", d, *SEARCH_FLAGS),
        d,
        lambda: sum(sc.TAG_FINAL_EPOCH in r.data.tags for r in _candidates(d)) >= 2,
        env={"TUNE_GLOBAL_CHECKPOINT_S": "100000"},
        timeout=420,
    )
    before = {r.info.run_id: r.info.end_time for r in _candidates(d) if sc.TAG_FINAL_EPOCH in r.data.tags}
    time.sleep(2)
    return d, before, run(cmd, d, env=shared_ray.env)


@pytest.mark.slow
def test_early_stopped_candidates_are_tagged_with_their_final_epoch(searched):
    d, _, out = searched
    assert out.returncode == 0, out.stderr[-3000:]
    cands = [r for r in _candidates(d) if r.data.tags.get(sc.TAG_LOST) != "1"]
    # the candidates Tune's snapshot lost were adopted: --num-samples in all, each T once
    assert len(cands) == N
    assert len({r.data.params["temperature"] for r in cands}) == N
    assert len({r.data.tags[sc.TAG_CANDIDATE] for r in cands}) == N  # each trial once
    c = tr.client(f"sqlite:///{d / 'mlflow.db'}")
    for r in cands:
        epoch = int(r.data.tags[sc.TAG_FINAL_EPOCH])
        assert r.info.status == "FINISHED"
        assert r.data.tags[sc.TAG_STOPPED] == ("1" if epoch < 3 else "0")
        steps = sorted({m.step for m in c.get_metric_history(r.info.run_id, "val/dr/acc")})
        assert steps == list(range(1, epoch + 1))  # every epoch the searcher saw, and no other
        assert not any(k.startswith("test/") for k in r.data.metrics)  # the search never sees test
    stopped = [r for r in cands if r.data.tags[sc.TAG_STOPPED] == "1"]
    assert 0 < len(stopped) < N, "ASHA stopped no candidate (or all): the bookkeeping went untested"
    assert "(stopped early by ASHA)" in out.stderr


@pytest.mark.slow
def test_a_killed_search_resumes_keeping_what_was_booked(searched):
    d, before, out = searched
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[sweep] resuming" in out.stderr
    now = {r.info.run_id: r for r in _candidates(d)}
    assert len(before) >= 2
    for rid, end in before.items():  # booked before the kill: replayed to Tune, never trained again
        assert now[rid].info.end_time == end
        assert now[rid].data.tags[sc.TAG_ATTEMPTS] == "1"
    for r in now.values():  # none left RUNNING: a run the killed driver lost is adopted or closed
        assert r.info.status == "FINISHED" or (r.info.status, r.data.tags.get(sc.TAG_LOST)) == ("KILLED", "1")
    parents = [r for r in runs(d, EXP) if r.data.tags.get(sc.TAG_STAGE) == sc.STAGE_SWEEP]
    names = sorted(r.data.tags[sc.TAG_RUN_NAME] for r in parents)
    assert names == ["search sweep", "search: candidates"]  # one parent per phase, not one per invocation
    assert all(r.info.status == "FINISHED" for r in parents)


@pytest.mark.slow
def test_the_picks_are_confirmed_as_ordinary_trials(searched, tmp_path):
    d, _, out = searched
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [
        dict(
            temperature=float(r.data.params["temperature"]),
            epoch=int(r.data.tags[sc.TAG_FINAL_EPOCH]),
            score=r.data.metrics["search/score"],
        )
        for r in _candidates(d)
        if sc.TAG_FINAL_EPOCH in r.data.tags
    ]
    students = [r for r in runs(d, EXP) if r.data.tags.get(sc.TAG_STAGE) == sc.STAGE_STUDENT]
    temps = sorted(float(r.data.params["temperature"]) for r in students if r.data.tags[sc.TAG_LABEL] != "baseline")
    assert temps == sorted(se.pick(rows, 2))
    assert len(students) == 3 and all(r.info.status == "FINISHED" and "test/dr/acc" in r.data.metrics for r in students)
    from analysis import tables as tb

    u = f"sqlite:///{d / 'mlflow.db'}"
    assert (
        tb.main(
            [
                "--experiment",
                EXP,
                "--mlflow-uri",
                u,
                "--folds",
                "0",
                "--bootstrap",
                "0",
                "--no-log",
                "--out",
                str(tmp_path / "t"),
            ]
        )
        == 0
    )
    assert (
        fg.main(
            [
                "--experiment",
                EXP,
                "--mlflow-uri",
                u,
                "--out",
                str(tmp_path / "f"),
                "--no-log",
                "--gradcam-per-task",
                "0",
            ]
        )
        == 0
    )
    assert (tmp_path / "f" / "fig_search_trace.png").exists()
