"""Task-count sweep (paper Table VIII): single-task models vs SALL with 2 and with 3 sub-tasks."""

from __future__ import annotations

import argparse
import sys

from sall.config import TrialConfig
from sweeps.runner import Grid, run_sweep


def add_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--count-temperature", type=float, default=8.0, help="T of the SALL trials (paper: 8)")


def grid(args: argparse.Namespace, base: TrialConfig) -> Grid:
    three = ("dr", "amd", "arter")
    sall = dict(temperature=args.count_temperature, multitask=True, sa_labels=True)
    return [
        ("single", base.replace(tasks=three, temperature=1.0, multitask=False, sa_labels=False)),
        ("2 sub-task", base.replace(tasks=("dr", "amd"), **sall)),
        ("3 sub-task", base.replace(tasks=three, **sall)),
    ]


if __name__ == "__main__":
    sys.exit(run_sweep("task_count", __doc__, grid, add_args, None))
