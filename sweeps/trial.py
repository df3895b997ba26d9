"""The Ray Tune trainable: one trial = the whole SALL chain, logged to MLflow as a child run."""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sall.checkpoint import Preempted
from sall.config import TrialConfig, config_from_dict, param_strings
from sall.store import Store, open_store
from tracking import client as tr
from tracking import schema as sc
from tracking.client import retry


def teacher_run(
    uri: str, experiment_id: str, parent_id: str, sweep: str, store: Store, teacher, cfg: TrialConfig
) -> str:
    """The MLflow run of a teacher in this experiment: created once (under a lock in the shared
    cache, so concurrent trials on any node agree), then pointed to by every trial that uses it.
    It sits under the sweep's `teachers` run, so the sweep's run list shows its trials, and it
    spans the teacher's training (the run is made afterwards; a made-up span of milliseconds
    would read as broken beside the trials). Its params are `cfg`'s teacher fields in the same
    string form as a trial's params."""
    with store.exclusive(f"mlflow-teacher-{experiment_id}-{teacher.key}"):
        mine = f"tags.`{sc.TAG_TEACHER_KEY}` = '{teacher.key}' and tags.`{sc.TAG_STAGE}` = '{sc.STAGE_TEACHER}'"
        if found := _first_run_id(uri, experiment_id, mine):
            return found
        c = tr.client(uri)
        start_ms, end_ms = _teacher_span(teacher)
        group = _teachers_run(uri, experiment_id, parent_id, sweep, store, start_ms)
        run = retry(
            c.create_run,
            experiment_id,
            start_time=start_ms,
            run_name=f"teacher {teacher.task} {replicate_name(cfg.fold, cfg.seed)}",
            tags={
                sc.TAG_STAGE: sc.STAGE_TEACHER,
                sc.TAG_SWEEP: sweep,
                sc.TAG_TEACHER_KEY: teacher.key,
                sc.TAG_FOLD: str(cfg.fold),
                sc.TAG_SEED: str(cfg.seed),
                sc.TAG_PARENT: group,
                sc.TAG_TASK: teacher.task,
                sc.TAG_TRAINED_NOW: str(teacher.fetched.built),
                sc.TAG_TEACHER_SHA: teacher.fetched.sha256,
            },
        )
        rid = run.info.run_id
        _log_teacher(uri, rid, teacher, cfg)
        retry(c.set_terminated, rid, "FINISHED", end_time=end_ms)
        with store.exclusive(f"mlflow-teachers-{parent_id}"):  # one writer, so no later end is lost
            _stretch_to(uri, group, end_ms)
        return rid


def _first_run_id(uri: str, experiment_id: str, filter_string: str) -> str | None:
    """The id of a run the filter finds (the caller holds the lock that makes it the only one)."""
    found = tr.find_runs(uri, experiment_id, filter_string)
    return found[0].info.run_id if found else None


def _log_teacher(uri: str, run_id: str, teacher, cfg: TrialConfig) -> None:
    """A teacher's params (its fields, in a trial's string form), curve, test metrics and cost."""
    info = teacher.info
    tr.log_params(uri, run_id, param_strings(cfg.teacher_fields(teacher.task)))
    for h in info["history"]:
        tr.log_metrics(uri, run_id, {k: v for k, v in h.items() if "/" in k}, step=int(h["epoch"]))
    test = {sc.metric(sc.TEST, teacher.task, k): v for k, v in info["test"].items() if isinstance(v, (int, float))}
    tr.log_metrics(uri, run_id, test)
    tr.log_metrics(uri, run_id, {"best_epoch": info["best_epoch"], "train_seconds": info["seconds"]})
    log_costs(uri, run_id, info)


def log_costs(uri: str, run_id: str, costs: dict[str, float]) -> None:
    """A training's cost across attempts as `cost/*` metrics, and its resumes and lost epochs as tags
    (absent from teachers trained before checkpoints existed: nothing is logged then)."""
    if "spent_s" not in costs:
        return
    tr.log_metrics(uri, run_id, {f"{sc.COST}/{k}": float(costs[k]) for k in sc.COST_NAMES})
    c = tr.client(uri)
    retry(c.set_tag, run_id, sc.TAG_RESUMES, str(int(costs["resumes"])))
    retry(c.set_tag, run_id, sc.TAG_EPOCHS_LOST, f"{float(costs['epochs_lost']):.3f}")


