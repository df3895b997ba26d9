"""Search the temperature instead of sweeping the paper's grid: Optuna's TPE proposes T on a log
scale, ASHA stops the candidates whose validation accuracy trails after a few epochs, and the best
few are then confirmed on every fold as ordinary trials (the ones analysis/tables.py reads).

Why: the paper finds its T by training 12 temperatures x 3 folds to the end; on a new data set,
backbone or task mix that is the whole grid's cost again. The search answers "which T?" from
students only (teachers come from the shared cache, trained once per task and fold), spends most
candidates' epochs early, and never looks at the test split: candidates report validation
accuracy per epoch and end before the chain's test evaluation.

In MLflow the search is one parent run with a child run per candidate (tag sall.stage=candidate;
sall.stopped=1 and sall.final_epoch for those ASHA stopped); the confirmation is a sweep run with
ordinary student trials. Both parents have sall.sweep=search.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sall.cli import guarded
from sall.config import N_FOLDS, TrialConfig, config_from_dict, stable_hash
from sall.errors import ConfigError
from sweeps import runner as rn
from sweeps import temperature
from tracking import client as tr
from tracking import schema as sc

SWEEP = "search"
METRIC = "val_metric"  # what candidates report to Tune: the searcher's and ASHA's objective
SMOKE_PLAN = dict(num_samples=4, top=2, grace=1)  # --smoke: a whole search and confirmation in ~a minute


def add_args(g: argparse.ArgumentParser) -> None:
    # fmt: off
    g.add_argument("--num-samples", type=int, default=None, help="candidates to try (default 10; 4 with --smoke)")
    g.add_argument("--top", type=int, default=None, help="confirm the best this many candidates on --folds (default 3; 2 with --smoke)")
    g.add_argument("--search-fold", type=int, default=0, help="the fold the search runs on")
    g.add_argument(
        "--metric",
        default="mean",
        help="what the search maximises: mean (validation accuracy averaged over --tasks) or a "
        "task's validation accuracy (dr, amd, arter)",
    )
    g.add_argument("--t-min", type=float, default=1.0, help="lowest temperature searched")
    g.add_argument("--t-max", type=float, default=50.0, help="highest temperature searched (log scale)")
    g.add_argument("--grace", type=int, default=None, help="ASHA: epochs every candidate trains before it may be stopped (default 2; 1 with --smoke)")
    g.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA: keep 1 in this many at each rung")
    g.add_argument("--search-seed", type=int, default=0, help="seed of the TPE sampler")
    g.add_argument("--no-baseline", action="store_true", help="confirm without the single-task baseline")
    # fmt: on


@dataclass(frozen=True)
class Plan:
    """What the search does, checked once; its fields name the search's Tune experiment."""

    num_samples: int
    top: int
    fold: int
    metric: str
    t_min: float
    t_max: float
    grace: int
    reduction_factor: float
    seed: int
    epochs: int

    def params(self) -> dict[str, Any]:
        return {"phase": "search", **{f"search_{k}": v for k, v in dataclasses.asdict(self).items()}}


def make_plan(args: argparse.Namespace, base: TrialConfig) -> Plan:
    """The search's settings from the flags (smoke defaults where a flag was not given); a bad
    value is one ConfigError naming the flag."""
    plan = Plan(
        num_samples=_flag(args, "num_samples", 10),
        top=_flag(args, "top", 3),
        fold=args.search_fold,
        metric=args.metric.strip(),
        t_min=args.t_min,
        t_max=args.t_max,
        grace=_flag(args, "grace", 2),
        reduction_factor=args.reduction_factor,
        seed=args.search_seed,
        epochs=base.student_epochs,
    )
    _check_counts(plan)
    _check_ranges(plan, base)
    return plan


def _flag(args: argparse.Namespace, name: str, default: int) -> int:
    """A flag's value; when not given, the smoke plan's with --smoke, else `default`."""
    value = getattr(args, name)
    return value if value is not None else SMOKE_PLAN[name] if args.smoke else default


