"""analysis/: tables, figures and external evaluation, on a real MLflow store filled by a small sweep.

One temperature sweep (baseline + T=8, folds 0,1, then both again on the confirming seed 1) runs
once per session (`confirmed_sweep` in conftest.py): fold 2 of every setting is missing. A copy of its store with the T=8 fold-1 run marked FAILED (MlflowClient.set_terminated,
as a crashed trial leaves it) adds a failed trial. Every end-to-end test reads those stores.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image
from sweep_helpers import ROOT, run

from analysis import common as cm
from analysis import evaluate as ev
from analysis import stats
from analysis import tables as tb
from tracking import schema as sc

EXP = "sall-temperature"


# ---------------------------------------------------------------------------------------------
# fast: statistics and the paper's data
def test_paired_bootstrap_is_paired_and_pooled():
    rng = np.random.default_rng(1)
    same = rng.random(200) < 0.6
    b = stats.paired_bootstrap([(same, same)], n_boot=500)
    assert (b.diff, b.lo, b.hi) == (0.0, 0.0, 0.0)  # identical predictions: no uncertainty at all
    ours = np.ones(100, bool)
    ref = np.r_[np.ones(80, bool), np.zeros(20, bool)]
    b = stats.paired_bootstrap([(ours, ref), (ours[:50], ours[:50])], n_boot=4000)
    assert b.diff == pytest.approx(20 / 150) and b.n_images == 150 and b.n_folds == 2
    assert b.lo < b.diff < b.hi and b.lo > 0


def test_paper_tables_transcribed():
    p = cm.paper_tables()
    t8 = next(r for r in p["IV"]["rows"] if r["T"] == 8)
    assert t8["dr"]["acc"] == 78.77 and t8["amd"]["acc"] == 81.73
    base = p["III"]["rows"][0]
    assert (base["sa"], base["mt"], base["dr"]["acc"]) == (False, False, 75.39)
    assert len(p["III"]["rows"]) == 9 and len(p["VI"]["rows"]) == 10 and len(p["IX"]["rows"]) == 4


# ---------------------------------------------------------------------------------------------
# the store: one small real sweep, plus one failed trial
@pytest.fixture(scope="module")
def store(confirmed_sweep) -> Path:
    return confirmed_sweep[0]


@pytest.fixture(scope="module")
def failed_store(store, tmp_path_factory):
    """The same store (a copy of its database; artifacts shared) with T=8 fold 1 FAILED."""
    import shutil

    d = tmp_path_factory.mktemp("analysis_failed")
    shutil.copy(store / "mlflow.db", d / "mlflow.db")
    c = cm.client(uri(d))
    rid = student(d, "T=8", 1).info.run_id
    c.set_tag(rid, sc.TAG_ERROR, "RuntimeError: injected")
    c.set_terminated(rid, "FAILED")
    return d


def tables_argv(store: Path, out: Path, *extra: str) -> list[str]:
    """analysis/tables.py's flags for a test store, written to `out`, logging nothing."""
    return ["--experiment", EXP, "--mlflow-uri", uri(store), "--out", str(out), "--no-log", *extra]


def uri(d: Path) -> str:
    return f"sqlite:///{d / 'mlflow.db'}"


def student(d: Path, label: str, fold: int, seed: int = 0):
    """The student run of a setting, fold and seed (seed 0: the grid's; seed 1: the confirmation's)."""
    c = cm.client(uri(d))
    exp = c.get_experiment_by_name(EXP)
    (run,) = c.search_runs(
        [exp.experiment_id],
        f"tags.`{sc.TAG_STAGE}` = '{sc.STAGE_STUDENT}' and tags.`{sc.TAG_LABEL}` = '{label}' and "
        f"tags.`{sc.TAG_FOLD}` = '{fold}' and tags.`{sc.TAG_SEED}` = '{seed}'",
    )
    return run


