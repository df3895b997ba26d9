"""The manifest: one row per image (image, task, grade, patient, source), validated up front."""

from __future__ import annotations

import hashlib

import pandas as pd

from sall.errors import DataError
from sall.tasks import TASKS

COLUMNS: tuple[str, ...] = ("image", "task", "grade", "patient", "source")


def check_columns(columns, origin: str) -> None:
    """The label columns image, task and grade must be there (the first check of any manifest)."""
    cols = [str(c) for c in columns]
    missing = [c for c in ("image", "task", "grade") if c not in cols]
    if missing:
        raise DataError(
            f"{origin}: missing column(s) {', '.join(missing)}; expected columns image, task, grade "
            f"(patient optional), found {', '.join(cols) or 'none'}"
        )


def check_manifest(df: pd.DataFrame, origin: str) -> pd.DataFrame:
    """Check the label columns of a manifest (not the image files) and return it normalised.

    `origin` names where the rows came from (a file path or a source name) for the error message.
    """
    check_columns(df.columns, origin)
    if len(df) == 0:
        raise DataError(f"{origin}: the manifest has no rows")
    df = df.copy()
    if "patient" not in df.columns:
        df["patient"] = df["image"].astype(str)
    if "source" not in df.columns:
        df["source"] = origin
    for i, row in enumerate(df.itertuples(index=False)):
        task = str(row.task)
        if task not in TASKS:
            raise DataError(
                f"{origin}: row {i + 2} ({row.image}): unknown task '{task}'; expected one of {', '.join(TASKS)}"
            )
        n = TASKS[task].num_classes
        try:
            grade = int(str(row.grade).strip())
            if str(grade) != str(row.grade).strip() and float(row.grade) != grade:
                raise ValueError
        except (ValueError, TypeError):
            raise DataError(
                f"{origin}: row {i + 2} ({row.image}): grade '{row.grade}' is not an integer; "
                f"expected 0..{n - 1} for task {task}"
            ) from None
        if not 0 <= grade < n:
            raise DataError(
                f"{origin}: row {i + 2} ({row.image}): grade {grade} out of range for task {task}; expected 0..{n - 1}"
            )
    df["task"] = df["task"].astype(str)
    df["grade"] = df["grade"].astype(str).str.strip().astype(float).astype(int)
    df["patient"] = df["patient"].astype(str)
    df["image"] = df["image"].astype(str)
    dup = df["image"].duplicated(keep="first")
    if dup.any():
        first = df.loc[dup, "image"].iloc[0]
        rows = [str(i + 2) for i in range(len(df)) if df["image"].iat[i] == first]
        raise DataError(
            f"{origin}: image '{first}' is listed {len(rows)} times (rows {', '.join(rows)}); expected each image once"
        )
    return df[list(COLUMNS)].reset_index(drop=True)


# The folds cut the data into 4 stratified quarters (sall/data/folds.py); scikit-learn refuses (ValueError)
# when no (task, grade) has 4 images, so that is checked here, as a data error, before any split.
MIN_CLASS_FOR_FOLDS = 4


def missing_grades(df: pd.DataFrame, task: str) -> list[int]:
    """The grades of `task` that no row of `df` has."""
    counts = df.loc[df["task"] == task, "grade"].value_counts()
    return [g for g in range(TASKS[task].num_classes) if counts.get(g, 0) == 0]


def check_classes(df: pd.DataFrame, tasks: tuple[str, ...], origin: str) -> None:
    """Every grade of every requested task must have at least one image, and the data must be large
    enough to be split into folds."""
    for task in tasks:
        empty = missing_grades(df, task)
        if empty:
            raise DataError(
                f"{origin}: task {task} has no image of grade(s) {', '.join(map(str, empty))}; "
                f"expected every grade 0..{TASKS[task].num_classes - 1} to have images"
            )
    largest = int(df.groupby(["task", "grade"]).size().max()) if len(df) else 0
    if largest < MIN_CLASS_FOR_FOLDS:
        raise DataError(
            f"{origin}: {len(df)} images, at most {largest} of any task and grade, are too few "
            f"to split into folds; expected at least {MIN_CLASS_FOR_FOLDS} images of some task "
            "and grade"
        )


def fingerprint(df: pd.DataFrame) -> str:
    """A short stable hash of the manifest's rows: names the image cache and the teachers."""
    h = hashlib.sha256()
    for row in df[list(COLUMNS)].itertuples(index=False):
        h.update("\x1f".join(map(str, row)).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]