def _teacher_span(teacher) -> tuple[int, int]:
    """(start, end) of the teacher's training in ms since the epoch: it ended when its cache file
    was written (a rename keeps that time), `seconds` (training and test) before. Holds for a
    teacher trained now and for one a cluster node trained earlier."""
    end = teacher.fetched.mtime
    return int(1000 * (end - float(teacher.info["seconds"]))), int(1000 * end)


def _teachers_run(uri: str, experiment_id: str, parent_id: str, sweep: str, store: Store, start_ms: int) -> str:
    """The sweep run's one `teachers` child (made by the first teacher, whichever node trains it).
    It starts with the sweep, or with an earlier teacher: a run's start cannot be moved later, and
    a teacher that finishes second may have started first."""
    with store.exclusive(f"mlflow-teachers-{parent_id}"):
        mine = f"tags.`{sc.TAG_STAGE}` = '{sc.STAGE_TEACHERS}' and tags.`{sc.TAG_PARENT}` = '{parent_id}'"
        if found := _first_run_id(uri, experiment_id, mine):
            return found
        c = tr.client(uri)
        start_ms = min(start_ms, retry(c.get_run, parent_id).info.start_time or start_ms)
        run = retry(
            c.create_run,
            experiment_id,
            start_time=start_ms,
            run_name=sc.STAGE_TEACHERS,
            tags={sc.TAG_STAGE: sc.STAGE_TEACHERS, sc.TAG_SWEEP: sweep, sc.TAG_PARENT: parent_id},
        )
        return run.info.run_id


def _stretch_to(uri: str, run_id: str, end_ms: int) -> None:
    """Finish the `teachers` run at its latest teacher's end, so its span covers them all."""
    c = tr.client(uri)
    old = retry(c.get_run, run_id).info.end_time or 0
    retry(c.set_terminated, run_id, "FINISHED", end_time=max(old, end_ms))


def replicate_name(fold: int, seed: int) -> str:
    """'fold1', or 'fold1 seed2' when the trial repeats a setting with another seed."""
    return f"fold{fold}" + (f" seed{seed}" if seed else "")


def _find_trial_run(uri: str, experiment_id: str, parent_id: str, config_key: str):
    runs = tr.find_runs(
        uri, experiment_id, f"tags.`{sc.TAG_CONFIG_KEY}` = '{config_key}' and tags.`{sc.TAG_PARENT}` = '{parent_id}'"
    )
    return runs[0] if runs else None


def _final_metrics(res) -> dict[str, float]:
    from sall.metrics import scalar_metrics

    out: dict[str, float] = {}
    for task, m in res.test.items():
        out.update({sc.metric(sc.TEST, task, k): v for k, v in scalar_metrics(m).items()})
    for task, m in res.val.items():
        out[sc.metric(sc.VAL_BEST, task, "acc")] = m["acc"]
    for task, s in res.soft.items():
        out[sc.metric(sc.SOFT, task, "max_mean")] = s["max_mean"]
        out[sc.metric(sc.SOFT, task, "var")] = s["var"]
    out["trial_seconds"] = res.seconds
    return out


def _log_artifacts(uri: str, run_id: str, res, label: str) -> None:
    """Config, metrics, per-task plots and CSVs, per-image predictions and the student, on the run.
    Plot titles name the setting and replicate ("DR confusion: T=8, fold 1"), not a hash."""
    from sall.metrics import to_jsonable

    c = tr.client(uri)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / sc.CONFIG_JSON).write_text(res.config.to_json())
        (root / sc.METRICS_JSON).write_text(
            json.dumps(
                to_jsonable(
                    {"test": res.test, "val": res.val, "soft": res.soft, "history": res.history, "profile": res.profile}
                ),
                indent=2,
            )
        )
        seed = f", seed {res.config.seed}" if res.config.seed else ""
        where = f"{label}, fold {res.config.fold}{seed}"
        for task, m in res.test.items():
            tr.write_task_artifacts(
                root, task, m, f"{task.upper()} confusion: {where}", f"{task.upper()} reliability: {where}"
            )
        for task, p in res.predictions.items():  # per-image test predictions (analysis/ bootstraps)
            tr.write_predictions(root, task, p)
        retry(c.log_artifacts, run_id, str(root))
    retry(c.log_artifact, run_id, res.student_path, sc.MODEL_DIR)


