"""Checkpoints inside a training: a killed or preempted training resumes bit-identically, a
preemption signal ends it as preempted with a checkpoint written, and bad settings are one line."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import summary, train

from sall.checkpoint import KIND, Preempted, StoreCheckpoints, preempt_signals, unpack
from sall.errors import SallError
from sall.store import open_store

HELPER = Path(__file__).with_name("checkpoint_helpers.py")


@pytest.fixture(scope="module")
def unbroken():
    """The summary (weights' hash, kept epoch, curve) of the small training without a break."""
    return summary(train(None))


def _checkpoint(store_dir: Path) -> dict | None:
    got = open_store(store_dir).fetch(KIND, "test-model", ".ckpt")
    return unpack(got.path.read_bytes()) if got else None


@pytest.mark.parametrize("sig", ["TERM", "USR1"])
def test_a_preemption_signal_mid_epoch_ends_the_training_as_preempted_with_a_checkpoint(tmp_path, sig, unbroken):
    """The signal arrives from another thread at a random moment of epoch 2; the training writes a
    checkpoint at the next batch and raises Preempted; a rerun continues to the same weights."""
    pid, signum = os.getpid(), getattr(signal, f"SIG{sig}")

    def arm(epoch: int, _metrics) -> None:
        if epoch == 1:
            threading.Timer(random.uniform(0.0, 0.5), os.kill, (pid, signum)).start()

    with pytest.raises(Preempted, match=r"small preempted at epoch \d+, batch \d+ \(checkpoint written\)"):
        train(str(tmp_path), on_epoch=arm)
    ck = _checkpoint(tmp_path)
    assert ck is not None and ck["epoch"] >= 2
    assert signal.getsignal(signum) is not None  # the handler the test process had is back
    resumed = train(str(tmp_path))
    assert summary(resumed) | {"resumes": 0} == unbroken
    assert resumed.resumes == 1 and resumed.epochs_lost == 0  # a graceful stop loses nothing


@pytest.mark.slow  # a child process trained, killed and resumed twice: about 10 s each
@pytest.mark.parametrize("every_s", ["600", "0.3"])
def test_sigkill_at_a_random_point_resumes_bit_identically(tmp_path, every_s, unbroken):
    """A child trains and is killed with SIGKILL at a random moment after its first checkpoint. With
    checkpoints at epoch ends only (600 s apart within an epoch) it resumes at the end of the last
    whole epoch; with them 0.3 s apart, within an epoch. Either way the result is the unbroken one."""
    env = {**os.environ, "SALL_CHECKPOINT_EVERY_S": every_s, "SALL_PROGRESS_EVERY_S": "0.05"}
    child = subprocess.Popen(
        [sys.executable, str(HELPER), str(tmp_path), str(tmp_path / "out.json")], env=env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 300
        while _checkpoint(tmp_path) is None and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 1.0))
        assert child.poll() is None, "the child finished before it could be killed"
        child.kill()
    finally:
        child.wait()
        child.stderr.close()
    ck = _checkpoint(tmp_path)
    if every_s == "600":
        assert ck["batch"] == 0 and ck["epoch"] >= 2  # the end of an epoch
    resumed = train(str(tmp_path))
    assert summary(resumed) | {"resumes": 0} == unbroken
    assert resumed.resumes == 1 and 0 <= resumed.epochs_lost <= 1


def test_an_unusable_checkpoint_is_one_line_and_training_starts_over(tmp_path, capfd, unbroken):
    StoreCheckpoints(open_store(tmp_path), "test-model").save(b"not a checkpoint")
    res = train(str(tmp_path))
    err = capfd.readouterr().err
    assert "[small] checkpoint unusable (" in err and "training from the start" in err
    assert "Traceback" not in err
    assert summary(res) == unbroken and res.resumes == 0


def test_a_finished_training_leaves_its_checkpoint_for_the_caller_to_clear(tmp_path):
    """fit keeps the checkpoint (the model is not stored yet); resuming from the finished one trains
    nothing; `clear` removes it and its progress record."""
    first = train(str(tmp_path), epochs=2)
    sink = StoreCheckpoints(open_store(tmp_path), "test-model")
    assert sink.load() is not None and sink.load_progress() is not None
    again = train(str(tmp_path), epochs=2)
    assert summary(again) | {"resumes": 0} == summary(first) and again.resumes == 1
    assert [h["epoch_s"] for h in again.history] == [h["epoch_s"] for h in first.history]  # none re-run
    sink.clear()
    assert sink.load() is None and sink.load_progress() is None
    assert not any((tmp_path / KIND).iterdir())


@pytest.mark.parametrize(
    "name,value,expected",
    [
        ("SALL_PREEMPT_SIGNALS", "TERM,FOO", "SALL_PREEMPT_SIGNALS names 'FOO'; expected signal names"),
        ("SALL_PREEMPT_SIGNALS", "KILL", "SALL_PREEMPT_SIGNALS names 'KILL'"),
        ("SALL_CHECKPOINT_EVERY_S", "soon", "SALL_CHECKPOINT_EVERY_S='soon' is invalid; expected a number"),
        ("SALL_PROGRESS_EVERY_S", "0", "SALL_PROGRESS_EVERY_S='0' is invalid"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    with pytest.raises(SallError) as e:
        train(str(tmp_path), epochs=1)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_signal_names_are_read_with_or_without_sig(monkeypatch):
    monkeypatch.setenv("SALL_PREEMPT_SIGNALS", "sigterm, USR2")
    assert preempt_signals() == [signal.SIGTERM, signal.SIGUSR2]


@pytest.mark.slow  # two whole chains
def test_a_chain_preempted_in_its_student_continues_to_the_unbroken_student(tmp_path):
    """The student is preempted after its first epoch; the rerun reuses the teachers, resumes the
    student, stores the same weights as a chain without a break, and leaves no checkpoint behind."""
    from sall.chain import Hooks, load_student, run_chain
    from sall.checkpoint import request_preemption
    from sall.config import from_preset

    cfg = from_preset("cpu", smoke=True, threads=1)
    stop = Hooks(student_epoch=lambda epoch, _m: request_preemption() if epoch == 1 else None)
    with pytest.raises(Preempted, match="student preempted at epoch 2, batch 0"):
        run_chain(cfg, tmp_path / "a", stop)
    assert any((tmp_path / "a" / KIND).glob("student-*.ckpt"))
    resumed = run_chain(cfg, tmp_path / "a")
    unbroken = run_chain(cfg, tmp_path / "b")
    assert not any(t["built"] for t in resumed.teachers.values())
    assert resumed.costs["resumes"] == 1 and unbroken.costs["resumes"] == 0
    assert [h["train/dr/loss"] for h in resumed.history] == [h["train/dr/loss"] for h in unbroken.history]
    a, b = load_student(resumed.student_path)[1]["dr"], load_student(unbroken.student_path)[1]["dr"]
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    for cache in ("a", "b"):
        assert not any(p.is_file() for p in (tmp_path / cache / KIND).iterdir())
