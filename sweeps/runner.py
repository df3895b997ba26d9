"""The one runner every sweep script uses: flags, grid x folds, checks, Ray Tune, progress, exit code.

A sweep script supplies its name, its grid and its own flags; everything else is here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sall.cli import add_data_model_args, config_overrides, guarded
from sall.config import N_FOLDS, SWEEP_SEEDS, TrialConfig, from_preset, stable_hash
from sall.errors import ConfigError, SallError
from tracking import client as tr
from tracking import schema as sc

Grid = list[tuple[str, TrialConfig]]  # (label, config at fold 0)
GridFn = Callable[[argparse.Namespace, TrialConfig], Grid]
# After the grid, inside its Ray session: (args, the grid's trials, uri, cache dir, its exit code) -> exit code
ThenFn = Callable[[argparse.Namespace, list, str, str, int], int]


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} '{text}' is invalid; expected comma-separated numbers") from None


def parse_folds(text: str) -> list[int]:
    try:
        folds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--folds '{text}' is invalid; expected e.g. 0,1,2") from None
    bad = [f for f in folds if not 0 <= f < N_FOLDS]
    if bad or not folds:
        raise ConfigError(
            f"--folds '{text}': fold {bad[0] if bad else '?'} out of range; expected folds among 0..{N_FOLDS - 1}"
        )
    return folds


def parse_ints(text: str, flag: str, minimum: int, example: str) -> list[int]:
    """A flag's comma-separated integers >= `minimum`, in order; a bad value is one ConfigError
    naming the flag (never a ValueError)."""
    problem = f"{flag} '{text}' is invalid; expected comma-separated integers >= {minimum}, e.g. {example}"
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(problem) from None
    if not values or min(values) < minimum:
        raise ConfigError(problem)
    return values


def parse_seeds(text: str) -> list[int]:
    return list(dict.fromkeys(parse_ints(text, "--seeds", 0, "0,1,2")))


def sweep_seeds(args: argparse.Namespace) -> list[int]:
    """--seeds, else the preset's default (one seed with --smoke): each seed repeats every
    setting on every fold with its own teachers, which measures the training noise."""
    if args.seeds is not None:
        return parse_seeds(args.seeds)
    return [0] if args.smoke else list(SWEEP_SEEDS.get(args.preset, (0,)))


def build_parser(
    sweep: str, description: str, add_args: Callable[[argparse.ArgumentParser], None] | None
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python sweeps/{sweep}.py",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Rerunning the same command resumes the sweep (finished trials are neither rerun nor "
        "logged twice); --fresh starts over. Review results with: mlflow ui --backend-store-uri "
        "sqlite:///mlflow.db",
    )
    c = p.add_argument_group("cluster and tracking")
    # fmt: off
    c.add_argument(
        "--address",
        default=None,
        help="Ray address: auto (the cluster this node belongs to), HOST:PORT, ray://HOST:10001; "
        "none starts a local Ray",
    )
    c.add_argument("--mlflow-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI")
    c.add_argument("--experiment", default=f"sall-{sweep}", help="MLflow experiment")
    c.add_argument(
        "--storage-path",
        default=str(Path("~/ray_results").expanduser()),
        help="Ray Tune results (shared storage on a multi-node cluster)",
    )
    c.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (fractions allowed)")
    c.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial (fractions allowed)")
    c.add_argument(
        "--max-concurrent-trials",
        type=int,
        default=None,
        help="at most this many trials at once (default: as many as the resources allow)",
    )
    c.add_argument("--max-failures", type=int, default=1, help="retries of a failing trial (Tune FailureConfig)")
    c.add_argument("--folds", default="0,1,2", help="which folds to run")
    c.add_argument(
        "--seeds",
        default=None,
        help="repeat every setting and fold with these seeds (teachers "
        "are keyed by seed too), e.g. 0,1,2; default: the preset's ("
        + ", ".join(f"{k}: {','.join(map(str, v))}" for k, v in SWEEP_SEEDS.items())
        + "), 0 with --smoke",
    )
    c.add_argument("--dry-run", action="store_true", help="print the trial grid and which teachers will be trained or reused; run nothing")
    c.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    c.add_argument("--verbose", action="store_true", help="stream the trials' own progress lines")
    c.add_argument("--profile", action="store_true", help="log where each trial's time goes (profile/* metrics)")
    c.add_argument("--no-teacher-reuse", action="store_true", help="benchmarks only: give every trial a private cache, so nothing is reused")
    # fmt: on
    add_data_model_args(p)
    if add_args:
        g = p.add_argument_group(f"{sweep} grid")
        add_args(g)
        p.set_defaults(_grid_dests=[a.dest for a in g._group_actions])
    return p


def grid_overridden(args: argparse.Namespace, parser: argparse.ArgumentParser) -> bool:
    """Did the user set any of the sweep's own grid flags (but those a sweep marks as leaving the
    grid alone, in `_not_grid`)?"""
    dests = set(getattr(args, "_grid_dests", [])) - set(getattr(args, "_not_grid", ()))
    return any(getattr(args, d) != parser.get_default(d) for d in dests)


@dataclass
class Trial:
    label: str
    cfg: TrialConfig


def expand(grid: Grid, folds: list[int], seeds: list[int] = (0,)) -> list[Trial]:
    """Grid x seeds x folds, ordered fold-interleaved so that concurrent trials need different
    teachers (a teacher is one task on one fold with one seed)."""
    seen: set[str] = set()
    out: list[Trial] = []
    for label, cfg in grid:
        for s in seeds:
            for f in folds:
                c = cfg.replace(fold=f, seed=s)
                if c.key() in seen:  # two grid points that coincide are one trial
                    continue
                seen.add(c.key())
                out.append(Trial(label, c))
    return out


def local_path(text: str, flag: str) -> str:
    """A folder flag as an absolute path; `~nosuchuser/x` is a one-line error, not RuntimeError."""
    try:
        return str(Path(text).expanduser().resolve())
    except RuntimeError as e:  # expanduser: the user in ~user does not exist
        raise SallError(f"{flag} '{text}' cannot be expanded ({e}); expected a folder path") from None


def check_ray_address(address: str, timeout: float = 5.0) -> str:
    """Resolve and probe a Ray address within seconds, so a dead cluster is an error, not a hang."""
    if address == "auto":
        addr = os.environ.get("RAY_ADDRESS")
        if not addr:
            cur = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
            addr = cur.read_text().strip() if cur.exists() else ""
        if not addr:
            raise SallError(
                "--address auto: no running Ray cluster found on this node (no RAY_ADDRESS, "
                "no `ray start` session); expected `ray start --head` first, or omit --address "
                "for a local Ray"
            )
        if addr == "auto":
            raise SallError("RAY_ADDRESS=auto is circular; expected HOST:PORT")
    else:
        addr = address
    hostport = addr.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError, OverflowError) as e:  # OverflowError: a port beyond a C long
        raise SallError(
            f"Ray cluster at '{addr}' (--address {address}) does not answer "
            f"({getattr(e, 'strerror', None) or e}); expected a running Ray head node"
        ) from None
    return address if address.startswith("ray://") else addr


# The driver's environment that its trials need on whichever node runs them: the MLflow client's
# own settings (credentials such as MLFLOW_TRACKING_TOKEN, request retries and timeouts), and the
# tests' fault injection. A cluster's worker processes inherit their node's environment, not the
# driver's, so these travel in the job's runtime_env.
FORWARDED_ENV_PREFIXES = ("MLFLOW_",)
FORWARDED_ENV = ("SALL_DEBUG_FAIL",)


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables of `environ` (default: this process's) that the job's workers get."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV}


def init_ray(args: argparse.Namespace) -> None:
    import ray

    quiet = dict(log_to_driver=args.verbose, include_dashboard=False, configure_logging=True, logging_level="WARNING")
    if env := forwarded_env():
        quiet["runtime_env"] = {"env_vars": env}
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if args.address:
        addr = check_ray_address(args.address)
        try:  # "auto" stays "auto": only then does Ray pick up this node's auth token by itself
            ray.init(
                address="auto" if args.address == "auto" else addr,
                **{k: v for k, v in quiet.items() if k != "include_dashboard"},
            )
        except Exception as e:  # ConnectionError and friends
            raise SallError(f"could not join the Ray cluster at '{addr}': {e}") from None
    else:
        ray.init(**quiet)


def check_cluster(uri: str, locations: dict[str, str]) -> None:
    """On a cluster of several nodes: the tracking store must be a server every node reaches, and a
    local folder given for a store must be the same folder on every node (a shared disk). Checked
    once Ray is up, before any trial: otherwise each node writes its own copy, and trains its own
    teachers."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    if not uri.startswith(("http://", "https://", "databricks")):
        raise SallError(
            f"--mlflow-uri {uri} is a file on this node, but the cluster has {len(nodes)} nodes: each would log "
            "to its own copy; expected a tracking server every node reaches, e.g. `mlflow server --host 0.0.0.0 "
            "--backend-store-uri postgresql+psycopg2://USER:PASS@DBHOST/mlflow` and --mlflow-uri http://HOST:5000"
        )
    for flag, where in locations.items():
        if "://" not in where:
            _check_shared(flag, where, nodes)


