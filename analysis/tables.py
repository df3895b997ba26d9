"""Print the paper's table for a sweep: our mean +- std over folds beside the paper's numbers.

    python analysis/tables.py --experiment sall-temperature [--mlflow-uri URI] [--out DIR]

Reads the sweep's trial runs from MLflow, groups them by setting (trial key) over folds and
prints the paper's table for that study as Markdown: Table III (ablation), IV and V
(temperature), VI (data ratio), VIII (task count), IX (per-class caps); the experiment's
`sall.sweep` tag picks it, --table overrides. Each of our cells is `mean +- std (n folds)`, in
percent like the paper; the paper's value (analysis/paper_tables.json) stands beside it.
Missing folds and failed trials are named in the `folds` column and never averaged in.

Below each table, the answer (analysis/gain.py): per task the setting chosen on validation, its
gain with a verdict (established / suggestive / not distinguished), confirmed on fresh seeds when
the sweep ran them; then "Is the gain real?": each setting against its reference, the fold as the
unit, the corrected resampled t, Holm and BH over the table's comparisons, an equivalence test,
and a bootstrap over test images labelled as what it is (test-set sampling only).

Writes tables.md, tables.tex and one CSV per table (plus gain_<table>.csv) to --out (default
analysis_out/<experiment>/) and logs them to the experiment's latest sweep (parent) run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from analysis import common as cm
from analysis import gain as gn
from analysis import stats
from sall.errors import SallError
from tracking import schema as sc

SWEEP_TABLES = {
    "ablation": ["III"],
    "temperature": ["IV", "V"],
    "search": ["IV", "V"],
    "data_ratio": ["VI"],
    "task_count": ["VIII"],
    "sample_caps": ["IX"],
}
TABLES = ("III", "IV", "V", "VI", "VIII", "IX")
METRIC_NAMES = {"acc": "acc", "conf": "con", "err": "err"}
DASH = "—"


# ---------------------------------------------------------------------------------------------
# the table model
@dataclass
class Column:
    id: str  # "dr/acc"
    header: str  # "DR acc"
    metric: str  # "test/dr/acc"
    task: str
    scale: float = 100.0
    decimals: int = 1
    paper: bool = True  # the paper reports it: a paper column follows ours
    paper_decimals: int = 2


@dataclass
class Row:
    keys: list[str]
    setting: cm.Setting | None
    paper: dict[str, float] = field(default_factory=dict)  # column id -> the paper's value
    ref: Row | None = None  # compare against this row ("Is the gain real?")
    reference: bool = False  # this row is a reference (baseline / single-task models)

    @property
    def label(self) -> str:
        return self.setting.label if self.setting else self.keys[0]


@dataclass
class Choice:
    task: str
    row: Row
    val: float  # its validation accuracy (mean over folds of the per-fold means)
    near: list[str]  # the settings not distinguished from it on validation (it first)
    replicates: list[tuple[int, int]]  # the (fold, seed) replicates whose validation chose it


@dataclass
class Table:
    id: str
    title: str
    key_headers: list[str]
    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    gains: list[dict] = field(default_factory=list)  # per (row, task) against its reference
    design: gn.Design = gn.FOLDS  # the test's unit and the corrected t's n_test / n_train
    chosen: dict[str, Choice] = field(default_factory=dict)  # task -> the row chosen on validation
    confirmed: dict[str, dict] = field(default_factory=dict)  # task -> its test on fresh replicates


# ---------------------------------------------------------------------------------------------
# cells


def _order_and_link(rows: list):
    """Sort rows by their `_order`, point every row at the reference row (the baseline), return it."""
    rows.sort(key=lambda r: r._order)
    base = next((r for r in rows if r.reference), None)
    for r in rows:
        if base is not None and r is not base:
            r.ref = base
    return base


def ours(row: Row, col: Column) -> tuple[str, float, float, int]:
    """(display, mean, sd, n) of our value over the finished replicates. The sd is the spread
    over folds (of the per-fold means over seeds); the noise table adds the spread over seeds."""
    s = row.setting
    if s is None:
        return DASH, math.nan, math.nan, 0
    if col.task not in s.config.tasks:
        return "NA", math.nan, math.nan, 0
    values = s.values(col.metric)
    if not values:
        if not s.finished:
            statuses = {s.runs[k].status for k in s.failed}
            text = "FAILED" if "FAILED" in statuses else ("running" if "RUNNING" in statuses else "missing")
            return text, math.nan, math.nan, 0
        return "n/a", math.nan, math.nan, 0  # finished, but undefined (e.g. err with no error)
    v = list(values.values())
    mean = sum(v) / len(v)
    std = stats.noise(values).fold_sd
    spec = f".{col.decimals}f"
    if col.scale == 1.0 and 0 < abs(mean) < 10**-col.decimals * 10:  # tiny (soft-label var): show digits
        spec = ".2e"
    text = f"{col.scale * mean:{spec}}"
    if not math.isnan(std):
        text += f" ± {col.scale * std:{spec}}"
    return f"{text} ({len(v)})", mean, std, len(v)


def paper_cell(row: Row, col: Column) -> str:
    v = row.paper.get(col.id)
    return DASH if v is None else f"{v:.{col.paper_decimals}f}"


def headers(t: Table) -> list[str]:
    out = list(t.key_headers)
    for c in t.columns:
        out.append(f"{c.header} (ours)" if c.paper else c.header)
        if c.paper:
            out.append(f"{c.header} (paper)")
    return out + ["folds"]


def display_rows(t: Table) -> list[list[str]]:
    out = []
    for r in t.rows:
        line = list(r.keys)
        for c in t.columns:
            line.append(ours(r, c)[0])
            if c.paper:
                line.append(paper_cell(r, c))
        line.append(r.setting.fold_note() if r.setting else "not run")
        out.append(line)
    return out


# ---------------------------------------------------------------------------------------------
# building the tables
def _fmt_t(t: float) -> str:
    return f"{t:g}"


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def _metric_columns(tasks: list[str], metrics: list[str], paper_metrics=("acc", "conf", "err")) -> list[Column]:
    return [
        Column(
            f"{t}/{m}",
            f"{t.upper()} {METRIC_NAMES.get(m, m)}",
            sc.metric(sc.TEST, t, m),
            t,
            paper=m in paper_metrics,
            decimals=1 if m in ("acc", "conf", "err", "macro_f1") else 3,
            scale=100.0 if m in ("acc", "conf", "err", "macro_f1", "ece") else 1.0,
        )
        for m in metrics
        for t in tasks
    ]


def _paper_values(prow: dict, tasks: list[str]) -> dict[str, float]:
    return {f"{t}/{m}": v for t in tasks for m, v in prow.get(t, {}).items()}


def switch_table(tid: str, sets: list[cm.Setting], paper: dict, metrics: list[str]) -> Table:
    """Table III (ablation) or IV (temperature): rows keyed by (T, SA-label, multi-task)."""
    lookup: dict[tuple, tuple[str, int, dict]] = {}
    for src in ("III", "IV"):
        for i, p in enumerate(paper[src]["rows"]):
            lookup[(float(p["T"]), p["sa"], p["mt"])] = (src, i, p)
    tasks = cm.tasks(sets)
    cols = _metric_columns(tasks, metrics)
    rows = []
    for s in sets:
        c = s.config
        k = (c.temperature, c.sa_labels, c.multitask)
        src, i, p = lookup.get(k, (DASH, 99, {}))
        row = Row(
            [
                s.label,
                _fmt_t(c.temperature),
                _yn(c.sa_labels),
                _yn(c.multitask),
                f"{src}{'*' if k == (1.0, False, False) else ''}",
            ],
            s,
            _paper_values(p, tasks),
            reference=c.is_baseline,
        )
        row._order = (
            ((0, 0, 0) if row.reference else (1, i, 0))
            if tid == "III"
            else ((0, 0, 0) if row.reference else (1, c.temperature, (not c.sa_labels, not c.multitask)))
        )
        rows.append(row)
    base = _order_and_link(rows)
    title = (
        paper["III"]["title"]
        if tid == "III"
        else "Table IV: SALL at each temperature T beside the single-task baseline"
    )
    notes = [
        "`paper` names the paper's table of the matching row (* = the paper's baseline); "
        "the paper reports T = 1, 2, 3 and the baseline in Table III, T = 4 ... 50 in Table IV."
    ]
    if base is None:
        notes.append("No baseline (T=1, sa=no, mt=no) in this experiment: no gain tests.")
    return Table(tid, title, ["setting", "T", "SA-label", "Multi-task", "paper"], cols, rows, notes)


def soft_table(sets: list[cm.Setting], paper: dict) -> Table:
    """Table V: the soft labels' mean max and variance against T (per task's teacher)."""
    pv = {float(p["T"]): p for p in paper["V"]["rows"]}
    sets = [s for s in sets if s.config.sa_labels]
    tasks = cm.tasks(sets)
    cols = []
    for t in tasks:
        cols.append(Column(f"{t}/max", f"{t.upper()} max", sc.metric(sc.SOFT, t, "max_mean"), t, 1.0, 4, True, 4))
        cols.append(Column(f"{t}/var", f"{t.upper()} var", sc.metric(sc.SOFT, t, "var"), t, 1.0, 4, True, 4))
    rows = []
    for s in sorted(sets, key=lambda s: (s.config.temperature, not s.config.multitask)):
        p = pv.get(s.config.temperature, {})
        vals = {f"{t}/{k}": p[k] for t in tasks for k in ("max", "var") if k in p}
        rows.append(Row([s.label, _fmt_t(s.config.temperature)], s, vals))
    return Table(
        "V",
        paper["V"]["title"],
        ["setting", "T"],
        cols,
        rows,
        [
            "Ours: soft labels of each task's teacher on the other tasks' training images at T. "
            "The paper gives one max / var over both tasks, repeated beside each task."
        ],
    )


def ratio_tables(sets: list[cm.Setting], paper: dict, metrics: list[str]) -> list[Table]:
    """Table VI: one half per direction; the reduced task's share and the paper's image counts."""
    tasks = list(sets[0].config.tasks)
    if len(tasks) < 2:
        raise SallError("the data-ratio table needs two tasks; the trials have " + ",".join(tasks))
    totals = paper["VI"]["totals"]
    out = []
    for a, b in ((tasks[0], tasks[1]), (tasks[1], tasks[0])):
        prow = {p["count"]: p for p in paper["VI"]["rows"] if p["reduced"] == b and a in p}
        rows = []
        for s in sets:
            counts = dict(s.config.sample_counts)
            if set(counts) - {b}:
                continue
            f = counts.get(b, 1.0)
            paper_count = None
            if b in totals and f <= 1.0:
                near = [c for c in prow if abs(c - f * totals[b]) <= 0.005 * totals[b]]
                paper_count = near[0] if near else None
            share = f"{100 * f:.2f} %" if f <= 1.0 else f"{f:g} images"
            pa = totals.get(a, DASH)
            keys = [s.label, share, f"{pa} / {paper_count if paper_count else DASH}"]
            r = Row(keys, s, _paper_values(prow.get(paper_count, {}), [a]))
            r._order = f if f <= 1 else 1e9
            rows.append(r)
        rows.sort(key=lambda r: r._order)
        cols = _metric_columns([a], metrics)
        out.append(
            Table(
                f"VI-{b}",
                f"Table VI: fewer {b.upper()} training images; {a.upper()} metrics",
                ["setting", f"{b.upper()} share", f"paper images {a.upper()} / {b.upper()}"],
                cols,
                rows,
                [
                    f"Our fractions are the paper's counts over its training set ({b.upper()}: "
                    f"{totals.get(b, '?')} images); the matching paper row is the one whose count "
                    "the fraction reproduces."
                ],
            )
        )
    return out


def count_table(sets: list[cm.Setting], paper: dict, metrics: list[str]) -> Table:
    """Table VIII: single-task models vs SALL with 2 and 3 sub-tasks."""
    pv = {p["setting"]: p for p in paper["VIII"]["rows"]}
    tasks = cm.tasks(sets)
    cols = _metric_columns(tasks, metrics)
    rows = []
    for s in sets:
        c = s.config
        name = "single" if c.is_baseline else (f"{len(c.tasks)} sub-task" if c.sa_labels and c.multitask else None)
        row = Row(
            [s.label, f"T={_fmt_t(c.temperature)}"],
            s,
            _paper_values(pv.get(name, {}), tasks),
            reference=name == "single",
        )
        row._order = (0 if row.reference else 1, len(c.tasks), c.temperature)
        rows.append(row)
    _order_and_link(rows)
    return Table(
        "VIII",
        paper["VIII"]["title"],
        ["setting", "T"],
        cols,
        rows,
        ["NA: the setting has no such task. The paper's 2 sub-task row is its T = 8 row of Table IV."],
    )


def caps_table(sets: list[cm.Setting], paper: dict, metrics: list[str]) -> Table:
    """Table IX: per-class caps, single-task models vs ours; caps map in order to 1500, 3000."""
    caps = sorted({s.config.class_cap for s in sets if s.config.class_cap is not None})
    paper_caps = sorted({p["cap"] for p in paper["IX"]["rows"]})
    cap_map = {
        c: (paper_caps[i] if i < len(paper_caps) and len(caps) == len(paper_caps) else None) for i, c in enumerate(caps)
    }
    pv = {(p["cap"], p["kind"]): p for p in paper["IX"]["rows"]}
    tasks = cm.tasks(sets)
    cols = _metric_columns(tasks, metrics, paper_metrics=("acc",))
    rows, singles = [], {}
    for s in sets:
        c = s.config
        kind = "single" if c.is_baseline else "ours"
        pc = cap_map.get(c.class_cap)
        row = Row(
            [s.label, str(c.class_cap), f"{pc} + {'Single Model' if kind == 'single' else 'ours'}" if pc else DASH],
            s,
            _paper_values(pv.get((pc, kind), {}), tasks),
            reference=kind == "single",
        )
        row._order = (c.class_cap or 0, kind != "single", c.temperature)
        rows.append(row)
        if kind == "single":
            singles[c.class_cap] = row
    rows.sort(key=lambda r: r._order)
    for r in rows:
        if not r.reference:
            r.ref = singles.get(r.setting.config.class_cap)
    notes = [
        "Our caps map in order to the paper's 1500 and 3000 images per class: "
        + ", ".join(f"cap={c} ↔ {p}" for c, p in cap_map.items() if p)
        if any(cap_map.values())
        else "Our caps do not map one to one to the paper's 1500 / 3000: no paper values."
    ]
    return Table("IX", paper["IX"]["title"], ["setting", "cap", "paper row"], cols, rows, notes)


def build(tid: str, sets: list[cm.Setting], metrics: list[str]) -> list[Table]:
    paper = cm.paper_tables()
    if tid in ("III", "IV"):
        return [switch_table(tid, sets, paper, metrics)]
    if tid == "V":
        return [soft_table(sets, paper)]
    if tid == "VI":
        return ratio_tables(sets, paper, metrics)
    if tid == "VIII":
        return [count_table(sets, paper, metrics)]
    if tid == "IX":
        return [caps_table(sets, paper, metrics)]
    raise SallError(f"unknown table '{tid}'; expected one of {', '.join(TABLES)}")


# ---------------------------------------------------------------------------------------------
# Is the gain real?
def family_design(sets: list[cm.Setting], ratio: float | None = None) -> gn.Design:
    """The replicate design the settings share (`gain.design_of`), with `ratio` overriding its
    n_test / n_train; a family that mixes designs has no one unit, so it is an error."""
    designs = {gn.design_of(s.config.redraw, s.config.dataset == "synthetic") for s in sets}
    if len(designs) > 1:
        raise SallError(
            "the runs mix replicates of one fixed split with replicates that drew their own data (--redraw); "
            "expected one kind per analysis: pass --parent to analyse one sweep run"
        )
    d = designs.pop() if designs else gn.FOLDS
    return d if ratio is None else dataclasses.replace(d, ratio=ratio)


def gains(t: Table, uri: str | None, cache: Path, n_boot: int, ratio: float | None = None) -> None:
    """Each row with a reference, per task: its units (D_f, the per-fold mean over seeds of the
    paired accuracy difference, or one difference per replicate that drew its own data), tested as
    one family (`gain.family`), and the bootstrap over test images beside it."""
    t.design = family_design([r.setting for r in t.rows if r.setting is not None], ratio)
    for r in t.rows:
        if r.ref is None or r.setting is None or r.ref.setting is None:
            continue
        for task in r.setting.config.tasks:
            if task not in r.ref.setting.config.tasks:
                continue
            metric = sc.metric(sc.TEST, task, "acc")
            ours, ref = r.setting.values(metric), r.ref.setting.values(metric)
            reps = sorted(set(ours) & set(ref))
            by_fold, note = (
                _image_pairs(r, task, reps, uri, cache, t.design)
                if n_boot > 0
                else ({}, "bootstrap skipped (--bootstrap 0)")
            )
            pairs = [(np.stack([a for a, _ in v]), np.stack([b for _, b in v])) for v in by_fold.values()]
            bs = (
                stats.paired_bootstrap(pairs, n_boot=n_boot)
                if pairs
                else stats.Bootstrap(math.nan, math.nan, math.nan, 0, 0)
            )
            t.gains.append(
                dict(
                    setting=r.label,
                    reference=r.ref.label,
                    task=task,
                    diffs=gn.unit_diffs(ours, ref, t.design),
                    seed_sd=gn.seed_sd(ours, ref),
                    acc=gn.replicate_mean(ours),
                    seeds=len({s for _, s in reps}),
                    boot=bs,
                    note=note,
                    row=r,
                )
            )
    test_family(t.gains, t.design.ratio)
    t.chosen = choose_on_validation(t, t.design)


def test_family(gs: list[dict], ratio: float) -> None:
    """Test a table's comparisons as one family and put each one's figures on its gain entry: the
    single place where table rows get their p-values and verdicts."""
    if not gs:
        return
    d, _ = gn.fold_matrix([g["diffs"] for g in gs])
    fam = gn.family(d, ratio)
    c = fam.test
    for i, g in enumerate(gs):
        g.update(
            mean=float(c.mean[i]),
            sd=float(c.sd[i]),
            n=int(c.n[i]),
            p=float(c.p[i]),
            lo=float(c.lo[i]),
            hi=float(c.hi[i]),
            p_holm=float(fam.p_holm[i]),
            q=float(fam.q[i]),
            verdict=str(fam.verdict[i]),
            p_tost=float(fam.p_tost[i]),
            detectable=gn.detectable(float(c.sd[i]), int(c.n[i]), ratio),
        )


def _image_pairs(r: Row, task: str, reps: list, uri: str | None, cache: Path, design: gn.Design) -> tuple[dict, str]:
    """Per unit (fold, or replicate with its own data), the (correct_ours, correct_ref) arrays of
    each of its seeds over its test images."""
    by_fold: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    note = ""
    for rep in reps:
        a = cm.predictions(uri, r.setting.finished[rep], task, cache)
        b = cm.predictions(uri, r.ref.setting.finished[rep], task, cache)
        if a is None or b is None:
            note = "no per-image predictions logged for some replicate"
            continue
        m = a.merge(b, on="row", suffixes=("_o", "_r")).sort_values("row")
        if (m["label_o"] != m["label_r"]).any() or len(m) != len(a):
            note = "test images differ between the runs; paired on the common ones"
        pcols = sorted(c for c in a.columns if c.startswith("prob_"))
        y = m["label_o"].to_numpy()
        po = m[[f"{c}_o" for c in pcols]].to_numpy().argmax(1)
        pr = m[[f"{c}_r" for c in pcols]].to_numpy().argmax(1)
        pairs = by_fold.setdefault(rep if design.per_replicate else rep[0], [])
        if pairs and len(pairs[0][0]) != len(y):  # seeds of one fold must share its test images
            note = "seeds of a fold saw different test images; bootstrap over the first seed only"
            continue
        pairs.append((po == y, pr == y))
    return by_fold, note


# ---------------------------------------------------------------------------------------------
# the best setting: chosen on validation, and the settings it cannot be told from
def choose_on_validation(t: Table, design: gn.Design = gn.FOLDS) -> dict[str, Choice]:
    """Per task, among the rows compared with a reference, the one with the best validation
    accuracy (`val_best/<task>/acc`). The test split never takes part, so its figures for the
    chosen row are a measurement, not a winner's curse on test images."""
    out = {}
    for task in _acc_tasks(t):
        metric = sc.metric(sc.VAL_BEST, task, "acc")
        rows = {
            r.label: r for r in t.rows if r.ref is not None and r.setting is not None and task in r.setting.config.tasks
        }
        cands = {k: r.setting.values(metric) for k, r in rows.items()}
        cands = {k: v for k, v in cands.items() if v}
        best = gn.choose(cands)
        if best is None:
            continue
        reps = sorted({rep for v in cands.values() for rep in v})
        out[task] = Choice(task, rows[best], gn.replicate_mean(cands[best]), gn.near_best(cands, best, design), reps)
    return out


