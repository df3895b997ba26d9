"""How much a setting's accuracy moves with the seed alone: the single-task baseline of one task on
one fold, trained once per seed (its model is the task's teacher), with preset overrides.

This is the measurement behind the cpu preset's choices (docs/results-synthetic.md, "The default run as evidence"):
the seed changes the initialisation and the batch order, nothing else, so the spread over seeds
is the training noise that no test-set size removes. Each seed trains one model (about 15 s at
8 epochs on one core); an image cache in --cache-dir is reused across calls.

    python bench/seed_noise.py --task amd --fold 1 --seeds 0-4
    python bench/seed_noise.py --task amd --fold 1 --seeds 0-4 --set teacher_epochs=6 --set student_epochs=6

Prints one line per seed and a summary; with --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile

import numpy as np

from sall.chain import run_chain
from sall.cli import guarded
from sall.config import from_preset


def parse_seeds(text: str) -> list[int]:
    """'0-4' or '0,2,5'."""
    if "-" in text:
        lo, hi = text.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",") if s.strip()]


def parse_override(text: str) -> tuple[str, object]:
    """'lr=0.004' -> ('lr', 0.004): the value as JSON when it parses, else as a string."""
    key, _, value = text.partition("=")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def accuracy(task: str, fold: int, seed: int, preset: str, overrides: dict, cache_dir: str) -> float:
    cfg = from_preset(
        preset,
        seed=seed,
        fold=fold,
        tasks=(task,),
        threads=1,
        temperature=1.0,
        multitask=False,
        sa_labels=False,
        **overrides,
    )
    with contextlib.redirect_stderr(io.StringIO()):
        return float(run_chain(cfg, cache_dir).test[task]["acc"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="amd")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--seeds", default="0-4")
    p.add_argument("--preset", default="cpu")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TrialConfig field (repeatable), e.g. --set teacher_epochs=6",
    )
    p.add_argument("--cache-dir", default=None, help="image and teacher cache (default: a temporary one)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    overrides = dict(parse_override(s) for s in args.set)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or tmp
        accs = []
        for seed in parse_seeds(args.seeds):
            accs.append(accuracy(args.task, args.fold, seed, args.preset, overrides, cache))
            print(f"{args.task} fold {args.fold} seed {seed}: test accuracy {accs[-1]:.4f}", flush=True)
    a = np.array(accs) * 100
    sd = float(a.std(ddof=1)) if len(a) > 1 else float("nan")
    print(
        f"{args.task} fold {args.fold} {overrides or 'preset'}: mean {a.mean():.1f} %, sd over "
        f"{len(a)} seeds {sd:.1f} pp, range {a.min():.1f}-{a.max():.1f}"
    )
    if args.json:
        print(
            json.dumps(
                dict(
                    task=args.task,
                    fold=args.fold,
                    overrides=overrides,
                    acc_pct=a.round(2).tolist(),
                    mean_pct=round(float(a.mean()), 2),
                    sd_pp=round(sd, 2),
                )
            )
        )
    return 0


if __name__ == "__main__":  # a bad flag or a preemption (SIGTERM) is one line, as in `python -m sall run`
    sys.exit(guarded(main, debug=False))
