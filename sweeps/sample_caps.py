"""Per-class sample caps (paper Table IX): 3 tasks, SALL vs single-task models at two caps.

The paper caps every class at 1,500 and 3,000 training images, about 20 % and 41 % of its largest
class (7,359 normal images); the default caps scale those shares to this dataset's largest class.
"""

from __future__ import annotations

import argparse
import sys

from sall.config import TrialConfig
from sweeps.runner import Grid, parse_ints, run_sweep

PAPER_LARGEST_CLASS = 7359
PAPER_CAPS = (1500, 3000)


def add_args(g: argparse.ArgumentParser) -> None:
    g.add_argument("--caps", default=None, help="per-class caps, e.g. 50,100 (default: the paper's, scaled)")
    g.add_argument("--caps-temperature", type=float, default=8.0, help="T of the SALL trials (paper: 8)")


def scaled_caps(base: TrialConfig) -> list[int]:
    """The paper's caps as shares of its largest class, applied to this dataset's largest class."""
    from sall.chain import preflight

    data = preflight(base.replace(class_cap=None))
    m = data.manifest.iloc[data.splits["train"]]
    largest = int(m[m["task"].isin(base.tasks)].groupby(["task", "grade"]).size().max())
    return [max(2, round(largest * c / PAPER_LARGEST_CLASS)) for c in PAPER_CAPS]


def parse_caps(text: str) -> list[int]:
    """--caps: comma-separated integers >= 1 (a bad value is one error line, not a ValueError)."""
    return parse_ints(text, "--caps", 1, "50,100")


def grid(args: argparse.Namespace, base: TrialConfig) -> Grid:
    if base.tasks == ("dr", "amd"):  # the study is about three tasks
        base = base.replace(tasks=("dr", "amd", "arter"))
    caps = parse_caps(args.caps) if args.caps else scaled_caps(base)
    out: Grid = []
    for cap in caps:
        out.append(
            (f"cap={cap} single", base.replace(class_cap=cap, temperature=1.0, multitask=False, sa_labels=False))
        )
        out.append(
            (
                f"cap={cap} ours",
                base.replace(class_cap=cap, temperature=args.caps_temperature, multitask=True, sa_labels=True),
            )
        )
    return out


if __name__ == "__main__":
    sys.exit(run_sweep("sample_caps", __doc__, grid, add_args, None))