def _acc_tasks(t: Table) -> list[str]:
    return [c.task for c in t.columns if c.metric.endswith("/acc")]


def is_chosen(t: Table, g: dict) -> bool:
    ch = t.chosen.get(g["task"])
    return ch is not None and ch.row is g["row"]


def gain_of(t: Table, task: str) -> dict | None:
    """The gain entry of the row chosen on validation for `task`."""
    return next((g for g in t.gains if g["task"] == task and is_chosen(t, g)), None)


def confirm(t: Table, sets: list[cm.Setting], ratio: float | None = None) -> None:
    """Per task, the setting chosen on validation against its reference on the confirming
    replicates (fresh seeds, on the synthetic set with fresh data, that played no part in the
    choice), on their test split. One pre-specified comparison per task: the family is the
    confirmed tasks."""
    by_key = {_setting_key(s): s for s in sets}
    design = family_design(sets, ratio)
    entries = []
    for task, ch in t.chosen.items():
        ours_s, ref_s = by_key.get(_setting_key(ch.row.setting)), by_key.get(_setting_key(ch.row.ref.setting))
        if ours_s is None or ref_s is None:
            continue
        metric = sc.metric(sc.TEST, task, "acc")
        ours, ref = ours_s.values(metric), ref_s.values(metric)
        reps = sorted(set(ours) & set(ref))
        if reps:
            entries.append(
                dict(
                    setting=ch.row.label,
                    reference=ch.row.ref.label,
                    task=task,
                    diffs=gn.unit_diffs(ours, ref, design),
                    seed_sd=gn.seed_sd(ours, ref),
                    acc=gn.replicate_mean(ours),
                    reps=reps,
                    design=design,
                    row=ch.row,
                )
            )
    test_family(entries, design.ratio)
    t.confirmed = {e["task"]: e for e in entries}