def _check_counts(plan: Plan) -> None:
    if plan.num_samples < 1:
        raise ConfigError(f"--num-samples {plan.num_samples} is invalid; expected an integer >= 1")
    if not 1 <= plan.top <= plan.num_samples:
        raise ConfigError(f"--top {plan.top} is invalid; expected 1..{plan.num_samples} (--num-samples)")
    if not 1 <= plan.grace <= plan.epochs:
        raise ConfigError(f"--grace {plan.grace} is invalid; expected 1..{plan.epochs} (the student's epochs)")
    if not (math.isfinite(plan.reduction_factor) and plan.reduction_factor > 1):
        raise ConfigError(f"--reduction-factor {plan.reduction_factor} is invalid; expected a number > 1")


def _check_ranges(plan: Plan, base: TrialConfig) -> None:
    if not 0 <= plan.fold < N_FOLDS:
        raise ConfigError(f"--search-fold {plan.fold} out of range; expected 0..{N_FOLDS - 1}")
    if plan.metric != "mean" and plan.metric not in base.tasks:
        raise ConfigError(
            f"--metric '{plan.metric}' is invalid; expected mean or one of the tasks {','.join(base.tasks)}"
        )
    if not (math.isfinite(plan.t_min) and math.isfinite(plan.t_max) and 0 < plan.t_min < plan.t_max):
        raise ConfigError(
            f"--t-min {plan.t_min} / --t-max {plan.t_max} are invalid; expected 0 < t-min < t-max, finite"
        )


def round_t(t: float) -> float:
    """Three significant digits: candidates read as T=3.17, and a confirmed T is the same number
    in the candidate's and the trials' configs."""
    return float(f"{t:.3g}")


def score(metrics: dict[str, float], metric: str, tasks: tuple[str, ...]) -> float:
    """The search's objective from one epoch's metrics: validation accuracy, mean over tasks or one."""
    names = [sc.metric(sc.VAL, t, "acc") for t in (tasks if metric == "mean" else (metric,))]
    missing = [n for n in names if n not in metrics]
    if missing:
        raise RuntimeError(f"epoch metrics lack {', '.join(missing)}; the search needs validation every epoch")
    return sum(metrics[n] for n in names) / len(names)


# ---------------------------------------------------------------------------------------------
# the candidates (Tune trials of the search)
class LastEpoch(Exception):
    """A candidate has reported its last epoch: its work for the searcher is done, and the chain's
    test evaluation that would follow must not run during a search."""


def candidate_config(config: dict[str, Any]) -> TrialConfig:
    return config_from_dict(config["trial"]["cfg"]).replace(temperature=round_t(config["temperature"]))


def epoch_reporter(
    uri: str, run_id: str, cfg: TrialConfig, metric: str, replayed: int = 0
) -> Callable[[int, dict[str, float]], None]:
    """The student's per-epoch hook: log the epoch to MLflow, then report the objective to Tune.
    In that order because the epoch on which ASHA stops a candidate is the last one its thread
    gets to: Tune ends it inside `tune.report` (SystemExit), and the epoch must be logged by then.
    The first `replayed` epochs were already logged and reported (`replay`): training repeats
    them (it is deterministic), silently."""

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        from ray import tune

        if epoch <= replayed:
            return
        value = score(metrics, metric, cfg.tasks)
        tr.log_metrics(uri, run_id, {k: v for k, v in metrics.items() if "/" in k}, step=epoch)
        tune.report({"epoch": epoch, METRIC: value, "temperature": cfg.temperature, "mlflow_run_id": run_id})
        if epoch >= cfg.student_epochs:
            raise LastEpoch

    return on_epoch


def candidate(config: dict[str, Any]) -> None:
    """Tune trainable of the search: one student at the proposed T on the search fold, its
    teachers from the shared cache, validation reported per epoch, no test evaluation."""
    from ray import tune

    from sall.chain import Hooks, run_chain
    from sweeps import trial as tl

    sw = config["sweep"]
    uri = sw["mlflow_uri"]
    cfg = candidate_config(config)
    trial_id = tune.get_context().get_trial_id()
    earlier = _earlier_run(sw, cfg, trial_id)
    replayed = replay(uri, earlier, cfg, config["metric"])
    if replayed >= cfg.student_epochs:
        return
    run_id = tl.open_run(
        sw,
        cfg,
        f"T={cfg.temperature:g}",
        earlier,
        {sc.TAG_STAGE: sc.STAGE_CANDIDATE, sc.TAG_CANDIDATE: trial_id, sc.TAG_SEARCH_METRIC: config["metric"]},
    )
    hooks = Hooks(
        teacher_ready=tl.teacher_hook(sw, cfg, run_id),
        student_epoch=epoch_reporter(uri, run_id, cfg, config["metric"], replayed),
    )
    try:
        run_chain(cfg, sw["cache_dir"], hooks)
    except LastEpoch:
        return
    except Exception as e:  # not SystemExit: a candidate ASHA stopped is booked by the driver
        tl.fail_run(uri, run_id, e)
        raise


def _earlier_run(sw: dict[str, Any], cfg: TrialConfig, trial_id: str) -> Any:
    """This candidate's run from an earlier attempt: by its Tune trial id (a retry, or a trial
    restored after a crash), else a run of the same config in this search that a killed driver
    left behind before Tune saved the trial. Tune snapshots its state every 10 s or so, so a kill
    can lose candidates that had already been booked (FINISHED), not only the one in flight; the
    restored searcher, seeded and back at the snapshot, proposes the same T again under a new id.
    Adopted, a booked run is replayed rather than trained twice, and the search still runs
    --num-samples candidates (CI once saw 8 of 6 before this); an unfinished one leaves no orphan."""
    uri, parent = sw["mlflow_uri"], sw["parent_run_id"]
    mine = f"tags.`{sc.TAG_PARENT}` = '{parent}' and tags.`{sc.TAG_STAGE}` = '{sc.STAGE_CANDIDATE}'"
    for which in (f"tags.`{sc.TAG_CANDIDATE}` = '{trial_id}'", f"tags.`{sc.TAG_CONFIG_KEY}` = '{cfg.key()}'"):
        found = tr.find_runs(uri, sw["experiment_id"], f"{which} and {mine}")
        found.sort(key=lambda r: r.info.status != "FINISHED")  # a booked run first: replayed, not retrained
        if found:
            tr.retry(tr.client(uri).set_tag, found[0].info.run_id, sc.TAG_CANDIDATE, trial_id)
            return found[0]
    return None


def replay(uri: str, earlier: Any, cfg: TrialConfig, metric: str) -> int:
    """A candidate booked before a crash whose end Tune had not saved yet runs again after the
    restore: give Tune its logged epochs instead of training them again, so its run stays as it
    was booked. Returns how many epochs were replayed (0: none booked). A SystemExit here is ASHA
    stopping it again."""
    from ray import tune

    if earlier is None or earlier.info.status != "FINISHED" or sc.TAG_FINAL_EPOCH not in earlier.data.tags:
        return 0
    run_id, c = earlier.info.run_id, tr.client(uri)
    names = [sc.metric(sc.VAL, t, "acc") for t in cfg.tasks]
    per_epoch: dict[int, dict[str, float]] = {}
    for name in names:
        for m in tr.retry(c.get_metric_history, run_id, name):
            per_epoch.setdefault(int(m.step), {})[name] = m.value
    epochs = [e for e in sorted(per_epoch) if e <= int(earlier.data.tags[sc.TAG_FINAL_EPOCH])]
    for epoch in epochs:
        tune.report(
            {
                "epoch": epoch,
                METRIC: score(per_epoch[epoch], metric, cfg.tasks),
                "temperature": cfg.temperature,
                "mlflow_run_id": run_id,
            }
        )
    return len(epochs)


def close_orphans(uri: str, experiment_id: str, parent: str, booked: set[str]) -> int:
    """Candidates whose trial a killed driver lost and the resumed search did not propose again:
    KILLED, tagged sall.lost=1, so no run of the search stays RUNNING. Returns how many."""
    runs = tr.find_runs(
        uri,
        experiment_id,
        f"tags.`{sc.TAG_PARENT}` = '{parent}' and tags.`{sc.TAG_STAGE}` = "
        f"'{sc.STAGE_CANDIDATE}' and attributes.status = 'RUNNING'",
    )
    lost = [r.info.run_id for r in runs if r.info.run_id not in booked]
    for rid in lost:
        tr.retry(tr.client(uri).set_tag, rid, sc.TAG_LOST, "1")
        tr.end_run(uri, rid, "KILLED")
    return len(lost)


