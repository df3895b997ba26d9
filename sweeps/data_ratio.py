"""Data-ratio sweep (paper Table VI): SALL at T = 3 with fewer images of one task, both directions.

The paper's counts become fractions of its training set (e.g. 400 of 28,228 AMD images = 1.4 %),
so the study scales to any dataset; pass --fractions to choose others.
"""

from __future__ import annotations

import argparse
import sys

from sall.config import TrialConfig
from sweeps.runner import Grid, parse_floats, run_sweep

# Table VI: AMD counts with all DR images, and DR counts with all AMD images
PAPER_AMD = (400, 2800, 13101, 18844, 28228)
PAPER_DR = (500, 3000, 15533, 19620, 28154)


def add_args(g: argparse.ArgumentParser) -> None:
    g.add_argument(
        "--fractions",
        default=None,
        help="fractions (or counts > 1) of the reduced task's training images, used in both "
        "directions (default: the paper's counts as fractions)",
    )
    g.add_argument("--ratio-temperature", type=float, default=3.0, help="T of the study (paper: 3)")


def grid(args: argparse.Namespace, base: TrialConfig) -> Grid:
    a, b = base.tasks[0], base.tasks[1] if len(base.tasks) > 1 else base.tasks[0]
    if args.fractions:
        fa = fb = parse_floats(args.fractions, "--fractions")
    else:
        fb = [round(c / PAPER_AMD[-1], 4) for c in PAPER_AMD]  # reduce the second task (AMD)
        fa = [round(c / PAPER_DR[-1], 4) for c in PAPER_DR]  # reduce the first task (DR)
    sall = base.replace(temperature=args.ratio_temperature, multitask=True, sa_labels=True)
    out: Grid = [("all", sall)]
    for f in fb:
        if f != 1.0:
            out.append((f"{b}={f:g}", sall.replace(sample_counts=((b, f),))))
    for f in fa:
        if f == 1.0:
            continue  # the same trial as "all"
        out.append((f"{a}={f:g}", sall.replace(sample_counts=((a, f),))))
    return out


def smoke(g: Grid) -> Grid:
    """--smoke: all data, and the smallest share of each task in turn."""
    first_of = {}
    for label, cfg in g[1:]:
        first_of.setdefault(label.split("=")[0], (label, cfg))
    return [g[0], *first_of.values()]


if __name__ == "__main__":
    sys.exit(run_sweep("data_ratio", __doc__, grid, add_args, smoke))