def _setting_key(s: cm.Setting) -> str:
    """A setting's key whether or not its replicates drew their own data: the confirmation of a
    choice runs the same setting on fresh data."""
    return s.config.replace(redraw=False).trial_key()


def replicates_text(reps: list[tuple[int, int]]) -> str:
    """'folds 0,1,2 × seed 0' for a set of (fold, seed) replicates."""
    folds = sorted({f for f, _ in reps})
    seeds = sorted({s for _, s in reps})
    return (
        f"fold{'s' if len(folds) > 1 else ''} {','.join(map(str, folds))} × "
        f"seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
    )


def _figures(g: dict) -> str:
    """Δ, its 95 % CI and both p-values of one tested entry."""
    return (
        f"{100 * g['mean']:+.1f} pp, 95 % CI {_pp_signed(g['lo'])} to {_pp_signed(g['hi'])}, "
        f"p = {_p(g['p'])}, Holm p = {_p(g['p_holm'])}"
    )


def headline(t: Table) -> str:
    """The answer a reader can act on: per task the setting chosen on validation, its gain with the
    verdict (from the confirming replicates when there are any), the settings it cannot be told
    from, and the tally of the table's verdicts."""
    ref = next((r for r in t.rows if r.reference and r.setting), None)
    if ref is None or not t.gains:
        return ""
    parts = []
    for task, ch in t.chosen.items():
        c, g = t.confirmed.get(task), gain_of(t, task)
        head = f"**{task.upper()}: {ch.row.label}**, chosen on validation ({replicates_text(ch.replicates)})"
        if c is not None and not math.isnan(c["mean"]):
            body = (
                f"; confirmed on {replicates_text(c['reps'])} (test split), against {c['reference']}: {_figures(c)} "
                f"over {len(t.confirmed)} confirmed task(s): **{c['verdict']}**; rests on "
                f"{c['design'].units(c['n'])} of fresh models"
            )
        elif g is not None:
            body = (
                f"; not confirmed on fresh replicates, so its test figures come from the replicates that chose "
                f"it: {_figures(g)} over the table's {len(t.gains)} comparisons: **{g['verdict']}**; rests on "
                f"{t.design.units(g['n'])}"
            )
        else:
            body = ""
        near = ", ".join(ch.near[1:]) or "none"
        parts.append(f"{head}{body}. Not distinguished from it on validation: {near}.")
    if not parts:
        parts.append("No validation accuracy logged: no setting chosen.")
    tally = {v: sum(g["verdict"] == v for g in t.gains) for v in (gn.ESTABLISHED, gn.SUGGESTIVE)}
    return (
        "**The answer.** "
        + " ".join(parts)
        + f" Of the table's {len(t.gains)} comparisons with {ref.label}: {tally[gn.ESTABLISHED]} established, "
        f"{tally[gn.SUGGESTIVE]} suggestive, the rest not distinguished."
    )