@pytest.mark.slow
def test_tables_from_a_real_sweep(store):
    r = run(
        [sys.executable, str(ROOT / "analysis" / "tables.py"), "--experiment", EXP, "--bootstrap", "500"], store
    )  # default URI sqlite:///mlflow.db in the sweep's folder
    assert r.returncode == 0, r.stderr
    md = r.stdout
    assert "Table IV" in md and "Table V" in md
    table_iv = md.split("## Table V")[0].split("### Noise")[0]
    rows = {line.split("|")[1].strip(): line for line in table_iv.splitlines() if line.startswith("| ")}
    # our mean +- std (n) beside the paper's number, matched by setting
    t8 = rows["T=8"]
    assert "78.77" in t8 and "81.73" in t8 and "(2)" in t8 and "±" in t8
    assert "75.39" in rows["baseline"]
    # the value is the mean over the two folds, read independently from MLflow
    accs = [student(store, "T=8", f).data.metrics["test/dr/acc"] for f in (0, 1)]
    assert f"{100 * np.mean(accs):.1f} ± {100 * np.std(accs, ddof=1):.1f} (2)" in t8
    # the missing fold is named
    assert "n=2 of 3, fold 2 missing" in t8 and "fold 2 missing" in rows["baseline"]
    # the gain section: paired over folds and bootstrapped over test images
    assert "Is the gain real?" in md and "corrected t" in md and "images, 2 folds" in md
    # the noise kept apart, the answer chosen on validation, and a verdict word on every gain row
    assert "### Noise (IV)" in md and "**The answer.**" in md and "chosen on validation (folds 0,1 × seed 0)" in md
    gain_lines = [x for x in md.split("### Is the gain real? (IV)")[1].split("_")[0].splitlines() if x.count("|") > 9]
    assert all(any(w in x for w in ("established", "suggestive", "not distinguished")) for x in gain_lines[2:])
    assert "beyond noise" not in md and "within noise" not in md
    # outputs on disk and on the parent run
    files = Path(store / "analysis_out" / EXP)
    for name in ("tables.md", "tables.tex", "table_IV.csv", "table_V.csv", "gain_IV.csv"):
        assert (files / name).stat().st_size > 100, name
    assert "\\begin{tabular}" in (files / "tables.tex").read_text()
    c = cm.client(uri(store))
    parent = cm.latest_parent(uri(store), c.get_experiment_by_name(EXP).experiment_id)
    assert "analysis/tables/tables.md" in {a.path for a in c.list_artifacts(parent, "analysis/tables")}


@pytest.mark.slow
def test_tables_show_failed_trials(failed_store, tmp_path, capsys):
    assert tb.main(tables_argv(failed_store, tmp_path, "--bootstrap", "200")) == 0
    md = capsys.readouterr().out
    t8 = next(line for line in md.splitlines() if line.startswith("| T=8 |"))
    assert "n=1 of 3, FAILED (fold 1), fold 2 missing" in t8
    acc0 = student(failed_store, "T=8", 0).data.metrics["test/dr/acc"]
    assert f"| {100 * acc0:.1f} (1) | 78.77 |" in t8  # fold 0 only: the failed fold is not averaged in
    gain_table = md.split("### Is the gain real?")[1].split("\n\n")[1]  # the block after its heading
    t8_gains = [x for x in gain_table.splitlines() if x.split("|")[1].strip().lstrip("★ ") == "T=8"]
    assert all("not distinguished" in x for x in t8_gains), t8_gains  # one fold: no test, no claim


@pytest.mark.slow
def test_tables_override_and_csv(failed_store, tmp_path, capsys):
    assert (
        tb.main(tables_argv(failed_store, tmp_path, "--table", "III", "--bootstrap", "0", "--metrics", "acc,kappa"))
        == 0
    )
    md = capsys.readouterr().out
    assert "Table III" in md and "DR kappa" in md
    # --bootstrap 0 skips the resampling over images, never the tests over folds
    assert "Is the gain real?" in md and "bootstrap skipped (--bootstrap 0)" in md
    import csv

    rows = list(csv.DictReader(open(tmp_path / "table_III.csv")))
    t8 = next(r for r in rows if r["setting"] == "T=8")
    assert t8["folds_failed"] == "1" and t8["folds_finished"] == "0" and t8["dr/acc_n"] == "1"
    base = next(r for r in rows if r["setting"] == "baseline")
    assert base["folds_missing"] == "2" and float(base["dr/acc_paper"]) == 75.39
    assert base["folds_finished"] == "0,1"


