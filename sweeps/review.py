"""A finished sweep's answer, on its own MLflow run (the parent of its trials).

A reviewer opens the sweep run in the MLflow UI; without this it holds three counters and the
answer needs `python analysis/tables.py` by hand. `review_sweep` runs that analysis in-process
for the sweep's own trials and puts on the sweep run:

* the description (`mlflow.note.content`, rendered as Markdown on the run page): the headline
  first (per task the setting chosen on validation, its gain and verdict, confirmed on fresh
  seeds when the sweep ran them), then the paper table, its
  noise and "Is the gain real?", as much as fits in a tag;
* artifacts: everything tables.py writes (`analysis/tables/`: tables.md, .tex, CSVs) and the
  figures of analysis/figures.py but Grad-CAM (`analysis/figures/`);
* metrics `best/<task>/<name>` (see BEST_METRICS), a tag `sall.best.<task>` naming the setting
  chosen on validation and `sall.verdict.<task>` its verdict (analysis/gain.py's words).

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

from tracking import schema as sc

NOTE_LIMIT = 8000  # MLflow's longest tag value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH)
METRICS = ["acc", "conf", "err"]  # the paper's columns, as tables.py prints by default
BOOTSTRAP = 10000  # tables.py's default: the multinomial bootstrap costs well under a second

# The sweep run's best-setting metrics, per task: best/<task>/<name>. The best setting of a task is
# the one with the best validation accuracy; its figures come from the replicates that confirmed
# it (fresh seeds) when the sweep ran them, else from those that chose it (`confirmed` says which).
BEST_METRICS = {
    "temperature": "T of the setting chosen on validation",
    "val_acc_pct": "its mean validation accuracy over the choosing replicates, %",
    "delta_pp": "its mean test accuracy difference to the reference over folds, pp",
    "ci_low_pp": "lower end of that difference's 95 % CI (corrected resampled t over folds)",
    "ci_high_pp": "upper end of that CI",
    "p": "the corrected t's two-sided p",
    "p_holm": "p adjusted by Holm over the family: the confirmed tasks, else the table's comparisons",
    "n_replicates": "the units the figures rest on: folds of one data set, or replicates that drew their own data",
    "independent": "1: those units share no image (each drew its own synthetic data); 0: they overlap (folds)",
    "confirmed": "1: the figures come from fresh seeds that played no part in the choice; 0: from the choosing ones",
    "boot_low_pp": "bootstrap 95 % CI over the choosing replicates' test images, lower end (test-set sampling only)",
    "boot_high_pp": "the same, upper end",
    "acc_pct": "the chosen setting's mean test accuracy over the same replicates as delta, %",
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
        from tracking import client as tr

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
    from tracking import client as tr

    c = tr.client(uri)
    run = tr.retry(c.get_run, parent_id)
    name = tr.retry(c.get_experiment, experiment_id).name
    return name, run.data.tags.get(sc.TAG_SWEEP), run.data.params.get("folds")


def _has_trials(uri: str, experiment_id: str, parent_id: str) -> bool:
    from tracking import client as tr

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
    from tracking import client as tr

    _, sets, confirming, sweep = tb.load(uri, experiment, parent_id, cm.parse_folds(folds))
    tables = tb.analyse(uri, sets, tb.SWEEP_TABLES[sweep], METRICS, n_boot, confirming=confirming)
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
        tr.retry(client.set_tag, parent_id, sc.per_task(sc.TAG_VERDICT, task), m["verdict"])
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
    """Per task, the setting chosen on validation and its figures, as BEST_METRICS (+ `setting`,
    `verdict`): from its confirmation when there is one, else from the table's gain entry."""
    from analysis import tables as tb

    best: dict[str, dict[str, Any]] = {}
    for t in tables:
        for task, ch in t.chosen.items():
            g, c = tb.gain_of(t, task), t.confirmed.get(task)
            shown = c if c is not None else g
            design = c["design"] if c is not None else t.design
            if task in best or shown is None:
                continue
            best[task] = {
                "setting": ch.row.label,
                "verdict": shown["verdict"],
                "temperature": ch.row.setting.config.temperature,
                "val_acc_pct": 100 * ch.val,
                "delta_pp": 100 * shown["mean"],
                "ci_low_pp": 100 * shown["lo"],
                "ci_high_pp": 100 * shown["hi"],
                "p": shown["p"],
                "p_holm": shown["p_holm"],
                "n_replicates": shown["n"],
                "independent": int(design.independent),
                "confirmed": int(c is not None),
                "boot_low_pp": 100 * g["boot"].lo if g else math.nan,
                "boot_high_pp": 100 * g["boot"].hi if g else math.nan,
                "acc_pct": 100 * shown["acc"],
            }
    return best
