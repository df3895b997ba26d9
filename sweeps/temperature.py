"""Temperature sweep (paper Table IV and Fig. 5): SALL at each T, beside the single-task baseline.

After the grid, the T with the best validation accuracy is confirmed per task: the baseline and
that T run again with fresh seeds (`--confirm-seeds`), on the built-in synthetic set each on data
of its own, and the sweep run's answer is their test result, from replicates that played no part in
the choice and, there, share no image with it or with each other."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from sall.config import TrialConfig
from sall.errors import ConfigError
from sweeps import runner as rn
from sweeps.runner import Grid, parse_floats, run_sweep
from tracking import schema as sc

PAPER_TEMPERATURES = "1,2,3,4,5,6,7,8,9,10,20,50"
CONFIRM = "confirm"  # the stage's name: Tune experiment suffix and metric prefix


def add_args(g: argparse.ArgumentParser) -> None:
    g.add_argument(
        "--temperatures",
        default=PAPER_TEMPERATURES,
        help="temperatures of the SALL trials (soft labels and student outputs)",
    )
    g.add_argument("--no-baseline", action="store_true", help="leave out the single-task baseline")
    g.add_argument(
        "--confirm-seeds",
        default="auto",
        help="after the grid, run the baseline and each task's T chosen on validation again with these "
        "fresh seeds (e.g. 1,2) on every fold, on synthetic data each replicate on images of its own (as "
        "--redraw); the sweep run's answer is that confirmation. auto: one seed "
        "after the grid's on the built-in synthetic data (6 to 9 more trials), none with --smoke or on "
        "real data (hours there); none: no confirmation",
    )
    g.set_defaults(_not_grid=("confirm_seeds",))  # it adds trials after the grid; --smoke still trims the grid


def confirm_seeds(args: argparse.Namespace) -> list[int]:
    """The confirming seeds of --confirm-seeds; never one the grid runs, and none without a baseline."""
    text = args.confirm_seeds.strip()
    if text == "none":
        return []
    grid_seeds = rn.sweep_seeds(args)
    if text == "auto":
        auto = not args.smoke and args.dataset == "synthetic" and not args.no_baseline
        return [max(grid_seeds) + 1] if auto else []
    seeds = rn.parse_ints(text, "--confirm-seeds", 0, "1,2 (or auto, none)")
    reused = sorted(set(seeds) & set(grid_seeds))
    if reused:
        raise ConfigError(
            f"--confirm-seeds '{text}' reuses seed {reused[0]} of the grid; expected seeds the grid does not run"
        )
    if args.no_baseline:
        raise ConfigError(f"--confirm-seeds '{text}' with --no-baseline; expected the baseline to confirm against")
    return list(dict.fromkeys(seeds))


def grid(args: argparse.Namespace, base: TrialConfig) -> Grid:
    confirm_seeds(args)  # a bad --confirm-seeds fails now, not after the grid has run
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


def chosen_labels(args: argparse.Namespace, trials: list[rn.Trial], uri: str, parent: str) -> list[str]:
    """The grid's settings chosen on validation, one per task (the analysis' own rule), in grid order."""
    from analysis import common as cm
    from analysis import tables as tb

    folds = tuple(rn.parse_folds(args.folds))
    _, sets, _ = cm.load_sweep(uri, args.experiment, parent, folds, tuple(confirm_seeds(args)))
    table = tb.build("IV", sets, ["acc"])[0]
    with tempfile.TemporaryDirectory() as tmp:
        tb.gains(table, None, Path(tmp), 0)
    picked = {ch.row.label for ch in table.chosen.values()}
    return [label for label in dict.fromkeys(t.label for t in trials) if label in picked]


def grid_parent(args: argparse.Namespace, trials: list[rn.Trial], uri: str, cache_dir: str) -> str:
    """The sweep run of the grid `trials`."""
    grid_id = rn.make_sweep_id("temperature", trials, uri, cache_dir, args.experiment)
    exp_id = rn.tr.ensure_experiment(uri, args.experiment)
    return rn.tr.find_runs(uri, exp_id, rn.tr.sweep_filter(grid_id))[0].info.run_id


def confirming_config(cfg: TrialConfig) -> TrialConfig:
    """A grid setting as the confirmation runs it: on the synthetic set, which costs nothing to draw,
    every confirming replicate draws its own images, so the confirmation rests on independent
    replicates; on a fixed data set, the same split with fresh seeds (or as the grid chose, --redraw)."""
    return cfg.replace(redraw=True) if cfg.dataset == "synthetic" else cfg


def confirm(args: argparse.Namespace, trials: list[rn.Trial], uri: str, cache_dir: str, code: int) -> int:
    """After the grid: the baseline and the T chosen on validation, on fresh seeds, under the grid's
    sweep run; its answer is then their test result. Skipped when the grid failed."""
    seeds = confirm_seeds(args)
    if not seeds:
        return code
    folds = rn.parse_folds(args.folds)
    if args.dry_run:
        print(
            f"then: the baseline and each task's T chosen on validation, on seeds {','.join(map(str, seeds))} x "
            f"folds {args.folds}: {2 * len(seeds) * len(folds)} to {3 * len(seeds) * len(folds)} trials"
        )
        return code
    if code != 0:
        rn.say("[sweep] the grid did not finish: no confirmation (rerun the same command to resume both)")
        return code
    parent = grid_parent(args, trials, uri, cache_dir)
    rn.tr.retry(rn.tr.client(uri).set_tag, parent, sc.TAG_CONFIRM_SEEDS, ",".join(map(str, seeds)))
    labels = chosen_labels(args, trials, uri, parent)
    configs = {t.label: confirming_config(t.cfg) for t in trials}
    more = rn.expand([(k, configs[k]) for k in ["baseline", *labels]], folds, seeds)
    rn.say(f"[sweep] chosen on validation: {', '.join(labels)}; confirming on seeds {','.join(map(str, seeds))}")
    return rn.more_trials("temperature", args, trials, more, uri, cache_dir, CONFIRM)


if __name__ == "__main__":
    sys.exit(run_sweep("temperature", __doc__, grid, add_args, smoke, then=confirm))
