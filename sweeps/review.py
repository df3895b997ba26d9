"""A finished sweep's answer, on its own MLflow run (the parent of its trials).

A reviewer opens the sweep run in the MLflow UI; without this it holds three counters and the
answer needs `python analysis/tables.py` by hand. `review_sweep` runs that analysis in-process
for the sweep's own trials and puts on the sweep run:

* the description (`mlflow.note.content`, rendered as Markdown on the run page): the headline
  first (the best setting against the baseline and the noise floor), then the paper table, its
  noise and "Is the gain real?", as much as fits in a tag;
* artifacts: everything tables.py writes (`analysis/tables/`: tables.md, .tex, CSVs) and the
  figures of analysis/figures.py but Grad-CAM (`analysis/figures/`);
* metrics `best/<task>/<name>` (see BEST_METRICS) and a tag `sall.best.<task>` naming the setting.

Only MLflow's client is used, as by the analysis scripts, so it works wherever the sweep logged:
a local SQLite file or a cluster's tracking server. It must never fail the sweep: whatever goes
wrong is one warning line on stderr, and the trials and the exit code stay as they were.
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sweeps import schema as sc

NOTE_LIMIT = 8000  # MLflow's longest tag value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH)
METRICS = ["acc", "conf", "err"]  # the paper's columns, as tables.py prints by default
BOOTSTRAP = 10000  # tables.py's default: the multinomial bootstrap costs well under a second

# The sweep run's best-setting metrics, per task: best/<task>/<name>. The best setting of a task
# is the one with the largest mean accuracy gain over its reference (the baseline).
BEST_METRICS = {
    "temperature": "T of the best setting",
    "delta_pp": "its mean accuracy difference to the reference, pp, paired over fold x seed",
    "ci_low_pp": "lower end of that difference's 95 % CI: delta - the pooled noise floor",
    "ci_high_pp": "upper end: delta + the pooled noise floor (the floor the verdicts use)",
    "boot_low_pp": "bootstrap 95 % CI of the difference over test images, lower end",
    "boot_high_pp": "the same, upper end",
    "acc_pct": "the best setting's mean test accuracy, %",
}


def review_sweep(uri: str, experiment_id: str, parent_id: str, n_boot: int = BOOTSTRAP) -> None:
    """Put the analysis of the sweep run `parent_id` on that run; warn, never raise, on failure.
    What it needs beyond the ids (the experiment's name, the folds) it reads from MLflow, so any
    sweep can call it with what it has at its end."""
    t0 = time.time()
    experiment = experiment_id
    chatter = io.StringIO()  # the analysis' own progress lines: the sweep prints one line instead
    try:
        from analysis.tables import SWEEP_TABLES
        from sweeps import tracking as tr

        experiment, sweep, folds = _sweep_of(uri, experiment_id, parent_id)
        if sweep not in SWEEP_TABLES or not _has_trials(uri, experiment_id, parent_id):
            return  # no paper table, or no trial (a search's candidates): nothing to put on its run
        with contextlib.redirect_stderr(chatter):
            summary = _review(uri, experiment, parent_id, folds, n_boot)
        tr.log_metrics(uri, parent_id, {"review_seconds": time.time() - t0})
        print(
            f"[sweep] the answer is on the sweep run's page ({time.time() - t0:.1f}s): {summary}",
            file=sys.stderr,
            flush=True,
        )
    except Exception as e:  # never fail the sweep over its summary
        text = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        print(
            f"warning: the analysis was not put on sweep run {parent_id} ({text}); the trials are kept; "
            f"`python analysis/tables.py --experiment {experiment} --parent {parent_id}` retries it",
            file=sys.stderr,
            flush=True,
        )


def _sweep_of(uri: str, experiment_id: str, parent_id: str) -> tuple[str, str | None, str | None]:
    """(experiment name, sweep name, its folds as the sweep run's `folds` param, e.g. '0,1,2')."""
    from sweeps import tracking as tr

    c = tr.client(uri)
    run = tr.retry(c.get_run, parent_id)
    name = tr.retry(c.get_experiment, experiment_id).name
    return name, run.data.tags.get(sc.TAG_SWEEP), run.data.params.get("folds")


def _has_trials(uri: str, experiment_id: str, parent_id: str) -> bool:
    from sweeps import tracking as tr

    return bool(
        tr.find_runs(
            uri,
            experiment_id,
            f"tags.`{sc.TAG_STAGE}` = '{sc.STAGE_STUDENT}' and tags.`{sc.TAG_PARENT}` = '{parent_id}'",
            max_results=1,
        )
    )


def _review(uri: str, experiment: str, parent_id: str, folds: str | None, n_boot: int) -> str:
    """The work of `review_sweep`; returns the headline (or a short note) for the sweep's stderr."""
    from analysis import common as cm
    from analysis import figures as fg
    from analysis import tables as tb
    from sweeps import tracking as tr

    _, sets, sweep = cm.load_sweep(uri, experiment, parent_id, cm.parse_folds(folds))
    tables = tb.analyse(uri, sets, tb.SWEEP_TABLES[sweep], METRICS, n_boot)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        tb.write_outputs(tables, experiment, out / "tables")
        (out / "figures").mkdir()
        fg.draw(uri, sets, sweep, out / "figures", out / "cache")
        cm.log_outputs(uri, parent_id, out / "tables", sc.ANALYSIS_TABLES)
        cm.log_outputs(uri, parent_id, out / "figures", sc.ANALYSIS_FIGURES)
    client = tr.client(uri)
    tr.retry(client.set_tag, parent_id, sc.TAG_NOTE, note(tables, experiment, parent_id))
    best = best_settings(tables)
    tr.log_metrics(
        uri,
        parent_id,
        {sc.metric(sc.BEST, task, k): v for task, m in best.items() for k, v in m.items() if k in BEST_METRICS},
    )
    for task, m in best.items():
        tr.retry(client.set_tag, parent_id, sc.per_task(sc.TAG_BEST, task), m["setting"])
    heads = [tb.headline(t) for t in tables if tb.headline(t)]
    return heads[0].replace("**", "") if heads else "no reference setting, so no gain tests"


def note(tables: list, experiment: str, parent_id: str, limit: int = NOTE_LIMIT) -> str:
    """The run description: the headlines, then each table's blocks in tables.py's order, as many
    as fit in `limit` characters; the blocks left out are named, with where to find them."""
    from analysis import tables as tb

    heads = [h for h in (tb.headline(t) for t in tables) if h]
    blocks = [b for t in tables for b in tb.sections(t) if b not in heads]
    where = (
        f"_All of it, with LaTeX, CSVs and figures: Artifacts → `analysis/`; or `python analysis/tables.py "
        f"--experiment {experiment} --parent {parent_id}`._"
    )
    text = "\n\n".join([f"# {experiment}: the answer", *heads, where])
    left: list[str] = []
    for b in blocks:
        if not left and len(text) + len(b) + 2 <= limit - 200:  # room for the list of what is left
            text += "\n\n" + b
        else:
            left.append(b.splitlines()[0].lstrip("# "))
    if left:
        text += "\n\n_Not shown here for want of room (in `analysis/tables/tables.md`): " + "; ".join(left) + "._"
    return text[:limit]


def best_settings(tables: list) -> dict[str, dict[str, Any]]:
    """Per task, the compared setting with the largest mean gain, as BEST_METRICS (+ `setting`)."""
    from analysis import tables as tb

    best: dict[str, dict[str, Any]] = {}
    for t in tables:
        for g in t.gains:
            ft, row = g["folds"], g["row"]
            old = best.get(g["task"])
            if math.isnan(ft.mean) or (old is not None and old["delta_pp"] >= 100 * ft.mean):
                continue
            floor = tb.floor_of(g)
            best[g["task"]] = {
                "setting": row.label,
                "temperature": row.setting.config.temperature,
                "delta_pp": 100 * ft.mean,
                "ci_low_pp": 100 * (ft.mean - floor),
                "ci_high_pp": 100 * (ft.mean + floor),
                "boot_low_pp": 100 * g["boot"].lo,
                "boot_high_pp": 100 * g["boot"].hi,
                "acc_pct": 100 * row.setting.mean(sc.metric(sc.TEST, g["task"], "acc")),
            }
    return best
