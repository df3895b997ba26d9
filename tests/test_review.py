"""A sweep reviewed in the MLflow UI (issue 14): the answer on the sweep run, teachers apart from
the trials with their real training span, one string form per param, an honest progress line.

The fast tests use a hand-made store (real MLflow, real analysis); the slow ones share one smoke
temperature sweep, run once for the module as a user would.
"""

from __future__ import annotations

import pytest
from sweep_helpers import runs
from test_analysis import EXP, _hand_store

from analysis import common as cm
from analysis import tables as tb
from sall.config import from_preset, param_strings
from sweeps.review import note, review_sweep
from tracking import schema as sc


# ---------------------------------------------------------------------------------------------
# fast: params
def test_params_have_one_form_across_run_kinds_and_no_blanks():
    cfg = from_preset("cpu")
    student, teacher = cfg.params(), param_strings(cfg.teacher_fields("dr"))
    assert student["betas"] == teacher["betas"] == "0.9,0.999"
    assert student["sample_counts"] == "all"  # empty means every image: say so
    assert all(v != "" for v in [*student.values(), *teacher.values()])
    assert param_strings({"tasks": (), "sample_counts": (("amd", 0.5),)}) == {"sample_counts": "amd=0.5"}


# ---------------------------------------------------------------------------------------------
# fast: the review on a hand-made store
@pytest.fixture(scope="module")
def gain_store(tmp_path_factory) -> tuple[str, str]:
    """Baseline and T=4 on 3 folds, T=4 ahead by 4 pp (3 pp on fold 2) with seed 0; seed 1 confirms
    it, ahead by 2, 3 and 4 pp: (uri, parent run)."""
    d = tmp_path_factory.mktemp("gain")
    acc = {}
    for f in range(3):
        acc[("baseline", f, 0)] = 0.5 + 0.02 * f
        acc[("T=4", f, 0)] = 0.5 + 0.02 * f + (0.03 if f == 2 else 0.04)
        acc[("baseline", f, 1)] = 0.51 + 0.02 * f
        acc[("T=4", f, 1)] = 0.51 + 0.02 * f + 0.02 + 0.01 * f
    u = _hand_store(d, acc, confirm="1")
    return u, cm.latest_parent(u, cm.experiment_id(u, EXP))


def test_review_puts_the_answer_on_the_sweep_run(gain_store, capsys):
    u, parent = gain_store
    review_sweep(u, cm.experiment_id(u, EXP), parent, n_boot=0)
    err = capsys.readouterr().err
    assert "warning" not in err and "the answer is on the sweep run's page" in err
    assert len(err.strip().splitlines()) == 1  # the analysis' own progress stays quiet
    run_ = cm.client(u).get_run(parent)
    text = run_.data.tags[sc.TAG_NOTE]
    assert text.index("**DR: T=4**, chosen on validation (folds 0,1,2 × seed 0)") < text.index("| baseline |")
    assert "confirmed on folds 0,1,2 × seed 1" in text and "rests on 3 folds" in text
    assert "Table IV" in text and "### Noise (IV)" in text and "Is the gain real?" in text
    m = run_.data.metrics
    # the answer's figures are the confirmation's: D_f = 2, 3, 4 pp on seed 1, not seed 0's 11/3
    from scipy import stats as sps

    se = (1 / 3 + 0.5) ** 0.5 * 1.0
    assert m["best/dr/temperature"] == 4 and m["best/dr/delta_pp"] == pytest.approx(3.0)
    assert m["best/dr/confirmed"] == 1 and m["best/dr/n_replicates"] == 3
    assert m["best/dr/ci_high_pp"] - 3.0 == pytest.approx(sps.t.ppf(0.975, 2) * se)
    assert m["best/dr/p"] == pytest.approx(2 * sps.t.sf(3.0 / se, 2))
    assert m["best/dr/p_holm"] == pytest.approx(min(1.0, 2 * m["best/dr/p"]))  # Holm over DR and AMD
    assert m["best/amd/acc_pct"] == pytest.approx(100 * (0.51 + 0.2 + 0.02 + 0.03))  # seed 1, mean over folds
    assert "best/dr/boot_low_pp" not in m  # no bootstrap: nothing made up
    assert run_.data.tags[sc.per_task(sc.TAG_BEST, "dr")] == "T=4"
    word = run_.data.tags[sc.per_task(sc.TAG_VERDICT, "dr")]
    assert word == ("suggestive" if m["best/dr/p"] < 0.05 <= m["best/dr/p_holm"] else "not distinguished")
    arts = {a.path for p in ("analysis/tables", "analysis/figures") for a in cm.client(u).list_artifacts(parent, p)}
    assert {
        "analysis/tables/tables.md",
        "analysis/tables/table_IV.csv",
        "analysis/tables/gain_IV.csv",
        "analysis/figures/fig5_temperature.png",
        "analysis/figures/fig6_confusion.png",
    } <= arts


