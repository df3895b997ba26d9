"""Behaviour with no test before issue 13, each checked cheaply and for real (no mocks, no Ray):
the training loop's checkpoint, prediction order, teacher keys, the sweep grid, --smoke,
MLflow's retry on a locked SQLite file and errors of the loader's background thread."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fit_helpers import fit_dr

from sall.chain import teacher_key
from sall.config import from_preset
from sall.data.loader import Batches
from sall.model import MultiHeadNet
from sall.train import Runtime, predict

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(**kw):
    return from_preset("cpu", smoke=True, image_size=16, batch_size=8, augment=False, threads=1, **kw)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(13)
    return rng.integers(0, 256, size=(48, 16, 16, 3), dtype=np.uint8)


def _model(seed: int = 0) -> MultiHeadNet:
    torch.manual_seed(seed)
    return MultiHeadNet("test_resnet", {"dr": 5})


# ---------------------------------------------------------------------------------- fit


@pytest.mark.parametrize("checkpoint", ["best", "last"])
def test_fit_keeps_the_checkpointed_epoch(images, checkpoint):
    """After fit the model holds the weights of the epoch with the best validation accuracy (the
    first one on a tie), or of the last epoch; FitResult.state is those weights too. With the
    last epoch kept, validation runs only after it."""
    cfg = tiny_cfg(lr=0.05, checkpoint=checkpoint, schedule="constant")
    labels = np.random.default_rng(1).integers(0, 5, size=len(images))
    model = _model()
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(epoch, metrics):
        snapshots[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    with contextlib.redirect_stderr(io.StringIO()):
        res = fit_dr(model, images, labels, cfg, epochs=5, on_epoch=snapshot)
    accs = [h.get("val/dr/acc") for h in res.history]
    if checkpoint == "last":  # validation chooses nothing, so it is measured once, at the end
        assert [a is None for a in accs] == [True] * 4 + [False], accs
    expected = int(np.argmax(accs)) + 1 if checkpoint == "best" else len(accs)
    assert res.best_epoch == expected, accs
    kept = snapshots[expected]
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), kept[k].cpu()), k
        assert torch.equal(res.state[k].cpu(), kept[k].cpu()), k
    if checkpoint == "best" and expected != len(accs):  # the restore really changed the weights
        assert any(not torch.equal(snapshots[len(accs)][k], kept[k]) for k in kept)


# ---------------------------------------------------------------------------------- predict


def test_predict_returns_rows_in_the_order_asked(images):
    """Batches sort rows for faster reads; predict must undo it: shuffled rows, repeats and a last
    partial batch give each row its own logits, as predicting it alone does."""
    rt = Runtime.from_config(tiny_cfg())
    model = _model().eval()
    rows = np.random.default_rng(2).permutation(np.r_[np.arange(20), [3, 3, 17]])
    z = predict(model, images, rows, rt, batch_size=6)["dr"]
    alone = np.stack([predict(model, images, np.array([r]), rt)["dr"][0] for r in rows])
    np.testing.assert_allclose(z, alone, rtol=1e-4, atol=1e-5)
    assert predict(model, images, np.array([], dtype=np.int64), rt) == {}


# ---------------------------------------------------------------------------------- teacher keys

TEACHER_FIELDS = dict(
    fold=1,
    class_cap=5,
    backbone="resnet18",
    image_size=24,
    lr=1e-3,
    batch_size=16,
    teacher_epochs=3,
    augment=True,
    seed=7,
    synthetic_n=60,
    pretrained=True,
    optimizer="sgd",
    weight_decay=1e-4,
    eps=1e-6,
    betas=(0.8, 0.99),
)
NOT_TEACHER_FIELDS = dict(
    temperature=8.0,
    multitask=False,
    sa_labels=False,
    student_epochs=5,
    sample_counts=(("amd", 0.5),),
    tasks=("dr", "amd", "arter"),
    threads=3,
    device="cpu",
    amp="off",
    channels_last="off",
    profile=True,
    compile=True,
)


@pytest.mark.parametrize("field,value", sorted(TEACHER_FIELDS.items()))
def test_a_teacher_field_changes_the_teachers_key(field, value):
    base = tiny_cfg()
    assert getattr(base, field) != value
    assert teacher_key(base.replace(**{field: value}), "dr", "fp") != teacher_key(base, "dr", "fp")


@pytest.mark.parametrize("field,value", sorted(NOT_TEACHER_FIELDS.items()))
def test_other_fields_keep_the_teachers_key(field, value):
    """T, the data ratio, the switches, the student's epochs and runtime settings reuse the teacher."""
    base = tiny_cfg()
    assert getattr(base, field) != value
    assert teacher_key(base.replace(**{field: value}), "dr", "fp") == teacher_key(base, "dr", "fp")


