"""`python -m sall run ...`: one teacher -> soft-label -> student chain, metrics as JSON on stdout.

The data/model flags are defined here once and reused by every sweep script.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sall.config import PRESETS, TrialConfig, from_preset
from sall.errors import SallError

DEFAULT_CACHE = ".sall-cache"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit code 2), like every other error."""

    def error(self, message: str):  # type: ignore[override]
        one_line_error(self, message)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        return _no_empty_values(self, super().parse_known_args(args, namespace))


def _no_empty_values(p: argparse.ArgumentParser, parsed):
    """`--fold=--` gives `fold == []` on Python <= 3.12 (argparse drops the '--' and converts
    nothing): a flag that takes one value must have one."""
    ns, extras = parsed
    for a in p._actions:
        if a.nargs is None and a.option_strings and isinstance(getattr(ns, a.dest, None), list):
            p.error(f"argument {'/'.join(a.option_strings)}: expected one value, got '--'")
    return ns, extras


def one_line(message: object) -> str:
    """`message` as one printable line: control characters and line breaks of user input (a CSV cell,
    a flag value) are shown escaped, so an error is always exactly one line on a terminal."""
    return "".join(c if c.isprintable() else (" " if c in "\r\n" else repr(c)[1:-1]) for c in str(message))


def one_line_error(p: argparse.ArgumentParser, message: str):
    p.exit(2, f"error: {one_line(message)}; expected the flags of `{p.prog} --help`\n")


def one_line_errors(p: argparse.ArgumentParser) -> None:
    """Make a parser (built elsewhere, e.g. a sweep's) report a bad flag in one line, not usage + error,
    and refuse a flag left without its value (`--temperatures=--`)."""
    if isinstance(p, OneLineParser):
        return
    p.error = lambda message: one_line_error(p, message)  # type: ignore[method-assign]
    parse = p.parse_known_args
    p.parse_known_args = lambda args=None, namespace=None: _no_empty_values(  # type: ignore[method-assign]
        p, parse(args, namespace)
    )


def add_data_model_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `python -m sall run` and the sweeps (design.md). Also makes `p`'s errors one line."""
    one_line_errors(p)
    _add_data_args(p.add_argument_group("data"))
    _add_model_args(p.add_argument_group("model and training"))
    _add_runtime_args(p.add_argument_group("runtime"))


def _add_data_args(g: argparse._ArgumentGroup) -> None:
    # fmt: off
    g.add_argument(
        "--dataset",
        default="synthetic",
        help="synthetic (built-in, the default), odir (needs --data-root), a CSV manifest "
        "(columns image,task,grade[,patient]; paths relative to the file) or an image "
        "folder root/<task>/<grade>/*",
    )
    g.add_argument(
        "--data-root",
        default=None,
        help="folder of the dataset (required for odir: the folder with full_df.csv and preprocessed_images/)",
    )
    g.add_argument("--tasks", default="dr,amd", help="comma-separated tasks among dr,amd,arter (default dr,amd)")
    g.add_argument("--class-cap", type=int, default=None, help="at most this many training images per task and grade (teachers and students)")
    g.add_argument(
        "--train-per-task",
        type=int,
        default=None,
        help="at most this many training images per task, stratified (default from the preset)",
    )
    g.add_argument("--val-per-task", type=int, default=None, help="at most this many validation images per task (default from the preset)")
    g.add_argument("--synthetic-n", type=int, default=None, help="synthetic images per task (default from the preset)")
    g.add_argument(
        "--redraw",
        action="store_true",
        default=None,
        help="each replicate (fold, seed) draws its own data: fresh synthetic images per replicate, "
        "or the quarters of another dataset re-cut per seed (repeated cross-validation)",
    )
    # fmt: on


def _add_model_args(m: argparse._ArgumentGroup) -> None:
    # fmt: off
    m.add_argument(
        "--preset",
        default="cpu",
        choices=None,
        help=f"settings bundle: {', '.join(PRESETS)} (cpu: small timm model at 64 px, fits a "
        "laptop; cpu-real: ImageNet-initialised tf_efficientnet_lite0 at 160 px from an "
        "installed package, no network, for real photographs such as ODIR on a CPU; "
        "paper: inception_v3 at 299 px, ImageNet weights, Adam lr 1e-5)",
    )
    m.add_argument("--backbone", default=None, help="any timm model name (default from the preset)")
    m.add_argument("--image-size", type=int, default=None, help="input size in pixels (default from the preset)")
    m.add_argument("--pretrained", dest="pretrained", action="store_true", default=None,
                   help="start from ImageNet weights (timm's hub, or --pretrained-path)")
    m.add_argument("--no-pretrained", dest="pretrained", action="store_false")
    m.add_argument("--pretrained-path", default=None, help="local ImageNet weights file for the backbone")
    m.add_argument("--lr", type=float, default=None, help="learning rate (Adam)")
    m.add_argument("--batch-size", type=int, default=None)
    m.add_argument(
        "--schedule",
        default=None,
        choices=["constant", "cosine"],
        help="learning rate: constant, or cosine decay to 0 (default from the preset)",
    )
    m.add_argument(
        "--checkpoint",
        default=None,
        choices=["best", "last"],
        help="keep the best validation epoch, or the last (the paper's choice; default from the preset)",
    )
    m.add_argument("--teacher-epochs", type=int, default=None)
    m.add_argument("--student-epochs", type=int, default=None)
    m.add_argument(
        "--augment",
        dest="augment",
        action="store_true",
        default=None,
        help="the paper's augmentations (scale, rot90, flips, skew); default from the preset "
        "(cpu: off, it slows learning in a few epochs; paper: on)",
    )
    m.add_argument("--no-augment", dest="augment", action="store_false", default=None, help="switch the augmentations off")
    m.add_argument("--seed", type=int, default=None)
    # fmt: on