def _check_shared(flag: str, folder: str, nodes: list[dict]) -> None:
    """A marker written here must be visible on every node: one Ray task pinned to each node looks."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = Path(folder) / f".shared-check-{uuid.uuid4().hex}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("ok")

    def sees(path: str) -> bool:
        return os.path.exists(path)

    look = ray.remote(num_cpus=0)(sees)
    try:
        refs = {
            n["NodeID"]: look.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(marker))
            for n in nodes
        }
        blind = [node for node, ref in refs.items() if not ray.get(ref, timeout=60)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise SallError(
            f"{flag} {folder} is not shared: {len(blind)} of {len(nodes)} nodes do not see a file written to it "
            f"here (node {blind[0][:12]}); expected a folder every node mounts, or an object store such as "
            "s3://bucket/prefix"
        )


def say(line: str) -> None:
    """A progress line for the person at the terminal: stderr, at once (stdout is for results)."""
    print(line, file=sys.stderr, flush=True)


def make_progress(total: int, tasks: tuple[str, ...]):
    """A Tune callback: a line per finished trial with its key metrics, and done / running /
    pending with an ETA. (Defined here so that ray.tune is imported only when a sweep runs.)"""
    from ray.tune import Callback

    class _Progress(Callback):
        def __init__(self, total: int, tasks: tuple[str, ...]) -> None:
            self.total, self.tasks = total, tasks
            self.t0 = time.time()
            self.started: dict[str, float] = {}
            self.done = 0
            self.failed = 0
            self.durations: list[float] = []
            self.max_running = 1

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.time()

        def _line(self, trials, ended) -> None:
            # Tune calls back before it marks the ended trial: it still reads RUNNING
            running = sum(t.status == "RUNNING" and t is not ended for t in trials)
            self.max_running = max(self.max_running, running)
            pending = max(self.total - self.done - self.failed - running, 0)
            el = time.time() - self.t0
            eta = ""
            if self.durations:  # recent trials: the first ones also trained the teachers
                recent = self.durations[-2 * self.max_running :]
                left = (pending + running * 0.5) * sum(recent) / len(recent) / self.max_running
                eta = f" · ETA {_fmt(left)}"
            say(
                f"[sweep] done {self.done}/{self.total} · failed {self.failed} · running {running} · "
                f"pending {pending} · elapsed {_fmt(el)}{eta}"
            )

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            dt = time.time() - self.started.get(trial.trial_id, self.t0)
            self.durations.append(dt)
            r = trial.last_result or {}
            label, rep = _label(trial)
            parts = []
            for t in trial.config["trial"]["cfg"].get("tasks", self.tasks):
                if f"{t}_acc" in r:
                    parts.append(
                        f"{t} acc {r[f'{t}_acc']:.3f} kappa {r.get(f'{t}_kappa', float('nan')):.3f} "
                        f"ece {r.get(f'{t}_ece', float('nan')):.3f}"
                    )
            note = " (already logged)" if r.get("reused_run") else ""
            print(f"[trial] {label} {rep}: {' | '.join(parts)} ({_fmt(dt)}){note}", file=sys.stderr, flush=True)
            self._line(trials, trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.failed += 1
            label, rep = _label(trial)
            print(f"[trial] {label} {rep}: FAILED ({trial.error_file or 'see MLflow'})", file=sys.stderr, flush=True)
            self._line(trials, trial)

    return _Progress(total, tasks)


def _label(trial: Any) -> tuple[str, str]:
    """(setting label, 'fold1' or 'fold1 seed2') of a Tune trial."""
    from sweeps.trial import replicate_name

    t = trial.config["trial"]
    return t["label"], replicate_name(t["cfg"]["fold"], t["cfg"].get("seed", 0))


def _trial_name(trial: Any) -> str:
    """Short, readable trial names (the default embeds the whole config)."""
    label, rep = _label(trial)
    safe = "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in f"{label}_{rep}")
    return f"{safe}_{trial.trial_id}"


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def dry_run(trials: list[Trial], cache_dir: str) -> None:
    """Print the trial grid and, per trial, the teachers it needs: cached, to train, or trained by
    an earlier trial of this sweep."""
    from sall.chain import needs_teachers, preflight, teacher_key
    from sall.store import open_store

    store = open_store(cache_dir)
    plan: dict[str, str] = {}
    print(f"{'#':>3}  {'setting':<24} {'fold':>4} {'seed':>4}  {'config':<12}  teachers")
    for i, t in enumerate(trials):
        data = preflight(t.cfg)
        notes = []
        for task in needs_teachers(t.cfg):
            k = teacher_key(t.cfg, task, data.fingerprint)
            if k not in plan:
                cached = store.exists("teachers", k, ".pt")
                plan[k] = "cached" if cached else "train"
                notes.append(f"{k} [{plan[k]}]")
            else:
                notes.append(f"{k} [reuse]")
        print(f"{i:>3}  {t.label:<24} {t.cfg.fold:>4} {t.cfg.seed:>4}  {t.cfg.key():<12}  {' '.join(notes) or '-'}")
    n_train = sum(v == "train" for v in plan.values())
    print(
        f"\n{len(trials)} trials; {len(plan)} teachers: {n_train} to train (once each), "
        f"{len(plan) - n_train} already in {cache_dir}"
    )


def run_sweep(
    sweep: str,
    description: str,
    grid_fn: GridFn,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    smoke_grid: Callable[[Grid], Grid] | None = None,
    argv: list[str] | None = None,
    then: ThenFn | None = None,
) -> int:
    """Parse flags, check everything, then run (or resume) the sweep, and `then` after it (also
    called with --dry-run, to print its plan). Returns the exit code."""
    parser = build_parser(sweep, description, add_args)
    args = parser.parse_args(argv)
    if grid_overridden(args, parser):
        smoke_grid = None  # --smoke trims only the default grid, never one the user chose
    return guarded(lambda: _run(sweep, args, grid_fn, smoke_grid, then), args.debug)


def _run(sweep: str, args: argparse.Namespace, grid_fn: GridFn, smoke_grid, then: ThenFn | None = None) -> int:
    uri, base = sweep_setup(args)
    grid = grid_fn(args, base)
    if args.smoke and smoke_grid is not None:
        grid = smoke_grid(grid)
    trials = expand(grid, parse_folds(args.folds), sweep_seeds(args))
    cache_dir = check_trials(trials, args)
    if args.dry_run:
        dry_run(trials, cache_dir)
        return then(args, trials, uri, cache_dir, 0) if then else 0
    with ray_session(args):
        check_cluster(uri, {"--cache-dir": cache_dir, "--storage-path": args.storage_path})
        code = tune_trials(sweep, args, trials, uri, cache_dir)
        return then(args, trials, uri, cache_dir, code) if then else code


def sweep_setup(args: argparse.Namespace) -> tuple[str, TrialConfig]:
    """(tracking URI, base config): the services are checked first, so an unreachable tracking
    store or cluster is an error within seconds, before any data is read. Every sweep, a grid or
    the search, starts here."""
    uri = tr.resolve_uri(args.mlflow_uri)
    if not args.dry_run:
        tr.check_tracking_uri(uri)
        if args.address:
            check_ray_address(args.address)
    over = config_overrides(args)
    for flag in ("cpus_per_trial", "gpus_per_trial"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value >= 0) or (flag == "cpus_per_trial" and value <= 0):
            raise ConfigError(
                f"--{flag.replace('_', '-')} {value} is invalid; expected a finite number "
                f"{'> 0' if flag == 'cpus_per_trial' else '>= 0'} (fractions allowed)"
            )
    threads = max(1, int(args.cpus_per_trial)) if args.threads is None else args.threads
    over["threads"] = threads
    base = from_preset(args.preset, smoke=args.smoke, profile=args.profile, **over)
    base.validate()
    return uri, base


def check_trials(trials: list[Trial], args: argparse.Namespace) -> str:
    """Every check that can fail, before anything starts (config, cache dir, data); returns the
    cache dir."""
    for t in trials:
        t.cfg.validate()
    from sall.chain import preflight

    cache_dir = store_location(args.cache_dir, "--cache-dir")
    if getattr(args, "no_teacher_reuse", False) and "://" in cache_dir:
        raise ConfigError("--no-teacher-reuse gives each trial a private folder; expected a local --cache-dir")
    if not args.dry_run:
        check_storage_path(args.storage_path)
    for t in trials:
        preflight(t.cfg)
    return cache_dir


def store_location(text: str, flag: str) -> str:
    """A store flag as an absolute folder path or an object-store URI, checked writable (an object
    store by a probe object): an unknown scheme, an unreachable endpoint, a missing bucket or
    refused credentials are one line here, before anything starts."""
    from sall.store import open_store

    if text.startswith("file://"):
        text = text[len("file://") :]
    where = text if "://" in text else local_path(text, flag)
    try:
        open_store(where).check()
    except SallError as e:
        raise SallError(f"{flag} {e}") from None
    return where


def check_storage_path(text: str) -> None:
    """--storage-path: a folder, or an object-store URI Ray Tune can write through pyarrow."""
    if "://" not in text:
        return
    scheme = text.split("://", 1)[0]
    if scheme not in ("s3", "gs", "file"):
        raise SallError(
            f"--storage-path '{text}' has an unsupported scheme '{scheme}://'; expected a folder, s3:// or gs://"
        )
    store_location(text, "--storage-path")


@contextlib.contextmanager
def ray_session(args: argparse.Namespace) -> Iterator[None]:
    """Ray for the body (local, or the cluster of --address), shut down however it ends."""
    init_ray(args)
    try:
        yield
    finally:
        import ray

        ray.shutdown()


@dataclass
class SweepRun:
    """One Tune experiment of a sweep and its MLflow parent run."""

    sweep: str
    sweep_id: str
    uri: str
    experiment_id: str
    parent: str
    storage: str
    cache_dir: str

    @property
    def exp_dir(self) -> str:
        return os.path.join(self.storage, self.sweep_id)

    def settings(self) -> dict[str, str]:
        """What every trial needs to log into this sweep (`run_trial`'s `sweep`)."""
        return dict(
            sweep=self.sweep,
            mlflow_uri=self.uri,
            experiment_id=self.experiment_id,
            parent_run_id=self.parent,
            cache_dir=self.cache_dir,
        )


def open_sweep(
    sweep: str, sweep_id: str, args: argparse.Namespace, uri: str, cache_dir: str, params: dict[str, Any]
) -> SweepRun:
    """The experiment and the parent run of `sweep_id`: the same parent when resumed; --fresh
    removes Tune's state and gives the new invocation its own parent."""
    storage = local_path(args.storage_path, "--storage-path") if "://" not in args.storage_path else args.storage_path
    exp_dir = os.path.join(storage, sweep_id)
    exp_id = tr.ensure_experiment(uri, args.experiment)
    if args.fresh:
        if os.path.isdir(exp_dir):
            shutil.rmtree(exp_dir)
        old = tr.find_runs(uri, exp_id, tr.sweep_filter(sweep_id))
        for r in old:  # the new invocation gets its own parent run
            tr.retry(
                tr.client(uri).set_tag, r.info.run_id, sc.TAG_SWEEP_ID, f"{sweep_id}-superseded-{int(time.time())}"
            )
    parent = tr.parent_run(
        uri,
        exp_id,
        sweep,
        sweep_id,
        {
            "sweep": sweep,
            "folds": args.folds,
            "preset": args.preset,
            "seeds": ",".join(map(str, sweep_seeds(args))),
            "dataset": args.dataset,
            "tasks": args.tasks,
            "smoke": args.smoke,
            "address": args.address or "local",
            "cpus_per_trial": args.cpus_per_trial,
            "gpus_per_trial": args.gpus_per_trial,
            **params,
        },
    )
    return SweepRun(sweep, sweep_id, uri, exp_id, parent, storage, cache_dir)


def fit_tuner(
    run: SweepRun,
    args: argparse.Namespace,
    trainable_fn: Callable[[dict], None],
    space: dict[str, Any],
    callbacks: list,
    tune_config: Any,
) -> Any:
    """Run the Tune experiment, or resume it from its state in --storage-path (finished trials
    are kept, failed ones retried; a search algorithm and scheduler resume with it)."""
    from ray import tune

    if not args.verbose:  # a failed trial is our one line (and its error.txt), not Tune's traceback dump
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    trainable = tune.with_resources(trainable_fn, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})
    if not args.fresh and tune.Tuner.can_restore(run.exp_dir):
        print(
            f"[sweep] resuming {run.exp_dir}: finished trials are kept, failed ones are retried",
            file=sys.stderr,
            flush=True,
        )
        tuner = tune.Tuner.restore(
            run.exp_dir, trainable, resume_unfinished=True, resume_errored=True, param_space=space
        )
    else:
        run_config = tune.RunConfig(
            name=run.sweep_id,
            storage_path=run.storage,
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            callbacks=callbacks,
            verbose=0,
        )
        tuner = tune.Tuner(trainable, param_space=space, run_config=run_config, tune_config=tune_config)
    return tuner.fit()