@pytest.mark.slow
def test_tables_errors(store, capsys):
    assert tb.main(["--experiment", "nope", "--mlflow-uri", uri(store)]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err
    assert tb.main(["--experiment", EXP, "--mlflow-uri", uri(store / "absent"), "--no-log"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_figures_written(store, tmp_path):
    from analysis import figures as fg  # in-process: the scripts' own start-up is tested by tables.py's run

    out = tmp_path / "figs"
    argv = ["--experiment", EXP, "--out", str(out), "--mlflow-uri", uri(store), "--cache-dir", str(store / "cache")]
    assert fg.main([*argv, "--gradcam-per-task", "1"]) == 0
    for name in ("fig5_temperature.png", "fig6_confusion.png", "fig7_reliability.png", "fig8_gradcam.png"):
        assert (out / name).stat().st_size > 20_000, name
    assert json.loads((out / "figures.json").read_text())["sall"] == "T=8"


@pytest.fixture(scope="module")
def external(tmp_path_factory) -> Path:
    """A small external CSV dataset: 3 dr and 2 amd images per grade."""
    root = tmp_path_factory.mktemp("external")
    lines, k = ["image,task,grade,patient"], 0
    for task, per in (("dr", 3), ("amd", 2)):
        for g in range(5 if task == "dr" else 4):
            for _ in range(per):
                write_image(root / f"img/{k}.png", 40, seed=k)
                lines.append(f"img/{k}.png,{task},{g},p{k}")
                k += 1
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    (root / "dr_only.csv").write_text("\n".join(lines[:16]) + "\n")
    return root


@pytest.mark.slow
def test_evaluate_external_end_to_end(store, external, capsys):
    rid = student(store, "T=8", 0).info.run_id
    data = str(external / "manifest.csv")
    argv = ["--run-id", rid, "--dataset", data, "--mlflow-uri", uri(store), "--cache-dir", str(store / "cache")]
    assert ev.main(argv) == 0  # in-process, as the error cases below
    out = json.loads(capsys.readouterr().out)
    assert out["n_images"] == {"dr": 15, "amd": 8} and out["temperature"] == 8.0
    assert 0 <= out["metrics"]["dr"]["acc"] <= 1
    c = cm.client(uri(store))
    ext = c.get_run(out["external_run"])
    assert ext.data.tags[sc.TAG_STAGE] == sc.STAGE_EXTERNAL and ext.data.tags[sc.TAG_EVALUATED_RUN] == rid
    assert ext.info.experiment_id == c.get_run(rid).info.experiment_id
    assert ext.data.metrics["external/dr/acc"] == pytest.approx(out["metrics"]["dr"]["acc"])
    assert "predictions_dr.csv" in {a.path for a in c.list_artifacts(ext.info.run_id)}
    # the tables still see only the trials: the grid's 4 and the confirmation's 4
    assert len(cm.student_runs(uri(store), ext.info.experiment_id)) == 8


@pytest.mark.slow
def test_evaluate_errors(store, external, capsys):
    rid = student(store, "T=8", 0).info.run_id
    c = cm.client(uri(store))
    parent = cm.latest_parent(uri(store), c.get_experiment_by_name(EXP).experiment_id)
    base = ["--mlflow-uri", uri(store), "--cache-dir", str(store / "cache"), "--no-log"]
    cases = [
        (["--run-id", "0123456789abcdef", "--dataset", "synthetic"], "unknown run id"),
        (["--run-id", parent, "--dataset", "synthetic"], "has no model artifact"),
        (["--run-id", rid, "--dataset", "synthetic", "--task", "arter"], "has no arter head"),
        (["--run-id", rid, "--dataset", str(external / "dr_only.csv"), "--task", "amd"], "no images of task amd"),
    ]
    for argv, msg in cases:
        assert ev.main(argv + base) == 2
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]  # progress lines, then one error line, no traceback
        assert last.startswith("error: ") and msg in last and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# seeds: the noise split into folds and seeds, and the floor, on a store written by hand
def test_noise_split_into_folds_and_seeds():
    # fold means 0.5, 0.6, 0.7 (sd 0.1); within each fold the two seeds differ by 0.02 (sd 0.0141)
    values = {(f, s): 0.5 + 0.1 * f + (0.01 if s else -0.01) for f in range(3) for s in range(2)}
    nz = stats.noise(values)
    assert nz.fold_sd == pytest.approx(0.1) and nz.seed_sd == pytest.approx(0.02 / math.sqrt(2))
    assert (nz.n_folds, nz.n_seeds) == (3, 2)
    assert math.isnan(stats.noise({(0, 0): 0.5, (1, 0): 0.6}).seed_sd)  # one seed: no seed spread


def test_bootstrap_counts_an_image_once_over_seeds():
    rng = np.random.default_rng(0)
    ours = rng.random((2, 400)) < 0.7  # two seeds on the same 400 images
    ref = rng.random((2, 400)) < 0.6
    b = stats.paired_bootstrap([(ours, ref)], n_boot=2000)
    assert b.n_images == 400 and b.diff == pytest.approx(ours.mean() - ref.mean())
    assert b.lo < b.diff < b.hi


def _hand_store(d: Path, acc: dict[tuple[str, int, int], float], val: dict | None = None, confirm: str = "") -> str:
    """An MLflow store with one student run per (setting, fold, seed) and the tags a sweep writes;
    the validation accuracy is the test one unless `val` gives it; `confirm` tags the sweep run's
    confirming seeds."""
    from sall.config import from_preset

    u = f"sqlite:///{d / 'mlflow.db'}"
    c = cm.client(u)
    exp = c.create_experiment(EXP)
    tags = {sc.TAG_STAGE: sc.STAGE_SWEEP, sc.TAG_SWEEP: "temperature"}
    parent = c.create_run(exp, tags={**tags, **({sc.TAG_CONFIRM_SEEDS: confirm} if confirm else {})}).info.run_id
    for (label, fold, seed), a in acc.items():
        base = from_preset("cpu", fold=fold, seed=seed)
        cfg = (
            base.replace(temperature=1.0, multitask=False, sa_labels=False)
            if label == "baseline"
            else base.replace(temperature=float(label[2:]))
        )
        run = c.create_run(
            exp,
            tags={
                sc.TAG_STAGE: sc.STAGE_STUDENT,
                sc.TAG_SWEEP: "temperature",
                sc.TAG_FOLD: str(fold),
                sc.TAG_SEED: str(seed),
                sc.TAG_TRIAL_KEY: cfg.trial_key(),
                sc.TAG_LABEL: label,
                sc.TAG_PARENT: parent,
            },
        )
        rid = run.info.run_id
        for k, v in cfg.params().items():
            c.log_param(rid, k, v)
        for task, offset in (("dr", 0.0), ("amd", 0.2)):
            c.log_metric(rid, f"test/{task}/acc", a + offset)
            c.log_metric(rid, f"val_best/{task}/acc", (val or {}).get((label, fold, seed), a) + offset)
        c.set_terminated(rid, "FINISHED")
    return u


def _tables(u: str, tmp_path: Path, capsys) -> str:
    argv = ["--experiment", EXP, "--mlflow-uri", u, "--out", str(tmp_path / "out"), "--bootstrap", "0"]
    assert tb.main([*argv, "--no-log", "--table", "IV"]) == 0
    return capsys.readouterr().out


def test_table_with_seeds_tests_the_fold_means_not_the_pairs(tmp_path, capsys):
    # baseline: fold means .50/.52/.54, seeds +-.005; T=4: +.04 on every pair but one (+.03)
    acc = {}
    for f in range(3):
        for s in range(2):
            b = 0.50 + 0.02 * f + (0.005 if s else -0.005)
            acc[("baseline", f, s)] = b
            acc[("T=4", f, s)] = b + (0.03 if (f, s) == (2, 1) else 0.04)
    md = _tables(_hand_store(tmp_path, acc), tmp_path, capsys)
    base = next(line for line in md.split("### Noise")[0].splitlines() if line.startswith("| baseline |"))
    assert "52.0 ± 2.0 (6)" in base and "6 of 6 (3 folds × 2 seeds)" in base
    noise = next(line for line in md.split("### Noise")[1].splitlines() if line.startswith("| baseline |"))
    assert "| 2.0 | 0.7 |" in noise  # DR: sd over folds 2.0 pp, over seeds 0.71 pp
    # the unit is the fold: D_f = 4, 4, 3.5 pp; the corrected t over those 3 values, 2 df
    d = np.array([4, 4, 3.5]) / 100
    from scipy import stats as sps

    se = math.sqrt(1 / 3 + 0.5) * d.std(ddof=1)
    p = 2 * sps.t.sf(d.mean() / se, 2)
    gain = next(line for line in md.split("### Is the gain real?")[1].splitlines() if "| dr |" in line)
    assert "+3.8 [+4.0, +4.0, +3.5]" in gain and f"| {p:.3f} |" in gain
    # the family is DR and AMD (both +3.83 pp): Holm doubles the smaller p
    assert f"| {min(1, 2 * p):.3f} |" in gain
    word = "established" if 2 * p < 0.05 else "suggestive" if p < 0.05 else "not distinguished"
    assert (
        f"| {word} |" in gain and "| 0.3 / 0.4 |" in gain
    )  # sd of D over folds / over seeds (0.71 on one fold, pooled over 3)


def test_the_best_is_chosen_on_validation_and_confirmed_on_fresh_seeds(tmp_path, capsys):
    # seed 0 chooses: T=2 wins on validation, T=4 on test; seeds 1 and 2 confirm T=2 only
    acc, val = {}, {}
    for f in range(3):
        b = 0.50 + 0.02 * f
        acc[("baseline", f, 0)], acc[("T=2", f, 0)], acc[("T=4", f, 0)] = b, b + 0.01, b + 0.05
        val[("baseline", f, 0)], val[("T=2", f, 0)], val[("T=4", f, 0)] = b, b + 0.06, b + 0.02 + 0.002 * f
        for s in (1, 2):
            acc[("baseline", f, s)] = b + 0.001 * s
            acc[("T=2", f, s)] = b + 0.03 + 0.002 * f + 0.001 * s
    u = _hand_store(tmp_path, acc, val, confirm="1,2")
    md = _tables(u, tmp_path, capsys)
    answer = next(x for x in md.splitlines() if x.startswith("**The answer.**"))
    assert "**DR: T=2**, chosen on validation (folds 0,1,2 × seed 0)" in answer
    assert "confirmed on folds 0,1,2 × seeds 1,2 (test split)" in answer and "rests on 3 folds" in answer
    d = np.array([3.0, 3.2, 3.4]) / 100
    from scipy import stats as sps

    p = 2 * sps.t.sf(d.mean() / (math.sqrt(1 / 3 + 0.5) * d.std(ddof=1)), 2)
    assert "+3.2 pp" in answer and f"p = {p:.3f}, Holm p = {min(1, 2 * p):.3f}" in answer
    assert "Not distinguished from it on validation: T=4" not in answer  # T=4 is 3.6-4 pp behind on every fold
    assert "### Confirmed on fresh replicates (IV)" in md
    # the confirming runs never enter the grid's table: its rows hold seed 0 only
    base = next(line for line in md.split("### Noise")[0].splitlines() if line.startswith("| baseline |"))
    assert "3 of 3" in base