def test_note_keeps_to_the_tag_limit_and_names_what_it_leaves_out(gain_store):
    u, parent = gain_store
    _, sets, confirming, _ = tb.load(u, EXP, parent, None)
    tables = tb.analyse(u, sets, ["IV"], ["acc", "conf", "err"], 0, confirming=confirming)
    full = note(tables, EXP, parent)
    short = note(tables, EXP, parent, limit=2500)
    assert len(short) <= 2500 < len(full)
    assert "**DR: T=4**" in short and "Not shown here for want of room" in short
    assert "Is the gain real? (IV)" in short.split("Not shown here")[1]


def test_a_failing_review_is_one_warning_never_an_exception(gain_store, tmp_path, capsys):
    u, parent = gain_store
    review_sweep(f"sqlite:///{tmp_path / 'no-folder' / 'mlflow.db'}", "1", "0" * 32)
    review_sweep(u, cm.experiment_id(u, EXP), "0" * 32)  # no such run
    lines = [x for x in capsys.readouterr().err.splitlines() if " INFO mlflow" not in x]  # MLflow's own
    assert len(lines) == 2 and all(x.startswith("warning: the analysis was not put on sweep run") for x in lines)
    assert "Traceback" not in "".join(lines)


def test_a_sweep_without_a_paper_table_or_a_trial_gets_no_review(gain_store, capsys):
    u, _ = gain_store
    c = cm.client(u)
    exp = c.create_experiment("sall-custom")
    custom = c.create_run(exp, tags={sc.TAG_STAGE: sc.STAGE_SWEEP, sc.TAG_SWEEP: "custom"}).info.run_id
    empty = c.create_run(
        cm.experiment_id(u, EXP), tags={sc.TAG_STAGE: sc.STAGE_SWEEP, sc.TAG_SWEEP: "temperature"}
    ).info.run_id
    capsys.readouterr()
    review_sweep(u, exp, custom)
    review_sweep(u, cm.experiment_id(u, EXP), empty)  # e.g. a search's candidates: no trial under it
    assert capsys.readouterr().err == ""
    assert sc.TAG_NOTE not in c.get_run(custom).data.tags and sc.TAG_NOTE not in c.get_run(empty).data.tags


# ---------------------------------------------------------------------------------------------
# slow: one smoke sweep, as a user runs it
@pytest.fixture(scope="module")
def smoke(temperature_smoke):
    d, out = temperature_smoke  # shared with tests/test_sweeps.py
    rs = runs(d, "sall-temperature")
    return out, rs, {r.info.run_id: r for r in rs}


def _stage(rs: list, stage: str) -> list:
    return [r for r in rs if r.data.tags.get(sc.TAG_STAGE) == stage]


@pytest.mark.slow
def test_smoke_sweep_run_shows_the_answer(smoke):
    out, rs, _ = smoke
    (parent,) = _stage(rs, sc.STAGE_SWEEP)
    text = parent.data.tags[sc.TAG_NOTE]
    assert "**The answer.**" in text and "chosen on validation" in text and "| baseline |" in text
    assert "| T=8 |" in text
    assert {
        "best/dr/temperature",
        "best/dr/delta_pp",
        "best/dr/ci_low_pp",
        "best/dr/p_holm",
        "best/dr/boot_high_pp",
        "review_seconds",
    } <= set(parent.data.metrics)
    assert "the answer is on the sweep run's page" in out.stderr and "warning: the analysis" not in out.stderr


@pytest.mark.slow
def test_smoke_teachers_sit_apart_with_their_training_span(smoke):
    _, rs, by_id = smoke
    (parent,) = _stage(rs, sc.STAGE_SWEEP)
    (group,) = _stage(rs, sc.STAGE_TEACHERS)
    teachers = _stage(rs, sc.STAGE_TEACHER)
    assert group.data.tags[sc.TAG_PARENT] == parent.info.run_id and group.info.status == "FINISHED"
    assert len(teachers) == 6 and all(t.data.tags[sc.TAG_PARENT] == group.info.run_id for t in teachers)
    children = {r.info.run_id for r in rs if r.data.tags.get(sc.TAG_PARENT) == parent.info.run_id}
    assert children == {r.info.run_id for r in _stage(rs, sc.STAGE_STUDENT)} | {group.info.run_id}
    for t in teachers:
        span = (t.info.end_time - t.info.start_time) / 1000
        assert span == pytest.approx(t.data.metrics["train_seconds"], abs=0.01)
        assert span > 0 and t.info.start_time >= parent.info.start_time - 1000
        assert group.info.start_time <= t.info.start_time and t.info.end_time <= group.info.end_time


@pytest.mark.slow
def test_smoke_params_read_alike_and_progress_ends_at_zero_running(smoke):
    out, rs, _ = smoke
    student, teacher = _stage(rs, sc.STAGE_STUDENT)[0], _stage(rs, sc.STAGE_TEACHER)[0]
    assert student.data.params["betas"] == teacher.data.params["betas"] == "0.9,0.999"
    assert student.data.params["sample_counts"] == "all"
    assert all(v != "" for r in rs for v in r.data.params.values())
    last = [x for x in out.stderr.splitlines() if x.startswith("[sweep] done")][-1]
    assert last.startswith("[sweep] done 9/9") and "running 0 · pending 0" in last
