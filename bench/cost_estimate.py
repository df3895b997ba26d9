"""GPU-hours of the paper's full reproduction (Tables III, IV, VI, VIII, IX over 3 folds), with and
without teacher reuse, and under preemption with and without epoch checkpoints.

The trial grids are the sweep scripts' own; the image counts are the paper's (Tables I and VII);
the epochs come from the `paper` preset. The per-image cost is measured here for the backbone at
its resolution (`--measure`, on this machine's device), or given (`--train-images-per-s`, e.g.
measured on a cluster GPU with bench/throughput.py --backbone inception_v3 --image-size 299).
Evaluation and teacher inference are counted at a third of a training image.

Preemption (`--preemptions-per-hour`, a Poisson rate per GPU): a training that restarts from its
last checkpoint takes, in expectation, (e^(rate * s) - 1) / rate hours per segment of s hours
between checkpoints (the classic restart result). Without checkpoints the segment is the whole
training; with them it is one epoch, made longer by the measured checkpoint overhead
(`--checkpoint-overhead`, 0.015 of an epoch on the `cpu` preset: bench/checkpoint_overhead.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time

# the paper's training / validation+test images per task (Tables I and VII; test = val)
PAPER_TRAIN = {"dr": 28154, "amd": 28228, "arter": 10121}
PAPER_VAL = {"dr": 6543, "amd": 8199, "arter": 3375}
PAPER_LARGEST_CLASS = 7359
GRADES = {"dr": 5, "amd": 4, "arter": 2}


def grids(base) -> dict[str, list]:
    """The five studies' grids, built by the sweep scripts themselves (paper defaults)."""
    out = {}
    for name, extra in (
        ("ablation", []),
        ("temperature", []),
        ("data_ratio", []),
        ("task_count", []),
        ("sample_caps", ["--caps", "1500,3000"]),
    ):
        from sweeps.runner import build_parser

        mod = importlib.import_module(f"sweeps.{name}")
        args = build_parser(name, mod.__doc__, mod.add_args).parse_args(extra)  # the scripts' own flags and defaults
        out[name] = mod.grid(args, base)
    return out


def train_count(task: str, cap: int | None) -> int:
    n = PAPER_TRAIN[task]
    if cap is None:
        return n
    # cap each class; the paper's classes are roughly balanced after augmentation
    return min(n, cap * GRADES[task])


def expected_hours(hours: float, segments: int, rate: float, overhead: float = 0.0) -> float:
    """Expected hours to finish a training of `hours` split into `segments` between checkpoints
    (1: no checkpoint) under preemptions at `rate` per hour, each checkpoint costing `overhead`."""
    total = hours * (1 + overhead)
    if rate <= 0:
        return total
    return segments * math.expm1(rate * total / segments) / rate


