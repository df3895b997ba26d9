"""How often do the verdicts claim what is not there, and how often do they find what is?

    python analysis/calibration.py [--sweeps 4000] [--effect-pp 3] [--seeds 1]

Simulates whole sweeps: settings x tasks x folds x seeds of test accuracies with the noise the
default run measured (docs/results-synthetic.md), then runs them through
`gain.family`, the code that gives every table row its verdict. Per task and fold, an effect that
all settings share (the data split); per setting and fold, one they do not (which test images and
training images suit it); per run, the training noise of its seed. Folds are independent here, so
the corrected t's split ratio makes it conservative for this model, as it is meant to be. The same
model is exact for replicates that each drew their own data (`--redraw`, and the confirmation on
the synthetic set): there each replicate is a unit and the ratio is 0, the plain paired t.

* Null: no setting differs from the baseline. The family-wise rate of a false "established" must
  be at most 5 %.
* Power: one setting is better by `effect` on every task; how often is it established, in the
  table of the whole grid, and in the confirmation (the chosen setting and the baseline on fresh
  seeds, one comparison per task, Holm over the tasks)?
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from analysis import gain as gn


@dataclass(frozen=True)
class Noise:
    """Sds in accuracy units, per task (DR, AMD), set to the default run's measurements: the
    baseline's sd over folds (1.1 / 1.0 pp), and the paired difference's sd over folds with one
    seed (1.1 / 1.8 pp: the pooled floors in docs/results-synthetic.md of 1.3 / 2.1 pp at 24 df and 3 folds), split
    between a setting's own luck with a fold's images and its seed's training noise. Under the null
    the verdicts' error rate does not depend on these sds (the t is scale-free); the power does."""

    fold: tuple[float, ...] = (0.011, 0.010)  # baseline sd over folds: shared by every setting
    setting_fold: tuple[float, ...] = (0.005, 0.006)  # a setting's own luck with a fold's images
    seed: tuple[float, ...] = (0.006, 0.011)  # a run's training noise (its seed)


DEFAULT = Noise()
SETTINGS = 12  # the default grid: T = 1..10, 20, 50, beside the baseline
FOLDS = 3


def simulate(
    rng: np.random.Generator,
    sweeps: int,
    effects: np.ndarray,
    folds: int = FOLDS,
    seeds: int = 1,
    noise: Noise = DEFAULT,
) -> np.ndarray:
    """Test accuracies (sweeps, settings + 1, tasks, folds, seeds); setting 0 is the baseline.
    `effects` (settings, tasks): each setting's true difference to the baseline."""
    effects = np.asarray(effects, float)
    k, tasks = effects.shape
    sd = {name: np.asarray(getattr(noise, name))[:tasks] for name in ("fold", "setting_fold", "seed")}
    shape = (sweeps, k + 1, tasks, folds, seeds)
    fold = rng.standard_normal((sweeps, 1, tasks, folds, 1)) * sd["fold"][:, None, None]
    own = rng.standard_normal((sweeps, k + 1, tasks, folds, 1)) * sd["setting_fold"][:, None, None]
    run = rng.standard_normal(shape) * sd["seed"][:, None, None]
    true = np.concatenate([np.zeros((1, tasks)), effects])[None, :, :, None, None]
    return 0.7 + true + fold + own + run


def fold_diffs(acc: np.ndarray) -> np.ndarray:
    """D_f for every setting and task against the baseline: (sweeps, settings * tasks, folds),
    comparisons ordered setting-major as a table lists them."""
    d = (acc[:, 1:] - acc[:, :1]).mean(-1)  # mean over seeds of the paired differences
    return d.reshape(d.shape[0], -1, d.shape[-1])


def established(acc: np.ndarray, ratio: float = gn.SPLIT_RATIO) -> np.ndarray:
    """(sweeps, comparisons) booleans: the table's verdict is `established`."""
    return gn.family(fold_diffs(acc), ratio).verdict == gn.ESTABLISHED


def grid_effects(effect: float, tasks: int = 2, settings: int = SETTINGS, which: int = 2) -> np.ndarray:
    """No effect but one: setting `which` (T = 3 in the default grid) better by `effect` on every task."""
    e = np.zeros((settings, tasks))
    e[which] = effect
    return e


def false_claim_rate(
    rng: np.random.Generator, sweeps: int, seeds: int = 1, ratio: float = gn.SPLIT_RATIO, settings: int = SETTINGS
) -> float:
    """Share of null sweeps with at least one established difference (the family-wise error)."""
    acc = simulate(rng, sweeps, np.zeros((settings, 2)), seeds=seeds)
    return float(established(acc, ratio).any(-1).mean())


def grid_power(rng: np.random.Generator, sweeps: int, effect: float, seeds: int = 1) -> float:
    """Share of sweeps whose table establishes the one real effect (per task, averaged)."""
    eff = grid_effects(effect)
    acc = simulate(rng, sweeps, eff, seeds=seeds)
    hit = established(acc).reshape(sweeps, SETTINGS, -1)[:, eff[:, 0] != 0]
    return float(hit.mean())


def confirmation_power(
    rng: np.random.Generator, sweeps: int, effect: float, seeds: int = 1, ratio: float = gn.SPLIT_RATIO
) -> float:
    """Share of confirmations (the chosen setting, better by `effect` on both tasks, and the
    baseline on fresh seeds; Holm over the two tasks) that establish it, per task. With `ratio` 0,
    the confirmation on the synthetic set: every replicate on data of its own."""
    acc = simulate(rng, sweeps, np.full((1, 2), effect), seeds=seeds)
    return float(established(acc, ratio).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python analysis/calibration.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sweeps", type=int, default=4000, help="simulated sweeps per figure")
    p.add_argument("--effect-pp", type=float, default=3.0, help="the true gain of the one better setting, pp")
    p.add_argument("--seeds", type=int, default=1, help="seeds per fold of the grid")
    p.add_argument("--confirm-seeds", type=int, default=1, help="fresh seeds per fold of the confirmation")
    a = p.parse_args(argv)
    if a.sweeps < 1 or a.seeds < 1 or a.confirm_seeds < 1:
        p.error(f"--sweeps {a.sweeps}, --seeds {a.seeds}, --confirm-seeds {a.confirm_seeds}: expected integers >= 1")
    rng = np.random.default_rng(0)
    e = a.effect_pp / 100
    print(f"design: {SETTINGS} settings + baseline, 2 tasks, {FOLDS} folds; split ratio {gn.SPLIT_RATIO:g}")
    print(f"null, {a.seeds} seed(s): family-wise false 'established' {false_claim_rate(rng, a.sweeps, a.seeds):.3f}")
    print(f"{a.effect_pp:g} pp on one setting, grid table: power {grid_power(rng, a.sweeps, e, a.seeds):.3f}")
    conf = confirmation_power(rng, a.sweeps, e, a.confirm_seeds)
    print(f"{a.effect_pp:g} pp, confirmation on {a.confirm_seeds} fresh seed(s) x {FOLDS} folds: power {conf:.3f}")
    null = false_claim_rate(rng, a.sweeps, 1, ratio=0.0, settings=1)
    fresh = confirmation_power(rng, a.sweeps, e, 1, ratio=0.0)
    print(
        f"confirmation on {FOLDS} replicates of fresh data each (ratio 0): null family-wise {null:.3f}, "
        f"{a.effect_pp:g} pp power {fresh:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
