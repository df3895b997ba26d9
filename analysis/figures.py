"""Draw the paper's figures for a sweep, from its MLflow runs.

    python analysis/figures.py --experiment sall-temperature --out DIR [--mlflow-uri URI]

Writes the PNGs that apply to the experiment to DIR and logs them to its latest sweep (parent) run:
  fig5_temperature.png   acc / confidence / error against T, mean +- std over folds, the baseline
                         as a horizontal line with its +- std band       (temperature sweep)
  fig_data_ratio.png     accuracy against the share of the reduced task, both directions
                                                                           (data_ratio sweep)
  fig_settings.png       accuracy per setting, mean +- std over folds      (other sweeps)
  fig_search_trace.png   a temperature search's candidates: T against validation accuracy, those ASHA
                         stopped marked, over the grid's curve on the same fold when the store holds
                         both (search sweep, and the temperature sweep when a search exists)
  fig6_confusion.png     confusion matrices, baseline vs SALL, summed over folds
  fig7_reliability.png   reliability diagrams, baseline vs SALL, bins pooled over folds
  fig8_gradcam.png       Grad-CAM of test images through each head of the stored SALL student

"SALL" is the best setting by mean accuracy over tasks (or the one at --temperature); the
baseline is the single-task setting (T = 1, no soft labels, no multi-task). Grad-CAM downloads
the student's `model/` artifact and needs the trial's images (the cache dir, and the dataset at
the path the trial used); it is skipped with a warning where they cannot be had.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analysis import common as cm
from sall.config import TrialConfig
from sall.errors import SallError
from sall.tasks import TASKS
from tracking import schema as sc

COLORS = {"dr": "#1f77b4", "amd": "#d62728", "arter": "#2ca02c"}
METRICS = (("acc", "accuracy"), ("conf", "confidence (correct)"), ("err", "error (confidence, wrong)"))
DPI = 130


def _figure(**kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    fig.clear()
    cm.log(f"[figures] wrote {path}")
    return path


def short(task: str, grade: int) -> str:
    """A grade's name without its parenthesis: 'NPDR-II (moderate)' -> 'NPDR-II'."""
    return TASKS[task].grades[grade].split(" (")[0]


def _stat(s: cm.Setting, metric: str) -> tuple[float, float, int]:
    v = list(s.values(metric).values())
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def _is_sall(s: cm.Setting) -> bool:
    """Soft labels and multi-task: a SALL setting (whatever its T)."""
    return s.config.sa_labels and s.config.multitask


def pick(sets: list[cm.Setting], temperature: float | None) -> tuple[cm.Setting | None, cm.Setting | None]:
    """(baseline, SALL): SALL = the soft-label multi-task setting with the best mean accuracy, or
    the one at `temperature`; with several such settings (e.g. task count) the one with most tasks."""
    done = [s for s in sets if s.finished]
    base = next((s for s in done if s.config.is_baseline and not s.config.sample_counts), None)
    sall = [s for s in done if _is_sall(s)]
    if temperature is not None:
        sall = [s for s in sall if abs(s.config.temperature - temperature) < 1e-9]
        if not sall:
            raise SallError(
                f"--temperature {temperature:g}: no finished SALL setting at that T; have "
                + ", ".join(sorted({f"{s.config.temperature:g}" for s in done if s.config.sa_labels}))
            )
    if base is not None:  # compare like with like: the baseline's cap and tasks where possible
        same = [s for s in sall if s.config.class_cap == base.config.class_cap]
        sall = same or sall
    best = max(sall, key=lambda s: (cm.score(s), len(s.config.tasks)), default=None)
    return base, best


# ---------------------------------------------------------------------------------------------
def fig_temperature(sets: list[cm.Setting], out: Path) -> Path | None:
    """Paper Fig. 5: acc / conf / err against T."""
    sall = sorted((s for s in sets if _is_sall(s) and s.finished), key=lambda s: s.config.temperature)
    if not sall:
        return None
    base = next((s for s in sets if s.config.is_baseline and s.finished), None)
    tasks = cm.tasks(sets)
    ts = [s.config.temperature for s in sall]
    fig = _figure(figsize=(5.0 * len(METRICS), 4.2))
    axes = fig.subplots(1, len(METRICS))
    for ax, (m, name) in zip(axes, METRICS):
        for t in tasks:
            st = [_stat(s, sc.metric(sc.TEST, t, m)) for s in sall]
            y = np.array([100 * a for a, _, _ in st])
            e = np.array([100 * b for _, b, _ in st])
            ax.errorbar(ts, y, yerr=e, marker="o", capsize=3, color=COLORS.get(t), label=f"{t.upper()} SALL")
            if base is not None:
                bm, bs, _ = _stat(base, sc.metric(sc.TEST, t, m))
                if not math.isnan(bm):
                    ax.axhline(100 * bm, color=COLORS.get(t), ls="--", lw=1.2, label=f"{t.upper()} baseline")
                    ax.axhspan(100 * (bm - bs), 100 * (bm + bs), color=COLORS.get(t), alpha=0.08)
        if len(ts) > 1 and max(ts) / min(ts) > 8:
            ax.set_xscale("log")
        ax.set_xticks(ts)
        ax.set_xticklabels([f"{t:g}" for t in ts])
        ax.minorticks_off()
        ax.set_xlabel("temperature T")
        ax.set_ylabel(f"{name} (%)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    n = max(len(s.finished) for s in sall)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"SALL against temperature (mean ± std over up to {n} folds; dashed: baseline ± std)")
    fig.tight_layout()
    return _save(fig, out / "fig5_temperature.png")


def fig_ratio(sets: list[cm.Setting], out: Path) -> Path | None:
    """Accuracy against the share of the reduced task's training images, both directions."""
    tasks = cm.tasks(sets)
    if len(tasks) < 2:
        return None
    full = next((s for s in sets if not s.config.sample_counts and s.finished), None)
    fig = _figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, reduced in zip(axes, tasks[:2]):
        pts = [
            (s.config.sample_count(reduced), s)
            for s in sets
            if dict(s.config.sample_counts).keys() == {reduced} and s.finished and s.config.sample_count(reduced) <= 1
        ]
        if full is not None:
            pts.append((1.0, full))
        pts.sort(key=lambda p: p[0])
        if not pts:
            continue
        x = [100 * f for f, _ in pts]
        for t in tasks:
            st = [_stat(s, sc.metric(sc.TEST, t, "acc")) for _, s in pts]
            ls = "-" if t != reduced else ":"
            ax.errorbar(
                x,
                [100 * a for a, _, _ in st],
                yerr=[100 * b for _, b, _ in st],
                marker="o",
                capsize=3,
                ls=ls,
                color=COLORS.get(t),
                label=f"{t.upper()} acc" + (" (reduced task)" if t == reduced else ""),
            )
        ax.set_xscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:.3g}" for v in x], rotation=30)
        ax.minorticks_off()
        ax.set_xlabel(f"{reduced.upper()} training images used (%)")
        ax.set_title(f"fewer {reduced.upper()} images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test accuracy (%)")
    fig.suptitle("Data ratio (paper Table VI): mean ± std over folds")
    fig.tight_layout()
    return _save(fig, out / "fig_data_ratio.png")


def fig_settings(sets: list[cm.Setting], out: Path) -> Path | None:
    """Accuracy per setting (bars, mean +- std over folds), for the sweeps without a curve."""
    sets = [s for s in sets if s.finished]
    if not sets:
        return None
    tasks = cm.tasks(sets)
    sets = sorted(sets, key=lambda s: (not s.config.is_baseline, s.config.class_cap or 0, s.label))
    w = 0.8 / len(tasks)
    fig = _figure(figsize=(max(6.0, 1.3 * len(sets) + 2), 4.5))
    ax = fig.subplots()
    for i, t in enumerate(tasks):
        st = [_stat(s, sc.metric(sc.TEST, t, "acc")) for s in sets]
        x = np.arange(len(sets)) + (i - (len(tasks) - 1) / 2) * w
        ax.bar(
            x,
            [100 * a if n else 0 for a, _, n in st],
            w,
            yerr=[100 * b for _, b, _ in st],
            capsize=3,
            color=COLORS.get(t),
            label=t.upper(),
        )
    ax.set_xticks(np.arange(len(sets)))
    ax.set_xticklabels(
        [f"{s.label}\n({len(s.finished)} folds)" for s in sets], fontsize=8, rotation=20 if len(sets) > 5 else 0
    )
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy per setting (mean ± std over folds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, out / "fig_settings.png")


# ---------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """One candidate of a temperature search (sweeps/search.py), as its run recorded it."""

    temperature: float
    score: float  # the search's objective at its final epoch (validation accuracy)
    epoch: int
    stopped: bool
    fold: int
    metric: str


