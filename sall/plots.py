"""Figures and CSVs for the metrics of :mod:`sall.metrics`: confusion matrix and reliability diagram.

matplotlib is imported lazily and figures are drawn on the Agg canvas directly (no pyplot, no
global backend switch), so this module is safe in Ray workers, threads and headless machines. Every plot function saves a PNG
(120 dpi), closes its figure and returns the path it wrote.
"""

from __future__ import annotations

import csv
import os

from sall.metrics import expected_calibration_error

__all__ = ["confusion_csv", "plot_confusion", "plot_reliability", "reliability_csv"]

_DPI = 120


def _new_figure(**kwargs):
    """A figure bound to the Agg canvas, without pyplot: no global state, no backend switch,
    safe in threads and Ray workers, nothing to leak when it goes out of scope."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _ensure_dir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def _save(fig, path: str) -> None:
    fig.tight_layout()
    _ensure_dir(path)
    fig.savefig(path, dpi=_DPI)


def plot_confusion(
    confusion: list[list[int]],
    class_names: list[str],
    title: str,
    path: str,
    normalize: bool = True,
) -> str:
    """Confusion-matrix heatmap (rows = true grade, columns = predicted grade).

    Each cell shows its count and, with ``normalize``, the row-normalised percentage; the
    colour is the row-normalised value (or the raw count without ``normalize``).
    """
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    k = cm.shape[0]
    if cm.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"confusion must be K x K with K=len(class_names)={len(class_names)}, got {cm.shape}")
    row_sums = cm.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(row_sums > 0, cm / np.where(row_sums > 0, row_sums, 1), 0.0)
    values = norm if normalize else cm
    vmax = 1.0 if normalize else max(cm.max(), 1.0)

    size = max(4.0, 0.9 * k + 2.5)
    fig = _new_figure(figsize=(size + 1.0, size))
    ax = fig.subplots()
    try:
        im = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
        cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cbar.set_label("row fraction" if normalize else "count")
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(
            class_names,
            rotation=45 if max(map(len, class_names), default=0) > 4 else 0,
            ha="right" if max(map(len, class_names), default=0) > 4 else "center",
        )
        ax.set_yticklabels(class_names)
        ax.set_xlabel("predicted grade")
        ax.set_ylabel("true grade")
        ax.set_title(title)
        fontsize = 10 if k <= 6 else 8
        for i in range(k):
            for j in range(k):
                text = f"{int(cm[i, j])}"
                if normalize:
                    text += f"\n{100.0 * norm[i, j]:.1f}%"
                colour = "white" if values[i, j] > 0.55 * vmax else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)
        _save(fig, path)
    finally:
        fig.clear()
    return path


def plot_reliability(reliability: list[dict], title: str, path: str) -> str:
    """Reliability diagram (Guo et al. 2017; paper Fig. 7).

    Top: per-bin accuracy bars ("outputs"), the gap between accuracy and mean confidence of
    each bin shaded red ("gap"), the dashed diagonal of perfect calibration, ECE in the legend.
    Bottom: histogram of the sample count per confidence bin.
    """
    los = [float(b["lo"]) for b in reliability]
    his = [float(b["hi"]) for b in reliability]
    widths = [hi - lo for lo, hi in zip(los, his)]
    counts = [int(b["count"]) for b in reliability]
    filled = [i for i, b in enumerate(reliability) if b["count"] and b["acc"] is not None]
    ece = expected_calibration_error(reliability)

    fig = _new_figure(figsize=(5.2, 6.0))
    ax, axh = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    try:
        ax.bar(
            [los[i] for i in filled],
            [reliability[i]["acc"] for i in filled],
            width=[widths[i] for i in filled],
            align="edge",
            color="#1f77b4",
            edgecolor="black",
            linewidth=0.8,
            label="outputs (accuracy)",
        )
        # Gap: from the bin's accuracy to its mean confidence.
        gap_bottom = [min(reliability[i]["acc"], reliability[i]["conf"]) for i in filled]
        gap_height = [abs(reliability[i]["conf"] - reliability[i]["acc"]) for i in filled]
        ax.bar(
            [los[i] for i in filled],
            gap_height,
            bottom=gap_bottom,
            width=[widths[i] for i in filled],
            align="edge",
            color="red",
            alpha=0.3,
            edgecolor="red",
            linewidth=0.8,
            hatch="//",
            label="gap",
        )
        ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1.2, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ece_txt = "n/a" if ece != ece else f"{100.0 * ece:.2f}%"
        ax.set_title(title)
        handles, labels = ax.get_legend_handles_labels()
        from matplotlib.patches import Patch

        handles.append(Patch(color="none"))
        labels.append(f"ECE = {ece_txt}")
        ax.legend(handles, labels, loc="upper left", fontsize=9)
        ax.grid(alpha=0.3)

        axh.bar(los, counts, width=widths, align="edge", color="gray", edgecolor="black", linewidth=0.6)
        axh.set_xlim(0, 1)
        axh.set_xlabel("confidence")
        axh.set_ylabel("count")
        axh.grid(alpha=0.3)
        _save(fig, path)
    finally:
        fig.clear()
    return path


def confusion_csv(confusion: list[list[int]], class_names: list[str], path: str) -> str:
    """Write the confusion matrix as CSV: header ``true\\predicted,<names...>``, one row per true class."""
    k = len(class_names)
    if len(confusion) != k or any(len(row) != k for row in confusion):
        raise ValueError(f"confusion must be {k} x {k} to match class_names")
    _ensure_dir(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true\\predicted", *class_names])
        for name, row in zip(class_names, confusion):
            w.writerow([name, *(int(v) for v in row)])
    return path


def reliability_csv(reliability: list[dict], path: str) -> str:
    """Write the reliability bins as CSV with columns lo, hi, count, acc, conf (empty for empty bins)."""
    _ensure_dir(path)
    cols = ["lo", "hi", "count", "acc", "conf"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for b in reliability:
            w.writerow(["" if b.get(c) is None else b[c] for c in cols])
    return path
