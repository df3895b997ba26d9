"""Ablation sweep (paper Table III): soft labels on/off x multi-task on/off at T = 1, 2, 3."""

from __future__ import annotations

import argparse
import sys

from sall.config import TrialConfig
from sweeps.runner import Grid, parse_floats, run_sweep

# the paper's rows: (T, sa_labels, multitask); T=1/no/no is the baseline
PAPER_ROWS = [
    (1, False, False),
    (1, True, False),
    (1, False, True),
    (1, True, True),
    (2, True, True),
    (3, True, True),
    (3, False, False),
    (3, True, False),
    (3, False, True),
]


def add_args(g: argparse.ArgumentParser) -> None:
    g.add_argument(
        "--temperatures",
        default=None,
        help="instead of the paper's rows: soft labels x multi-task at these temperatures (rows without soft labels once, at T=1)",
    )


def label(t: float, sa: bool, mt: bool) -> str:
    if t == 1 and not sa and not mt:
        return "baseline"
    return f"T={t:g} sa={'yes' if sa else 'no'} mt={'yes' if mt else 'no'}"


def factorial_rows(temperatures: list[float]) -> list[tuple[float, bool, bool]]:
    """Every switch combination at each T. T only softens soft labels, so the rows without them
    are the same experiment at every T: they run once, at T = 1, where the hard-label single-task
    row is the baseline and reuses the teachers (at T = 8 it would train them again as students)."""
    rows = [(1.0, False, False), (1.0, False, True)]
    return rows + [(t, True, mt) for t in dict.fromkeys(temperatures) for mt in (False, True)]


def grid(args: argparse.Namespace, base: TrialConfig) -> Grid:
    if args.temperatures:
        rows = factorial_rows(parse_floats(args.temperatures, "--temperatures"))
    else:
        rows = PAPER_ROWS
    return [(label(t, sa, mt), base.replace(temperature=float(t), sa_labels=sa, multitask=mt)) for t, sa, mt in rows]


def smoke(g: Grid) -> Grid:
    """--smoke: baseline, multi-task without soft labels, full SALL at T=3."""
    keep = {"baseline", "T=1 sa=no mt=yes", "T=3 sa=yes mt=yes"}
    return [x for x in g if x[0] in keep] or g[:3]


if __name__ == "__main__":
    sys.exit(run_sweep("ablation", __doc__, grid, add_args, smoke))
