"""The whole chain on tiny synthetic data: teachers cached and reused, switches, stored student."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from sall.chain import load_student, needs_teachers, run_chain
from sall.config import from_preset


def tiny(**kw):
    return from_preset("cpu", smoke=True, **kw)


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """(cache, result): a cache in which a first chain at T=3 trained the teachers. Every test that
    needs trained teachers asks for it, so each passes alone and in any order."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, run_chain(tiny(temperature=3.0), cache)


def test_teachers_trained_once_then_reused_at_another_T(warm):
    cache, a = warm
    assert set(a.test) == {"dr", "amd"}
    assert all(t["built"] for t in a.teachers.values())
    for m in a.test.values():
        assert 0.0 <= m["acc"] <= 1.0 and len(m["confusion"]) in (4, 5)
    b = run_chain(tiny(temperature=8.0), cache)
    assert not any(t["built"] for t in b.teachers.values())
    assert {t: d["key"] for t, d in a.teachers.items()} == {t: d["key"] for t, d in b.teachers.items()}
    # soft labels are softer at T=8 than at T=3
    assert b.soft["dr"]["max_mean"] < a.soft["dr"]["max_mean"]


def test_baseline_reuses_teachers_as_its_models(warm):
    cache, _ = warm
    base = run_chain(tiny(temperature=1.0, multitask=False, sa_labels=False), cache)
    assert sorted(base.reused_teacher_as_baseline) == ["amd", "dr"]
    assert not any(t["built"] for t in base.teachers.values())
    teacher_acc = base.teachers["dr"]["info"]["test"]["acc"]
    assert np.isclose(base.test["dr"]["acc"], teacher_acc)


def test_which_teachers_a_trial_needs():
    assert needs_teachers(tiny(sa_labels=False, multitask=True, temperature=3.0)) == []
    assert needs_teachers(tiny(sa_labels=True)) == ["dr", "amd"]
    assert needs_teachers(tiny(temperature=1.0, multitask=False, sa_labels=False)) == ["dr", "amd"]
    # a baseline whose student is trained differently from the teachers trains its own models
    assert needs_teachers(tiny(temperature=1.0, multitask=False, sa_labels=False, student_epochs=3)) == []


def test_no_sa_labels_trains_no_teacher_and_single_task_models(tmp_path):
    r = run_chain(tiny(sa_labels=False, multitask=False, temperature=3.0), tmp_path)
    assert r.teachers == {} and r.soft == {}
    assert not (tmp_path / "teachers").exists()
    cfg, models = load_student(r.student_path)
    assert cfg == r.config.replace()
    assert models["dr"] is not models["amd"]
    assert list(models["dr"].heads) == ["dr"]


def test_student_is_stored_and_reloads(warm):
    _, r = warm
    cfg, models = load_student(r.student_path)
    assert models["dr"] is models["amd"] and sorted(models["dr"].heads) == ["amd", "dr"]
    assert cfg.key() == r.config.key()


def test_cli_prints_json_metrics(warm):
    cache, _ = warm
    out = subprocess.run(
        [sys.executable, "-m", "sall", "run", "--smoke", "--cache-dir", str(cache), "-T", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert set(res["test"]) == {"dr", "amd"}
    assert {"acc", "conf", "err", "ece", "nll", "brier", "kappa", "macro_f1"} <= set(res["test"]["dr"])
    assert "[teacher dr] reusing" in out.stderr


def test_corrupt_teacher_is_rebuilt_with_a_warning(tmp_path, capsys):
    a = run_chain(tiny(temperature=3.0, tasks=("dr", "amd")), tmp_path)
    path = a.teachers["dr"]["path"]
    with open(path, "r+b") as f:  # flip bytes in the middle: bit rot on shared storage
        f.seek(200)
        f.write(b"\x00" * 64)
    b = run_chain(tiny(temperature=5.0), tmp_path)
    assert b.teachers["dr"]["built"] and not b.teachers["amd"]["built"]
    assert "corrupt" in capsys.readouterr().err


def test_reloaded_student_reproduces_its_test_predictions(warm):
    """The stored student, loaded back, gives the per-image test probabilities the chain reported."""
    import torch

    from sall.chain import prepare
    from sall.store import ArtifactStore
    from sall.train import Runtime, predict

    cache, r = warm
    cfg, models = load_student(r.student_path)
    data = prepare(cfg, ArtifactStore(cache))
    rt = Runtime.from_config(cfg)
    for task, pred in r.predictions.items():
        z = predict(models[task], data.images, pred["rows"], rt)[task]
        probs = torch.softmax(torch.from_numpy(z) / cfg.temperature, dim=1).numpy()
        np.testing.assert_allclose(probs, pred["probs"], atol=1e-5)


def test_a_two_task_run_decodes_and_labels_only_what_it_uses(warm):
    """The arter images of a dr,amd run are never rendered, and each teacher's logits cover exactly
    the fold's training images of the other task: the only rows a soft label is given to."""
    from sall.chain import preflight
    from sall.data.image_cache import image_array
    from sall.store import ArtifactStore

    cache, res = warm
    assert sorted(p.name.rsplit("-", 1)[1] for p in (cache / "images").glob("*.npy")) == ["amd.npy", "dr.npy"]
    data = preflight(res.config)
    for task, other in (("dr", "amd"), ("amd", "dr")):
        blob = torch.load(cache / "logits" / f"{res.teachers[task]['key']}-on-{other}.pt", weights_only=True)
        assert np.array_equal(blob["rows"].numpy(), data.rows("train", other))
        assert blob["logits"].shape == (len(data.rows("train", other)), 5 if task == "dr" else 4)
    images = image_array(data.manifest, data.fingerprint, res.config.image_size, ArtifactStore(cache), res.config.tasks)
    arter = np.flatnonzero(data.manifest["task"].to_numpy() == "arter")
    with pytest.raises(KeyError, match="arter"):
        images[arter[:2]]
    dr = data.rows("test", "dr")[:3]
    assert images[dr].shape == (3, res.config.image_size, res.config.image_size, 3)
    assert np.array_equal(images[int(dr[1])], images[dr][1])