def open_run(
    sw: dict[str, Any], cfg: TrialConfig, label: str, existing: Any = None, tags: dict[str, str] | None = None
) -> str:
    """The trial's MLflow run: `existing` reopened (a retry, or a rerun after a crash, logs into the
    same run and counts the attempt), else a new child of the sweep run with the trial's tags,
    `tags` added (the search's candidates are trials of another stage)."""
    uri, exp_id, parent_id = sw["mlflow_uri"], sw["experiment_id"], sw["parent_run_id"]
    c = tr.client(uri)
    if existing is not None:
        run_id = existing.info.run_id
        retry(c.update_run, run_id, status="RUNNING")
        attempts = int(existing.data.tags.get(sc.TAG_ATTEMPTS, "1")) + 1
        retry(c.set_tag, run_id, sc.TAG_ATTEMPTS, str(attempts))
    else:
        tags = {
            sc.TAG_STAGE: sc.STAGE_STUDENT,
            sc.TAG_SWEEP: sw["sweep"],
            sc.TAG_FOLD: str(cfg.fold),
            sc.TAG_SEED: str(cfg.seed),
            sc.TAG_TRIAL_KEY: cfg.trial_key(),
            sc.TAG_CONFIG_KEY: cfg.key(),
            sc.TAG_LABEL: label,
            sc.TAG_PARENT: parent_id,
            sc.TAG_NODE: _node(),
            sc.TAG_HOST: socket.gethostname(),
            **(tags or {}),
        }
        run = retry(c.create_run, exp_id, run_name=f"{label} {replicate_name(cfg.fold, cfg.seed)}", tags=tags)
        run_id = run.info.run_id
        retry(c.set_tag, run_id, sc.TAG_ATTEMPTS, "1")
        tr.log_params(uri, run_id, cfg.params())
    retry(c.set_tag, run_id, sc.TAG_NODE, _node())
    return run_id


def teacher_hook(sw: dict[str, Any], cfg: TrialConfig, run_id: str) -> Callable[[Any], None]:
    """The chain's `teacher_ready`: each teacher gets its run in the experiment, and the trial's
    run points to it."""
    uri, exp_id, parent_id = sw["mlflow_uri"], sw["experiment_id"], sw["parent_run_id"]
    c = tr.client(uri)
    store = open_store(sw["cache_dir"])

    def teacher_ready(teacher) -> None:
        rid = teacher_run(uri, exp_id, parent_id, sw["sweep"], store, teacher, cfg)
        retry(c.set_tag, run_id, sc.per_task(sc.TAG_TEACHER_RUN, teacher.task), rid)
        retry(c.set_tag, run_id, sc.per_task(sc.TAG_TEACHER_KEY, teacher.task), teacher.key)
        retry(c.set_tag, run_id, sc.per_task(sc.TAG_TEACHER_SHA, teacher.task), teacher.fetched.sha256)

    return teacher_ready


def fail_run(uri: str, run_id: str, e: BaseException) -> None:
    """Mark a run FAILED with the error as a tag and the traceback as `error.txt` (call it from
    the `except` block, where the traceback is current)."""
    c = tr.client(uri)
    retry(c.set_tag, run_id, sc.TAG_ERROR, f"{type(e).__name__}: {e}"[:5000])
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / sc.ERROR_TXT
        p.write_text(traceback.format_exc())
        retry(c.log_artifact, run_id, str(p))
    tr.end_run(uri, run_id, "FAILED")


def preempt_run(uri: str, run_id: str, e: BaseException) -> None:
    """Mark a run preempted (a signal stopped it after a checkpoint; a rerun continues it): status
    KILLED and tag `sall.preempted`, not FAILED."""
    retry(tr.client(uri).set_tag, run_id, sc.TAG_PREEMPTED, str(e)[:5000])
    tr.end_run(uri, run_id, sc.STATUS_PREEMPTED)


def logged_steps(uri: str, run: Any) -> dict[str, int]:
    """The last step of each per-epoch metric an earlier attempt of `run` logged (none for a new run)."""
    if run is None:
        return {}
    c = tr.client(uri)
    keys = [k for k in run.data.metrics if k.startswith((f"{sc.TRAIN}/", f"{sc.VAL}/"))]
    return {k: max(m.step for m in retry(c.get_metric_history, run.info.run_id, k)) for k in keys}


