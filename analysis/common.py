"""What the analysis tools share: reading a sweep's runs back from MLflow, grouping them into
settings over folds, the command-line frame (one-line errors, progress on stderr).

Runs are read with MLflow's client only (search_runs, download_artifacts), so the tools work
against any tracking store the sweeps wrote to: a local SQLite file or a remote server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stderr readable

from sall.cli import guarded
from sall.config import N_FOLDS, TrialConfig
from sall.errors import SallError
from sall.tasks import TASKS
from tracking import client as tr
from tracking import schema as sc

PAPER_TABLES = Path(__file__).with_name("paper_tables.json")
DEFAULT_URI = "sqlite:///mlflow.db"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def paper_tables() -> dict[str, Any]:
    return json.loads(PAPER_TABLES.read_text())


# ---------------------------------------------------------------------------------------------
# command line
def add_common_args(p: argparse.ArgumentParser, experiment: bool = True) -> None:
    if experiment:
        p.add_argument("--experiment", required=True, help="MLflow experiment of the sweep, e.g. sall-temperature")
    p.add_argument(
        "--mlflow-uri",
        default=DEFAULT_URI,
        help="MLflow tracking URI (default: sqlite:///mlflow.db in the working directory)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def main(parser: argparse.ArgumentParser, fn: Callable[[argparse.Namespace], int], argv=None) -> int:
    """Parse, then run `fn(args)`: a SallError (or an MLflow lookup failure turned into one)
    becomes one line on stderr and exit code 2, unless --debug."""
    args = parser.parse_args(argv)
    return guarded(lambda: fn(args), args.debug)


def client(uri: str):
    return tr.client(uri)


def open_store(uri: str) -> str:
    """The resolved tracking URI; a SQLite file that does not exist is an error, not a new store."""
    uri = tr.resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise SallError(
                f"MLflow store {uri} does not exist; expected the sqlite file the sweep "
                "wrote (run from the sweep's folder or pass --mlflow-uri)"
            )
    return uri


def experiment_id(uri: str, name: str) -> str:
    exp = tr.retry(client(uri).get_experiment_by_name, name)
    if exp is None:
        names = [e.name for e in tr.retry(client(uri).search_experiments)]
        raise SallError(
            f"no MLflow experiment '{name}' in {uri}; experiments there: {', '.join(sorted(names)) or '(none)'}"
        )
    return exp.experiment_id


# ---------------------------------------------------------------------------------------------
# runs -> trials -> settings
Replicate = tuple[int, int]  # (fold, seed)


def replicate_text(rep: Replicate) -> str:
    return f"fold {rep[0]}" + (f" seed {rep[1]}" if rep[1] else "")


@dataclass
class TrialRun:
    """One student run (one setting on one fold)."""

    run_id: str
    status: str  # FINISHED, FAILED, RUNNING, KILLED, ...
    label: str
    fold: int
    trial_key: str
    parent: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]

    @property
    def ok(self) -> bool:
        return self.status == "FINISHED"

    @cached_property
    def config(self) -> TrialConfig:
        """The trial's config, rebuilt from its params (a param older code did not log takes the
        field's default)."""
        return TrialConfig.from_params(self.params)

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def replicate(self) -> Replicate:
        """(fold, seed): what a setting's runs are paired on."""
        return (self.fold, self.seed)


@dataclass
class Setting:
    """One grid point (a trial key) and its runs, one per replicate (fold, seed)."""

    trial_key: str
    runs: dict[Replicate, TrialRun]  # (fold, seed) -> the run that counts for it
    expected: tuple[Replicate, ...]

    @cached_property
    def first(self) -> TrialRun:
        return sorted(self.runs.values(), key=lambda r: (not r.ok, r.replicate))[0]

    @property
    def config(self) -> TrialConfig:
        """The setting's config (that of its first run: its runs differ in fold and seed only)."""
        return self.first.config

    @property
    def label(self) -> str:
        return self.first.label

    @property
    def finished(self) -> dict[Replicate, TrialRun]:
        return {k: r for k, r in sorted(self.runs.items()) if r.ok}

    @property
    def failed(self) -> list[Replicate]:
        return sorted(k for k, r in self.runs.items() if not r.ok)

    @property
    def missing(self) -> list[Replicate]:
        return sorted(set(self.expected) - set(self.runs))

    @property
    def seeds(self) -> list[int]:
        return sorted({s for _, s in self.finished})

    def values(self, metric: str) -> dict[Replicate, float]:
        """(fold, seed) -> value of a metric over the finished runs that logged it (NaN is never
        logged)."""
        return {k: r.metrics[metric] for k, r in self.finished.items() if metric in r.metrics}

    def mean(self, metric: str) -> float:
        v = list(self.values(metric).values())
        return sum(v) / len(v) if v else math.nan

    def fold_note(self) -> str:
        """'3 of 3' (or '6 of 6 (3 folds x 2 seeds)'), or what is missing / failed:
        'n=2 of 3, fold 2 missing'."""
        n, total = len(self.finished), len(set(self.expected) | set(self.runs))
        parts = []
        bad: dict[str, list[Replicate]] = {}
        for k in self.failed:
            bad.setdefault(self.runs[k].status, []).append(k)
        for status, reps in bad.items():
            parts.append(f"{status} ({_replicates(reps)})")
        if self.missing:
            parts.append(f"{_replicates(self.missing)} missing")
        seeds = {s for _, s in set(self.expected) | set(self.runs)}
        shape = ""
        if len(seeds) > 1:
            folds = {f for f, _ in set(self.expected) | set(self.runs)}
            shape = f" ({len(folds)} folds × {len(seeds)} seeds)"
        if not parts:
            return f"{n} of {total}{shape}"
        return f"n={n} of {total}{shape}, " + ", ".join(parts)


