"""The noise of a sweep's values, and the bootstrap over test images.

* The noise, kept apart: the spread across folds (of the per-fold means over seeds) and the
  spread across seeds within a fold (pooled over folds).
* Over test images: a bootstrap 95 % confidence interval of the accuracy difference, pooled over
  folds. Within each fold both models saw the same test images, so images are paired; each
  bootstrap replicate resamples images with replacement within each fold. It holds the trained
  models fixed, so it measures test-set sampling only, never the training noise: it decides no
  verdict. The verdicts come from analysis/gain.py, over folds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Noise:
    fold_sd: float  # sd over folds of the per-fold mean (over seeds)
    seed_sd: float  # sd over seeds within a fold, pooled over folds (NaN with one seed)
    n_folds: int
    n_seeds: int


def noise(values: dict[tuple[int, int], float]) -> Noise:
    """Split the spread of one setting's values over (fold, seed) into its two sources."""
    by_fold: dict[int, list[float]] = {}
    for (fold, _seed), v in values.items():
        by_fold.setdefault(fold, []).append(v)
    means = [float(np.mean(v)) for v in by_fold.values()]
    fold_sd = float(np.std(means, ddof=1)) if len(means) > 1 else math.nan
    within = [(len(v) - 1, float(np.var(v, ddof=1))) for v in by_fold.values() if len(v) > 1]
    df = sum(k for k, _ in within)
    seed_sd = math.sqrt(sum(k * var for k, var in within) / df) if df else math.nan
    n_seeds = max((len(v) for v in by_fold.values()), default=0)
    return Noise(fold_sd, seed_sd, len(by_fold), n_seeds)


@dataclass
class Bootstrap:
    diff: float  # pooled observed accuracy difference
    lo: float
    hi: float
    n_images: int
    n_folds: int

    def text(self, scale: float = 100.0) -> str:
        if self.n_images == 0:
            return "no per-image predictions"
        return (
            f"{scale * self.diff:+.2f} [{scale * self.lo:+.2f}, {scale * self.hi:+.2f}] "
            f"({self.n_images} images, {self.n_folds} fold{'s' if self.n_folds != 1 else ''})"
        )


def paired_bootstrap(
    folds: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> Bootstrap:
    """Bootstrap CI of acc(ours) - acc(ref) pooled over folds.

    `folds`: per fold, (correct_ours, correct_ref), boolean arrays over the same test images in
    the same order: 1-D for one seed, or (seeds, images) when each seed re-trained both models on
    that fold. Seeds share the fold's test images, so an image counts once, with its difference
    averaged over the seeds. Resampling images within a fold then only changes how many images fall
    on each of the few values that average can take, so each replicate draws those counts from a
    multinomial: exact, and fast for any number of images.
    """
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    n_all, observed = 0, 0.0
    for ours, ref in folds:
        ours, ref = np.atleast_2d(np.asarray(ours, bool)), np.atleast_2d(np.asarray(ref, bool))
        d = (ours.astype(np.int64) - ref.astype(np.int64)).sum(0)  # per image: sum over seeds
        n = d.size
        if n == 0:
            continue
        values, counts = np.unique(d, return_counts=True)
        draws = rng.multinomial(n, counts / n, size=n_boot)
        total += draws @ (values / ours.shape[0])
        observed += d.sum() / ours.shape[0]
        n_all += n
    if n_all == 0:
        return Bootstrap(math.nan, math.nan, math.nan, 0, 0)
    reps = total / n_all
    a = (1 - level) / 2
    return Bootstrap(observed / n_all, float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a)), n_all, len(folds))