def search_candidates(uri: str, experiment: str) -> list[Candidate]:
    """The booked candidates of the searches in `experiment`; none when it does not exist."""
    exp = cm.tr.retry(cm.client(uri).get_experiment_by_name, experiment)
    if exp is None:
        return []
    runs = cm.tr.find_runs(uri, exp.experiment_id, f"tags.`{sc.TAG_STAGE}` = '{sc.STAGE_CANDIDATE}'", max_results=50000)
    return [
        Candidate(
            TrialConfig.from_params(r.data.params).temperature,
            r.data.metrics[sc.SEARCH_SCORE],
            int(r.data.tags.get(sc.TAG_FINAL_EPOCH, "0")),
            r.data.tags.get(sc.TAG_STOPPED) == "1",
            int(r.data.tags.get(sc.TAG_FOLD, "0")),
            r.data.tags.get(sc.TAG_SEARCH_METRIC, "mean"),
        )
        for r in runs
        if sc.SEARCH_SCORE in r.data.metrics and "temperature" in r.data.params
    ]


def grid_settings(uri: str, experiment: str) -> list[cm.Setting]:
    """The settings of a grid experiment (e.g. sall-temperature); none when it does not exist."""
    exp = cm.tr.retry(cm.client(uri).get_experiment_by_name, experiment)
    return cm.settings(cm.student_runs(uri, exp.experiment_id)) if exp is not None else []


def _grid_curve(sets: list[cm.Setting], fold: int, metric: str) -> tuple[list[float], list[float]]:
    """(T, validation objective on `fold`) of the grid's SALL settings: the same number a candidate
    reports at its last epoch (the kept weights are the last epoch's)."""
    pts = []
    for s in sets:
        run = next((r for (f, _), r in s.finished.items() if f == fold), None)
        if run is None or not _is_sall(s):
            continue
        names = [sc.metric(sc.VAL_BEST, t, "acc") for t in (s.config.tasks if metric == "mean" else (metric,))]
        if all(n in run.metrics for n in names):
            pts.append((s.config.temperature, sum(run.metrics[n] for n in names) / len(names)))
    pts.sort()
    return [t for t, _ in pts], [v for _, v in pts]


def fig_search(cands: list[Candidate], grid: list[cm.Setting], confirmed: list[float], out: Path) -> Path | None:
    """The search trace: each candidate's T against the validation accuracy it reached (crosses:
    stopped early by ASHA, with the epoch), over the grid's curve on the same fold when the store
    holds one; dotted lines at the temperatures confirmed on every fold."""
    if not cands:
        return None
    fold, metric = cands[0].fold, cands[0].metric
    fig = _figure(figsize=(7.5, 4.6))
    ax = fig.subplots()
    gx, gy = _grid_curve(grid, fold, metric)
    if gx:
        ax.plot(gx, [100 * v for v in gy], "-o", color="gray", lw=1.2, ms=4, label=f"grid, fold {fold} (all epochs)")
    done = [c for c in cands if not c.stopped]
    stopped = [c for c in cands if c.stopped]
    ax.scatter(
        [c.temperature for c in done],
        [100 * c.score for c in done],
        s=40,
        color="#1f77b4",
        zorder=3,
        label=f"candidate, all {max((c.epoch for c in done), default=0)} epochs",
    )
    ax.scatter(
        [c.temperature for c in stopped],
        [100 * c.score for c in stopped],
        s=40,
        marker="x",
        color="#d62728",
        zorder=3,
        label="candidate stopped early (at epoch n)",
    )
    for c in stopped:
        ax.annotate(
            f"{c.epoch}",
            (c.temperature, 100 * c.score),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
            color="#d62728",
        )
    for i, t in enumerate(sorted(confirmed)):
        ax.axvline(t, color="#2ca02c", ls=":", lw=1.2, label="confirmed on every fold" if i == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("temperature T (log scale)")
    what = "mean over tasks" if metric == "mean" else metric.upper()
    ax.set_ylabel(f"validation accuracy, {what} (%)")
    ax.set_title(f"Temperature search on fold {fold}: {len(cands)} candidates, {len(stopped)} stopped early")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, out / "fig_search_trace.png")


def search_trace(
    uri: str, args: argparse.Namespace, sets: list[cm.Setting], sweep: str | None, out: Path
) -> Path | None:
    """The trace for a search experiment (over the --grid-experiment's curve) or for a grid
    experiment (with the --search-experiment's candidates), when the store holds a search."""
    if sweep == "search":
        confirmed = sorted({s.config.temperature for s in sets if _is_sall(s)})
        return fig_search(
            search_candidates(uri, args.experiment), grid_settings(uri, args.grid_experiment), confirmed, out
        )
    if sweep == "temperature":
        return fig_search(search_candidates(uri, args.search_experiment), sets, [], out)
    return None