def make_sweep_id(sweep: str, trials: list[Trial], uri: str, cache_dir: str, experiment: str) -> str:
    """Names the sweep's Tune state (in --storage-path, by default ~/ray_results, shared by every
    clone on the machine): by its trials and by where their results go. A rerun into the same
    MLflow store and cache resumes; the same grid into another store (a fresh clone, another
    --mlflow-uri or --experiment) is a new sweep, not a resume that reports trials it never logged.
    A store made again at the same path (mlflow.db deleted, a clone into the same folder) is
    another store too: the experiment's creation time is part of the name. (Creates the
    experiment if it is new: called only where the sweep is about to log into it.)"""
    exp_id = tr.ensure_experiment(uri, experiment)
    born = tr.retry(tr.client(uri).get_experiment, exp_id).creation_time
    where = [uri, os.path.abspath(cache_dir) if "://" not in cache_dir else cache_dir, experiment, born]
    return f"{sweep}-" + stable_hash([sorted(t.cfg.key() for t in trials), where])


def tune_trials(sweep: str, args: argparse.Namespace, trials: list[Trial], uri: str, cache_dir: str) -> int:
    """Run (or resume) a grid of trials under one parent run; the exit code."""
    sweep_id = make_sweep_id(sweep, trials, uri, cache_dir, args.experiment)
    run = open_sweep(sweep, sweep_id, args, uri, cache_dir, {"trials": len(trials)})
    print(
        f"[sweep] {sweep}: {len(trials)} trials · MLflow {uri} experiment '{args.experiment}' "
        f"(parent run {run.parent}) · Tune {run.exp_dir}",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.time()
    results = fit_trials(run, args, trials)
    return close_sweep(run, results, t0)


def fit_trials(run: SweepRun, args: argparse.Namespace, trials: list[Trial]) -> Any:
    """The teacher stage, then the trials as one Tune experiment (resumed if it ran before)."""
    from ray import tune

    if not args.no_teacher_reuse:  # with private caches every trial trains its own, on purpose
        from sweeps.teachers import run_stage

        run_stage(run, [t.cfg for t in trials], args.cpus_per_trial, args.gpus_per_trial, say)
    space = {
        "trial": tune.grid_search([{"label": t.label, "cfg": dataclasses.asdict(t.cfg)} for t in trials]),
        "sweep": run.settings(),
        "private_cache": bool(args.no_teacher_reuse),
    }
    # reuse_actors: a trial's process keeps torch, timm and the loaded manifest and splits for the
    # next trial (new processes cost ~15 s a trial on 2 cores)
    tune_config = tune.TuneConfig(
        max_concurrent_trials=args.max_concurrent_trials,
        reuse_actors=True,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_name,
    )
    progress = make_progress(len(trials), tuple(args.tasks.split(",")))
    return fit_tuner(run, args, _trainable, space, [progress], tune_config)


def close_sweep(run: SweepRun, results: Any, t0: float) -> int:
    """End the parent run, print the outcome and which trials failed; the exit code."""
    errors = [r for r in results if r.error is not None]
    unreported = [r for r in results if r.error is None and not r.metrics]  # Tune was interrupted
    ok = len(results) - len(errors) - len(unreported)
    wall = time.time() - t0
    if unreported:
        with contextlib.suppress(Exception):  # the answer waits for the rerun that finishes the rest
            tr.end_run(run.uri, run.parent, "KILLED")
        say(f"[sweep] interrupted: {ok}/{len(results)} trials finished; rerun the same command to resume")
        return 130
    try:
        tr.end_run(run.uri, run.parent, "FINISHED" if not errors else "FAILED")
        tr.log_metrics(run.uri, run.parent, {"trials_finished": ok, "trials_failed": len(errors), "wall_seconds": wall})
        tr.log_metrics(run.uri, run.parent, tr.sweep_costs(run.uri, run.experiment_id, run.parent))
    except Exception as e:  # the tracking server died during the sweep: what finished is kept
        raise SallError(
            f"MLflow at {run.uri} stopped answering ({str(e).strip().splitlines()[0][:200]}); {ok}/{len(results)} "
            "trials finished and are kept; rerun the same command once the tracking server is back"
        ) from None
    from sweeps.review import review_sweep  # the analysis on the sweep run; warns, never raises

    review_sweep(run.uri, run.experiment_id, run.parent)
    print(
        f"[sweep] {run.sweep}: {ok}/{len(results)} trials finished in {_fmt(wall)}; "
        f"review with: {tr.review_hint(run.uri, run.experiment_id)}",
        file=sys.stderr,
        flush=True,
    )
    if errors:
        print(f"[sweep] {len(errors)} trial(s) failed:", file=sys.stderr)
        for r in errors:
            c = r.config["trial"]
            from sweeps.trial import replicate_name

            rep = replicate_name(c["cfg"]["fold"], c["cfg"].get("seed", 0))
            print(f"  - {c['label']} {rep}: {str(r.error).strip().splitlines()[-1][:300]}", file=sys.stderr)
        print("[sweep] rerun the same command to retry only the failed trials", file=sys.stderr)
        return 1
    return 0


def _trainable(config: dict) -> None:
    """Tune trainable: unpack the grid entry and the sweep settings for `run_trial`."""
    from sweeps.trial import run_trial

    trial, sw = config["trial"], dict(config["sweep"])
    if config.get("private_cache"):  # --no-teacher-reuse: measure what reuse saves
        shared = sw["cache_dir"]
        sw["cache_dir"] = os.path.join(shared, "private", stable_hash(trial["cfg"]))
        os.makedirs(sw["cache_dir"], exist_ok=True)
        images = os.path.join(sw["cache_dir"], "images")
        if not os.path.lexists(images):  # decoded images stay shared: only teachers are not reused
            os.makedirs(os.path.join(shared, "images"), exist_ok=True)
            os.symlink(os.path.join(shared, "images"), images)
    run_trial({"cfg": trial["cfg"], "label": trial["label"], "sweep": sw})


def more_trials(
    sweep: str, args: argparse.Namespace, grid: list[Trial], trials: list[Trial], uri: str, cache_dir: str, stage: str
) -> int:
    """Run `trials` after the grid `grid` as a Tune experiment of their own (resumable like the
    grid) whose runs log under the grid's sweep run, then review that run again, so its answer
    includes them. Used by the temperature sweep's confirmation on fresh seeds."""
    grid_id = make_sweep_id(sweep, grid, uri, cache_dir, args.experiment)
    exp_id = tr.ensure_experiment(uri, args.experiment)
    found = tr.find_runs(uri, exp_id, tr.sweep_filter(grid_id))
    if not found:
        raise SallError(f"no sweep run of {grid_id} in {uri}; expected the grid to have run first")
    storage = local_path(args.storage_path, "--storage-path") if "://" not in args.storage_path else args.storage_path
    sweep_id = f"{grid_id}-{stage}-" + stable_hash(sorted(t.cfg.key() for t in trials))
    run = SweepRun(sweep, sweep_id, uri, exp_id, found[0].info.run_id, storage, cache_dir)
    if args.fresh and os.path.isdir(run.exp_dir):
        shutil.rmtree(run.exp_dir)
    say(f"[sweep] {stage}: {len(trials)} trials under sweep run {run.parent} · Tune {run.exp_dir}")
    t0 = time.time()
    results = fit_trials(run, args, trials)
    errors = [r for r in results if r.error is not None]
    tr.log_metrics(
        uri, run.parent, {f"{stage}_trials_finished": len(results) - len(errors), f"{stage}_seconds": time.time() - t0}
    )
    tr.log_metrics(uri, run.parent, tr.sweep_costs(uri, exp_id, run.parent))  # now with this stage's trials
    from sweeps.review import review_sweep

    review_sweep(uri, exp_id, run.parent)
    say(f"[sweep] {stage}: {len(results) - len(errors)}/{len(results)} trials finished in {_fmt(time.time() - t0)}")
    return 1 if errors else 0