def _add_runtime_args(r: argparse._ArgumentGroup) -> None:
    # fmt: off
    r.add_argument(
        "--cache-dir",
        default=DEFAULT_CACHE,
        help="teachers, logits and the image cache; shared storage on a cluster (default .sall-cache)",
    )
    r.add_argument("--device", default=None, help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: torch decides)")
    r.add_argument("--amp", default=None, choices=["auto", "bf16", "off"], help="bf16 autocast: auto = on with CUDA")
    r.add_argument(
        "--channels-last",
        default=None,
        choices=["auto", "on", "off"],
        help="channels_last memory format (auto = on: faster on CUDA and on the CPU)",
    )
    r.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    r.add_argument("--smoke", action="store_true", help="tiny data and epochs: a whole run in seconds")
    r.add_argument("--debug", action="store_true", help="show tracebacks")
    # fmt: on


# The flags of add_data_model_args that are TrialConfig fields of the same name.
OVERRIDE_FIELDS = (
    "dataset data_root tasks class_cap synthetic_n redraw train_per_task val_per_task schedule checkpoint backbone "
    "image_size pretrained pretrained_path lr batch_size teacher_epochs student_epochs augment seed device "
    "threads amp channels_last compile"
).split()


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The data/model flags as TrialConfig overrides (None = take the preset's value)."""
    return {name: getattr(args, name) for name in OVERRIDE_FIELDS}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m sall",
        description="Synergic Adversarial Label Learning: train the teachers (cached), make the soft "
        "labels at temperature T, train the student and print its per-task test metrics "
        "as JSON on stdout. Progress goes to stderr.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run one teacher -> soft-label -> student chain",
        description="Run one chain on one fold and print the per-task test metrics as JSON.",
    )
    add_data_model_args(run)
    s = run.add_argument_group("the SALL switches")
    # fmt: off
    s.add_argument("--temperature", "-T", type=float, default=3.0, help="T for the soft labels and the student's outputs (paper eq. 10; default 3)")
    s.add_argument("--fold", type=int, default=0, help="which of the 3 folds (0, 1 or 2)")
    s.add_argument("--sa-labels", dest="sa_labels", action="store_true", default=True,
                   help="train each head also on the other tasks' images with soft labels (default)")
    s.add_argument("--no-sa-labels", dest="sa_labels", action="store_false")
    s.add_argument("--multitask", dest="multitask", action="store_true", default=True, help="one shared backbone with a head per task (default)")
    s.add_argument("--no-multitask", dest="multitask", action="store_false", help="one single-head model per task")
    s.add_argument("--baseline", action="store_true", help="the paper's baseline: --no-multitask --no-sa-labels -T 1")
    s.add_argument("--profile", action="store_true", help="report where the time goes (stderr and JSON)")
    s.add_argument("--full", action="store_true", help="print every metric (confusion, reliability bins)")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="check the flags and the data, print the resolved config and which teachers would "
        "be trained or reused; train nothing, write nothing",
    )
    # fmt: on
    return p


def run_command(args: argparse.Namespace) -> int:
    from sall.chain import run_chain
    from sall.metrics import to_jsonable

    over = config_overrides(args)
    if args.baseline:
        args.multitask, args.sa_labels, args.temperature = False, False, 1.0
    cfg: TrialConfig = from_preset(
        args.preset,
        smoke=args.smoke,
        temperature=args.temperature,
        fold=args.fold,
        multitask=args.multitask,
        sa_labels=args.sa_labels,
        profile=args.profile,
        **over,
    )
    if args.dry_run:
        return dry_run(cfg, args.cache_dir)
    res = run_chain(cfg, args.cache_dir)
    out = res.summary()
    if args.full:
        out["test"] = to_jsonable(res.test)
    if args.profile:
        print("profile: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.profile.items()), file=sys.stderr)
    print(json.dumps(out, indent=2))
    return 0


def dry_run(cfg: TrialConfig, cache_dir: str) -> int:
    """Every check of a run (config, weights, data, folds, subsets); nothing trained or written."""
    from sall.chain import needs_teachers, preflight, teacher_key
    from sall.store import open_store

    store = open_store(cache_dir)  # writable? (an absent folder is not created)
    store.check()
    data = preflight(cfg)
    teachers = {}
    for task in needs_teachers(cfg):
        key = teacher_key(cfg, task, data.fingerprint)
        cached = store.exists("teachers", key, ".pt")
        teachers[task] = {"key": key, "cached": cached}
    print(
        json.dumps(
            {"config_key": cfg.key(), "config": json.loads(cfg.to_json()), "teachers": teachers, "data": data.summary},
            indent=2,
        )
    )
    return 0


def guarded(fn: Callable[[], int], debug: bool) -> int:
    """Run `fn`; a SallError becomes one line on stderr and exit code 2 (traceback with --debug)."""
    try:
        return fn()
    except SallError as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: run_command(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