# ---------------------------------------------------------------------------------------------
def _test_metrics(uri: str, s: cm.Setting, cache: Path) -> list[dict]:
    out = []
    for r in s.finished.values():
        m = cm.run_metrics_json(uri, r, cache)
        if m is not None:
            out.append(m["test"])
    return out


def fig_confusion(uri: str, pair: list[tuple[str, cm.Setting]], tasks: list[str], out: Path, cache: Path) -> Path:
    """Paper Fig. 6: confusion matrices of the baseline and SALL, summed over folds."""
    mets = {name: _test_metrics(uri, s, cache) for name, s in pair}
    fig = _figure(figsize=(5.2 * len(pair), 4.6 * len(tasks)))
    axes = np.atleast_2d(fig.subplots(len(tasks), len(pair)))
    if len(pair) == 1:
        axes = axes.reshape(len(tasks), 1)
    for i, t in enumerate(tasks):
        k = TASKS[t].num_classes
        for j, (name, s) in enumerate(pair):
            ax = axes[i, j]
            cmx = np.zeros((k, k), dtype=int)
            n = 0
            for m in mets[name]:
                if t in m:
                    cmx += np.asarray(m[t]["confusion"], dtype=int)
                    n += 1
            rows = cmx.sum(1, keepdims=True)
            norm = np.where(rows > 0, cmx / np.maximum(rows, 1), 0.0)
            ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
            for a in range(k):
                for b in range(k):
                    ax.text(
                        b,
                        a,
                        f"{cmx[a, b]}\n{100 * norm[a, b]:.0f}%",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if norm[a, b] > 0.55 else "black",
                    )
            ax.set_xticks(range(k))
            ax.set_yticks(range(k))
            ax.set_xticklabels([str(g) for g in range(k)])
            ax.set_yticklabels([f"{g} {short(t, g)}" for g in range(k)], fontsize=8)
            ax.set_xlabel("predicted grade")
            ax.set_ylabel("true grade")
            acc = np.trace(cmx) / max(cmx.sum(), 1)
            ax.set_title(
                f"{t.upper()} · {name}: {s.label}\n(sum of {n} folds, {cmx.sum()} images, acc {100 * acc:.1f}%)",
                fontsize=9,
            )
    fig.suptitle("Confusion matrices (rows: true grade; colour: row fraction)")
    fig.tight_layout()
    return _save(fig, out / "fig6_confusion.png")


def pooled_bins(per_fold: list[list[dict]]) -> list[dict]:
    """Reliability bins pooled over folds: counts add, acc and conf are count-weighted means."""
    out = []
    for bins in zip(*per_fold):
        n = sum(b["count"] for b in bins)
        acc = sum(b["acc"] * b["count"] for b in bins if b["count"]) / n if n else None
        conf = sum(b["conf"] * b["count"] for b in bins if b["count"]) / n if n else None
        out.append(dict(lo=bins[0]["lo"], hi=bins[0]["hi"], count=n, acc=acc, conf=conf))
    return out


