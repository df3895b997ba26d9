"""Students trained as one fused model (sall/fused.py) against the same students trained apart:
the same weights, per-epoch metrics and kept epochs, up to the order of floating-point sums."""

import numpy as np
import pytest
import torch

from sall.chain import new_model, one_hot
from sall.config import from_preset
from sall.fused import FusedStudents, fit_fused, member_head, member_state
from sall.train import Runtime, TrainSet, fit

HEADS = {"dr": 5, "amd": 4}
TEMPERATURES = (1.0, 3.0, 8.0)
N_TRAIN, N_VAL = 32, 16  # 2 batches of 16, at 32 px
# The bounds, measured on a 2-core x86 CPU (torch 2.14, one thread, 2 epochs of 2 batches, lr 2e-3):
# - float64: the largest difference between a fused member's weights (BatchNorm statistics
#   included) and its separate training's was 4e-14 (6e-11 with 3 batches an epoch), and every
#   loss and accuracy was equal. This is the fusion's own error: vmap runs a member's convolutions
#   as one grouped convolution, whose sums run in another order. The bound leaves a wide margin.
# - float32, the training's dtype: losses agreed within 2.4e-7 and accuracies exactly, but single
#   weights differed by up to 1.6e-4 (with 3 batches an epoch: 4e-3, in 0.08 % of the weights,
#   mostly BatchNorm biases and dead ReLU units). Adam's first steps move each weight by about lr
#   whatever its gradient's size, so a gradient that is zero up to rounding takes its sign from the
#   rounding, which differs between the two summation orders: an elementwise bound would say
#   little. The relative L2 difference of all weights was at most 3.3e-6 (2.1e-4 with 3 batches);
#   the bound leaves a 5x margin over the worse, and students of T = 1 and T = 3 differ by 0.017,
#   over 10x the bound (checked too).
F64_WEIGHT_ATOL = 1e-9
F32_WEIGHT_REL = 1e-3
F32_LOSS_ATOL = 1e-5


def _data():
    """Random images; rows alternate DR and AMD; each member's soft labels come from one set of
    teacher logits at its own temperature, as the chain gives them."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(N_TRAIN + N_VAL, 32, 32, 3), dtype=np.uint8)
    task = np.array(["dr", "amd"])[np.arange(N_TRAIN) % 2]
    grades = {h: rng.integers(0, k, size=N_TRAIN + N_VAL) for h, k in HEADS.items()}
    teacher = {h: rng.normal(0, 3, size=(N_TRAIN, k)).astype(np.float32) for h, k in HEADS.items()}
    trains = []
    for T in TEMPERATURES:
        targets = {}
        for h, k in HEADS.items():
            soft = torch.softmax(torch.from_numpy(teacher[h]) / T, dim=1).numpy()
            soft[task == h] = one_hot(grades[h][:N_TRAIN][task == h], k)
            targets[h] = soft
        trains.append(TrainSet(np.arange(N_TRAIN), targets, {h: np.ones(N_TRAIN, dtype=bool) for h in HEADS}))
    val_rows = np.arange(N_TRAIN, N_TRAIN + N_VAL)
    val = {h: (val_rows, grades[h][val_rows]) for h in HEADS}
    return images, trains, val


def _cfg(checkpoint: str):
    return from_preset(
        "cpu", smoke=True, image_size=32, batch_size=16, device="cpu", threads=1, checkpoint=checkpoint, lr=2e-3
    )


def _train_both(checkpoint: str, epochs: int = 2, dtype=torch.float32):
    """The K students trained apart (`fit`) and fused, from the same initialisation (seed 7)."""
    images, trains, val = _data()
    cfg = _cfg(checkpoint)
    rt = Runtime.from_config(cfg)
    kw = dict(epochs=epochs, cfg=cfg, rt=rt, name="t", seed=3)
    apart = [
        fit(new_model(cfg, list(HEADS), 7).to(dtype), images, tr, val, temperature=T, **kw)
        for tr, T in zip(trains, TEMPERATURES)
    ]
    members = [new_model(cfg, list(HEADS), 7).to(dtype) for _ in TEMPERATURES]
    fused = fit_fused(members, images, trains, val, temperatures=TEMPERATURES, **kw)
    return apart, fused, members


def _max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n].double() - b[n].double()).abs().max()) for n in a)


def _rel_weight_diff(a: dict, b: dict) -> float:
    """|a - b| / |a| over all learned weights at once (L2)."""
    names = [n for n in a if n.endswith(("weight", "bias"))]
    d = torch.cat([(a[n].double() - b[n].double()).flatten() for n in names])
    return float(d.norm() / torch.cat([a[n].double().flatten() for n in names]).norm())


def _same_history(apart: list, fused: list, loss_atol: float) -> None:
    """Equal kept epochs, metric names and accuracies; losses within `loss_atol`."""
    for a, f in zip(apart, fused):
        assert f.best_epoch == a.best_epoch
        assert [h.keys() for h in f.history] == [h.keys() for h in a.history]
        for ha, hf in zip(a.history, f.history):
            for name in (n for n in ha if "/" in n):
                tol = loss_atol if "/loss" in name else 0.0
                assert hf[name] == pytest.approx(ha[name], abs=tol), name


def test_fused_students_equal_separate_trainings_in_float64():
    """checkpoint=best: each member keeps its own best epoch, as its separate training does."""
    apart, fused, members = _train_both("best", dtype=torch.float64)
    assert len({a.best_epoch for a in apart}) > 1  # the members keep different epochs: the rule is tested
    for a, f, m in zip(apart, fused, members):
        assert _max_weight_diff(a.state, f.state) < F64_WEIGHT_ATOL
        assert _max_weight_diff(m.state_dict(), f.state) == 0.0  # the kept weights are in the member
    _same_history(apart, fused, loss_atol=1e-12)


def test_fused_students_equal_separate_trainings_in_float32():
    apart, fused, members = _train_both("last")
    assert _rel_weight_diff(apart[0].state, apart[1].state) > 10 * F32_WEIGHT_REL  # T changes the model
    for a, f, m in zip(apart, fused, members):
        assert _rel_weight_diff(a.state, f.state) < F32_WEIGHT_REL
        assert _max_weight_diff(m.state_dict(), f.state) == 0.0
    _same_history(apart, fused, loss_atol=F32_LOSS_ATOL)


def test_a_member_loads_into_a_plain_model_and_predicts_as_the_fused_forward():
    cfg = _cfg("last")
    members = [new_model(cfg, list(HEADS), seed) for seed in (1, 2, 3)]  # initial states of their own
    fused = FusedStudents(members)
    with torch.no_grad():  # train mode: a step's BatchNorm statistics move; then compare in eval mode
        for p in fused.parameters():
            p.add_(0.01 * torch.randn_like(p))
        fused.train()(torch.rand(8, 3, 32, 32))
    x = torch.rand(4, 3, 32, 32)
    out = fused.eval()(x)
    for k in range(fused.k):
        plain = new_model(cfg, list(HEADS), 0)
        plain.load_state_dict(member_state(fused.state_dict(), fused, k))  # strict: every key, no extra
        plain.eval()
        with torch.no_grad():
            z = plain(x)
        for h in HEADS:
            torch.testing.assert_close(out[member_head(h, k)], z[h], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[member_head("dr", 0)], out[member_head("dr", 1)])
