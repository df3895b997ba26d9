"""What teacher reuse saves: one small temperature sweep run with reuse, and again without.

Both runs use the real sweep script (local Ray, MLflow in a temporary SQLite file). Prints a table,
and with --json one JSON object as the last line: teachers_trained, teachers_expected,
wall_cached_s, wall_uncached_s, the measured ratio and the ideal one,
(K x (teachers + student)) / (teachers + K x student).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(workdir: Path, args: argparse.Namespace, reuse: bool) -> tuple[float, list]:
    cmd = [
        sys.executable,
        str(ROOT / "sweeps" / "temperature.py"),
        "--no-baseline",
        "--temperatures",
        args.temperatures,
        "--folds",
        args.folds,
        "--tasks",
        args.tasks,
        "--synthetic-n",
        str(args.synthetic_n),
        "--teacher-epochs",
        str(args.epochs),
        "--student-epochs",
        str(args.epochs),
        "--max-concurrent-trials",
        "1",
        "--mlflow-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--storage-path",
        str(workdir / "ray"),
        "--cache-dir",
        str(args.cache_dir or workdir / "cache"),
    ]
    if not reuse:
        cmd.append("--no-teacher-reuse")
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode != 0:
        sys.exit(f"sweep failed:\n{out.stderr[-3000:]}")
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = c.get_experiment_by_name("sall-temperature")
    return wall, c.search_runs([exp.experiment_id], max_results=1000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--temperatures", default="2,4,8", help="the K temperatures")
    p.add_argument("--folds", default="0")
    p.add_argument("--tasks", default="dr,amd")
    p.add_argument("--synthetic-n", type=int, default=400)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--cache-dir", default=None, help="shared image cache (teachers stay private per run)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    k = len(args.temperatures.split(","))
    n_tasks, n_folds = len(args.tasks.split(",")), len(args.folds.split(","))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        if args.cache_dir is None:
            args.cache_dir = d / "shared-cache"
        (d / "a").mkdir()
        (d / "b").mkdir()
        # warm the image cache so neither run pays for decoding
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sall",
                "run",
                "--no-sa-labels",
                "--synthetic-n",
                str(args.synthetic_n),
                "--student-epochs",
                "1",
                "--tasks",
                args.tasks,
                "--cache-dir",
                str(args.cache_dir),
            ],
            capture_output=True,
            check=True,
        )
        wall_c, runs_c = sweep(d / "a", args, reuse=True)
        wall_u, runs_u = sweep(d / "b", args, reuse=False)

    def trained(runs: list) -> int:
        return sum(
            len([t for t in r.data.tags.get("sall.teachers_trained", "none").split(",") if t != "none"])
            for r in runs
            if r.data.tags.get("sall.stage") == "student"
        )

    teachers_s = sum(
        r.data.metrics.get("train_seconds", 0) for r in runs_c if r.data.tags.get("sall.stage") == "teacher"
    )
    students = [
        r.data.metrics["trial_seconds"]
        for r in runs_c
        if r.data.tags.get("sall.stage") == "student" and r.data.tags.get("sall.teachers_trained") == "none"
    ]
    student_s = sum(students) / max(len(students), 1)
    per_fold_teachers = teachers_s / n_folds
    ideal = (k * (per_fold_teachers + student_s)) / (per_fold_teachers + k * student_s)
    out = dict(
        k=k,
        teachers_trained=trained(runs_c),
        teachers_trained_without_reuse=trained(runs_u),
        teachers_expected=n_tasks * n_folds,
        wall_cached_s=round(wall_c, 1),
        wall_uncached_s=round(wall_u, 1),
        ratio=round(wall_u / wall_c, 3),
        ideal_ratio=round(ideal, 3),
        teacher_s_per_fold=round(per_fold_teachers, 1),
        student_s=round(student_s, 1),
    )
    print(f"K={k} temperatures, {n_folds} fold(s), {n_tasks} tasks", file=sys.stderr)
    print(f"with reuse:    {wall_c:7.1f} s, {out['teachers_trained']} teachers trained", file=sys.stderr)
    print(f"without reuse: {wall_u:7.1f} s, {out['teachers_trained_without_reuse']} teachers trained", file=sys.stderr)
    print(
        f"ratio {out['ratio']} (ideal {out['ideal_ratio']}: teachers {per_fold_teachers:.1f} s/fold, "
        f"student {student_s:.1f} s)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
