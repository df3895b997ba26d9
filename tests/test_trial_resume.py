"""A trial's MLflow run across attempts: a preempted attempt is KILLED with `sall.preempted` (not
FAILED), a resumed one logs each epoch's step once, and the costs land as tags and metrics."""

from __future__ import annotations

import shutil

import pytest
from sweep_helpers import _template_store

from sall.checkpoint import Preempted
from sweeps.trial import epoch_logger, log_costs, logged_steps, preempt_run
from tracking import client as tr
from tracking import schema as sc


@pytest.fixture
def run(tmp_path):
    """(uri, run id) of a fresh run in a migrated sqlite store."""
    shutil.copyfile(_template_store(), tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tr.ensure_experiment(uri, "resume")
    return uri, tr.client(uri).create_run(exp).info.run_id


def _epoch(e: int) -> dict[str, float]:
    return {"train/dr/loss": 1.0 / e, "val/dr/acc": 0.1 * e, "epoch_s": 3.0}


def test_a_resumed_trial_logs_each_epoch_once_and_fills_what_the_kill_left_out(run):
    uri, rid = run
    first = epoch_logger(uri, rid, logged_steps(uri, None), [0.0])
    for e in (1, 2):
        first(e, _epoch(e))
    c = tr.client(uri)
    again = epoch_logger(uri, rid, logged_steps(uri, c.get_run(rid)), [0.0])
    for e in (1, 2, 3, 4):  # fit replays the restored epochs 1-3 (3 was never logged), then trains 4
        again(e, _epoch(e))
    for key in ("train/dr/loss", "val/dr/acc"):
        assert sorted(m.step for m in c.get_metric_history(rid, key)) == [1, 2, 3, 4], key
    assert "epoch_s" not in c.get_run(rid).data.metrics


def test_a_preempted_run_is_killed_not_failed_and_its_costs_are_tagged(run):
    uri, rid = run
    preempt_run(uri, rid, Preempted("student preempted at epoch 3, batch 5 (checkpoint written); rerun to continue"))
    got = tr.client(uri).get_run(rid)
    assert got.info.status == "KILLED" and got.info.status != "FAILED"
    assert got.data.tags[sc.TAG_PREEMPTED].startswith("student preempted at epoch 3, batch 5")
    log_costs(uri, rid, {"resumes": 1, "epochs_lost": 0.25, "lost_s": 2.0, "spent_s": 40.0})
    got = tr.client(uri).get_run(rid)
    assert got.data.tags[sc.TAG_RESUMES] == "1" and got.data.tags[sc.TAG_EPOCHS_LOST] == "0.250"
    assert got.data.metrics[f"{sc.COST}/spent_s"] == 40.0 and got.data.metrics[f"{sc.COST}/lost_s"] == 2.0
