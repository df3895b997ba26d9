"""The MLflow schema of a sweep: every tag, stage, metric name and artifact path, named once.

The sweeps write these names and the analysis (and the tests, and whatever reads a store later)
finds runs and values by them, so a name spelled two ways splits a store in two without an
error. Constants only: no MLflow or Ray import, so anything may import it.

A sweep's runs, by the `sall.stage` tag:
  sweep      the parent run of one sweep invocation (`sall.sweep`, `sall.sweep_id`)
  teachers   the sweep run's one child that holds its teacher runs
  teacher    a teacher, once per experiment (`sall.teacher_key`)
  student    a trial: one setting on one fold and seed (`sall.trial_key`, `sall.config_key`)
  candidate  a student of a temperature search (sweeps/search.py)
  external   a student evaluated on another dataset (analysis/evaluate.py)
"""

from __future__ import annotations

# ---- MLflow's own tags ----------------------------------------------------------------------
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_NOTE = "mlflow.note.content"  # the run's description, rendered as Markdown

# ---- what a run is --------------------------------------------------------------------------
TAG_STAGE = "sall.stage"
STAGE_SWEEP = "sweep"
STAGE_TEACHERS = "teachers"
STAGE_TEACHER = "teacher"
STAGE_STUDENT = "student"
STAGE_CANDIDATE = "candidate"
STAGE_EXTERNAL = "external"

TAG_SWEEP = "sall.sweep"  # the sweep's name: temperature, ablation, search ...
TAG_SWEEP_ID = "sall.sweep_id"  # one invocation's grid and store; a rerun resumes into it
TAG_FOLD = "sall.fold"
TAG_SEED = "sall.seed"
TAG_TRIAL_KEY = "sall.trial_key"  # TrialConfig.trial_key(): a setting, over folds and seeds
TAG_CONFIG_KEY = "sall.config_key"  # TrialConfig.key(): one trial
TAG_TEACHER_KEY = "sall.teacher_key"  # on a teacher; on a student, one per task: `sall.teacher_key.<task>`
TAG_LABEL = "sall.label"  # the setting's name in the grid ("T=8", "baseline")

# ---- a trial's life -------------------------------------------------------------------------
TAG_ATTEMPTS = "sall.attempts"  # how many times the trial was started (retries, resumes)
TAG_ERROR = "sall.error"  # the exception of a failed attempt
TAG_NODE = "sall.node"  # the Ray node of the latest attempt
TAG_HOST = "sall.host"
TAG_PRECISION = "sall.precision"  # the arithmetic path of the latest attempt: bf16 autocast or fp32, and why
TAG_TEACHER_RUN = "sall.teacher"  # on a student, one per task: `sall.teacher.<task>` = the teacher's run id
TAG_TEACHER_SHA = "sall.teacher_sha256"  # on a student, one per task: the checksum of the teacher it learnt from
TAG_TEACHERS_TRAINED = "sall.teachers_trained"  # the tasks whose teacher this trial trained, or "none"
TAG_TASK = "sall.task"  # a teacher's task
TAG_TRAINED_NOW = "sall.trained_now"  # a teacher: trained by this sweep, not found in the cache
TAG_PREEMPTED = "sall.preempted"  # a preemption signal stopped an attempt (the run is KILLED until resumed)
TAG_RESUMES = "sall.resumes"  # how many times its training continued from a checkpoint
TAG_EPOCHS_LOST = "sall.epochs_lost"  # work redone after kills, in epochs (<= 1 per kill)
STATUS_PREEMPTED = "KILLED"  # MLflow's status for a preempted attempt: not FAILED

# ---- the temperature search -----------------------------------------------------------------
TAG_CANDIDATE = "sall.candidate"  # the Tune trial id: finds the run again after a restore
TAG_SEARCH_METRIC = "sall.search_metric"
TAG_STOPPED = "sall.stopped"  # "1": ASHA stopped the candidate early
TAG_FINAL_EPOCH = "sall.final_epoch"
TAG_LOST = "sall.lost"  # "1": a killed driver lost the candidate's trial
TAG_PICKED = "sall.picked"  # on the search run: the temperatures it confirms

# ---- the analysis -----------------------------------------------------------------------------
TAG_BEST = "sall.best"  # on a sweep run, one per task: `sall.best.<task>` = the best setting
TAG_VERDICT = "sall.verdict"  # on a sweep run, one per task: `sall.verdict.<task>` = the best setting's verdict
TAG_CONFIRM_SEEDS = "sall.confirm_seeds"  # on a sweep run: the seeds that confirm its choice ("1,2")
TAG_EVALUATED_RUN = "sall.evaluated_run"  # on an external run: the student run it evaluated
TAG_EXTERNAL_DATASET = "sall.external_dataset"


def per_task(tag: str, task: str) -> str:
    """A tag with one value per task: `sall.teacher.dr`."""
    return f"{tag}.{task}"


# ---- metrics: <prefix>/<task>/<name>, per epoch (train, val) or once (the rest) --------------
# train/ and val/ are named by sall/train.py's epoch history (sall/ imports nothing from sweeps/);
# the trial logs them as they come.
TRAIN = "train"
VAL = "val"  # per epoch; also what a search reports
TEST = "test"
VAL_BEST = "val_best"  # validation accuracy of the kept epoch
SOFT = "soft"  # the soft labels: max_mean, var
EXTERNAL = "external"
BEST = "best"  # on a sweep run: best/<task>/<name> (sweeps/review.py)
PROFILE = "profile"  # profile/<stage>: seconds, with --profile
SEARCH = "search"  # search/score, search/final_epoch: a candidate as the search booked it
COST = "cost"  # cost/<name>: the training's seconds over every attempt (COST_NAMES)
COST_NAMES = ("spent_s", "lost_s", "epochs_lost", "resumes")  # sall.chain.fit_costs's keys


def metric(prefix: str, task: str, name: str) -> str:
    """`test/dr/acc`."""
    return f"{prefix}/{task}/{name}"


SEARCH_SCORE = f"{SEARCH}/score"
SEARCH_FINAL_EPOCH = f"{SEARCH}/final_epoch"

# ---- artifacts --------------------------------------------------------------------------------
CONFIG_JSON = "config.json"
METRICS_JSON = "metrics.json"
ERROR_TXT = "error.txt"
CANDIDATES_JSON = "candidates.json"
MODEL_DIR = "model"  # the stored student: model/<key>.pt
ANALYSIS_TABLES = "analysis/tables"  # on a sweep run: tables.py's output
ANALYSIS_FIGURES = "analysis/figures"


CONFUSION = "confusion"  # per task: confusion_<task>.png and .csv
RELIABILITY = "reliability"  # per task: reliability_<task>.png and .csv
PREDICTIONS = "predictions"  # per task: predictions_<task>.csv (row, [image,] label, prob_0 ...)


def task_file(kind: str, task: str, ext: str) -> str:
    """A per-task artifact's name: `task_file(PREDICTIONS, "dr", "csv")` = predictions_dr.csv."""
    return f"{kind}_{task}.{ext}"