def book(uri: str, result: dict[str, Any], epochs: int) -> dict[str, Any]:
    """Record on a candidate's run what the search made of it, once Tune is done with it: stopped
    early or not, its final epoch and the last score the searcher saw. Idempotent, so the driver
    can book each candidate as it ends and again after a resume."""
    run_id, epoch = result["mlflow_run_id"], int(result["epoch"])
    row = dict(
        temperature=float(result["temperature"]),
        score=float(result[METRIC]),
        epoch=epoch,
        stopped=epoch < epochs,
        run_id=run_id,
    )
    c = tr.client(uri)
    run = tr.retry(c.get_run, run_id)
    if run.info.status == "FINISHED" and run.data.tags.get(sc.TAG_FINAL_EPOCH) == str(epoch):
        return row
    tr.retry(c.set_tag, run_id, sc.TAG_STOPPED, "1" if row["stopped"] else "0")
    tr.retry(c.set_tag, run_id, sc.TAG_FINAL_EPOCH, str(epoch))
    tr.log_metrics(uri, run_id, {sc.SEARCH_SCORE: row["score"], sc.SEARCH_FINAL_EPOCH: epoch})
    tr.end_run(uri, run_id, "FINISHED")
    return row


def pick(rows: list[dict[str, Any]], top: int) -> list[float]:
    """The temperatures to confirm: ASHA's survivors first (furthest epoch), then the best score,
    then the lower T. The last key matters: validation accuracies are fractions of a few hundred
    images and tie often, and without it the pick followed the order the rows came in (Tune's
    results, or MLflow's search), so a resumed search could confirm other temperatures."""
    ranked = sorted(rows, key=lambda r: (-r["epoch"], -r["score"], r["temperature"]))
    return list(dict.fromkeys(r["temperature"] for r in ranked))[:top]