def _replicates(reps: list[Replicate]) -> str:
    if all(seed == 0 for _, seed in reps):
        folds = [f for f, _ in reps]
        return ("fold " if len(folds) == 1 else "folds ") + ",".join(map(str, folds))
    return ", ".join(replicate_text(r) for r in reps)


def student_runs(uri: str, exp_id: str, parent: str | None = None) -> list[TrialRun]:
    flt = f"tags.`{sc.TAG_STAGE}` = '{sc.STAGE_STUDENT}'"
    if parent:
        flt += f" and tags.`{sc.TAG_PARENT}` = '{parent}'"
    out = []
    for r in tr.find_runs(uri, exp_id, flt, max_results=50000):
        t = r.data.tags
        out.append(
            TrialRun(
                run_id=r.info.run_id,
                status=r.info.status,
                label=t.get(sc.TAG_LABEL, "?"),
                fold=int(t.get(sc.TAG_FOLD, r.data.params.get("fold", -1))),
                trial_key=t.get(sc.TAG_TRIAL_KEY, "?"),
                parent=t.get(sc.TAG_PARENT, ""),
                start_time=r.info.start_time or 0,
                params=dict(r.data.params),
                metrics=dict(r.data.metrics),
            )
        )
    return out


def settings(runs: list[TrialRun], expected_folds: tuple[int, ...] | None = None) -> list[Setting]:
    """Group runs by trial key. Per (fold, seed) the run that counts is the latest FINISHED one; a
    replicate with only failed (or unfinished) runs shows its latest as such; it is never averaged
    in. Every setting is expected on each fold with every seed seen in the experiment."""
    folds = tuple(range(N_FOLDS)) if expected_folds is None else expected_folds
    seeds = sorted({r.seed for r in runs}) or [0]
    expected = tuple((f, s) for f in folds for s in seeds)
    by_key: dict[str, dict[Replicate, list[TrialRun]]] = {}
    for r in runs:
        by_key.setdefault(r.trial_key, {}).setdefault(r.replicate, []).append(r)
    out = []
    for key, reps in by_key.items():
        chosen = {k: max(rs, key=lambda r: (r.ok, r.start_time)) for k, rs in reps.items()}
        out.append(Setting(key, chosen, expected))
    return out


def tasks(sets: list[Setting]) -> list[str]:
    """The tasks any of the settings has, in the paper's order (DR, AMD, arteriosclerosis)."""
    have = {t for s in sets for t in s.config.tasks}
    return [t for t in TASKS if t in have]


def score(s: Setting) -> float:
    """A setting's mean test accuracy over its tasks (-1: none): a measurement, never what chooses a
    setting (that is validation, analysis/gain.py)."""
    v = [s.mean(sc.metric(sc.TEST, t, "acc")) for t in s.config.tasks]
    v = [x for x in v if not math.isnan(x)]
    return sum(v) / len(v) if v else -1.0


