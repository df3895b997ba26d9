"""Verdicts on gains that hold up: the fold as the unit, its variance corrected, multiplicity adjusted.

Why each piece:

* **The unit is the fold** (the replicate that owns its data split). Seeds on one fold share its
  training images and its test images, so (fold, seed) pairs are not independent; treating them
  as such shrinks the p-values. Per fold, D_f is the mean over seeds of acc(setting) - acc(ref),
  paired on the same fold and seed.
* **The corrected resampled t** (Nadeau & Bengio 2003; Bouckaert & Frank 2004). Folds that share
  training data give correlated D_f, and var(D_f) / J then understates the variance of their mean.
  SE = sqrt((1/J + n_test/n_train) * S^2), with J - 1 degrees of freedom. Our folds rotate over four
  quarters (test one, validate the next, train on the other two), so n_test/n_train = 1/2
  (`SPLIT_RATIO`), on ODIR and on the synthetic set alike (its manifest is drawn once and split the
  same way).
* **Replicates that draw their own data** (a config's `redraw`; `Design`). On the synthetic set each
  (fold, seed) replicate is drawn afresh: replicates share no image, each one is a unit and the
  ratio is 0 (the plain paired t over independent replicates). On a fixed data set re-cut per seed
  (repeated cross-validation) each (fold, seed) is a unit too, with the ratio kept at 1/2: the
  corrected repeated k-fold t of Bouckaert & Frank.
* **Multiplicity.** A table compares every (setting, task) with one reference: one family. Its
  p-values are adjusted by Holm (family-wise error) and by Benjamini-Hochberg (false discovery
  rate, scipy's `false_discovery_control`).
* **One meaning per verdict word**, everywhere: `established` (Holm-adjusted p < 0.05),
  `suggestive` (raw p < 0.05 only), `not distinguished` (otherwise). "No effect" is never read
  off a large p; only an equivalence test (TOST) within a stated margin says a difference is small.

Every function takes arrays whose last axis is the folds (NaN: a fold without both runs), so the
table of one sweep and ten thousand simulated sweeps run through the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
SPLIT_RATIO = 0.5  # n_test / n_train of the quarter rotation: one test quarter, two training quarters
ESTABLISHED, SUGGESTIVE, NOT_DISTINGUISHED = "established", "suggestive", "not distinguished"
EQUIVALENCE_MARGIN = 0.03  # the TOST margin, as accuracy: the project's target for a detectable gain
POWER = 0.8


@dataclass(frozen=True)
class Design:
    """What the unit of a test is and how units overlap, from how the replicates got their data."""

    per_replicate: bool  # the unit is each (fold, seed) replicate, else each fold (mean over seeds)
    ratio: float  # n_test / n_train of the corrected t: 0 where units share no data
    independent: bool  # no two units share an image

    def units(self, n: int) -> str:
        """'3 independent replicates (each its own data)' and the like, for n units."""
        if self.independent:
            return f"{n} independent replicate{'s' if n != 1 else ''} (each drew its own data)"
        if self.per_replicate:
            return f"{n} replicate{'s' if n != 1 else ''} of repeated cross-validation (overlapping data, corrected t)"
        return f"{n} fold{'s' if n != 1 else ''} (overlapping training data, corrected t)"


FOLDS = Design(per_replicate=False, ratio=SPLIT_RATIO, independent=False)


def design_of(redraw: bool, synthetic: bool) -> Design:
    """The design of a setting's replicates: folds of one data set, (fold, seed) replicates of a
    data set re-cut per seed, or (fold, seed) replicates each drawn afresh (synthetic only)."""
    if not redraw:
        return FOLDS
    return Design(per_replicate=True, ratio=0.0 if synthetic else SPLIT_RATIO, independent=synthetic)


def unit_diffs(
    ours: dict[tuple[int, int], float], ref: dict[tuple[int, int], float], design: Design = FOLDS
) -> dict[object, float]:
    """The test's units: D_f per fold (`fold_means`), or, per (fold, seed) replicate, its own
    difference where every replicate drew its own data."""
    if not design.per_replicate:
        return fold_means(ours, ref)
    return {key: ours[key] - ref[key] for key in sorted(set(ours) & set(ref))}


def fold_means(ours: dict[tuple[int, int], float], ref: dict[tuple[int, int], float]) -> dict[int, float]:
    """D_f: per fold, the mean over seeds of ours - ref on the (fold, seed) pairs both finished."""
    by_fold: dict[int, list[float]] = {}
    for key in sorted(set(ours) & set(ref)):
        by_fold.setdefault(key[0], []).append(ours[key] - ref[key])
    return {f: float(np.mean(d)) for f, d in by_fold.items()}


def seed_sd(ours: dict[tuple[int, int], float], ref: dict[tuple[int, int], float]) -> float:
    """The sd of the paired difference across seeds within a fold, pooled over folds (NaN: one seed)."""
    by_fold: dict[int, list[float]] = {}
    for key in sorted(set(ours) & set(ref)):
        by_fold.setdefault(key[0], []).append(ours[key] - ref[key])
    within = [(len(d) - 1, float(np.var(d, ddof=1))) for d in by_fold.values() if len(d) > 1]
    df = sum(k for k, _ in within)
    return math.sqrt(sum(k * v for k, v in within) / df) if df else math.nan


@dataclass
class Corrected:
    """The corrected resampled t over the last axis (folds); every field has the input's leading shape."""

    mean: np.ndarray
    sd: np.ndarray  # S: the sd of D_f over folds
    se: np.ndarray
    n: np.ndarray  # J: folds with a value
    t: np.ndarray
    p: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def corrected_t(d: np.ndarray, ratio: float = SPLIT_RATIO, level: float = 0.95) -> Corrected:
    """Nadeau-Bengio's corrected resampled t of mean(D_f) = 0, two-sided, J - 1 df, and its CI.

    A zero S with a non-zero mean (every fold equal) has no t: its p stays NaN, never 0."""
    d = np.asarray(d, dtype=float)
    n = np.sum(~np.isnan(d), axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.nansum(d, axis=-1) / np.maximum(n, 1), np.nan)
        ss = np.nansum((d - mean[..., None]) ** 2, axis=-1)
        sd = np.where(n > 1, np.sqrt(ss / np.maximum(n - 1, 1)), np.nan)
        se = np.sqrt(1.0 / n + ratio) * sd
        df = np.where(n > 1, n - 1, np.nan)
        t = np.where(se > 0, mean / se, np.nan)
        p = 2 * sps.t.sf(np.abs(t), df)
        half = sps.t.ppf(0.5 + level / 2, df) * se
    return Corrected(mean, sd, se, n, t, p, mean - half, mean + half)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values over the last axis; NaN entries are not in the family."""
    p = np.asarray(p, dtype=float)
    finite = ~np.isnan(p)
    m = finite.sum(axis=-1, keepdims=True)
    order = np.argsort(np.where(finite, p, np.inf), axis=-1)
    ranked = np.take_along_axis(p, order, axis=-1)
    k = np.arange(p.shape[-1])
    stepped = np.maximum.accumulate(np.where(np.isnan(ranked), 0.0, (m - k) * ranked), axis=-1)
    adjusted = np.empty_like(p)
    np.put_along_axis(adjusted, order, np.minimum(stepped, 1.0), axis=-1)
    return np.where(finite, adjusted, np.nan)


def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values over the last axis (scipy); NaN entries are not in the family."""
    p = np.asarray(p, dtype=float)
    if not np.isnan(p).any():
        return sps.false_discovery_control(p, axis=-1) if p.shape[-1] else p
    out = np.full_like(p, np.nan)
    for idx in np.ndindex(p.shape[:-1]):
        row = p[idx]
        ok = ~np.isnan(row)
        if ok.any():
            out[idx + (ok,)] = sps.false_discovery_control(row[ok])
    return out