GAIN_HEADERS = [
    "setting",
    "vs",
    "task",
    "Δ acc, pp [per fold, mean over seeds]",
    "95 % CI, pp (corrected t)",
    "p",
    "p Holm",
    "q (BH)",
    "verdict",
    "sd of Δ over folds / over seeds, pp",
    "within ±3 pp? TOST p",
    "Δ found at 80 % power, pp",
    "bootstrap 95 % CI, pp (test-set sampling only)",
    "note",
]


def gain_rows(t: Table) -> list[list[str]]:
    out = []
    for g in t.gains:
        per = " [" + ", ".join(f"{100 * d:+.1f}" for d in g["diffs"].values()) + "]" if len(g["diffs"]) <= 6 else ""
        out.append(
            [
                ("★ " if is_chosen(t, g) else "") + g["setting"],
                g["reference"],
                g["task"],
                f"{_pp_signed(g['mean'])}{per}",
                f"{_pp_signed(g['lo'])} to {_pp_signed(g['hi'])}",
                _p(g["p"]),
                _p(g["p_holm"]),
                _p(g["q"]),
                g["verdict"],
                f"{_pp(g['sd'])} / {_pp(g['seed_sd'])}",
                _p(g["p_tost"]),
                _pp(g["detectable"]),
                g["boot"].text(),
                g["note"],
            ]
        )
    return out


