"""Evaluation metrics for one task on one split (design.md, "Metrics"; paper section IV-C, Table V).

Everything here is numpy + scikit-learn and returns plain, JSON-ready Python values (after
:func:`to_jsonable`).

Conventions
-----------
* ``probs`` is an (N, K) array of probabilities (rows sum to 1), ``labels`` an (N,) array of
  integer class indices in ``0..K-1``. The prediction is ``argmax(probs, axis=1)`` (ties go to
  the lowest index, as numpy does) and the confidence is ``max(probs, axis=1)``.
* Undefined values are ``float('nan')`` in the dicts returned here (e.g. ``err`` when every
  prediction is correct, ``conf`` when every prediction is wrong). :func:`to_jsonable` turns
  NaN into ``None`` so that ``json.dumps(..., allow_nan=False)`` works.
* Reliability / ECE bins are ``n_bins`` equal-width bins over [0, 1], right-closed:
  bin b covers ``(b/n_bins, (b+1)/n_bins]``; a confidence of exactly 0 goes into bin 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score

__all__ = [
    "SCALAR_KEYS",
    "classification_metrics",
    "expected_calibration_error",
    "reliability_bins",
    "scalar_metrics",
    "soft_label_stats",
    "to_jsonable",
]

#: The scalar entries of :func:`classification_metrics`, in logging order.
SCALAR_KEYS = ("acc", "conf", "err", "ece", "nll", "brier", "kappa", "macro_f1")

_NLL_EPS = 1e-12


def _check_inputs(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, K), got shape {probs.shape}")
    if labels.ndim != 1 or labels.shape[0] != probs.shape[0]:
        raise ValueError(f"labels must be 1-D with N={probs.shape[0]} entries, got shape {labels.shape}")
    n, k = probs.shape
    if n == 0:
        raise ValueError("cannot compute metrics on 0 samples")
    if k == 0:
        raise ValueError("probs has 0 classes")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or infinite values")
    if labels.dtype.kind not in "iub":
        if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            pass
        else:
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in 0..{k - 1} (K={k}), got range {labels.min()}..{labels.max()}")
    return probs, labels


def reliability_bins(confidences: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> list[dict]:
    """Equal-width confidence bins for a reliability diagram / ECE (Guo et al. 2017).

    Returns ``n_bins`` dicts ``{lo, hi, count, acc, conf}``; bin b covers ``(lo, hi]`` with
    ``lo = b / n_bins``, ``hi = (b + 1) / n_bins`` (a confidence of exactly 0 falls into bin 0).
    ``acc`` (fraction correct) and ``conf`` (mean confidence) are ``None`` for empty bins.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    # Bin index = ceil(c * n_bins) - 1 computed with exact integer edges b / n_bins (comparison
    # against Python floats b / n_bins avoids linspace round-off at the edges).
    edges = np.array([b / n_bins for b in range(n_bins + 1)])
    idx = np.searchsorted(edges, confidences, side="left") - 1
    idx = np.clip(idx, 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": count,
                "acc": float(correct[mask].mean()) if count else None,
                "conf": float(confidences[mask].mean()) if count else None,
            }
        )
    return bins


def expected_calibration_error(bins: Sequence[dict]) -> float:
    """ECE of :func:`reliability_bins` output: ``sum_b |acc_b - conf_b| * n_b / N``.

    The one formula for every ECE the project reports (the metrics, the reliability plots and the
    paper figures, whose bins may be pooled over folds), so they cannot drift apart. ``N`` is the
    total count of the bins; bins without samples (or, as read back, without ``acc``/``conf``) add
    nothing. ``nan`` when the bins hold no sample.
    """
    n = sum(int(b["count"]) for b in bins)
    if n == 0:
        return math.nan
    return float(
        sum(
            abs(b["acc"] - b["conf"]) * b["count"] / n
            for b in bins
            if b["count"] and b["acc"] is not None and b["conf"] is not None
        )
    )