def fig_reliability(uri: str, pair: list[tuple[str, cm.Setting]], tasks: list[str], out: Path, cache: Path) -> Path:
    """Paper Fig. 7: reliability diagrams of the baseline and SALL, bins pooled over folds."""
    from matplotlib.patches import Patch

    from sall.metrics import expected_calibration_error  # the one ECE formula, on the pooled bins

    mets = {name: _test_metrics(uri, s, cache) for name, s in pair}
    fig = _figure(figsize=(4.8 * len(pair), 5.4 * len(tasks)))
    grid = fig.add_gridspec(2 * len(tasks), len(pair), height_ratios=[3, 1] * len(tasks))
    for i, t in enumerate(tasks):
        for j, (name, s) in enumerate(pair):
            per_fold = [m[t]["reliability"] for m in mets[name] if t in m]
            ax = fig.add_subplot(grid[2 * i, j])
            axh = fig.add_subplot(grid[2 * i + 1, j], sharex=ax)
            if not per_fold:
                ax.set_title(f"{t.upper()} · {name}: no metrics")
                continue
            bins = pooled_bins(per_fold)
            n = sum(b["count"] for b in bins)
            full = [b for b in bins if b["count"]]
            ece = expected_calibration_error(bins)  # nan without samples
            lo = [b["lo"] for b in full]
            wd = [b["hi"] - b["lo"] for b in full]
            ax.bar(
                lo,
                [b["acc"] for b in full],
                wd,
                align="edge",
                color="#1f77b4",
                edgecolor="black",
                lw=0.6,
                label="outputs (accuracy)",
            )
            ax.bar(
                lo,
                [abs(b["conf"] - b["acc"]) for b in full],
                wd,
                bottom=[min(b["acc"], b["conf"]) for b in full],
                align="edge",
                color="red",
                alpha=0.3,
                edgecolor="red",
                hatch="//",
                lw=0.6,
                label="gap",
            )
            ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_ylabel("accuracy")
            ax.set_title(f"{t.upper()} · {name}: {s.label} ({len(per_fold)} folds, {n} images)", fontsize=9)
            h, lab = ax.get_legend_handles_labels()
            ax.legend(h + [Patch(color="none")], lab + [f"ECE = {100 * ece:.2f}%"], loc="upper left", fontsize=7)
            ax.grid(alpha=0.3)
            axh.bar(
                [b["lo"] for b in bins],
                [b["count"] for b in bins],
                [b["hi"] - b["lo"] for b in bins],
                align="edge",
                color="gray",
                edgecolor="black",
                lw=0.5,
            )
            axh.set_xlabel("confidence")
            axh.set_ylabel("count")
            axh.grid(alpha=0.3)
    fig.suptitle("Reliability diagrams (bins pooled over folds)")
    fig.tight_layout()
    return _save(fig, out / "fig7_reliability.png")


# ---------------------------------------------------------------------------------------------
def target_layer(model, image_size: int, name: str | None = None):
    """The Grad-CAM layer: --target-layer, else the deepest backbone stage whose feature map is at
    least 4 x 4 at this image size (the last stage of a small input is 1 x 1: no map to show)."""
    bb = model.backbone
    if name:
        try:
            return name, model.get_submodule(name)
        except AttributeError:
            raise SallError(f"--target-layer '{name}' is not a module of the student model") from None
    info = list(getattr(bb, "feature_info", []))
    if not info:
        convs = [n for n, m in bb.named_modules() if type(m).__name__ == "Conv2d"]
        if not convs:
            raise SallError("no conv layer in the backbone for Grad-CAM; pass --target-layer")
        return f"backbone.{convs[-1]}", bb.get_submodule(convs[-1])
    ok = [f for f in info if image_size / f["reduction"] >= 4] or info[:1]
    mod = ok[-1]["module"]
    return f"backbone.{mod}", bb.get_submodule(mod)


def make_head(model, task: str, temperature: float):
    """A torch module returning one head's tempered logits, as Grad-CAM wants. (Defined here so
    that torch is imported only when Grad-CAM runs.)"""
    import torch

    class _Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)[task] / temperature

    return _Head()


