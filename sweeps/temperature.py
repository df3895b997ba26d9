"""Temperature sweep (paper Table IV and Fig. 5): SALL at each T, beside the single-task baseline."""

from __future__ import annotations

import argparse
import sys

from sall.config import TrialConfig
from sweeps.runner import Grid, parse_floats, run_sweep

PAPER_TEMPERATURES = "1,2,3,4,5,6,7,8,9,10,20,50"


def add_args(g: argparse.ArgumentParser) -> None:
    g.add_argument(
        "--temperatures",
        default=PAPER_TEMPERATURES,
        help="temperatures of the SALL trials (soft labels and student outputs)",
    )
    g.add_argument("--no-baseline", action="store_true", help="leave out the single-task baseline")


def grid(args: argparse.Namespace, base: TrialConfig) -> Grid:
    out: Grid = []
    if not args.no_baseline:
        out.append(("baseline", base.replace(temperature=1.0, multitask=False, sa_labels=False)))
    for t in parse_floats(args.temperatures, "--temperatures"):
        out.append((f"T={t:g}", base.replace(temperature=t, multitask=True, sa_labels=True)))
    return out


def smoke(g: Grid) -> Grid:
    """--smoke: the baseline and two temperatures."""
    keep = {"baseline", "T=1", "T=8"}
    return [x for x in g if x[0] in keep] or g[:3]


if __name__ == "__main__":
    sys.exit(run_sweep("temperature", __doc__, grid, add_args, smoke))