def measure(backbone: str, size: int, batch: int) -> float:
    import timm
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = timm.create_model(backbone, num_classes=5).to(dev)
    opt = torch.optim.Adam(m.parameters(), 1e-5)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 5, (batch,), device=dev)
    for i in range(6):
        if i == 2:
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if dev == "cuda":
        torch.cuda.synchronize()
    return 4 * batch / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--train-images-per-s",
        type=float,
        default=None,
        help="training throughput of one GPU (images/s); default: measure here",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--preemptions-per-hour", type=float, default=0.1, help="Poisson rate per GPU (default 0.1)")
    ap.add_argument("--checkpoint-overhead", type=float, default=0.015, help="a checkpoint's cost, in epochs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from sall.chain import baseline_is_teacher, needs_teachers
    from sall.config import from_preset

    base = from_preset("paper")
    ips = args.train_images_per_s or measure(base.backbone, base.image_size, args.batch)
    import torch

    measured_on = (
        "given"
        if args.train_images_per_s
        else ("measured here on " + ("CUDA" if torch.cuda.is_available() else "the CPU"))
    )
    unit = "GPU-h" if args.train_images_per_s or torch.cuda.is_available() else "CPU-h"
    E = base.teacher_epochs
    teacher_cost: dict[tuple, float] = {}  # unique teacher -> images processed
    totals = {"with_reuse": 0.0, "without_reuse": 0.0}
    per_study = {}
    students: list[tuple[float, int]] = []  # (images, epochs) of every student training
    for study, grid in grids(base).items():
        s_with = s_without = 0.0
        for _label, cfg0 in grid:
            for fold in range(3):
                cfg = cfg0.replace(fold=fold)
                teachers = needs_teachers(cfg)
                t_imgs = 0.0
                for t in teachers:
                    n = train_count(t, cfg.class_cap)
                    all_imgs = sum(PAPER_TRAIN[x] + 2 * PAPER_VAL[x] for x in cfg.tasks)
                    cost = E * (n + PAPER_VAL[t] / 3) + all_imgs / 3
                    teacher_cost[(t, fold, cfg.class_cap)] = cost  # images; its epochs are E
                    t_imgs += cost
                student = 0.0
                for t in cfg.tasks:
                    if baseline_is_teacher(cfg, t):
                        continue
                    n = train_count(t, cfg.class_cap)
                    frac = cfg.sample_count(t)
                    n = n * frac if frac and frac <= 1 else n
                    student += cfg.student_epochs * (n + PAPER_VAL[t] / 3)
                if not cfg.multitask and cfg.sa_labels:  # each single model also sees the others' images
                    student *= len(cfg.tasks)
                s_with += student
                s_without += student + t_imgs
                students.append((student, cfg.student_epochs))
        per_study[study] = dict(
            trials=3 * len(grid), student_gpu_h=s_with / ips / 3600, without_reuse_gpu_h=s_without / ips / 3600
        )
        totals["without_reuse"] += s_without
        totals["with_reuse"] += s_with
    totals["with_reuse"] += sum(teacher_cost.values())
    trainings = [(c / ips / 3600, E) for c in teacher_cost.values()] + [(c / ips / 3600, e) for c, e in students]
    rate, over = args.preemptions_per_hour, args.checkpoint_overhead
    preempted = dict(
        preemptions_per_hour=rate,
        checkpoint_overhead=over,
        without_checkpoints=round(sum(expected_hours(h, 1, rate) for h, _ in trainings), 1),
        with_checkpoints=round(sum(expected_hours(h, e, rate, over) for h, e in trainings), 1),
    )
    out = dict(
        backbone=base.backbone,
        image_size=base.image_size,
        epochs=E,
        train_images_per_s=round(ips, 1),
        throughput_source=measured_on,
        unit=unit,
        unique_teachers=len(teacher_cost),
        gpu_hours_with_reuse=round(totals["with_reuse"] / ips / 3600, 1),
        gpu_hours_without_reuse=round(totals["without_reuse"] / ips / 3600, 1),
        under_preemption=preempted,
        per_study={
            k: {kk: round(vv, 1) if isinstance(vv, float) else vv for kk, vv in v.items()} for k, v in per_study.items()
        },
    )
    print(
        f"{base.backbone} at {base.image_size}px, {E} epochs, {ips:.1f} training images/s ({measured_on})",
        file=sys.stderr,
    )
    for k, v in out["per_study"].items():
        print(
            f"  {k:<12} {v['trials']:>3} trials: students {v['student_gpu_h']:8.1f} {unit}, without reuse "
            f"{v['without_reuse_gpu_h']:8.1f} {unit}",
            file=sys.stderr,
        )
    print(
        f"  {len(teacher_cost)} unique teachers; total {out['gpu_hours_with_reuse']} {unit} with reuse, "
        f"{out['gpu_hours_without_reuse']} without",
        file=sys.stderr,
    )
    print(
        f"  under {rate:g} preemptions per GPU-hour, with reuse: {preempted['without_checkpoints']} {unit} without "
        f"checkpoints, {preempted['with_checkpoints']} with a checkpoint every epoch ({over:.1%} each)",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
