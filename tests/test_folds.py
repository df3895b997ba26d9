"""Folds: patient-disjoint, stratified, 50/25/25, deterministic; subsets nested and stratified."""

import numpy as np
import pandas as pd
import pytest

from sall.data.folds import fold_splits, quarters
from sall.data.subset import cap_per_class, check_nonempty, take_per_task
from sall.data.synthetic import synthetic_manifest
from sall.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return synthetic_manifest(400, seed=0)


def test_patients_never_straddle_splits(manifest):
    for fold in range(3):
        s = fold_splits(manifest, fold)
        pats = {k: set(manifest["patient"].iloc[v]) for k, v in s.items()}
        assert not pats["train"] & pats["val"]
        assert not pats["train"] & pats["test"]
        assert not pats["val"] & pats["test"]
        assert len(s["train"]) + len(s["val"]) + len(s["test"]) == len(manifest)


def test_proportions_and_class_balance(manifest):
    s = fold_splits(manifest, 0)
    n = len(manifest)
    assert abs(len(s["train"]) / n - 0.5) < 0.03
    assert abs(len(s["val"]) / n - 0.25) < 0.03
    assert abs(len(s["test"]) / n - 0.25) < 0.03
    whole = manifest.groupby(["task", "grade"]).size() / n
    for split in ("train", "test"):
        part = manifest.iloc[s[split]].groupby(["task", "grade"]).size() / len(s[split])
        assert np.abs((part - whole).fillna(1)).max() < 0.03, split


def test_test_sets_disjoint_and_deterministic(manifest):
    tests = [set(fold_splits(manifest, f)["test"]) for f in range(3)]
    assert not tests[0] & tests[1] and not tests[1] & tests[2] and not tests[0] & tests[2]
    np.testing.assert_array_equal(quarters(manifest), quarters(manifest.copy()))


def test_fold_out_of_range(manifest):
    with pytest.raises(ConfigError, match="fold 3 out of range"):
        fold_splits(manifest, 3)


def test_class_cap(manifest):
    train = fold_splits(manifest, 0)["train"]
    capped = cap_per_class(manifest, train, 10)
    counts = manifest.iloc[capped].groupby(["task", "grade"]).size()
    assert counts.max() == 10
    assert set(capped) <= set(train)
    np.testing.assert_array_equal(capped, cap_per_class(manifest, train, 10))


def test_sample_counts_nested_and_stratified(manifest):
    train = fold_splits(manifest, 0)["train"]
    amd = train[manifest["task"].to_numpy()[train] == "amd"]
    small = take_per_task(manifest, train, {"amd": 40}, "fold 0")
    big = take_per_task(manifest, train, {"amd": 100}, "fold 0")
    small_amd = set(small) & set(amd)
    assert len(small_amd) == 40 and len(set(big) & set(amd)) == 100
    assert small_amd <= set(big)  # nested
    # the other tasks are untouched
    assert set(train) - set(amd) <= set(small)
    half = take_per_task(manifest, train, {"amd": 0.5}, "fold 0")
    assert len(set(half) & set(amd)) == round(0.5 * len(amd))
    # grade shares kept within a few percent
    g_all = manifest.iloc[amd]["grade"].value_counts(normalize=True).sort_index()
    g_sub = manifest.iloc[sorted(small_amd)]["grade"].value_counts(normalize=True).sort_index()
    assert (g_all - g_sub).abs().max() < 0.06


def test_sample_count_too_large(manifest):
    train = fold_splits(manifest, 0)["train"]
    with pytest.raises(DataError, match="sample count 100000 for task amd exceeds"):
        take_per_task(manifest, train, {"amd": 100000}, "fold 0")


def test_empty_class_after_cap_is_an_error(manifest):
    train = fold_splits(manifest, 0)["train"]
    no_pdr = train[~((manifest["task"].to_numpy()[train] == "dr") & (manifest["grade"].to_numpy()[train] == 4))]
    with pytest.raises(DataError, match="task dr has no training image of grade\\(s\\) 4"):
        check_nonempty(manifest, no_pdr, ("dr", "amd"), "fold 0 train split")


def test_patients_and_images_with_two_tasks_stay_in_one_split():
    """A patient whose eyes carry DR and AMD grades (or one image graded for both) must not train
    one task while it tests the other: folds group by patient across tasks."""
    base = synthetic_manifest(200, seed=0, tasks=("dr", "amd"))
    # the AMD rows borrow the DR rows' patients: every patient now has rows of both tasks, and
    # every second AMD row is the very same image as a DR row
    amd = base["task"] == "amd"
    base.loc[amd, "patient"] = base.loc[base["task"] == "dr", "patient"].to_numpy()
    same = base.index[amd][::2]
    base.loc[same, "image"] = base.loc[base.index[~amd][::2], "image"].to_numpy()
    for fold in range(3):
        s = fold_splits(base, fold)
        for key in ("patient", "image"):
            seen = {k: set(base[key].iloc[v]) for k, v in s.items()}
            assert not seen["train"] & seen["test"], (fold, key)
            assert not seen["train"] & seen["val"], (fold, key)
            assert not seen["val"] & seen["test"], (fold, key)


def test_train_cap_per_task_is_nested_and_stratified(manifest):
    from sall.data.subset import cap_per_task

    train = fold_splits(manifest, 0)["train"]
    small, large = cap_per_task(manifest, train, 50), cap_per_task(manifest, train, 120)
    counts = manifest.iloc[small].groupby("task").size()
    assert counts.max() == 50 and counts.min() == 50
    assert set(small) <= set(large) <= set(train)
    whole = manifest.iloc[train].groupby(["task", "grade"]).size() / manifest.iloc[train].groupby("task").size()
    part = manifest.iloc[large].groupby(["task", "grade"]).size() / 120
    assert np.abs(part - whole).max() < 0.03
    assert cap_per_task(manifest, train, None) is train
