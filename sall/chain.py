"""The SALL chain: data -> teachers -> teacher logits -> soft labels at T -> student -> metrics.

Stages follow design.md. Teachers and their logits are cached artifacts named by what they depend
on; the student and its evaluation run per trial. Nothing here knows about Ray or MLflow: callers
observe the chain through `Hooks`.
"""

from __future__ import annotations

import functools
import io
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sall.checkpoint import CheckpointSink, StoreCheckpoints
from sall.config import TrialConfig, stable_hash
from sall.data.folds import SPLIT_VERSION, fold_splits
from sall.data.image_cache import TaskImages, image_array
from sall.data.manifest import check_classes, fingerprint
from sall.data.subset import cap_per_class, cap_per_task, check_nonempty, take_per_task
from sall.losses import soft_labels
from sall.metrics import classification_metrics, soft_label_stats
from sall.model import MultiHeadNet, check_pretrained, input_normalization
from sall.store import Fetched, Store, open_store
from sall.tasks import TASKS
from sall.train import FitResult, Runtime, TrainSet, fit, predict


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# data
@functools.lru_cache(maxsize=8)
def _load_manifest_cached(
    dataset: str, data_root: str | None, synthetic_n: int, seed: int = 0
) -> tuple[pd.DataFrame, dict, str]:
    from sall.data.sources import format_summary, load_manifest

    manifest, summary = load_manifest(dataset, data_root, synthetic_n=synthetic_n, seed=seed)
    log(format_summary(summary))  # once per process: what was loaded, what was skipped and why
    fp = fingerprint(manifest)
    if dataset == "synthetic":  # the pixels come from code: its version is part of the data
        from sall.data.synthetic import RENDER_VERSION

        fp = stable_hash([fp, RENDER_VERSION])
    return manifest, summary, fp


@dataclass
class Data:
    """The manifest, one fold's splits and the image array, for one trial configuration."""

    manifest: pd.DataFrame
    summary: dict
    fingerprint: str
    splits: dict[str, np.ndarray]  # train (after the class cap), val, test: rows of the manifest
    images: TaskImages | None = None  # indexed by manifest row; only the trial's tasks are loaded

    def rows(self, split: str, task: str) -> np.ndarray:
        r = self.splits[split]
        return r[self.manifest["task"].to_numpy()[r] == task]

    def labels(self, rows: np.ndarray) -> np.ndarray:
        return self.manifest["grade"].to_numpy()[rows]

    def tasks_of(self, rows: np.ndarray) -> np.ndarray:
        return self.manifest["task"].to_numpy()[rows]


def preflight(cfg: TrialConfig) -> Data:
    """Every check that can fail before expensive work: config, weights, manifest, folds, subsets.

    Returns the data without images (no decoding yet). Raises SallError with one clear line.
    """
    cfg.validate()
    check_pretrained(cfg.backbone, cfg.pretrained, cfg.pretrained_path)
    manifest, summary, fp = _load_manifest_cached(cfg.dataset, cfg.data_root, cfg.synthetic_n, cfg.manifest_seed)
    check_classes(manifest, cfg.tasks, str(cfg.dataset))
    splits = fold_splits(manifest, cfg.fold, cfg.split_seed)
    where = f"fold {cfg.fold}"
    splits["train"] = cap_per_class(manifest, splits["train"], cfg.class_cap, seed=cfg.fold)
    splits["train"] = cap_per_task(manifest, splits["train"], cfg.train_per_task, seed=cfg.fold)
    splits["val"] = cap_per_task(manifest, splits["val"], cfg.val_per_task, seed=cfg.fold)
    cap_note = f" with class cap {cfg.class_cap}" if cfg.class_cap else ""
    check_nonempty(manifest, splits["train"], cfg.tasks, f"{where} train split{cap_note}")
    data = Data(manifest, summary, fp, splits)
    student_train_rows(cfg, data)  # sample counts feasible?
    return data