def _pp(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.1f}"


def _pp_signed(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:+.1f}"


def _p(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.3f}"


def gain_note(t: Table) -> str:
    n = max((g["n"] for g in t.gains), default=0)
    unit = (
        f"The unit is the replicate: each (fold, seed) drew its own data, and the {n} replicate values are "
        if t.design.per_replicate
        else f"The unit is the fold: Δ per fold is the mean over seeds of the paired difference, and the {n} fold values are "
    )
    why = "replicates share no image" if t.design.independent else "folds share training data"
    return (
        unit + "tested with the corrected resampled t (Nadeau & Bengio): SE = √((1/J + "
        f"n_test/n_train) · S²) with n_test/n_train = {t.design.ratio:g}, J - 1 degrees of freedom, because {why}. "
        "The family is this table's "
        f"{len(t.gains)} comparisons: p is adjusted by Holm (family-wise) and by Benjamini-Hochberg (q). "
        f"Verdicts: {gn.ESTABLISHED} = Holm p < 0.05; {gn.SUGGESTIVE} = p < 0.05 only; {gn.NOT_DISTINGUISHED} "
        "= otherwise, which is not evidence of no effect: that needs TOST p < 0.05 (the difference lies "
        f"within ±{100 * gn.EQUIVALENCE_MARGIN:g} pp). 'Δ found at 80 % power' is the true difference this "
        "design finds four times in five at its observed fold sd. The bootstrap resamples test images "
        "within each fold with the models fixed: test-set sampling only, never a verdict. "
        "★ = the setting chosen on validation for the task."
    )