def latest_parent(uri: str, exp_id: str) -> str | None:
    runs = tr.retry(
        client(uri).search_runs,
        [exp_id],
        filter_string=f"tags.`{sc.TAG_STAGE}` = '{sc.STAGE_SWEEP}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def sweep_name(uri: str, exp_id: str, runs: list[TrialRun]) -> str | None:
    """The sweep the experiment holds (`sall.sweep` of its parent runs, else of its students)."""
    parents = tr.find_runs(uri, exp_id, f"tags.`{sc.TAG_STAGE}` = '{sc.STAGE_SWEEP}'")
    names = {p.data.tags.get(sc.TAG_SWEEP) for p in parents} - {None}
    if not names:
        names = {tr.retry(client(uri).get_run, r.run_id).data.tags.get(sc.TAG_SWEEP) for r in runs[:1]} - {None}
    if len(names) > 1:
        raise SallError(f"experiment holds runs of several sweeps ({', '.join(sorted(names))}); pass --table")
    return names.pop() if names else None


def load_sweep(
    uri: str,
    experiment: str,
    parent: str | None = None,
    folds: tuple[int, ...] | None = None,
    confirm_seeds: tuple[int, ...] = (),
    confirming: bool = False,
) -> tuple[str, list[Setting], str | None]:
    """(experiment id, settings, sweep name) of an experiment; raises SallError when empty. Runs of
    the `confirm_seeds` are left out, or with `confirming` they are the only ones kept: the
    replicates that confirm a choice never mix with those that made it."""
    uri = open_store(uri)
    exp_id = experiment_id(uri, experiment)
    runs = [r for r in student_runs(uri, exp_id, parent) if (r.seed in confirm_seeds) == confirming]
    if not runs:
        raise SallError(
            f"experiment '{experiment}' has no trial runs (tag {sc.TAG_STAGE}={sc.STAGE_STUDENT})"
            + (f" under parent run {parent}" if parent else "")
            + (f" with seeds {','.join(map(str, confirm_seeds))}" if confirming else "")
            + "; expected a finished sweep"
        )
    log(
        f"[analysis] {experiment}: {len(runs)} trial runs{' (confirming)' if confirming else ''} "
        f"({sum(r.ok for r in runs)} finished, {sum(not r.ok for r in runs)} failed or unfinished)"
    )
    return exp_id, settings(runs, folds), sweep_name(uri, exp_id, runs)


def confirm_seeds(uri: str, parent: str | None) -> tuple[int, ...]:
    """The seeds that confirm the sweep run's choice (its `sall.confirm_seeds` tag); () when none."""
    if not parent:
        return ()
    text = tr.retry(client(uri).get_run, parent).data.tags.get(sc.TAG_CONFIRM_SEEDS, "")
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_folds(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SallError(f"--folds '{text}' is invalid; expected e.g. 0,1,2") from None


# ---------------------------------------------------------------------------------------------
# artifacts
def download(uri: str, run_id: str, path: str, dst: Path) -> Path | None:
    """Download one artifact of a run into dst; None when the run has no such artifact."""
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(tr.retry(client(uri).download_artifacts, run_id, path, str(dst)))
    except Exception as e:  # MlflowException / OSError: the artifact is not there
        text = str(e).lower()
        if any(m in text for m in ("does not exist", "no such file", "failed to download", "not found")):
            return None
        raise


def run_metrics_json(uri: str, run: TrialRun, cache: Path) -> dict | None:
    p = download(uri, run.run_id, sc.METRICS_JSON, cache / run.run_id)
    return json.loads(p.read_text()) if p else None


def predictions(uri: str, run: TrialRun, task: str, cache: Path):
    """The per-image test predictions of a task (DataFrame row, label, prob_*), or None."""
    import pandas as pd

    p = download(uri, run.run_id, sc.task_file(sc.PREDICTIONS, task, "csv"), cache / run.run_id)
    return pd.read_csv(p) if p else None


def log_outputs(uri: str, run_id: str, folder: Path, artifact_path: str) -> None:
    tr.retry(client(uri).log_artifacts, run_id, str(folder), artifact_path)


def log_to_sweep_run(
    args: argparse.Namespace, uri: str, exp_id: str, folder: Path, artifact_path: str, what: str
) -> None:
    """An analysis's outputs (`what`, for the log line) as artifacts of the sweep run (--parent,
    else the experiment's latest), so they sit beside the trials in the UI; nothing with --no-log
    or when the experiment has no sweep run."""
    parent = None if args.no_log else args.parent or latest_parent(uri, exp_id)
    if parent:
        log_outputs(uri, parent, folder, artifact_path)
        log(f"[analysis] logged {what} to parent run {parent} under {artifact_path}")


def student_file(uri: str, run_id: str, dst: Path) -> Path:
    """Download a trial's stored student (its `model/` artifact); SallError when it has none."""
    arts = tr.retry(client(uri).list_artifacts, run_id, sc.MODEL_DIR)
    pts = [a.path for a in arts if a.path.endswith(".pt")]
    if not pts:
        raise SallError(f"run {run_id} has no model artifact (model/*.pt); expected a finished trial run of a sweep")
    got = download(uri, run_id, pts[0], dst)
    if got is None:
        raise SallError(f"run {run_id}: its model artifact {pts[0]} could not be downloaded")
    return got