def verdict(p: np.ndarray, p_holm: np.ndarray) -> np.ndarray:
    """The verdict words: established (Holm p < ALPHA), suggestive (raw p < ALPHA), not distinguished."""
    p, p_holm = np.nan_to_num(np.asarray(p, float), nan=1.0), np.nan_to_num(np.asarray(p_holm, float), nan=1.0)
    return np.where(p_holm < ALPHA, ESTABLISHED, np.where(p < ALPHA, SUGGESTIVE, NOT_DISTINGUISHED))


def tost(c: Corrected, margin: float = EQUIVALENCE_MARGIN) -> np.ndarray:
    """Two one-sided tests that |true mean| < margin, on the corrected SE: the larger one-sided p.
    Below ALPHA, "no difference beyond +-margin" is a claim the data support."""
    df = np.where(c.n > 1, c.n - 1, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = sps.t.sf((c.mean + margin) / c.se, df)  # H0: mean <= -margin
        upper = sps.t.cdf((c.mean - margin) / c.se, df)  # H0: mean >= +margin
    return np.maximum(lower, upper)


def detectable(sd: float, n: int, ratio: float = SPLIT_RATIO, power: float = POWER) -> float:
    """The true difference a two-sided corrected t at ALPHA finds with probability `power`, for
    J = n folds whose D_f spread by `sd` (normal approximation of the t's power)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    df = n - 1
    return float((sps.t.ppf(1 - ALPHA / 2, df) + sps.t.ppf(power, df)) * math.sqrt(1 / n + ratio) * sd)


@dataclass
class Family:
    """One table's comparisons against its reference, tested and adjusted together."""

    test: Corrected
    p_holm: np.ndarray
    q: np.ndarray
    verdict: np.ndarray
    p_tost: np.ndarray


def family(d: np.ndarray, ratio: float = SPLIT_RATIO, margin: float = EQUIVALENCE_MARGIN) -> Family:
    """d: (..., comparisons, folds) of D_f. The corrected t per comparison, Holm and BH over the
    comparisons, the verdicts and the equivalence p."""
    c = corrected_t(d, ratio)
    ph = holm(c.p)
    return Family(c, ph, bh(c.p), verdict(c.p, ph), tost(c, margin))


def fold_matrix(diffs: list[dict]) -> tuple[np.ndarray, list]:
    """Per comparison {unit: D} -> a (comparisons, units) array with NaN where a unit is missing."""
    folds = sorted({f for d in diffs for f in d})
    out = np.full((len(diffs), len(folds)), np.nan)
    for i, d in enumerate(diffs):
        for j, f in enumerate(folds):
            out[i, j] = d.get(f, np.nan)
    return out, folds


def replicate_mean(values: dict[tuple[int, int], float]) -> float:
    """The mean over folds of the per-fold means over seeds: every fold weighs the same."""
    by_fold: dict[int, list[float]] = {}
    for (fold, _seed), v in values.items():
        by_fold.setdefault(fold, []).append(v)
    return float(np.mean([np.mean(v) for v in by_fold.values()])) if by_fold else math.nan


def choose(candidates: dict[str, dict[tuple[int, int], float]]) -> str | None:
    """The candidate with the best replicate mean: the rule that picks a setting, to be fed
    validation values only, so that the test split measures the choice and never makes it."""
    means = {k: replicate_mean(v) for k, v in candidates.items()}
    means = {k: m for k, m in means.items() if not math.isnan(m)}
    return max(means, key=means.get) if means else None


def near_best(candidates: dict[str, dict[tuple[int, int], float]], best: str, design: Design = FOLDS) -> list[str]:
    """The candidates not distinguished from `best` on the same values: each other one's units
    against the best, the corrected t, Holm over the comparisons; the best itself is in the set."""
    others = [k for k in candidates if k != best]
    if not others:
        return [best]
    d, _ = fold_matrix([unit_diffs(candidates[best], candidates[k], design) for k in others])
    fam = family(d, design.ratio)
    return [best] + [k for k, v in zip(others, fam.verdict) if v != ESTABLISHED]