def test_the_data_and_the_task_change_the_teachers_key():
    cfg = tiny_cfg()
    assert teacher_key(cfg, "dr", "fp") != teacher_key(cfg, "dr", "other data")
    assert teacher_key(cfg, "dr", "fp") != teacher_key(cfg, "amd", "fp")


# ---------------------------------------------------------------------------------- the sweep grid


def test_expand_drops_duplicate_trials_and_keeps_the_first_label():
    from sweeps.runner import expand

    base = tiny_cfg()
    grid = [
        ("baseline", base.replace(temperature=1.0, multitask=False, sa_labels=False)),
        ("T=3", base.replace(temperature=3.0)),
        ("T=3.0 again", base.replace(temperature=3.0)),
        ("T=1 single", base.replace(temperature=1.0, multitask=False, sa_labels=False)),
    ]
    trials = expand(grid, [0, 1, 2])
    assert [(t.label, t.cfg.fold) for t in trials] == [
        ("baseline", 0),
        ("baseline", 1),
        ("baseline", 2),
        ("T=3", 0),
        ("T=3", 1),
        ("T=3", 2),
    ]
    assert len({t.cfg.key() for t in trials}) == len(trials)
    assert expand(grid, [1, 1]) == expand(grid, [1])


def test_a_sweep_into_another_store_never_resumes_this_ones_tune_state(tmp_path):
    """Tune keeps its state in ~/ray_results, shared by every clone on a machine: the same grid
    run from a fresh clone (another MLflow store, cache or experiment) once resumed the old
    state and reported 39/39 finished with nothing logged; so did a clone into the folder of a
    deleted one, whose new mlflow.db lacked the runs that Tune kept as finished. Its Tune state is
    now its own."""
    from sweeps.runner import expand, make_sweep_id

    trials = expand([("T=3", tiny_cfg(temperature=3.0))], [0, 1])
    uri, cache = f"sqlite:///{tmp_path}/a/mlflow.db", str(tmp_path / "a" / "cache")
    first = make_sweep_id("temperature", trials, uri, cache, "sall-temperature")
    assert make_sweep_id("temperature", list(reversed(trials)), uri, cache, "sall-temperature") == first
    others = [
        ("temperature", trials, f"sqlite:///{tmp_path}/b/mlflow.db", cache, "sall-temperature"),
        ("temperature", trials, uri, str(tmp_path / "b" / "cache"), "sall-temperature"),
        ("temperature", trials, uri, cache, "mine"),
        ("temperature", trials[:1], uri, cache, "sall-temperature"),
    ]
    assert first not in {make_sweep_id(*o) for o in others}
    # the store deleted and made again at the same path: its runs are gone, so is the resume
    # the store deleted and made again at the same path, by a new command (a new process: this one
    # keeps the old database open): its runs are gone, so is the resume
    Path(uri[len("sqlite:///") :]).unlink()
    script = (
        "import json, sys; from sall.config import config_from_dict; from sweeps.runner import Trial, make_sweep_id; "
        "print(make_sweep_id('temperature', [Trial(t['label'], config_from_dict(t['cfg'])) for t in "
        "json.loads(sys.argv[1])], *sys.argv[2:]))"
    )
    blob = json.dumps([{"label": t.label, "cfg": dataclasses.asdict(t.cfg)} for t in trials])
    again = subprocess.run(
        [sys.executable, "-c", script, blob, uri, cache, "sall-temperature"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.split()[-1].startswith("temperature-") and again.stdout.split()[-1] != first


def _dry_run_trials(sweep: str, *flags: str, tmp_path) -> list[str]:
    import importlib

    m = importlib.import_module(f"sweeps.{sweep}")
    out = io.StringIO()
    argv = ["--dry-run", "--folds", "0", "--synthetic-n", "40", "--cache-dir", str(tmp_path / "c"), *flags]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert m.run_sweep(sweep, m.__doc__, m.grid, m.add_args, getattr(m, "smoke", None), argv=argv) == 0
    # rows of the table: "  i  <setting, 24 wide> fold  config  teachers"
    lines = out.getvalue().splitlines()
    return [ln[5:29].strip() for ln in lines if ln[:3].strip().isdigit() and ln[3:5] == "  "]


def test_smoke_trims_only_the_default_grid(tmp_path):
    full = _dry_run_trials("temperature", tmp_path=tmp_path)
    smoke = _dry_run_trials("temperature", "--smoke", tmp_path=tmp_path)
    chosen = _dry_run_trials("temperature", "--smoke", "--temperatures", "2,4,6", tmp_path=tmp_path)
    assert len(full) == 13 and smoke == ["baseline", "T=1", "T=8"]
    assert chosen == ["baseline", "T=2", "T=4", "T=6"], "a grid the user chose is never trimmed"


# ---------------------------------------------------------------------------------- MLflow retry


def _hold_lock(db: str, seconds: float, held: threading.Event) -> None:
    con = sqlite3.connect(db, timeout=0, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    held.set()
    time.sleep(seconds)
    con.execute("COMMIT")
    con.close()


def test_retry_waits_out_database_is_locked(tmp_path):
    """A real SQLite lock held by another connection: the write fails with "database is locked"
    until it is released, and retry returns the write's result instead of raising."""
    from tracking.client import retry

    db = str(tmp_path / "m.db")
    sqlite3.connect(db).execute("CREATE TABLE t (x)").connection.commit()
    held = threading.Event()
    holder = threading.Thread(target=_hold_lock, args=(db, 0.4, held))
    holder.start()
    held.wait(5)
    errors: list[str] = []

    def write() -> int:
        con = sqlite3.connect(db, timeout=0)
        try:
            con.execute("INSERT INTO t VALUES (1)")
            con.commit()
            return 1
        except sqlite3.OperationalError as e:
            errors.append(str(e))
            raise
        finally:
            con.close()

    assert retry(write) == 1
    holder.join()
    assert errors and set(errors) == {"database is locked"}
    assert sqlite3.connect(db).execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_retry_raises_other_errors_at_once(tmp_path):
    from tracking.client import retry

    calls = []

    def bad():
        calls.append(1)
        return sqlite3.connect(str(tmp_path / "x.db")).execute("SELECT * FROM missing")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        retry(bad)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------- the loader thread


def test_an_error_in_the_loaders_thread_surfaces_in_the_caller(images):
    """Batches are assembled in a background thread; an error there (a row past the end of the
    image array) is raised where the batches are consumed, after the good batches, and the thread
    ends."""
    before = threading.active_count()
    rows = np.array([0, 1, 2, 3, len(images) + 5])
    b = Batches(images, rows, 2, shuffle=False, augment=False, device=torch.device("cpu"), prefetch=True)
    got = []
    with pytest.raises(IndexError):
        for _, pos in b:
            got.append(pos.tolist())
    assert got == [[0, 1], [2, 3]]
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before, "the producer thread was left running"