def classification_metrics(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict:
    """All metrics of design.md "Metrics" for one task on one split.

    Args:
        probs: (N, K) predicted probabilities (softmax outputs; rows sum to 1).
        labels: (N,) ground-truth class indices in ``0..K-1``.
        n_bins: number of equal-width confidence bins for ``ece`` and ``reliability``.

    Returns a dict (JSON-ready after :func:`to_jsonable`) with:

    * ``acc``: fraction of ``argmax(probs) == labels``.
    * ``conf``: mean max-probability over the CORRECT predictions (paper IV-C "Conf");
      ``nan`` when no prediction is correct.
    * ``err``: mean max-probability over the WRONG predictions (paper IV-C "Err");
      ``nan`` when every prediction is correct.
    * ``ece``: expected calibration error, ``sum_b |acc_b - conf_b| * n_b / N`` over the
      ``n_bins`` bins of ``reliability``.
    * ``nll``: mean ``-log(max(p_true, 1e-12))``.
    * ``brier``: mean over samples of ``sum_k (p_k - onehot_k)^2`` (range 0..2).
    * ``kappa``: quadratic-weighted Cohen's kappa (sklearn, ``labels=range(K)``). Where it is
      undefined (sklearn gives nan: zero expected disagreement, e.g. all labels and all
      predictions are the same single class) this returns ``0.0`` instead.
    * ``macro_f1``: sklearn macro F1 over ``labels=range(K)`` with ``zero_division=0``
      (classes absent from both labels and predictions count as F1 = 0).
    * ``n``: number of samples.
    * ``confusion``: K x K list of lists of ints, rows = true class, columns = predicted.
    * ``reliability``: list of ``n_bins`` dicts ``{lo, hi, count, acc, conf}``, see
      :func:`reliability_bins`.
    """
    probs, labels = _check_inputs(probs, labels)
    n, k = probs.shape

    preds = probs.argmax(axis=1)
    confidences = probs.max(axis=1)
    correct = preds == labels

    acc = float(correct.mean())
    conf = float(confidences[correct].mean()) if correct.any() else math.nan
    err = float(confidences[~correct].mean()) if (~correct).any() else math.nan

    reliability = reliability_bins(confidences, correct, n_bins)
    ece = expected_calibration_error(reliability)

    p_true = probs[np.arange(n), labels]
    nll = float(-np.log(np.clip(p_true, _NLL_EPS, None)).mean())

    onehot = np.zeros_like(probs)
    onehot[np.arange(n), labels] = 1.0
    brier = float(((probs - onehot) ** 2).sum(axis=1).mean())

    kappa, macro_f1, confusion = _agreement(labels, preds, k)
    return {
        "acc": acc,
        "conf": conf,
        "err": err,
        "ece": ece,
        "nll": nll,
        "brier": brier,
        "kappa": kappa,
        "macro_f1": macro_f1,
        "n": int(n),
        "confusion": confusion,
        "reliability": reliability,
    }


def _agreement(labels: np.ndarray, preds: np.ndarray, k: int) -> tuple[float, float, list[list[int]]]:
    """Kappa, macro F1 and the confusion matrix over the K classes (sklearn, warnings silenced:
    small splits routinely miss a class, which the definitions in classification_metrics cover)."""
    class_ids = list(range(k))
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        try:
            kappa = float(cohen_kappa_score(labels, preds, labels=class_ids, weights="quadratic"))
        except (ValueError, ZeroDivisionError):
            kappa = math.nan
    if not math.isfinite(kappa):
        kappa = 0.0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        macro_f1 = float(f1_score(labels, preds, labels=class_ids, average="macro", zero_division=0))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on a single label even with labels=
        confusion = confusion_matrix(labels, preds, labels=class_ids).astype(int).tolist()
    return kappa, macro_f1, confusion


def soft_label_stats(probs: np.ndarray) -> dict:
    """Mean max and mean variance of soft labels (paper Table V).

    ``max_mean`` = mean over samples of ``max_k p_k``; ``var`` = mean over samples of the
    (population) variance of the probability vector across classes, ``np.var(p, axis=1).mean()``.
    E.g. the 4-class label [0.75, 0.1, 0.1, 0.05] has max 0.75 and var 0.08375, the order of
    the paper's T=1 row (max 0.7478, var 0.0960).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"probs must be a non-empty 2-D (N, K) array, got shape {probs.shape}")
    return {
        "max_mean": float(probs.max(axis=1).mean()),
        "var": float(np.var(probs, axis=1).mean()),
        "n": int(probs.shape[0]),
    }


def scalar_metrics(m: dict, drop_nan: bool = False) -> dict[str, float]:
    """The scalar entries of a :func:`classification_metrics` dict, as floats, for logging.

    Keys: ``SCALAR_KEYS`` (acc, conf, err, ece, nll, brier, kappa, macro_f1), those present in
    ``m``. Undefined values (NaN, or None after :func:`to_jsonable`) come back as
    ``float('nan')``, or are left out when ``drop_nan`` is true.
    """
    out: dict[str, float] = {}
    for key in SCALAR_KEYS:
        if key not in m:
            continue
        v = m[key]
        v = math.nan if v is None else float(v)
        if drop_nan and not math.isfinite(v):
            continue
        out[key] = v
    return out


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays, tuples and NaN/inf into strict-JSON values.

    numpy arrays become (nested) lists, numpy scalars Python scalars, tuples lists, and any
    non-finite float (NaN, +-inf) ``None``. Dict keys that are numpy scalars become Python
    scalars too.
    """
    if isinstance(obj, dict):
        return {(k.item() if isinstance(k, np.generic) else k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj
