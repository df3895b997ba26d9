"""Replicates that draw their own data (`redraw`): fresh synthetic images per (fold, seed), or a
fixed data set's quarters re-cut per seed; keys made before the field existed stay as they were."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sall.chain import preflight, teacher_key
from sall.config import from_preset
from sall.data.folds import fold_splits
from sall.data.image_cache import image_array
from sall.data.synthetic import synthetic_manifest
from sall.store import ArtifactStore

SMALL = dict(synthetic_n=120, train_per_task=None, val_per_task=None)


def test_keys_made_before_redraw_existed_are_unchanged():
    """Teachers, trials and sweeps are named by these keys: a cache or a store made by earlier code
    must still be found. The values are those the code gave before the field was added."""
    cfg = from_preset("cpu")
    assert (cfg.key(), cfg.trial_key()) == ("64b308dad0f7", "756deb6551ee")
    assert "redraw" not in cfg.params()
    assert cfg.replace(redraw=True).params()["redraw"] == "True"
    assert cfg.replace(redraw=True).key() != cfg.key()


def test_each_synthetic_replicate_draws_images_no_other_replicate_has():
    base = from_preset("cpu", redraw=True, **SMALL)
    reps = [base.replace(fold=f, seed=s) for f in range(3) for s in range(2)]
    assert len({c.manifest_seed for c in reps}) == len(reps) and 0 not in {c.manifest_seed for c in reps}
    data = [preflight(c) for c in reps]
    images = [set(d.manifest["image"]) for d in data]
    for i in range(len(reps)):
        for j in range(i):
            assert not images[i] & images[j]  # the ids carry the draw's seed: no image in two replicates
    keys = {teacher_key(c, "dr", d.fingerprint) for c, d in zip(reps, data)}
    assert len(keys) == len(reps)  # a teacher per replicate, trained on that replicate's own images
    fixed = preflight(base.replace(redraw=False))
    assert not images[0] & set(fixed.manifest["image"])  # nor one that the fixed data set has


def test_a_fixed_data_set_is_recut_per_seed_and_its_teachers_keyed_by_the_cut():
    manifest = synthetic_manifest(200, seed=0)
    cuts = [fold_splits(manifest, 0, split_seed)["test"] for split_seed in (0, 1, 2)]
    assert not np.array_equal(cuts[0], cuts[1]) and not np.array_equal(cuts[1], cuts[2])
    np.testing.assert_array_equal(fold_splits(manifest, 0)["test"], cuts[0])  # seed 0 is today's split
    for split_seed in (1, 2):  # each cut still keeps a patient in one split
        s = fold_splits(manifest, 0, split_seed)
        patients = {k: set(manifest["patient"].to_numpy()[v]) for k, v in s.items()}
        assert not patients["train"] & patients["test"] and not patients["val"] & patients["test"]
    odir = from_preset("cpu", dataset="odir", data_root="/data/odir", redraw=True)
    assert [odir.replace(seed=s).split_seed for s in (0, 1)] == [1, 2] and odir.manifest_seed == 0
    fields = [odir.replace(seed=s).teacher_fields("dr") for s in (0, 1)]
    assert fields[0]["split_seed"] == 1 and fields[1]["split_seed"] == 2
    assert "split_seed" not in odir.replace(redraw=False).teacher_fields("dr")


def test_only_the_rows_a_replicate_uses_are_drawn(tmp_path):
    # as the cpu preset does, the training and validation quarters are cut to a sample
    cfg = from_preset("cpu", redraw=True, image_size=16, synthetic_n=120, train_per_task=20, val_per_task=10)
    data = preflight(cfg)
    rows = np.concatenate(list(data.splits.values()))
    store = ArtifactStore(tmp_path)
    part = image_array(data.manifest, data.fingerprint, 16, store, cfg.tasks, rows)
    whole = image_array(data.manifest, data.fingerprint, 16, store, cfg.tasks)
    mine = rows[np.isin(data.manifest["task"].to_numpy()[rows], cfg.tasks)]
    assert sum(len(a) for a in part.arrays.values()) == len(mine) < sum(len(a) for a in whole.arrays.values())
    np.testing.assert_array_equal(part[mine], whole[mine])
    left_out = np.setdiff1d(np.flatnonzero(np.isin(data.manifest["task"], cfg.tasks)), rows)
    with pytest.raises(KeyError, match="left out"):
        part[left_out[:1]]


def test_the_chain_reads_a_redrawn_replicate_from_its_own_draw():
    cfg = from_preset("cpu", redraw=True, fold=1, seed=2, **SMALL)
    data = preflight(cfg)
    assert isinstance(data.manifest, pd.DataFrame)
    assert set(data.manifest["image"].str.extract(r"s=(\d+)$")[0].astype(int)) == {cfg.manifest_seed}


def test_a_redrawn_student_is_evaluated_on_its_own_draw_only_on_its_own_data_set():
    from analysis.evaluate import own_draw

    synth = from_preset("cpu", redraw=True, fold=1, seed=2)
    assert own_draw(synth, "synthetic") == (synth.manifest_seed, 0) and synth.manifest_seed != 0
    assert own_draw(synth, "odir") == (0, 0)  # ODIR's manifest seed deals its normal eyes: not ours to move
    odir = from_preset("cpu", dataset="odir", data_root="/data/odir", redraw=True, seed=1)
    assert own_draw(odir, "odir") == (0, 2) and own_draw(odir, "synthetic") == (0, 0)
