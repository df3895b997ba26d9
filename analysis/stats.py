"""Is the gain real? Paired comparisons of two settings: over replicates, and over test images.

* Over replicates (fold, seed): the paired differences d = acc(ours) - acc(reference) on the same
  fold with the same seed, their mean and a paired t-test (scipy), or an exact two-sided sign test
  where scipy is missing. With three folds and one seed the t-test has 2 degrees of freedom and
  the sign test cannot go below p = 0.25: power is low, and a large p is not evidence of no effect.
* The noise floor: the smallest difference the run could detect at 95 %, t(0.975, n-1) * sd / sqrt(n)
  over the n paired differences (the half-width of the difference's 95 % CI). With few pairs the
  sd itself is poorly known, so `pooled_floor` also pools the differences' variance over every
  setting compared with the same reference (they share the noise sources: the data split, the
  seed, the test images), which gives a steadier figure with sum(n_i - 1) degrees of freedom.
* The noise itself, kept apart: the spread across folds (of the per-fold means over seeds) and the
  spread across seeds within a fold (pooled over folds).
* Over test images: a bootstrap 95 % confidence interval of the accuracy difference, pooled over
  folds. Within each fold both models saw the same test images, so images are paired; each
  bootstrap replicate resamples images with replacement within each fold.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

Key = Hashable  # a fold, or a (fold, seed) replicate


@dataclass
class FoldTest:
    diffs: dict[Key, float]  # replicate -> difference
    mean: float
    p: float
    test: str  # "paired t" | "sign" | "-"

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def sd(self) -> float:
        d = list(self.diffs.values())
        return float(np.std(d, ddof=1)) if len(d) > 1 else math.nan

    @property
    def floor(self) -> float:
        """The smallest difference these pairs could detect at 95 %: t(0.975, n-1) * sd / sqrt(n)."""
        return detectable(self.sd, self.n, self.n - 1)

    def text(self, scale: float = 100.0) -> str:
        if not self.diffs:
            return "no paired replicates"
        per = ""
        if self.n <= 6:
            per = " [" + ", ".join(f"{scale * d:+.1f}" for d in self.diffs.values()) + "]"
        p = "n/a" if math.isnan(self.p) else f"{self.p:.3f}"
        return f"{scale * self.mean:+.2f}{per} p={p} ({self.test}, n={self.n})"


def detectable(sd: float, n: int, df: int, level: float = 0.95) -> float:
    """Half-width of the `level` CI of a mean of n differences whose sd is known with df degrees
    of freedom: the smallest mean difference that a two-sided t-test would call significant."""
    if n < 1 or df < 1 or math.isnan(sd):
        return math.nan
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, df) * sd / math.sqrt(n))


def paired_folds(ours: dict[Key, float], ref: dict[Key, float]) -> FoldTest:
    """Paired test over the replicates (folds, or (fold, seed)) where both settings finished."""
    keys = sorted(set(ours) & set(ref))
    diffs = {k: ours[k] - ref[k] for k in keys}
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
            p = float(stats.ttest_rel(list(ours[k] for k in keys), list(ref[k] for k in keys)).pvalue)
        return FoldTest(diffs, mean, p, "paired t")
    except ImportError:
        return FoldTest(diffs, mean, sign_test(d), "sign")


@dataclass
class PooledFloor:
    sd: float  # pooled sd of the paired differences
    df: int  # its degrees of freedom: sum of (n_i - 1)
    n: int  # pairs per setting (the most common count)
    floor: float  # t(0.975, df) * sd / sqrt(n)
    settings: int


def pooled_floor(tests: list[FoldTest]) -> PooledFloor:
    """The noise floor with the paired differences' variance pooled over several settings (each
    compared with the same reference), for a setting with the usual number of pairs."""
    usable = [t for t in tests if t.n > 1 and not math.isnan(t.sd)]
    df = sum(t.n - 1 for t in usable)
    if df == 0:
        return PooledFloor(math.nan, 0, 0, math.nan, 0)
    sd = math.sqrt(sum((t.n - 1) * t.sd**2 for t in usable) / df)
    n = Counter(t.n for t in usable).most_common(1)[0][0]
    return PooledFloor(sd, df, n, detectable(sd, n, df), len(usable))


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


def sign_test(d: np.ndarray) -> float:
    """Exact two-sided sign test of the median difference being 0 (ties dropped)."""
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
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