def make_bookkeeper(uri: str, epochs: int, total: int) -> Any:
    """A Tune callback: books each candidate as it ends and prints a line for it. (Defined here so
    that ray.tune is imported only when a search runs.)"""
    from ray.tune import Callback

    class _Bookkeeper(Callback):
        def __init__(self) -> None:
            self.done, self.t0 = 0, time.time()

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            if "mlflow_run_id" not in r:
                return
            row = book(uri, r, epochs)
            self.done += 1
            note = " (stopped early by ASHA)" if row["stopped"] else ""
            rn.say(
                f"[candidate] T={row['temperature']:g}: validation {row['score']:.3f} at epoch "
                f"{row['epoch']}/{epochs}{note} · {self.done}/{total} · elapsed {rn._fmt(time.time() - self.t0)}"
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            print(
                f"[candidate] T={round_t(trial.config['temperature']):g}: FAILED ({trial.error_file or 'see MLflow'})",
                file=sys.stderr,
                flush=True,
            )

    return _Bookkeeper()


def _candidate_name(trial: Any) -> str:
    return f"T={round_t(trial.config['temperature']):g}_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------
# the two phases
def search(
    args: argparse.Namespace, plan: Plan, search_base: TrialConfig, uri: str, cache_dir: str
) -> tuple[list[dict[str, Any]], int]:
    """Run (or resume) the search; (booked candidates, exit code)."""
    import optuna
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its per-trial lines drown the progress
    sweep_id = (
        rn.make_sweep_id(SWEEP, [rn.Trial("T search", search_base)], uri, cache_dir, args.experiment)
        + "-"
        + stable_hash(dataclasses.asdict(plan))
        + "-candidates"
    )
    run = rn.open_sweep(SWEEP, sweep_id, args, uri, cache_dir, {"trials": plan.num_samples, **plan.params()})
    tr.retry(tr.client(uri).set_tag, run.parent, sc.TAG_RUN_NAME, "search: candidates")
    print(
        f"[search] {plan.num_samples} candidates, T log-uniform in [{plan.t_min:g}, {plan.t_max:g}] on fold "
        f"{plan.fold} · MLflow {uri} experiment '{args.experiment}' (parent run {run.parent}) · Tune "
        f"{run.exp_dir}",
        file=sys.stderr,
        flush=True,
    )
    space = {
        "trial": {"label": "T search", "cfg": dataclasses.asdict(search_base)},
        "sweep": run.settings(),
        "metric": plan.metric,
        "temperature": tune.loguniform(plan.t_min, plan.t_max),
    }
    # TPE leaves its random start after a third of the budget, so the model guides the rest
    sampler = TPESampler(seed=plan.seed, n_startup_trials=max(2, plan.num_samples // 3))
    tune_config = tune.TuneConfig(
        metric=METRIC,
        mode="max",
        num_samples=plan.num_samples,
        search_alg=OptunaSearch(sampler=sampler),
        scheduler=ASHAScheduler(
            time_attr="epoch", max_t=plan.epochs, grace_period=plan.grace, reduction_factor=plan.reduction_factor
        ),
        max_concurrent_trials=args.max_concurrent_trials,
        reuse_actors=True,
        trial_name_creator=_candidate_name,
        trial_dirname_creator=_candidate_name,
    )
    t0 = time.time()
    results = rn.fit_tuner(
        run, args, candidate, space, [make_bookkeeper(uri, plan.epochs, plan.num_samples)], tune_config
    )
    rows = [book(uri, r.metrics, plan.epochs) for r in results if r.metrics.get("mlflow_run_id")]
    close_orphans(uri, run.experiment_id, run.parent, {r["run_id"] for r in rows})
    _log_search(uri, run.parent, rows, plan)
    return rows, rn.close_sweep(run, results, t0)


def _log_search(uri: str, parent: str, rows: list[dict[str, Any]], plan: Plan) -> None:
    """The search's outcome on its parent run: the picks, the epochs spent, every candidate."""
    picked = pick(rows, plan.top)
    tr.retry(tr.client(uri).set_tag, parent, sc.TAG_PICKED, ",".join(f"{t:g}" for t in picked))
    tr.log_metrics(
        uri,
        parent,
        {"student_epochs": sum(r["epoch"] for r in rows), "candidates_stopped": sum(r["stopped"] for r in rows)},
    )
    tr.log_dict_artifact(uri, parent, sorted(rows, key=lambda r: r["temperature"]), sc.CANDIDATES_JSON)
    spent = sum(r["epoch"] for r in rows)
    print(
        f"[search] picked T={', '.join(f'{t:g}' for t in picked)} (validation '{plan.metric}' at the furthest "
        f"epoch); {sum(r['stopped'] for r in rows)} of {len(rows)} stopped early; student-epochs "
        f"{spent} of {plan.num_samples * plan.epochs} without early stopping",
        file=sys.stderr,
        flush=True,
    )


def confirm_trials(args: argparse.Namespace, base: TrialConfig, temps: list[float]) -> list[rn.Trial]:
    """The confirmation: the baseline and the picked temperatures on every fold, built by the
    temperature sweep's own grid, so tables and figures treat them like its trials."""
    ns = argparse.Namespace(
        temperatures=",".join(f"{t:g}" for t in temps), no_baseline=args.no_baseline, confirm_seeds="none"
    )
    return rn.expand(temperature.grid(ns, base), rn.parse_folds(args.folds), rn.sweep_seeds(args))


def answer(uri: str, experiment_id: str, temps: list[float], metric: str) -> tuple[float, float] | None:
    """(T, objective): of the confirmed temperatures, the one with the best validation objective
    averaged over its folds. Validation again, never test: the test accuracy of the answer is
    measured, not used to choose it."""
    per_t: dict[float, list[float]] = {}
    for r in tr.find_runs(uri, experiment_id, f"tags.`{sc.TAG_STAGE}` = '{sc.STAGE_STUDENT}'", max_results=50000):
        cfg = TrialConfig.from_params(r.data.params)
        metrics = {k.replace(f"{sc.VAL_BEST}/", f"{sc.VAL}/"): v for k, v in r.data.metrics.items()}
        if r.info.status == "FINISHED" and cfg.temperature in temps and cfg.sa_labels:
            per_t.setdefault(cfg.temperature, []).append(score(metrics, metric, cfg.tasks))
    means = {t: sum(v) / len(v) for t, v in per_t.items()}
    return max(means.items(), key=lambda kv: kv[1]) if means else None


def print_plan(plan: Plan, args: argparse.Namespace, n_confirm: int) -> None:
    """--dry-run: what the search and its confirmation will do and spend at most."""
    grid = len(temperature.PAPER_TEMPERATURES.split(",")) * n_confirm * plan.epochs
    print(
        f"search: {plan.num_samples} candidates, T log-uniform in [{plan.t_min:g}, {plan.t_max:g}] on fold "
        f"{plan.fold}, Optuna TPE (seed {plan.seed}) with ASHA on validation '{plan.metric}' per epoch "
        f"(grace {plan.grace}, reduction {plan.reduction_factor:g}, max {plan.epochs} epochs)"
    )
    print(
        f"then the top {plan.top} on folds {args.folds} as ordinary trials"
        + ("" if args.no_baseline else ", beside the baseline")
    )
    print(
        f"student-epochs at most: search {plan.num_samples * plan.epochs} + confirm "
        f"{plan.top * n_confirm * plan.epochs}; the paper's grid of 12 temperatures: {grid}\n"
    )


def run(args: argparse.Namespace) -> int:
    """Check everything, then search and confirm (or, with --dry-run, print the plan)."""
    uri, base = rn.sweep_setup(args)
    plan = make_plan(args, base)
    search_base = base.replace(
        fold=plan.fold, seed=rn.sweep_seeds(args)[0], multitask=True, sa_labels=True, validate_every_epoch=True
    )
    searching = rn.Trial("T search", search_base)
    probe = confirm_trials(args, base, [plan.t_min])  # every fold and seed of the confirmation, checked now
    cache_dir = rn.check_trials([searching, *probe], args)
    n_confirm = len(rn.parse_folds(args.folds)) * len(rn.sweep_seeds(args))
    if args.dry_run:
        print_plan(plan, args, n_confirm)
        later = [rn.Trial(t.label.replace(f"T={plan.t_min:g}", "T=picked"), t.cfg) for t in probe]
        rn.dry_run([searching, *later], cache_dir)
        return 0
    with rn.ray_session(args):
        rn.check_cluster(uri, {"--cache-dir": cache_dir, "--storage-path": args.storage_path})
        rows, code = search(args, plan, search_base, uri, cache_dir)
        if code or not rows:
            return code or 1
        picked = pick(rows, plan.top)
        code = rn.tune_trials(SWEEP, args, confirm_trials(args, base, picked), uri, cache_dir)
    summarise(uri, args, plan, rows, picked, n_confirm)
    return code


def summarise(
    uri: str, args: argparse.Namespace, plan: Plan, rows: list[dict[str, Any]], picked: list[float], n_confirm: int
) -> None:
    """The answer (the confirmed T best on validation over folds) and what it cost, beside the grid."""
    best = answer(uri, tr.ensure_experiment(uri, args.experiment), picked, plan.metric)
    if best is not None:
        print(
            f"[search] answer: T={best[0]:g} (validation '{plan.metric}' {best[1]:.3f}, mean over the "
            f"confirmed folds); test accuracy: python analysis/tables.py --experiment {args.experiment}",
            file=sys.stderr,
            flush=True,
        )
    spent, confirm = sum(r["epoch"] for r in rows), len(picked) * n_confirm * plan.epochs
    grid = len(temperature.PAPER_TEMPERATURES.split(",")) * n_confirm * plan.epochs
    print(
        f"[search] student-epochs: search {spent} + confirm {confirm} = {spent + confirm}; the paper's "
        f"grid on these folds: {grid} ({(spent + confirm) / grid:.0%})",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = rn.build_parser(SWEEP, __doc__.split("\n\n")[0], add_args)
    args = parser.parse_args(argv)
    return guarded(lambda: run(args), args.debug)


if __name__ == "__main__":
    from sweeps.search import main as _main  # by module name, so Tune pickles its functions by reference

    sys.exit(_main())
