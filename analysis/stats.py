"""Is the gain real? Paired comparisons of two settings: over folds, and over test images.

* Over folds: the paired differences d_f = acc(ours, fold f) - acc(reference, fold f), their mean
  and a paired t-test (scipy), or an exact two-sided sign test where scipy is missing. With three
  folds the t-test has 2 degrees of freedom and the sign test cannot go below p = 0.25: power is
  low, and a large p is not evidence of no effect.
* Over test images: a bootstrap 95 % confidence interval of the accuracy difference, pooled over
  folds. Within each fold both models saw the same test images, so images are paired; each
  bootstrap replicate resamples images with replacement within each fold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class FoldTest:
    diffs: dict[int, float]  # fold -> difference
    mean: float
    p: float
    test: str  # "paired t" | "sign" | "-"

    def text(self, scale: float = 100.0) -> str:
        if not self.diffs:
            return "no paired folds"
        per = ", ".join(f"{scale * d:+.1f}" for d in self.diffs.values())
        p = "n/a" if math.isnan(self.p) else f"{self.p:.3f}"
        return f"{scale * self.mean:+.2f} [{per}] p={p} ({self.test}, n={len(self.diffs)})"


def paired_folds(ours: dict[int, float], ref: dict[int, float]) -> FoldTest:
    """Paired test over the folds where both settings finished."""
    folds = sorted(set(ours) & set(ref))
    diffs = {f: ours[f] - ref[f] for f in folds}
    d = np.array(list(diffs.values()), dtype=float)
    if len(d) == 0:
        return FoldTest({}, math.nan, math.nan, "-")
    mean = float(d.mean())
    if len(d) < 2:
        return FoldTest(diffs, mean, math.nan, "-")
    try:
        from scipy import stats

        if np.allclose(d, d[0]):  # zero variance: t undefined
            p = 1.0 if d[0] == 0 else math.nan
        else:
            p = float(stats.ttest_rel(list(ours[f] for f in folds), list(ref[f] for f in folds)).pvalue)
        return FoldTest(diffs, mean, p, "paired t")
    except ImportError:
        return FoldTest(diffs, mean, sign_test(d), "sign")


def sign_test(d: np.ndarray) -> float:
    """Exact two-sided sign test of the median difference being 0 (ties dropped)."""
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


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
        return (f"{scale * self.diff:+.2f} [{scale * self.lo:+.2f}, {scale * self.hi:+.2f}] "
                f"({self.n_images} images, {self.n_folds} fold{'s' if self.n_folds != 1 else ''})")


def paired_bootstrap(folds: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 10000, seed: int = 0,
                     level: float = 0.95) -> Bootstrap:
    """Bootstrap CI of acc(ours) - acc(ref) pooled over folds.

    `folds`: per fold, (correct_ours, correct_ref), boolean arrays over the same test images in
    the same order. Resampling images within a fold only changes how many of its images fall in
    each of the three paired outcomes (ours right only, ref right only, same), so each replicate
    draws those counts from a multinomial: exact, and fast for any number of images.
    """
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    n_all, observed = 0, 0
    for ours, ref in folds:
        ours, ref = np.asarray(ours, bool), np.asarray(ref, bool)
        n = len(ours)
        if n == 0:
            continue
        up, down = int((ours & ~ref).sum()), int((~ours & ref).sum())
        counts = rng.multinomial(n, [up / n, down / n, 1 - (up + down) / n], size=n_boot)
        total += counts[:, 0] - counts[:, 1]
        observed += up - down
        n_all += n
    if n_all == 0:
        return Bootstrap(math.nan, math.nan, math.nan, 0, 0)
    reps = total / n_all
    a = (1 - level) / 2
    return Bootstrap(observed / n_all, float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a)),
                     n_all, len(folds))
