"""Data sources -> one validated manifest (image, task, grade, patient, source) plus a summary.

`load_manifest(dataset, data_root)` accepts:
- `synthetic`: generated images (`synthetic://...` ids, rendered on demand);
- `odir`: the Kaggle ODIR-5K layout under `data_root` (`full_df.csv`, `preprocessed_images/`);
- a `.csv` manifest with columns image, task, grade (patient optional), paths relative to the CSV;
- an image folder `root/<task>/<grade>/<image>`.

Everything is checked up front (labels, then every image file decoded once) and problems are
reported as one DataError line naming the file, row or value. Nothing is printed: the summary
dict is returned and `format_summary` renders it for the command-line tools.

ODIR-5K labelling rules (per eye, from the per-eye diagnostic keywords; see `_classify_eye`):
- keywords are split on ',' and the full-width '，', lower-cased, and compared ignoring spaces
  and hyphens ("non proliferative" == "nonproliferative");
- dr: normal fundus 0, mild NPDR 1, moderate NPDR 2, severe NPDR 3, (severe) PDR 4;
  amd: drusen 1, dry AMD 2, wet AMD 3; arter: hypertensive retinopathy 1;
- an eye with graded findings of two tasks (e.g. moderate NPDR + hypertensive retinopathy) is
  dropped; an eye with "diabetic retinopathy" / "suspected diabetic retinopathy" and no DR grade
  is dropped as ungraded (whatever else it has); two grades of one task -> the highest;
- a graded finding plus an unrelated condition (cataract, epiretinal membrane, laser spot, ...)
  is kept with the finding's grade;
- "normal fundus" is grade 0 when the eye has nothing else except imaging artefacts
  ("lens dust", "low image quality"); "normal fundus" with another condition is dropped;
- eyes with only other conditions are dropped;
- patients: every patient's images go to ONE task. A patient with graded eyes of one task keeps
  their normal eyes in that task. A patient with graded eyes of two tasks (left DR, right AMD)
  keeps the task with the fewest graded images overall (the rarest, arter < amd < dr on ODIR) and
  their other eyes are dropped. Patients with only normal eyes are dealt (seeded, deterministic)
  to the requested tasks so that each task's total normal count follows its share
  max(graded_t, graded_total / (2 * n_tasks)) / sum(...);
- table rows whose image file is missing from preprocessed_images/ are skipped and counted.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pandas as pd

from sall.data.images import IMAGE_EXTENSIONS, check_images
from sall.data.manifest import COLUMNS, check_columns, check_manifest
from sall.errors import DataError
from sall.tasks import ALL_TASKS, TASKS

ODIR_HELP = "--dataset odir needs --data-root pointing at a folder with full_df.csv and preprocessed_images/"


def load_manifest(
    dataset: str,
    data_root: str | None = None,
    *,
    synthetic_n: int = 800,
    seed: int = 0,
    check_files: bool = True,
    tasks: Iterable[str] = ALL_TASKS,
    workers: int = 8,
) -> tuple[pd.DataFrame, dict]:
    """Build and validate the manifest of `dataset`; return (manifest, summary).

    The manifest has the columns of `sall.data.manifest.COLUMNS`; `image` is an absolute path or
    a synthetic id. `tasks` restricts the rows to those tasks (ODIR also splits its normal eyes
    among them only); the default keeps all three. `check_files` decodes every image file once
    (not for synthetic data). The caller still checks that each requested grade has images
    (`check_classes`). `summary` = {"dataset", "origin", "images", "patients",
    "counts": {task: {grade: n}}, "skipped": {reason: n}}.
    """
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise DataError(f"unknown task(s) {', '.join(unknown) or '(none)'}; expected some of {', '.join(TASKS)}")
    dataset = str(dataset)
    skipped: Counter = Counter()
    if dataset == "synthetic":
        from sall.data.synthetic import synthetic_manifest

        origin = "synthetic"
        df = check_manifest(synthetic_manifest(synthetic_n, seed, tasks), origin)
        names, first_row = None, None
    elif dataset == "odir":
        if not data_root:
            raise DataError(ODIR_HELP)
        origin, df, skipped = _odir(data_root, tasks, seed)
        df = check_manifest(df, origin)
        names, first_row = df["image"].map(lambda p: os.path.relpath(p, data_root)).tolist(), None
    elif dataset.lower().endswith(".csv") or os.path.isfile(dataset):
        origin, df, names = _csv(dataset)
        first_row = 2
    elif os.path.isdir(dataset):
        origin, df, skipped = _folder(dataset)
        df = check_manifest(df, origin)
        names, first_row = df["image"].map(lambda p: os.path.relpath(p, dataset)).tolist(), None
    else:
        raise DataError(
            f"unknown dataset '{dataset}'; expected synthetic, odir, a CSV manifest path or an image folder"
            + ("" if os.path.exists(dataset) else " (no such file or folder)")
        )

    if check_files and dataset != "synthetic":
        check_images(df["image"].tolist(), origin, workers=workers, names=names, first_row=first_row)

    keep = df["task"].isin(tasks)
    if not keep.all():
        skipped["task not requested"] += int((~keep).sum())
        df = df[keep].reset_index(drop=True)
    if len(df) == 0:
        raise DataError(f"{origin}: no images of task(s) {', '.join(tasks)}; expected at least one")
    return df, _summary(dataset, origin, df, skipped)


# ---------------------------------------------------------------- summary


def _summary(dataset: str, origin: str, df: pd.DataFrame, skipped: Counter) -> dict:
    counts = {
        task: {int(g): int(n) for g, n in sorted(df.loc[df["task"] == task, "grade"].value_counts().items())}
        for task in TASKS
        if (df["task"] == task).any()
    }
    return {
        "dataset": dataset,
        "origin": origin,
        "images": int(len(df)),
        "patients": int(df["patient"].nunique()),
        "counts": counts,
        "skipped": {k: int(v) for k, v in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])) if v},
    }


def format_summary(summary: dict) -> str:
    """A few human-readable lines (the command-line tools print them to stderr)."""
    lines = [f"data: {summary['origin']}: {summary['images']} images of {summary['patients']} patients"]
    for task, counts in summary["counts"].items():
        grades = TASKS[task].grades
        parts = ", ".join(f"{g} {grades[g]}: {n}" for g, n in counts.items())
        lines.append(f"  {task}: {sum(counts.values())} ({parts})")
    if summary["skipped"]:
        lines.append("  skipped: " + "; ".join(f"{k}: {n}" for k, n in summary["skipped"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- CSV manifest


def _csv(path: str) -> tuple[str, pd.DataFrame, list[str]]:
    if not os.path.exists(path):
        raise DataError(f"manifest file '{path}' does not exist; expected a CSV with columns image, task, grade")
    if os.path.isdir(path):
        raise DataError(f"manifest '{path}' is a folder; expected a CSV file with columns image, task, grade")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected a CSV with columns image, task, grade") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise DataError(
            f"{path}: not a readable CSV file ({' '.join(str(e).split())[:160]}); expected columns image, task, grade"
        ) from None
    raw.columns = [str(c).strip() for c in raw.columns]
    check_columns(raw.columns, path)  # before any column is read: a wrong header is one line, not a KeyError
    for col in ("image", "task", "grade", "patient"):
        if col in raw.columns:
            raw[col] = raw[col].str.strip()
    empty = raw["image"] == ""
    if empty.any():
        i = int(np.flatnonzero(empty.to_numpy())[0])
        raise DataError(f"{path}: row {i + 2}: empty image path; expected a file path")
    if "patient" in raw.columns:
        raw.loc[raw["patient"] == "", "patient"] = raw.loc[raw["patient"] == "", "image"]
    df = check_manifest(raw, path)  # labels, with the user's own image names in the messages
    names = df["image"].tolist()
    base = os.path.dirname(os.path.abspath(path))
    df["image"] = [os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p)) for p in names]
    dup = df["image"].duplicated(keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())
        same = [i for i in rows if df["image"].iat[i] == df["image"].iat[rows[0]]]
        raise DataError(
            f"{path}: rows {', '.join(str(i + 2) for i in same)} ({', '.join(repr(names[i]) for i in same)}) "
            "name the same image file; expected each image once"
        )
    if "source" not in raw.columns or (df["source"] == "").all():
        df["source"] = "csv"
    return path, df, names


# ---------------------------------------------------------------- image folder


def _subfolders(path: str, skipped: Counter) -> list[tuple[str, str]]:
    """(name, path) of the folders in `path`, sorted; hidden entries are ignored, and a file
    where a folder is expected is counted in `skipped`."""
    out = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith("."):
            continue
        if not os.path.isdir(full):
            skipped["file outside root/<task>/<grade>/"] += 1
            continue
        out.append((name, full))
    return out


def _grade_of(grade: str, gdir: str, task: str) -> int:
    """A grade folder's name as the grade, checked against the task's range."""
    n = TASKS[task].num_classes
    if not re.fullmatch(r"\d+", grade):
        raise DataError(f"{gdir}: grade folder '{grade}' is not an integer; expected 0..{n - 1} for task {task}")
    if int(grade) >= n:
        raise DataError(f"{gdir}: grade {int(grade)} out of range for task {task}; expected 0..{n - 1}")
    return int(grade)


def _images_below(gdir: str, skipped: Counter) -> list[str]:
    """The image files anywhere below a grade folder, in a stable order (hidden ones ignored,
    other files counted in `skipped`)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(gdir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            if os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                skipped["not an image file (extension)"] += 1
                continue
            out.append(os.path.join(dirpath, f))
    return out


def _folder(root: str) -> tuple[str, pd.DataFrame, Counter]:
    root = os.path.abspath(root)
    skipped: Counter = Counter()
    expected = "expected root/<task>/<grade>/<image> with task one of " + ", ".join(TASKS)
    rows = []
    for task, tdir in _subfolders(root, skipped):
        if task not in TASKS:
            raise DataError(f"{root}: folder '{task}' is not a task; {expected}")
        for grade, gdir in _subfolders(tdir, skipped):
            g = _grade_of(grade, gdir, task)
            for p in _images_below(gdir, skipped):
                rows.append((p, task, g, os.path.splitext(os.path.basename(p))[0], "folder"))
    if not rows:
        raise DataError(f"{root}: no image files found; {expected} and extensions {' '.join(IMAGE_EXTENSIONS)}")
    return root, pd.DataFrame(rows, columns=list(COLUMNS)), skipped


# ---------------------------------------------------------------- ODIR-5K


def _norm(keyword: str) -> str:
    return re.sub(r"[\s\-_]+", "", keyword.strip().lower())


_FINDINGS: dict[str, tuple[str, int]] = {
    _norm(k): v
    for k, v in {
        "mild nonproliferative retinopathy": ("dr", 1),
        "moderate non proliferative retinopathy": ("dr", 2),
        "severe nonproliferative retinopathy": ("dr", 3),
        "proliferative diabetic retinopathy": ("dr", 4),
        "severe proliferative diabetic retinopathy": ("dr", 4),
        "drusen": ("amd", 1),
        "dry age-related macular degeneration": ("amd", 2),
        "wet age-related macular degeneration": ("amd", 3),
        "hypertensive retinopathy": ("arter", 1),
    }.items()
}
_NORMAL = _norm("normal fundus")
_UNGRADED_DR = {_norm("diabetic retinopathy"), _norm("suspected diabetic retinopathy")}
_ARTEFACTS = {_norm("lens dust"), _norm("low image quality")}

# Eye categories (the skip reasons are the summary's keys).
_R_TWO_TASKS = "eye with findings of two tasks"
_R_UNGRADED = "ungraded diabetic retinopathy"
_R_OTHER = "other conditions only"
_R_NORMAL_OTHER = "normal fundus with another condition"
_R_STRADDLE = "patient's eyes in two tasks"
_R_MISSING = "image file missing"
_R_NO_KEYWORDS = "no diagnostic keywords"


def _classify_eye(keywords: str) -> tuple[str, int] | str:
    """(task, grade) for a usable finding, ("normal", 0) for a normal eye, else a skip reason."""
    kws = {_norm(k) for k in re.split(r"[,，;；]", str(keywords)) if _norm(k)}
    if not kws:
        return _R_NO_KEYWORDS
    found: dict[str, int] = {}
    for k in kws:
        if k in _FINDINGS:
            task, grade = _FINDINGS[k]
            found[task] = max(found.get(task, 0), grade)
    if kws & _UNGRADED_DR and "dr" not in found:
        return _R_UNGRADED
    if len(found) > 1:
        return _R_TWO_TASKS
    if len(found) == 1:
        return next(iter(found.items()))
    if _NORMAL in kws:
        return ("normal", 0) if kws - _ARTEFACTS == {_NORMAL} else _R_NORMAL_OTHER
    return _R_OTHER


def _odir(data_root: str, tasks: tuple[str, ...], seed: int) -> tuple[str, pd.DataFrame, Counter]:
    """The ODIR-5K manifest of the requested tasks by the labelling rules of the module docstring:
    (table path, manifest, skip counts)."""
    table, img_dir, per_patient = _odir_table(data_root)
    skipped: Counter = Counter()
    eyes = _odir_eyes(per_patient, img_dir, skipped)
    # Graded images per requested task decide the rarity order and the normal shares.
    graded = Counter(t for _, _, t, _ in eyes if t != "normal")
    by_patient: dict[str, list[tuple[str, str, int]]] = {}
    for pid, path, task, grade in eyes:
        by_patient.setdefault(pid, []).append((path, task, grade))
    rows, pool, normals_bound = _odir_graded_patients(by_patient, graded, tasks, skipped)
    rows += _odir_deal_normals(pool, by_patient, graded, normals_bound, tasks, seed)
    return table, _odir_sorted(rows), skipped


_ODIR_COLUMNS = ("ID", "Left-Diagnostic Keywords", "Right-Diagnostic Keywords")


def _odir_table(data_root: str) -> tuple[str, str, pd.DataFrame]:
    """(table path, image folder, one row per patient) of an ODIR-5K folder; a DataError naming the
    missing file, folder or column otherwise."""
    root = os.path.abspath(data_root)
    table = os.path.join(root, "full_df.csv")
    img_dir = os.path.join(root, "preprocessed_images")
    if not os.path.isdir(root):
        raise DataError(f"--data-root '{data_root}' is not a folder; {ODIR_HELP}")
    if not os.path.isfile(table):
        raise DataError(f"'{table}' does not exist; {ODIR_HELP}")
    if not os.path.isdir(img_dir):
        raise DataError(f"'{img_dir}' does not exist; {ODIR_HELP}")
    try:
        raw = pd.read_csv(table, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{table}: not a readable CSV file ({' '.join(str(e).split())[:160]})") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    twice = sorted({c for c in raw.columns if list(raw.columns).count(c) > 1})
    if twice:
        raise DataError(f"{table}: column '{twice[0]}' appears twice (spaces trimmed); expected each column once")
    missing = [c for c in _ODIR_COLUMNS if c not in raw.columns]
    if missing:
        raise DataError(
            f"{table}: missing column(s) {', '.join(missing)}; expected the ODIR-5K table "
            f"with columns {', '.join(_ODIR_COLUMNS)}"
        )
    raw["ID"] = raw["ID"].str.strip()
    # full_df.csv has one row per image of the original table: the same patient appears twice.
    return table, img_dir, raw.drop_duplicates("ID", keep="first")


def _odir_eyes(per_patient: pd.DataFrame, img_dir: str, skipped: Counter) -> list[tuple[str, str, str, int]]:
    """(patient, image path, task or "normal", grade) of every usable eye; the others are counted
    in ``skipped`` by reason."""
    present = set(os.listdir(img_dir))
    eyes = []
    for pid, left, right in per_patient[list(_ODIR_COLUMNS)].itertuples(index=False):
        if pid == "":
            continue
        for side, kw in (("left", left), ("right", right)):
            fname = f"{pid}_{side}.jpg"
            if fname not in present:
                skipped[_R_MISSING] += 1
                continue
            cat = _classify_eye(kw)
            if isinstance(cat, str):
                skipped[cat] += 1
                continue
            eyes.append((pid, os.path.join(img_dir, fname), cat[0], cat[1]))
    return eyes


def _odir_graded_patients(
    by_patient: dict[str, list[tuple[str, str, int]]], graded: Counter, tasks: tuple[str, ...], skipped: Counter
) -> tuple[list[tuple], list[str], Counter]:
    """Rows of the patients with graded eyes, each in ONE task (the rarest of theirs, normal eyes
    included); the patients with only normal eyes; and the normal eyes bound to each task."""
    rows = []
    pool: list[str] = []  # patients with only normal eyes
    normals_bound: Counter = Counter()
    for pid, items in by_patient.items():
        own = {t for _, t, _ in items if t != "normal"}
        if not own:
            pool.append(pid)
            continue
        wanted = [t for t in own if t in tasks]
        if not wanted:
            skipped["task not requested"] += len(items)
            continue
        task = min(wanted, key=lambda t: (graded[t], t))  # the rarest task keeps the patient
        for path, t, g in items:
            if t == task or t == "normal":
                rows.append((path, task, g, pid, "odir"))
                normals_bound[task] += t == "normal"
            elif t in tasks:
                skipped[_R_STRADDLE] += 1
            else:
                skipped["task not requested"] += 1
    return rows, pool, normals_bound


def _odir_deal_normals(
    pool: list[str],
    by_patient: dict[str, list[tuple[str, str, int]]],
    graded: Counter,
    normals_bound: Counter,
    tasks: tuple[str, ...],
    seed: int,
) -> list[tuple]:
    """Rows dealing the all-normal patients (whole, seeded) to the tasks, so that each task's normal
    count follows its share max(graded_t, graded_total / (2 * n_tasks)) / sum(...)."""
    total_graded = sum(graded[t] for t in tasks)
    weights = np.array([max(graded[t], total_graded / (2 * len(tasks)), 1.0) for t in tasks], dtype=float)
    n_normal = sum(normals_bound.values()) + sum(len(by_patient[p]) for p in pool)
    target = n_normal * weights / weights.sum()
    have = np.array([normals_bound[t] for t in tasks], dtype=float)
    order = np.random.default_rng(seed).permutation(len(pool))
    pool_sorted = sorted(pool, key=lambda p: (len(p), p))
    rows = []
    for k in order:
        pid = pool_sorted[k]
        j = int(np.argmax((target - have) / target))
        for path, _, _grade in by_patient[pid]:
            rows.append((path, tasks[j], 0, pid, "odir"))
        have[j] += len(by_patient[pid])
    return rows


def _odir_sorted(rows: list[tuple]) -> pd.DataFrame:
    """The manifest in a stable, readable order: by task, then patient ID, then file."""
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    if len(df):
        df["_t"] = df["task"].map({t: i for i, t in enumerate(TASKS)})
        df["_p"] = pd.to_numeric(df["patient"], errors="coerce")
        df = df.sort_values(["_t", "_p", "patient", "image"], kind="stable").drop(columns=["_t", "_p"])
        df = df.reset_index(drop=True)
    return df