def prepare(cfg: TrialConfig, store: Store) -> Data:
    data = preflight(cfg)
    # a replicate that drew its own data is that data's only user: draw only the rows of its splits
    rows = np.concatenate(list(data.splits.values())) if cfg.manifest_seed else None
    data.images = image_array(data.manifest, data.fingerprint, cfg.image_size, store, cfg.tasks, rows)
    return data


def student_train_rows(cfg: TrialConfig, data: Data) -> np.ndarray:
    """The student's training rows: the fold's (capped) train split of the trial's tasks, cut to
    the per-task sample counts of the data-ratio study."""
    rows = data.splits["train"]
    rows = rows[np.isin(data.tasks_of(rows), cfg.tasks)]
    return take_per_task(data.manifest, rows, dict(cfg.sample_counts), f"fold {cfg.fold}", seed=cfg.fold)


# ---------------------------------------------------------------------------------------------
# stage 1 and 2: teachers and their logits
def code_versions(cfg: TrialConfig) -> dict[str, Any]:
    """What the code adds to a model's key beyond the config: the split layout's version, and for
    pretrained weights their input standardisation (which changed from ImageNet's to the weights'
    own; random-init keys, whose training did not change, are left as they were)."""
    out: dict[str, Any] = {"split": SPLIT_VERSION}
    if cfg.pretrained or cfg.pretrained_path:
        out["input_norm"] = input_normalization(cfg.backbone, cfg.pretrained, cfg.pretrained_path)
    return out


def teacher_key(cfg: TrialConfig, task: str, data_fingerprint: str) -> str:
    """Names a teacher by everything it depends on (design.md) and nothing else."""
    return f"{task}-{stable_hash({**cfg.teacher_fields(task), 'data': data_fingerprint, **code_versions(cfg)})}"


def one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(labels), k), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def new_model(cfg: TrialConfig, heads: list[str], seed: int) -> MultiHeadNet:
    torch.manual_seed(seed)
    return MultiHeadNet(
        cfg.backbone,
        {t: TASKS[t].num_classes for t in heads},
        pretrained=cfg.pretrained,
        pretrained_path=cfg.pretrained_path,
    )