def noise_rows(t: Table) -> tuple[list[str], list[list[str]]]:
    """Per setting and task: the spread across folds and across seeds, kept apart."""
    tasks = [c.task for c in t.columns if c.metric.endswith("/acc")]
    head = ["setting"] + [f"{task.upper()} acc sd over {k}, pp" for task in tasks for k in ("folds", "seeds")]
    rows = []
    for r in t.rows:
        if r.setting is None:
            continue
        line = [r.label]
        for task in tasks:
            nz = stats.noise(r.setting.values(sc.metric(sc.TEST, task, "acc")))
            line += [_pp(nz.fold_sd), _pp(nz.seed_sd)]
        rows.append(line)
    return head, rows


NOISE_NOTE = (
    "Over folds: the sd of the per-fold means (over seeds), which holds the data split and the "
    "test images; it is the ± of the table above. Over seeds: the sd across seeds within a "
    "fold, pooled over folds (n/a with one seed): the training randomness alone."
)


# ---------------------------------------------------------------------------------------------
# output
def markdown(tables: list[Table], experiment: str) -> str:
    out = [f"# {experiment}", ""]
    for t in tables:
        out += [block + "\n" for block in sections(t)]
    return "\n".join(out)


def sections(t: Table) -> list[str]:
    """One table's Markdown as blocks, most important first (the table, its answer, the
    confirmation, the noise, the gains), so a reader with less room (the sweep run's description)
    can keep a prefix."""
    out = [f"## {t.title}\n\n{_md(headers(t), display_rows(t))}\n\n" + "\n".join(f"_{n}_" for n in t.notes)]
    summary = headline(t)
    if summary:
        out.append(summary)
    if t.confirmed:
        out.append(f"### Confirmed on fresh replicates ({t.id})\n\n{_md(*confirm_rows(t))}\n\n_{confirm_note(t)}_")
    if any(c.metric.endswith("/acc") for c in t.columns):
        out.append(f"### Noise ({t.id})\n\n{_md(*noise_rows(t))}\n\n_{NOISE_NOTE}_")
    if t.gains:
        out.append(f"### Is the gain real? ({t.id})\n\n{_md(GAIN_HEADERS, gain_rows(t))}\n\n_{gain_note(t)}_")
    return out


def confirm_rows(t: Table) -> tuple[list[str], list[list[str]]]:
    head = ["task", "chosen on validation", "chose", "confirmed on", "Δ acc, pp [per unit]", "95 % CI, pp"]
    head += ["p", "p Holm", "verdict"]
    rows = []
    for task, c in t.confirmed.items():
        per = " [" + ", ".join(f"{100 * d:+.1f}" for d in c["diffs"].values()) + "]"
        rows.append(
            [
                task,
                f"{c['setting']} vs {c['reference']}",
                replicates_text(t.chosen[task].replicates),
                replicates_text(c["reps"]),
                _pp_signed(c["mean"]) + per,
                f"{_pp_signed(c['lo'])} to {_pp_signed(c['hi'])}",
                _p(c["p"]),
                _p(c["p_holm"]),
                c["verdict"],
            ]
        )
    return head, rows


def confirm_note(t: Table) -> str:
    """How the confirming replicates were made and tested, from their design."""
    design = next((c["design"] for c in t.confirmed.values()), gn.FOLDS)
    made = (
        "new seeds, each drawing its own data (new images, teachers and students), scored on their test split; "
        "one difference per replicate, tested with the plain paired t (the replicates share no image)"
        if design.independent
        else "new seeds (new teachers and students) on the same data, scored on the test split; the corrected t "
        "over the " + ("replicates" if design.per_replicate else "folds")
    )
    return (
        "The setting was chosen on validation accuracy over the choosing replicates; the confirming replicates are "
        f"{made}. One pre-specified comparison per task, Holm over the tasks."
    )


def _md(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda x: str(x).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def latex(tables: list[Table]) -> str:
    out = ["% generated by analysis/tables.py; needs \\usepackage{booktabs}"]
    for t in tables:
        for title, head, rows in (
            (t.title, headers(t), display_rows(t)),
            (f"Is the gain real? ({t.id})", GAIN_HEADERS, gain_rows(t)),
        ):
            if not rows:
                continue
            out += [
                "\\begin{table}[ht]",
                "\\centering\\small",
                f"\\caption{{{_tex(title)}}}",
                "\\begin{tabular}{" + "l" * len(head) + "}",
                "\\toprule",
                " & ".join(_tex(h) for h in head) + " \\\\",
                "\\midrule",
            ]
            out += [" & ".join(_tex(c) for c in r) + " \\\\" for r in rows]
            out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def _tex(s: str) -> str:
    s = str(s)
    for a, b in (
        ("\\", "\\textbackslash "),
        ("&", "\\&"),
        ("%", "\\%"),
        ("_", "\\_"),
        ("#", "\\#"),
        ("±", "$\\pm$"),
        ("Δ", "$\\Delta$"),
        ("★", "$\\star$"),
        ("↔", "$\\leftrightarrow$"),
        ("—", "--"),
    ):
        s = s.replace(a, b)
    return s


def write_csv(t: Table, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        head = list(t.key_headers)
        for c in t.columns:
            head += [f"{c.id}_mean", f"{c.id}_std", f"{c.id}_n", f"{c.id}_paper"]
        w.writerow(head + ["folds_finished", "folds_failed", "folds_missing", "folds", "run_ids"])
        for r in t.rows:
            line = list(r.keys)
            for c in t.columns:
                _, mean, std, n = ours(r, c)
                line += [_num(c.scale * mean), _num(c.scale * std), n, _num(r.paper.get(c.id))]
            s = r.setting
            line += [
                _reps(s.finished),
                _reps(s.failed),
                _reps(s.missing),
                s.fold_note(),
                " ".join(s.runs[f].run_id for f in sorted(s.runs)),
            ]
            w.writerow(line)


GAIN_CSV = [
    ("setting", lambda t, g: g["setting"]),
    ("reference", lambda t, g: g["reference"]),
    ("task", lambda t, g: g["task"]),
    ("chosen_on_validation", lambda t, g: int(is_chosen(t, g))),
    ("fold_diffs_pp", lambda t, g: " ".join(f"{f}:{100 * d:.3f}" for f, d in g["diffs"].items())),
    ("mean_diff_pp", lambda t, g: _num(100 * g["mean"])),
    ("ci_low_pp", lambda t, g: _num(100 * g["lo"])),
    ("ci_high_pp", lambda t, g: _num(100 * g["hi"])),
    ("p", lambda t, g: _num(g["p"])),
    ("p_holm", lambda t, g: _num(g["p_holm"])),
    ("q_bh", lambda t, g: _num(g["q"])),
    ("verdict", lambda t, g: g["verdict"]),
    ("n_folds", lambda t, g: g["n"]),
    ("n_seeds", lambda t, g: g["seeds"]),
    ("split_ratio", lambda t, g: _num(t.design.ratio)),
    ("fold_sd_pp", lambda t, g: _num(100 * g["sd"])),
    ("seed_sd_pp", lambda t, g: _num(100 * g["seed_sd"])),
    ("tost_p_3pp", lambda t, g: _num(g["p_tost"])),
    ("detectable_80pct_pp", lambda t, g: _num(100 * g["detectable"])),
    ("boot_diff_pp_test_sampling_only", lambda t, g: _num(100 * g["boot"].diff)),
    ("boot_lo_pp_test_sampling_only", lambda t, g: _num(100 * g["boot"].lo)),
    ("boot_hi_pp_test_sampling_only", lambda t, g: _num(100 * g["boot"].hi)),
    ("n_images", lambda t, g: g["boot"].n_images),
    ("note", lambda t, g: g["note"]),
]


def write_gain_csv(t: Table, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([name for name, _ in GAIN_CSV])
        for g in t.gains:
            w.writerow([cell(t, g) for _, cell in GAIN_CSV])


def _reps(reps) -> str:
    """Replicates for a CSV cell: '0 1 2' (folds) or '0:0 0:1' (fold:seed) when seeds vary."""
    reps = list(reps)
    if all(seed == 0 for _, seed in reps):
        return ",".join(str(f) for f, _ in reps)
    return " ".join(f"{f}:{sd}" for f, sd in reps)


def _num(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python analysis/tables.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cm.add_common_args(p)
    p.add_argument(
        "--table",
        default=None,
        help="which paper table(s), comma-separated, among "
        f"{', '.join(TABLES)} (default: from the experiment's sall.sweep tag: "
        + ", ".join(f"{k} -> {'+'.join(v)}" for k, v in SWEEP_TABLES.items())
        + ")",
    )
    p.add_argument("--out", default=None, help="output folder (default analysis_out/<experiment>/)")
    p.add_argument(
        "--metrics",
        default="acc,conf,err",
        help="metrics per task (paper: acc,conf,err; also ece, nll, brier, kappa, macro_f1)",
    )
    p.add_argument("--folds", default=None, help="the folds a complete setting has (default 0,1,2)")
    p.add_argument(
        "--parent",
        default=None,
        help="only the trials of this sweep (parent) run; default: "
        "every trial of the experiment, the latest finished run per setting and fold",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=10000,
        help="bootstrap replicates over test images (0: skip the bootstrap, keep the paired tests)",
    )
    p.add_argument(
        "--split-ratio",
        default="auto",
        help="n_test/n_train of the corrected resampled t; auto: from the runs, 0.5 for the folds' quarter "
        "rotation (train on two quarters, test on one), 0 where every replicate drew its own synthetic data",
    )
    p.add_argument("--no-log", action="store_true", help="do not log the outputs to the parent run")
    return p


def table_ids(sweep: str | None, experiment: str, chosen: str | None = None) -> list[str]:
    """The paper tables to print: --table, else the ones of the experiment's sweep."""
    if chosen:
        return [x.strip().upper() for x in chosen.split(",") if x.strip()]
    if sweep in SWEEP_TABLES:
        return SWEEP_TABLES[sweep]
    raise SallError(
        f"experiment '{experiment}' is of sweep '{sweep}', which has no paper table; "
        f"pass --table among {', '.join(TABLES)}"
    )


def analyse(
    uri: str | None,
    sets: list[cm.Setting],
    ids: list[str],
    metrics: list[str],
    n_boot: int,
    ratio: float | None = None,
    confirming: list[cm.Setting] | None = None,
) -> list[Table]:
    """The tables with their gain tests (and, given the confirming replicates' settings, the
    confirmation of each task's choice): what this script prints, and what a finished sweep puts
    on its own run (sweeps/review.py), so both read the same numbers."""
    tables: list[Table] = []
    with tempfile.TemporaryDirectory() as tmp:
        for tid in ids:
            for t in build(tid, sets, metrics):
                gains(t, uri, Path(tmp), n_boot, ratio)
                if confirming:
                    confirm(t, confirming, ratio)
                tables.append(t)
    return tables


def load(uri: str, experiment: str, parent: str | None, folds: tuple[int, ...] | None):
    """(experiment id, the choosing settings, the confirming ones or None, sweep name): the
    confirming seeds are those the sweep run (`parent`, else the latest) names."""
    seeds = cm.confirm_seeds(uri, parent or cm.latest_parent(uri, cm.experiment_id(uri, experiment)))
    exp_id, sets, sweep = cm.load_sweep(uri, experiment, parent, folds, seeds)
    confirming = None
    if seeds:
        try:
            confirming = cm.load_sweep(uri, experiment, parent, folds, seeds, confirming=True)[1]
        except SallError:
            cm.log(f"[analysis] no confirming runs yet (seeds {','.join(map(str, seeds))})")
    return exp_id, sets, confirming, sweep


def split_ratio(text: str) -> float | None:
    """--split-ratio as a number, or None (auto: from the runs' design)."""
    if text.strip() == "auto":
        return None
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v >= 0):
        raise SallError(
            f"--split-ratio '{text}' is invalid; expected auto or n_test/n_train as a number >= 0, e.g. 0.5"
        )
    return v


def write_outputs(tables: list[Table], experiment: str, out: Path) -> str:
    """tables.md, tables.tex and a CSV per table (and per gain table) in `out`; returns the Markdown."""
    md = markdown(tables, experiment)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(md)
    (out / "tables.tex").write_text(latex(tables))
    for t in tables:
        write_csv(t, out / f"table_{t.id}.csv")
        if t.gains:
            write_gain_csv(t, out / f"gain_{t.id}.csv")
    return md


def run(args: argparse.Namespace) -> int:
    uri = cm.open_store(args.mlflow_uri)
    ratio = split_ratio(args.split_ratio)
    exp_id, sets, confirming, sweep = load(uri, args.experiment, args.parent, cm.parse_folds(args.folds))
    ids = table_ids(sweep, args.experiment, args.table)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    tables = analyse(uri, sets, ids, metrics, args.bootstrap, ratio, confirming)
    out = Path(args.out or Path("analysis_out") / args.experiment)
    print(write_outputs(tables, args.experiment, out))
    cm.log(f"[analysis] wrote {out}/tables.md, tables.tex and {', '.join('table_' + t.id + '.csv' for t in tables)}")
    cm.log(f"[analysis] the runs: {cm.tr.review_hint(uri, exp_id)}")
    cm.log_to_sweep_run(args, uri, exp_id, out, sc.ANALYSIS_TABLES, "the tables")
    return 0


def main(argv=None) -> int:
    return cm.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
