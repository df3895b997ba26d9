"""Deterministic subsets of a training split: per-class caps and per-task sample counts.

Subsets are nested: a smaller count keeps a subset of the images a larger count keeps, so the
data-ratio curve varies one thing only. Within a task they keep the grade proportions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sall.data.manifest import missing_grades
from sall.errors import DataError


def _stratified_order(grades: np.ndarray, seed: int) -> np.ndarray:
    """An order of positions that interleaves the grades by their relative rank."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(grades))
    rel = np.empty(len(grades), dtype=np.float64)
    for g in np.unique(grades):
        pos = perm[grades[perm] == g]  # positions of grade g in permuted order
        rel[pos] = (np.arange(len(pos)) + 0.5) / len(pos)
    return np.lexsort((perm.argsort(), rel))


def cap_per_class(manifest: pd.DataFrame, idx: np.ndarray, cap: int | None, seed: int = 0) -> np.ndarray:
    """Keep at most `cap` images of each (task, grade) among `idx`."""
    if cap is None:
        return idx
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    sub = manifest.iloc[idx]
    for (_task, _grade), rows in sub.groupby(["task", "grade"]).indices.items():
        chosen = idx[rows]
        if len(chosen) > cap:
            chosen = np.sort(rng.permutation(chosen)[:cap])
        keep.append(chosen)
    return np.sort(np.concatenate(keep)) if keep else idx[:0]


def cap_per_task(manifest: pd.DataFrame, idx: np.ndarray, cap: int | None, seed: int = 0) -> np.ndarray:
    """Keep at most `cap` images of each task among `idx`: a stratified, nested subset (the same
    rule as the data-ratio study), so a smaller cap keeps a subset of what a larger one keeps."""
    if cap is None:
        return idx
    tasks, counts = np.unique(manifest["task"].to_numpy()[idx], return_counts=True)
    return take_per_task(manifest, idx, {t: min(cap, int(n)) for t, n in zip(tasks, counts)}, "", seed)


def resolve_count(value: float, available: int, task: str, where: str) -> int:
    """A count (> 1) or a fraction (0, 1] of the available images, as an int."""
    if value <= 0:
        raise DataError(
            f"sample count {value:g} for task {task} is invalid; expected a count >= 1 or a fraction in (0, 1]"
        )
    n = int(round(value * available)) if value <= 1.0 else int(value)
    if value > 1.0 and value != int(value):
        raise DataError(
            f"sample count {value:g} for task {task} is invalid; expected an integer count or a fraction in (0, 1]"
        )
    if n > available:
        raise DataError(
            f"sample count {n} for task {task} exceeds the {available} training images "
            f"of {where}; expected at most {available} (or a fraction)"
        )
    return max(n, 1)


def take_per_task(
    manifest: pd.DataFrame, idx: np.ndarray, counts: dict[str, float], where: str, seed: int = 0
) -> np.ndarray:
    """Keep a stratified, nested subset of each task's training images (data-ratio study)."""
    if not counts:
        return idx
    tasks = manifest["task"].to_numpy()[idx]
    grades = manifest["grade"].to_numpy()[idx]
    keep: list[np.ndarray] = []
    for task in np.unique(tasks):
        mine = np.flatnonzero(tasks == task)
        if task in counts:
            n = resolve_count(counts[task], len(mine), task, where)
            order = _stratified_order(grades[mine], seed)
            mine = np.sort(mine[order[:n]])
        keep.append(idx[mine])
    return np.sort(np.concatenate(keep))


def check_nonempty(manifest: pd.DataFrame, idx: np.ndarray, tasks: tuple[str, ...], where: str) -> None:
    """Every grade of every task needs at least one training image."""
    sub = manifest.iloc[idx]
    for task in tasks:
        empty = missing_grades(sub, task)
        if empty:
            raise DataError(
                f"{where}: task {task} has no training image of grade(s) "
                f"{', '.join(map(str, empty))}; expected every grade to keep at least one "
                "image (more data, a larger --class-cap, or a larger sample count)"
            )
