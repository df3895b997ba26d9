"""The GPU path's pieces, exercised on the CPU: bf16 autocast, channels_last, batched augmentation,
thread settings; and on CUDA when there is one."""

import numpy as np
import pytest
import torch
from fit_helpers import fit_dr

from sall.chain import new_model
from sall.config import from_preset
from sall.data.augment import augment_batch, random_affine
from sall.data.loader import Batches
from sall.train import Runtime


def tiny_data(n=48, size=32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, size=n)
    return images, labels


@pytest.mark.parametrize("amp,channels_last", [("bf16", "on"), ("off", "on"), ("bf16", "off")])
def test_fit_with_autocast_and_channels_last_on_cpu(amp, channels_last):
    images, labels = tiny_data()
    cfg = from_preset("cpu", smoke=True, amp=amp, channels_last=channels_last, batch_size=16, device="cpu")
    rt = Runtime.from_config(cfg)
    assert rt.amp == (amp == "bf16") and rt.channels_last == (channels_last == "on")
    model = new_model(cfg, ["dr"], 0)
    res = fit_dr(model, images, labels, cfg, epochs=2, temperature=3.0, rt=rt)
    assert all(np.isfinite(h["train/dr/loss"]) for h in res.history)
    if channels_last == "on":
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_batches_channels_last_and_augmentation_shapes():
    images, _ = tiny_data()
    b = Batches(
        images,
        np.arange(40),
        16,
        shuffle=True,
        augment=True,
        device=torch.device("cpu"),
        channels_last=True,
        drop_last=True,
    )
    xs = list(b)
    assert len(xs) == 2 and all(x.shape == (16, 3, 32, 32) for x, _ in xs)
    assert xs[0][0].is_contiguous(memory_format=torch.channels_last)
    assert sorted(np.concatenate([p for _, p in xs]).tolist()) == sorted(
        set(np.concatenate([p for _, p in xs]).tolist())
    )


def test_augmentation_is_the_papers_family():
    g = torch.Generator().manual_seed(0)
    theta = random_affine(2000, g)
    lin = theta[:, :, :2]
    det = torch.det(lin).abs()
    # scale +-10 %: |det| of the inverse map lies in [1/1.1^2, 1/0.9^2]
    assert det.min() >= 1 / 1.1**2 - 1e-4 and det.max() <= 1 / 0.9**2 + 1e-4
    assert torch.all(theta[:, :, 2] == 0)  # no translation
    # an identity-like image survives: rot90/flip of a constant image is the same constant inside
    x = torch.ones(4, 3, 16, 16)
    y = augment_batch(x, g)
    assert torch.allclose(y[:, :, 6:10, 6:10], torch.ones(4, 3, 4, 4), atol=1e-5)


def test_trial_threads_follow_the_cpu_share():
    before = torch.get_num_threads()
    try:
        Runtime.from_config(from_preset("cpu", smoke=True, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_path_end_to_end(tmp_path):
    from sall.chain import run_chain

    r = run_chain(from_preset("cpu", smoke=True, device="cuda", compile=False), tmp_path)
    assert set(r.test) == {"dr", "amd"}


def test_auto_precision_on_a_cpu_is_bf16_only_where_native_and_measured(monkeypatch):
    from sall import train

    cpu = torch.device("cpu")
    cfg = from_preset("cpu", device="cpu")
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: None)
    assert train.precision_path(cfg, cpu) == (
        False,
        f"fp32 (cpu {torch.backends.cpu.get_cpu_capability().lower()}: no native bf16)",
    )
    on, text = train.precision_path(cfg.replace(amp="bf16"), cpu)
    assert on and text.startswith("bf16 autocast (cpu, amp=bf16, emulated on ")
    monkeypatch.setattr(train, "cpu_native_bf16", lambda: "amx")
    assert train.precision_path(cfg, cpu) == (False, "fp32 (cpu amx: bf16 not measured for test_resnet)")
    monkeypatch.setattr(train, "BF16_CPU_BACKBONES", frozenset({"test_resnet"}))
    assert train.precision_path(cfg, cpu) == (True, "bf16 autocast (cpu amx, measured faster for test_resnet)")
    assert train.precision_path(cfg.replace(amp="off"), cpu) == (False, "fp32 (cpu amx, amp=off)")
    assert train.precision_path(cfg, torch.device("cuda")) == (True, "bf16 autocast (cuda)")
    assert Runtime.from_config(cfg).precision == "bf16 autocast (cpu amx, measured faster for test_resnet)"