def fig_gradcam(
    uri: str, s: cm.Setting, out: Path, cache: Path, cache_dir: str, per_task: int, layer_name: str | None
) -> Path | None:
    """Paper Fig. 8: test images of each task and the Grad-CAM of every head on them."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from sall.chain import load_student, prepare
    from sall.data.loader import Batches
    from sall.store import ArtifactStore

    run = s.finished[min(s.finished)]
    cfg, models = load_student(cm.student_file(uri, run.run_id, cache / run.run_id))
    data = prepare(cfg, ArtifactStore(cache_dir))
    heads = list(cfg.tasks)
    picks = []  # (task, row, grade)
    for t in heads:
        rows = data.rows("test", t)
        grades = data.labels(rows)
        order = sorted(set(grades.tolist()), reverse=True)[:per_task]  # the most severe grades first
        picks += [(t, int(rows[grades == g][0]), int(g)) for g in order]
    ncol = 1 + len(heads)
    fig = _figure(figsize=(2.6 * ncol, 2.8 * len(picks)))
    axes = np.atleast_2d(fig.subplots(len(picks), ncol))
    used = {}
    for i, (t, row, g) in enumerate(picks):
        x, _ = next(
            iter(Batches(data.images, np.array([row]), 1, shuffle=False, augment=False, device=torch.device("cpu")))
        )
        img = np.asarray(data.images[row], dtype=np.float32) / 255.0
        axes[i, 0].imshow(img, interpolation="bilinear")
        axes[i, 0].set_title(f"{t.upper()} test image\ntrue: {g} {short(t, g)}", fontsize=8)
        for j, h in enumerate(heads, 1):
            model = models[h].eval()
            lname, layer = target_layer(model, cfg.image_size, layer_name)
            used[h] = lname
            head = make_head(model, h, cfg.temperature)
            with torch.no_grad():
                p = torch.softmax(head(x), 1)[0]
            pred = int(p.argmax())
            with GradCAM(model=head, target_layers=[layer]) as cam:
                heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(pred)])[0]
            axes[i, j].imshow(show_cam_on_image(img, heat, use_rgb=True), interpolation="bilinear")
            own = "own task" if h == t else "other task"
            axes[i, j].set_title(
                f"→ {h.upper()} head ({own})\npred {pred} {short(h, pred)} p={float(p[pred]):.2f}", fontsize=8
            )
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    layers = ", ".join(sorted(set(used.values())))
    fig.suptitle(
        f"Grad-CAM of {s.label} (fold {run.fold}, {cfg.image_size}px, layer {layers}):\n"
        "each test image through every head",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, out / "fig8_gradcam.png")


# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python analysis/figures.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cm.add_common_args(p)
    # fmt: off
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--temperature", type=float, default=None, help="SALL setting of Figs. 6-8 at this T (default: the best mean accuracy)")
    p.add_argument("--parent", default=None, help="only the trials of this sweep (parent) run")
    p.add_argument("--cache-dir", default=".sall-cache", help="the sweep's cache dir (images for Grad-CAM)")
    p.add_argument("--gradcam-per-task", type=int, default=2, help="Grad-CAM test images per task (0: none)")
    p.add_argument("--target-layer", default=None, help="Grad-CAM layer, e.g. backbone.layer4 (default: the deepest stage with a >= 4x4 map)")
    p.add_argument("--no-log", action="store_true", help="do not log the figures to the parent run")
    p.add_argument(
        "--grid-experiment",
        default="sall-temperature",
        help="for a search: the grid whose validation curve its trace is drawn over, if in the store",
    )
    p.add_argument(
        "--search-experiment",
        default="sall-search",
        help="for the temperature grid: the search whose trace is drawn over it, if in the store",
    )
    # fmt: on
    return p


def draw(
    uri: str, sets: list[cm.Setting], sweep: str | None, out: Path, cache: Path, temperature: float | None = None
) -> tuple[list[Path], cm.Setting | None, cm.Setting | None]:
    """The sweep's own figure, then the confusion and reliability figures of the baseline beside the
    best (or --temperature) setting: everything but Grad-CAM, which needs the students and images.
    Returns (written PNGs, baseline, SALL setting). Shared with sweeps/review.py."""
    tasks = cm.tasks(sets)
    sweep_fig = {"temperature": fig_temperature, "search": fig_temperature, "data_ratio": fig_ratio}.get(
        sweep or "", fig_settings
    )
    written: list[Path | None] = [sweep_fig(sets, out)]
    base, best = pick(sets, temperature)
    pair = [(n, s) for n, s in (("baseline", base), ("SALL", best)) if s is not None]
    if pair:
        both = [t for t in tasks if all(t in s.config.tasks for _, s in pair)]
        written.append(fig_confusion(uri, pair, both, out, cache))
        written.append(fig_reliability(uri, pair, both, out, cache))
    return [p for p in written if p is not None], base, best


def run(args: argparse.Namespace) -> int:
    uri = cm.open_store(args.mlflow_uri)
    exp_id, sets, sweep = cm.load_sweep(uri, args.experiment, args.parent)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        written, base, best = draw(uri, sets, sweep, out, Path(tmp), args.temperature)
        written += [p for p in [search_trace(uri, args, sets, sweep, out)] if p is not None]
        target = best or base
        if target is not None and args.gradcam_per_task > 0:
            try:
                written.append(
                    fig_gradcam(uri, target, out, Path(tmp), args.cache_dir, args.gradcam_per_task, args.target_layer)
                )
            except SallError as e:
                cm.log(f"[figures] Grad-CAM skipped: {e}")
    (out / "figures.json").write_text(
        json.dumps(
            {
                "experiment": args.experiment,
                "sweep": sweep,
                "baseline": base.label if base else None,
                "sall": best.label if best else None,
                "figures": [p.name for p in written],
            },
            indent=2,
        )
    )
    print("\n".join(str(p) for p in written))
    if written:
        cm.log_to_sweep_run(args, uri, exp_id, out, sc.ANALYSIS_FIGURES, f"{len(written)} figures")
    return 0


def main(argv=None) -> int:
    return cm.main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
