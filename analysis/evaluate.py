"""External validation: evaluate a finished trial's student on another dataset.

    python analysis/evaluate.py --run-id RUN --dataset SOURCE [--data-root DIR] [--task dr]
                                [--split all|test] [--mlflow-uri URI] [--cache-dir DIR]

Downloads the trial's stored student (its `model/` artifact, so this works from any machine that
reaches the tracking store), runs each requested head on the dataset's images of its task with
softmax(z / T) at the student's own temperature T, prints the metrics as JSON on stdout and logs
them as a new MLflow run in the same experiment (tags sall.stage=external,
sall.evaluated_run=RUN; nested under the evaluated run) with the confusion matrices,
reliability diagrams and per-image predictions as artifacts.

SOURCE is anything `--dataset` of the sweeps accepts: synthetic, odir (with --data-root), a CSV
manifest (image,task,grade[,patient]) or an image folder root/<task>/<grade>/*. By default every
image of the task is used (external validation: no fold split); --split test uses the test split
of the student's fold on that dataset instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from analysis import common as cm
from sall.errors import DataError, SallError
from tracking import schema as sc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python analysis/evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run-id", required=True, help="MLflow run id of a finished trial (a student run)")
    p.add_argument(
        "--dataset", required=True, help="synthetic, odir (needs --data-root), a CSV manifest or an image folder"
    )
    p.add_argument("--data-root", default=None, help="dataset folder (odir: with full_df.csv and preprocessed_images/)")
    p.add_argument(
        "--task",
        default=None,
        help="comma-separated tasks to evaluate (default: every task of the student that the dataset has)",
    )
    p.add_argument(
        "--split",
        default="all",
        choices=["all", "test"],
        help="all images (default), or the test split of the student's fold",
    )
    p.add_argument("--synthetic-n", type=int, default=None, help="synthetic images per task (default: the student's)")
    p.add_argument("--cache-dir", default=".sall-cache", help="where decoded images are cached")
    p.add_argument("--device", default=None, help="auto, cpu, cuda ... (default: the student's)")
    p.add_argument("--full", action="store_true", help="also print confusion matrices and reliability bins")
    p.add_argument("--no-log", action="store_true", help="print only; log no MLflow run")
    cm.add_common_args(p, experiment=False)
    return p


def get_run(uri: str, run_id: str):
    try:
        return cm.tr.retry(cm.client(uri).get_run, run_id)
    except Exception as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower() or "invalid" in str(e).lower():
            raise SallError(f"unknown run id '{run_id}' in {uri}; expected the id of a finished trial run") from None
        raise


def own_draw(cfg, dataset: str) -> tuple[int, int]:
    """(manifest seed, split seed) to evaluate a student on `dataset` with: its own draw and cut
    (`redraw`) on the data set it was trained on, the fixed ones (0, 0) on any other, whose
    manifest seed means something else (ODIR deals its normal eyes with it)."""
    return (cfg.manifest_seed, cfg.split_seed) if dataset == cfg.dataset else (0, 0)


def dataset_name(dataset: str) -> str:
    return dataset if dataset in ("synthetic", "odir") else os.path.basename(os.path.normpath(dataset))


def run(args: argparse.Namespace) -> int:
    from sall.chain import Data, evaluate, load_student
    from sall.data.folds import fold_splits
    from sall.data.image_cache import image_array
    from sall.data.manifest import fingerprint
    from sall.data.sources import load_manifest
    from sall.metrics import scalar_metrics, to_jsonable
    from sall.store import ArtifactStore
    from sall.tasks import TASKS
    from sall.train import Runtime

    uri = cm.open_store(args.mlflow_uri)
    orig = get_run(uri, args.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        cm.log(f"[evaluate] downloading the student of run {args.run_id}")
        cfg, models = load_student(cm.student_file(uri, args.run_id, Path(tmp)))
    have = list(models)
    if args.task:
        tasks = [t.strip() for t in args.task.split(",") if t.strip()]
        for t in tasks:
            if t not in TASKS:
                raise SallError(f"--task: unknown task '{t}'; expected some of {', '.join(TASKS)}")
            if t not in have:
                raise SallError(
                    f"--task {t}: the student of run {args.run_id} has no {t} head; it has {', '.join(have)}"
                )
    else:
        tasks = have
    if args.dataset == "odir" and not args.data_root:
        raise SallError("--dataset odir needs --data-root: the folder holding full_df.csv and preprocessed_images/")
    cm.log(f"[evaluate] loading {args.dataset} (tasks {', '.join(tasks)})")
    try:
        manifest, summary = load_manifest(
            args.dataset,
            args.data_root,
            tasks=tasks,
            synthetic_n=args.synthetic_n or cfg.synthetic_n,
            seed=own_draw(cfg, args.dataset)[0],
        )
    except DataError as e:
        if "no images of task" not in str(e):
            raise
        raise SallError(f"dataset {args.dataset} has no images of task {', '.join(tasks)}") from None
    present = set(manifest["task"])
    missing = [t for t in tasks if t not in present]
    if missing and args.task:
        raise SallError(
            f"dataset {args.dataset} has no images of task {', '.join(missing)}; it has {', '.join(sorted(present))}"
        )
    tasks = [t for t in tasks if t in present]
    fp = fingerprint(manifest)
    splits = (
        {"all": np.arange(len(manifest))}
        if args.split == "all"
        else fold_splits(manifest, cfg.fold, own_draw(cfg, args.dataset)[1])
    )
    data = Data(manifest, summary, fp, splits)
    data.images = image_array(manifest, fp, cfg.image_size, ArtifactStore(args.cache_dir))
    rt = Runtime.from_config(cfg.replace(device=args.device or cfg.device))
    metrics, preds = {}, {}
    for t in tasks:
        preds[t] = {}
        n = len(data.rows(args.split, t))
        if n == 0:
            raise SallError(f"dataset {args.dataset}: no {t} images in split '{args.split}'")
        cm.log(f"[evaluate] {t} head on {n} {t} images at T={cfg.temperature:g}")
        metrics[t] = evaluate(models[t].to(rt.device), t, data, args.split, cfg.temperature, rt, preds[t])
    out = {
        "evaluated_run": args.run_id,
        "label": orig.data.tags.get(sc.TAG_LABEL),
        "fold": cfg.fold,
        "temperature": cfg.temperature,
        "dataset": args.dataset,
        "data_root": args.data_root,
        "split": args.split,
        "tasks": tasks,
        "n_images": {t: metrics[t]["n"] for t in tasks},
        "metrics": {t: scalar_metrics(metrics[t]) for t in tasks},
    }
    if args.full:
        out["full"] = {t: {k: metrics[t][k] for k in ("confusion", "reliability")} for t in tasks}
    if not args.no_log:
        out["external_run"] = log_run(uri, orig, args, cfg, metrics, preds, manifest, summary)
    print(json.dumps(to_jsonable(out), indent=2))
    return 0


def log_run(uri, orig, args, cfg, metrics, preds, manifest, summary) -> str:
    """The external evaluation as its own run, nested under the evaluated one, with the same
    per-task artifacts as a trial's run."""
    from sall.metrics import scalar_metrics, to_jsonable

    tr, c = cm.tr, cm.client(uri)
    t = orig.data.tags
    name = dataset_name(args.dataset)
    run = tr.retry(
        c.create_run,
        orig.info.experiment_id,
        run_name=f"external {t.get(sc.TAG_LABEL, '?')} fold{cfg.fold} on {name}",
        tags={
            sc.TAG_STAGE: sc.STAGE_EXTERNAL,
            sc.TAG_EVALUATED_RUN: orig.info.run_id,
            sc.TAG_PARENT: orig.info.run_id,
            sc.TAG_LABEL: t.get(sc.TAG_LABEL, ""),
            sc.TAG_FOLD: str(cfg.fold),
            sc.TAG_SWEEP: t.get(sc.TAG_SWEEP, ""),
            sc.TAG_EXTERNAL_DATASET: name,
        },
    )
    rid = run.info.run_id
    params = {
        "dataset": args.dataset,
        "data_root": args.data_root,
        "split": args.split,
        "tasks": ",".join(metrics),
        "temperature": cfg.temperature,
        "evaluated_run": orig.info.run_id,
        "image_size": cfg.image_size,
    }
    tr.log_params(uri, rid, params)
    flat = {}
    for task, m in metrics.items():
        flat.update({sc.metric(sc.EXTERNAL, task, k): v for k, v in scalar_metrics(m).items()})
        flat[sc.metric(sc.EXTERNAL, task, "n")] = m["n"]
    tr.log_metrics(uri, rid, flat)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / sc.METRICS_JSON).write_text(
            json.dumps(to_jsonable({"external": metrics, "summary": summary}), indent=2)
        )
        for task, m in metrics.items():
            tr.write_task_artifacts(root, task, m, f"{task} on {name}", f"{task} on {name}")
            p = preds[task]
            tr.write_predictions(root, task, p, images=manifest["image"].to_numpy()[p["rows"]])
        tr.retry(c.log_artifacts, rid, str(root))
    tr.end_run(uri, rid, "FINISHED")
    cm.log(f"[evaluate] logged run {rid} ({sc.TAG_STAGE}={sc.STAGE_EXTERNAL}) in experiment {orig.info.experiment_id}")
    return rid


def main(argv=None) -> int:
    return cm.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