def evaluate(
    model: torch.nn.Module,
    task: str,
    data: Data,
    split: str,
    temperature: float,
    rt: Runtime,
    predictions: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """A head on its own task's split: softmax(z / T), the output it was trained to produce.
    With `predictions` (a dict), also fills it with the per-image rows, labels and probs."""
    rows = data.rows(split, task)
    z = predict(model, data.images, rows, rt)[task]
    probs = torch.softmax(torch.from_numpy(z) / temperature, dim=1).numpy()
    if predictions is not None:
        predictions.update(rows=rows, labels=data.labels(rows), probs=probs)
    return classification_metrics(probs, data.labels(rows))


def _save(obj: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getvalue())


def load_artifact(path: Path) -> dict:
    """Artifacts hold only tensors and plain data: load them without unpickling code."""
    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class Teacher:
    task: str
    key: str
    fetched: Fetched
    info: dict[str, Any]  # history, best_epoch, test metrics, seconds, n_train

    def model(self, cfg: TrialConfig) -> MultiHeadNet:
        m = new_model(cfg, [self.task], cfg.seed)
        m.load_state_dict(load_artifact(self.fetched.path)["state"])
        return m


def get_teacher(cfg: TrialConfig, task: str, data: Data, store: Store, rt: Runtime) -> Teacher:
    """Train the single-task teacher of `task` at T = 1, or reuse the cached one."""
    key = teacher_key(cfg, task, data.fingerprint)

    def build(tmp: Path) -> None:
        if cfg.debug_fail.startswith("teacher"):
            raise RuntimeError(f"injected failure in teacher {task} (debug_fail={cfg.debug_fail})")
        log(f"[teacher {task}] training {key} ({cfg.backbone}, {cfg.teacher_epochs} epochs)")
        t0 = time.time()
        rows = data.rows("train", task)
        labels = data.labels(rows)
        model = new_model(cfg, [task], cfg.seed)
        train = TrainSet(rows, {task: one_hot(labels, TASKS[task].num_classes)}, {task: np.ones(len(rows), dtype=bool)})
        val_rows = data.rows("val", task)
        res = fit(
            model,
            data.images,
            train,
            {task: (val_rows, data.labels(val_rows))},
            epochs=cfg.teacher_epochs,
            temperature=1.0,
            cfg=cfg,
            rt=rt,
            name=f"teacher {task}",
            seed=cfg.seed,
            checkpoints=StoreCheckpoints(store, f"teacher-{key}"),
        )
        info = dict(
            task=task,
            key=key,
            best_epoch=res.best_epoch,
            history=res.history,
            n_train=int(len(rows)),
            seconds=time.time() - t0,
            test=evaluate(model, task, data, "test", 1.0, rt),
            fields={k: str(v) for k, v in cfg.teacher_fields(task).items()},
            **fit_costs(res),
        )
        _save({"state": res.state, "info_json": _json(info)}, tmp)

    fetched = store.get_or_build("teachers", key, ".pt", build)
    if fetched.built:  # logits of an earlier (e.g. corrupt, rebuilt) teacher of this key are stale
        StoreCheckpoints(store, f"teacher-{key}").clear()  # the teacher is kept: its checkpoint is done with
        for other in TASKS:
            store.remove("logits", logits_key(key, other), ".pt")
    else:
        log(f"[teacher {task}] reusing {key}")
    import json

    info = json.loads(load_artifact(fetched.path)["info_json"])
    return Teacher(task, key, fetched, info)


def fit_costs(res: FitResult) -> dict[str, float]:
    """What a training cost across its attempts: resumes, the work a kill lost, the seconds spent."""
    return dict(resumes=res.resumes, epochs_lost=res.epochs_lost, lost_s=res.lost_s, spent_s=res.spent_s)


def logits_key(teacher_key: str, on_task: str) -> str:
    return f"{teacher_key}-on-{on_task}"


def get_logits(
    cfg: TrialConfig, teacher: Teacher, data: Data, store: Store, rt: Runtime, on_task: str
) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: the teacher's logits on the fold's training images of `on_task`, the only images a
    soft label is ever given to (a student trains on a subset of them). Cached with the teacher:
    its key fixes the fold, the caps and the data, so the rows are the same for every trial."""
    rows = data.rows("train", on_task)

    def build(tmp: Path) -> None:
        log(f"[teacher {teacher.task}] logits on {len(rows)} {on_task} training images")
        z = predict(teacher.model(cfg).to(rt.device), data.images, rows, rt)[teacher.task]
        _save({"rows": torch.from_numpy(rows.astype(np.int64)), "logits": torch.from_numpy(z)}, tmp)

    blob = load_artifact(store.get_or_build("logits", logits_key(teacher.key, on_task), ".pt", build).path)
    if not np.array_equal(blob["rows"].numpy(), rows):  # cannot happen unless the split code changed
        raise RuntimeError(
            f"cached logits {logits_key(teacher.key, on_task)} are for other rows than "
            f"fold {cfg.fold}'s {on_task} training split; bump SPLIT_VERSION"
        )
    return rows, blob["logits"].numpy()


def soft_label_array(cfg: TrialConfig, teacher: Teacher, data: Data, store: Store, rt: Runtime) -> np.ndarray:
    """softmax(teacher logits / T) on every training image of the trial's other tasks, indexed by
    manifest row; NaN on the rows no soft label is given to (the teacher's own task, val, test)."""
    out = np.full((len(data.manifest), TASKS[teacher.task].num_classes), np.nan, dtype=np.float32)
    for other in cfg.tasks:
        if other != teacher.task:
            rows, z = get_logits(cfg, teacher, data, store, rt, other)
            out[rows] = soft_labels(torch.from_numpy(z), cfg.temperature).numpy()
    return out


def _json(obj: Any) -> str:
    import json

    from sall.metrics import to_jsonable

    return json.dumps(to_jsonable(obj))


# ---------------------------------------------------------------------------------------------
# stage 3: the student
@dataclass
class Hooks:
    """How callers (the sweeps) observe a chain without the library knowing them."""

    teacher_ready: Callable[[Teacher], None] | None = None
    student_epoch: Callable[[int, dict[str, float]], None] | None = None


@dataclass
class ChainResult:
    config: TrialConfig
    test: dict[str, dict[str, Any]]  # task -> classification metrics on its test split
    val: dict[str, dict[str, Any]]
    soft: dict[str, dict[str, float]]  # task -> soft-label stats of its teacher's labels
    teachers: dict[str, dict[str, Any]]  # task -> key, built, seconds, path
    history: list[dict[str, float]]
    profile: dict[str, float]
    student_path: str
    seconds: float
    reused_teacher_as_baseline: list[str] = field(default_factory=list)
    # task -> {rows, labels, probs} of its test split, per image (for paired bootstraps)
    predictions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # the students' training across attempts (`fit_costs`, summed over their models)
    costs: dict[str, float] = field(default_factory=dict)
    precision: str = ""  # the arithmetic path the training took (sall/train.py: precision_path)

    def summary(self) -> dict[str, Any]:
        from sall.metrics import scalar_metrics, to_jsonable

        return to_jsonable(
            dict(
                config_key=self.config.key(),
                trial_key=self.config.trial_key(),
                test={t: scalar_metrics(m) for t, m in self.test.items()},
                soft=self.soft,
                teachers={t: {k: v for k, v in d.items() if k != "info"} for t, d in self.teachers.items()},
                seconds=round(self.seconds, 2),
                profile=self.profile,
            )
        )


def needs_teachers(cfg: TrialConfig) -> list[str]:
    """Which teachers a trial needs: all of its tasks' with soft labels; none otherwise, except
    that the baseline reuses the teachers as its single-task models when they coincide."""
    if cfg.sa_labels and (len(cfg.tasks) > 1):
        return list(cfg.tasks)
    return [t for t in cfg.tasks if baseline_is_teacher(cfg, t)]


def baseline_is_teacher(cfg: TrialConfig, task: str) -> bool:
    """The baseline's single-task model of `task` is exactly its teacher (same data, same
    training): reuse it instead of training it again."""
    return cfg.is_baseline and cfg.student_epochs == cfg.teacher_epochs and cfg.sample_count(task) is None


def teachers_and_soft_labels(
    cfg: TrialConfig, data: Data, store: Store, rt: Runtime, hooks: Hooks
) -> tuple[dict[str, Teacher], dict[str, np.ndarray]]:
    """Stages 1 and 2: the teachers a trial needs (trained once per key, else loaded) and, with
    SA-labels, each one's softened logits on the training rows of the other tasks."""
    teachers: dict[str, Teacher] = {}
    soft: dict[str, np.ndarray] = {}
    for task in needs_teachers(cfg):
        teachers[task] = get_teacher(cfg, task, data, store, rt)
        if hooks.teacher_ready:
            hooks.teacher_ready(teachers[task])
        if cfg.sa_labels:
            soft[task] = soft_label_array(cfg, teachers[task], data, store, rt)
    return teachers, soft


def build_teacher(cfg: TrialConfig, task: str, on_tasks: list[str], cache_dir: str) -> dict[str, Any]:
    """Stages 1 and 2 for one teacher on its own: train it (or find it trained) and its logits on
    the training images of `on_tasks`, so that the trials that need it only load. The sweep runs
    one of these per teacher key, in parallel, before the trials. Returns what the tracking layer
    records of it: key, built, seconds, mtime and the teacher's info."""
    store = open_store(cache_dir)
    cfg = cfg.replace(tasks=tuple(dict.fromkeys([task, *on_tasks])), sample_counts=())
    data = prepare(cfg, store)
    rt = Runtime.from_config(cfg)
    teacher = get_teacher(cfg, task, data, store, rt)
    for other in on_tasks:
        get_logits(cfg, teacher, data, store, rt, other)
    f = teacher.fetched
    return dict(
        task=task, key=teacher.key, built=f.built, seconds=f.seconds, mtime=f.mtime, sha256=f.sha256, info=teacher.info
    )


def reuse_teacher(
    cfg: TrialConfig, teacher: Teacher, rt: Runtime, hooks: Hooks, history: dict[int, dict[str, float]]
) -> MultiHeadNet:
    """The baseline's single-task model when it is its teacher: the teacher's weights, and its
    training curve as the model's (into `history` and the student_epoch hook)."""
    model = teacher.model(cfg).to(rt.device)
    for h in teacher.info["history"]:
        epoch_metrics = {k: v for k, v in h.items() if "/" in k}
        history.setdefault(int(h["epoch"]), {}).update(epoch_metrics)
        if hooks.student_epoch:
            hooks.student_epoch(int(h["epoch"]), epoch_metrics)
    log(f"[student] baseline {teacher.task}: the single-task model is the teacher; reusing it")
    return model


def run_chain(cfg: TrialConfig, cache_dir: str | Path, hooks: Hooks | None = None) -> ChainResult:
    """Run one trial's whole chain and return its metrics."""
    hooks = hooks or Hooks()
    t_start = time.time()
    store = open_store(cache_dir)
    t0 = time.time()
    data = prepare(cfg, store)
    rt = Runtime.from_config(cfg)
    profile: dict[str, float] = {"prepare_s": time.time() - t0}
    if cfg.debug_fail.startswith("student"):
        _maybe_fail(cfg, store)

    t0 = time.time()
    teachers, soft = teachers_and_soft_labels(cfg, data, store, rt, hooks)
    profile["teachers_s"] = time.time() - t0

    # stage 3
    rows = student_train_rows(cfg, data)
    row_tasks = data.tasks_of(rows)
    groups = [list(cfg.tasks)] if cfg.multitask else [[t] for t in cfg.tasks]
    test: dict[str, dict] = {}
    val: dict[str, dict] = {}
    states: dict[str, dict] = {}
    history: dict[int, dict[str, float]] = {}
    reused: list[str] = []
    predictions: dict[str, dict[str, np.ndarray]] = {}
    # named like the teachers by the data and split too: a renderer or split change is a new student
    student_key = stable_hash([cfg.key(), data.fingerprint, code_versions(cfg)])
    sinks = [StoreCheckpoints(store, f"student-{student_key}-{g}") for g in range(len(groups))]
    costs = dict.fromkeys(("resumes", "epochs_lost", "lost_s", "spent_s"), 0.0)
    for g, heads in enumerate(groups):
        if len(heads) == 1 and baseline_is_teacher(cfg, heads[0]):
            model = reuse_teacher(cfg, teachers[heads[0]], rt, hooks, history)
            reused.append(heads[0])
        else:
            model, res = train_student(cfg, data, rows, row_tasks, heads, soft, rt, hooks, cfg.seed + 1 + g, sinks[g])
            costs = {k: costs[k] + v for k, v in fit_costs(res).items()}
            for h in res.history:
                history.setdefault(int(h["epoch"]), {}).update({k: v for k, v in h.items() if "/" in k})
            for k, v in res.profile.items():
                profile[k] = profile.get(k, 0.0) + v
        t0 = time.time()
        for t in heads:
            test[t] = evaluate(model, t, data, "test", cfg.temperature, rt, predictions.setdefault(t, {}))
            val[t] = evaluate(model, t, data, "val", cfg.temperature, rt)
        profile["final_eval_s"] = profile.get("final_eval_s", 0.0) + time.time() - t0
        states.update({f"{g}.{k}": v for k, v in getattr(model, "_orig_mod", model).state_dict().items()})

    stats: dict[str, dict[str, float]] = {}
    for task, s in soft.items():
        other = rows[row_tasks != task]
        if len(other):
            stats[task] = soft_label_stats(s[other])

    student_path = store.get_or_build(
        "students",
        student_key,
        ".pt",
        lambda tmp: _save({"state": states, "groups_json": _json(groups), "config_json": cfg.to_json()}, tmp),
    ).path
    for sink in sinks:  # the student is kept: its checkpoints are done with
        sink.clear()
    return ChainResult(
        config=cfg,
        test=test,
        val=val,
        soft=stats,
        teachers={
            t: dict(
                key=tc.key, built=tc.fetched.built, seconds=tc.fetched.seconds, path=str(tc.fetched.path), info=tc.info
            )
            for t, tc in teachers.items()
        },
        history=[{"epoch": e, **m} for e, m in sorted(history.items())],
        profile=profile,
        student_path=str(student_path),
        seconds=time.time() - t_start,
        reused_teacher_as_baseline=reused,
        predictions=predictions,
        precision=rt.precision,
        costs=costs,
    )


def train_student(
    cfg: TrialConfig,
    data: Data,
    rows: np.ndarray,
    row_tasks: np.ndarray,
    heads: list[str],
    soft: dict[str, np.ndarray],
    rt: Runtime,
    hooks: Hooks,
    seed: int,
    checkpoints: CheckpointSink | None = None,
) -> tuple[MultiHeadNet, FitResult]:
    """One student model with `heads`. Each row trains the head of its own task with its true
    grade, and (with sa_labels) every other head with that head's teacher's soft label. With
    `checkpoints`, its training checkpoints there and resumes from what it finds."""
    if cfg.sa_labels:
        mine = rows  # images of the other tasks come in with soft labels
    else:
        mine = rows[np.isin(row_tasks, heads)]
    mt = data.tasks_of(mine)
    grades = data.labels(mine)
    targets: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for h in heads:
        k = TASKS[h].num_classes
        own = mt == h
        tgt = np.zeros((len(mine), k), dtype=np.float32)
        tgt[own] = one_hot(grades[own], k)
        mask = own.copy()
        if cfg.sa_labels and h in soft:
            tgt[~own] = soft[h][mine[~own]]
            if not np.isfinite(tgt).all():  # a row outside the soft-labelled training split
                raise RuntimeError(f"student head {h}: a training row has no soft label")
            mask[:] = True
        targets[h], masks[h] = tgt, mask
    name = "student" if len(heads) > 1 else f"student {heads[0]}"
    log(
        f"[{name}] training on {len(mine)} images, heads {','.join(heads)}, T={cfg.temperature:g}, "
        f"sa_labels={cfg.sa_labels}"
    )
    model = new_model(cfg, heads, seed)
    val = {h: (data.rows("val", h), data.labels(data.rows("val", h))) for h in heads}
    res = fit(
        model,
        data.images,
        TrainSet(mine, targets, masks),
        val,
        epochs=cfg.student_epochs,
        temperature=cfg.temperature,
        cfg=cfg,
        rt=rt,
        name=name,
        seed=seed,
        on_epoch=hooks.student_epoch,
        checkpoints=checkpoints,
    )
    return model, res


def _maybe_fail(cfg: TrialConfig, store: Store) -> None:
    """Tests only: `student` always fails; `student:once` fails on the first attempt only."""
    if cfg.debug_fail == "student":
        raise RuntimeError("injected failure in the student stage (debug_fail=student)")
    if cfg.debug_fail == "student:once":
        if store.get_or_build("debug", cfg.key(), ".failed-once", lambda tmp: tmp.write_text("1")).built:
            raise RuntimeError("injected one-time failure in the student stage (debug_fail=student:once)")


def load_student(path: str | Path) -> tuple[TrialConfig, dict[str, MultiHeadNet]]:
    """A stored student: its config and, per task, the model whose head answers for it."""
    import json

    from sall.config import config_from_dict

    blob = load_artifact(Path(path))
    cfg = config_from_dict(json.loads(blob["config_json"]))
    groups = json.loads(blob["groups_json"])
    models: dict[str, MultiHeadNet] = {}
    for g, heads in enumerate(groups):
        m = new_model(cfg, heads, 0)
        prefix = f"{g}."
        m.load_state_dict({k[len(prefix) :]: v for k, v in blob["state"].items() if k.startswith(prefix)})
        for h in heads:
            models[h] = m
    return cfg, models
