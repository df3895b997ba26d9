"""The training loop's choices: which epoch is kept (best on validation, or the paper's last) and
the learning-rate schedule (constant, or cosine decay to zero)."""

import numpy as np
import pytest
import torch
from fit_helpers import fit_dr

from sall.chain import new_model
from sall.config import from_preset
from sall.train import make_optimizer, make_scheduler


def _fit(checkpoint: str, epochs: int = 4, **over):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(48, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, size=48)
    cfg = from_preset("cpu", smoke=True, image_size=16, batch_size=8, device="cpu", checkpoint=checkpoint, **over)
    model = new_model(cfg, ["dr"], 0)
    return model, fit_dr(model, images, labels, cfg, epochs=epochs)


def test_best_checkpoint_is_the_best_validation_epoch_and_is_restored():
    model, res = _fit("best")
    accs = [h["val/dr/acc"] for h in res.history]
    assert res.best_epoch == 1 + int(np.argmax(accs))  # the first of equal bests
    for k, v in model.state_dict().items():  # the model holds the kept weights
        assert torch.equal(v, res.state[k]), k


def test_last_checkpoint_keeps_the_final_epoch():
    model, res = _fit("last")
    assert res.best_epoch == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, res.state[k]), k


@pytest.mark.parametrize("schedule,end", [("constant", 1.0), ("cosine", 0.0)])
def test_schedule_ends_where_it_should(schedule, end):
    cfg = from_preset("cpu", schedule=schedule, lr=0.01)
    opt = make_optimizer(torch.nn.Linear(2, 2), cfg)
    sched = make_scheduler(opt, cfg, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.01)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * end, abs=1e-12)
    if schedule == "cosine":
        assert all(a > b for a, b in zip(seen, seen[1:]))  # decays at every step


def test_schedule_and_checkpoint_change_the_teacher_key():
    base = from_preset("cpu", schedule="constant", checkpoint="best", train_per_task=None, val_per_task=None)
    for change in (
        dict(schedule="cosine"),
        dict(checkpoint="last"),
        dict(train_per_task=10),
        dict(val_per_task=10),
        dict(seed=1),
        dict(fold=1),
    ):
        assert base.replace(**change).teacher_fields("dr") != base.teacher_fields("dr"), change
    for change in (dict(temperature=8.0), dict(multitask=False), dict(sa_labels=False), dict(threads=1)):
        assert base.replace(**change).teacher_fields("dr") == base.teacher_fields("dr"), change