def epoch_logger(uri: str, run_id: str, logged: dict[str, int], spent: list[float]) -> Callable:
    """The student's per-epoch hook: each metric logged once per step, so the epochs a resumed
    training passes again (`fit` replays the ones it restored) fill holes and duplicate nothing."""

    def student_epoch(epoch: int, metrics: dict[str, float]) -> None:
        t0 = time.perf_counter()
        new = {k: v for k, v in metrics.items() if "/" in k and logged.get(k, 0) < epoch}
        tr.log_metrics(uri, run_id, new, step=epoch)
        logged.update(dict.fromkeys(new, epoch))
        spent[0] += time.perf_counter() - t0

    return student_epoch


def run_trial(config: dict[str, Any]) -> None:
    """Tune entry point. `config` holds the trial's TrialConfig (`cfg`), its label and the sweep's
    settings (`sweep`: tracking URI, experiment, parent run, cache dir, threads)."""
    from ray import tune

    from sall.chain import Hooks, run_chain

    sw = config["sweep"]
    cfg = config_from_dict(config["cfg"])
    # tests only: SALL_DEBUG_FAIL="student[:once][@label]" makes matching trials raise
    spec = os.environ.get("SALL_DEBUG_FAIL", "")
    mode, _, target = spec.partition("@")
    if mode and target in ("", config["label"]):
        cfg = cfg.replace(debug_fail=mode)
    uri, exp_id, parent_id = sw["mlflow_uri"], sw["experiment_id"], sw["parent_run_id"]
    key = cfg.key()
    existing = _find_trial_run(uri, exp_id, parent_id, key)
    if existing is not None and existing.info.status == "FINISHED":
        # finished before a crash of the driver: report what it logged, do not run or log again
        metrics = {k: v for k, v in existing.data.metrics.items() if k.startswith(f"{sc.TEST}/")}
        tune.report({**_tune_metrics(metrics), "mlflow_run_id": existing.info.run_id, "reused_run": 1})
        return
    run_id = open_run(sw, cfg, config["label"], existing)
    c = tr.client(uri)
    teacher_ready = teacher_hook(sw, cfg, run_id)

    logging_s = [0.0]  # time spent talking to MLflow, for --profile
    student_epoch = epoch_logger(uri, run_id, logged_steps(uri, existing), logging_s)
    try:
        res = run_chain(cfg, sw["cache_dir"], Hooks(teacher_ready=teacher_ready, student_epoch=student_epoch))
        final = _final_metrics(res)
        t0 = time.perf_counter()
        tr.log_metrics(uri, run_id, final)
        log_costs(uri, run_id, res.costs)
        _log_artifacts(uri, run_id, res, config["label"])
        logging_s[0] += time.perf_counter() - t0
        if cfg.profile:
            prof = {**res.profile, "logging_s": logging_s[0]}
            tr.log_metrics(uri, run_id, {f"{sc.PROFILE}/{k}": v for k, v in prof.items()})
            print("[profile] " + ", ".join(f"{k} {v:.1f}s" for k, v in prof.items()), file=sys.stderr, flush=True)
        retry(c.set_tag, run_id, sc.TAG_PRECISION, res.precision)
        retry(
            c.set_tag,
            run_id,
            sc.TAG_TEACHERS_TRAINED,
            ",".join(t for t, d in res.teachers.items() if d["built"]) or "none",
        )
    except Preempted as e:
        preempt_run(uri, run_id, e)
        raise
    except BaseException as e:
        fail_run(uri, run_id, e)
        raise
    tr.end_run(uri, run_id, "FINISHED")
    tune.report(
        {
            **_tune_metrics(final),
            "mlflow_run_id": run_id,
            "reused_run": 0,
            "teachers_trained": sum(int(d["built"]) for d in res.teachers.values()),
        }
    )


def _tune_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Tune-friendly names (no slashes) of the test metrics, for its progress and result grid."""
    return {
        k.replace(f"{sc.TEST}/", "").replace("/", "_"): v
        for k, v in metrics.items()
        if k.startswith(f"{sc.TEST}/") and v is not None
    }


def _node() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return os.environ.get("HOSTNAME", socket.gethostname())
