"""The sweep's teacher stage: every teacher the trials need, trained once, in parallel, before them.

The driver knows every trial's config, so it knows every teacher key the sweep needs. Each missing
teacher (with its logits on the other tasks' training images) is one Ray task with a trial's
resources, scheduled on any node; the trials start when their teachers exist, and only load them.
So no core waits on a lock while a teacher that someone needs is untrained, and no two nodes train
the same teacher. The store's own exclusivity (a lock file on a folder, a lease in an object store)
stays the safety net across concurrent sweeps and for a teacher whose task failed: a trial that
finds its teacher missing builds it under that lock, as a single chain does.

Each teacher's MLflow run is made here, by the driver, once.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sall.chain import Teacher, build_teacher, logits_key, needs_teachers, preflight, teacher_key
from sall.config import TrialConfig, config_from_dict
from sall.store import Fetched, open_store
from tracking import client as tr
from tracking import schema as sc


@dataclass
class TeacherJob:
    """One teacher the sweep needs, and the tasks its logits are needed on."""

    cfg: TrialConfig  # the first trial that needs it (its teacher fields are all that matter)
    task: str
    key: str
    on_tasks: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        seed = f" seed{self.cfg.seed}" if self.cfg.seed else ""
        return f"{self.task} fold{self.cfg.fold}{seed}"


def plan(cfgs: list[TrialConfig]) -> list[TeacherJob]:
    """Every teacher key the trials need, once, with the union of the tasks they need logits on."""
    jobs: dict[str, TeacherJob] = {}
    for cfg in cfgs:
        fp = preflight(cfg).fingerprint
        for task in needs_teachers(cfg):
            key = teacher_key(cfg, task, fp)
            job = jobs.setdefault(key, TeacherJob(cfg, task, key))
            if cfg.sa_labels:
                job.on_tasks = list(dict.fromkeys([*job.on_tasks, *(t for t in cfg.tasks if t != task)]))
    return list(jobs.values())


def _missing(job: TeacherJob, store) -> bool:
    return not store.exists("teachers", job.key, ".pt") or not all(
        store.exists("logits", logits_key(job.key, t), ".pt") for t in job.on_tasks
    )


def _logged_teachers(uri: str, experiment_id: str) -> set[str]:
    """Teacher keys that already have their run in the experiment."""
    runs = tr.find_runs(uri, experiment_id, f"tags.`{sc.TAG_STAGE}` = '{sc.STAGE_TEACHER}'", max_results=5000)
    return {r.data.tags.get(sc.TAG_TEACHER_KEY) for r in runs}


def _remote_build(cfg_dict: dict[str, Any], task: str, on_tasks: list[str], cache_dir: str) -> dict[str, Any]:
    """A Ray task: one teacher and its logits."""
    import ray

    out = build_teacher(config_from_dict(cfg_dict), task, on_tasks, cache_dir)
    return {**out, "node": ray.get_runtime_context().get_node_id()}


def run_stage(sweep: Any, cfgs: list[TrialConfig], cpus: float, gpus: float, say) -> None:
    """Train what is missing as parallel Ray tasks, then give every teacher its MLflow run once.
    A teacher whose task fails is reported; its trials build it themselves (and fail visibly)."""
    import ray

    from sweeps.trial import teacher_run

    store = open_store(sweep.cache_dir)
    jobs = plan(cfgs)
    logged = _logged_teachers(sweep.uri, sweep.experiment_id)
    todo = [j for j in jobs if _missing(j, store) or j.key not in logged]
    if not todo:
        return
    n_train = sum(_missing(j, store) for j in todo)
    say(f"[teachers] {len(jobs)} needed: {n_train} to train, at once as Ray tasks; {len(jobs) - n_train} cached")
    remote = ray.remote(max_retries=2)(_remote_build).options(num_cpus=cpus, num_gpus=gpus)
    refs = {remote.remote(dataclasses.asdict(j.cfg), j.task, j.on_tasks, sweep.cache_dir): j for j in todo}
    t0 = time.time()
    while refs:
        [ref], _ = ray.wait(list(refs), num_returns=1)
        job = refs.pop(ref)
        try:
            out = ray.get(ref)
        except Exception as e:  # noqa: BLE001 (any failure of one teacher: its trials will show it)
            say(f"[teachers] {job.name} failed ({str(e).strip().splitlines()[-1][:200]}); its trials will retry it")
            continue
        fetched = Fetched(Path(), out["built"], out["seconds"], out["mtime"], out["sha256"])
        teacher = Teacher(job.task, out["key"], fetched, out["info"])
        teacher_run(sweep.uri, sweep.experiment_id, sweep.parent, sweep.sweep, store, teacher, job.cfg)
        what = f"trained in {out['seconds']:.0f}s" if out["built"] else "found in the cache"
        say(f"[teachers] {job.name} {what} ({len(todo) - len(refs)}/{len(todo)}, {time.time() - t0:.0f}s)")
