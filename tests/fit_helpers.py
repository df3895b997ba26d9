"""One place for the tests' one-task training call: `fit` on DR (5 grades) with the first images
training and the rest validating, so each test states only what it varies."""

from __future__ import annotations

import numpy as np
import torch

from sall.chain import one_hot
from sall.config import TrialConfig
from sall.train import EpochCallback, FitResult, Runtime, TrainSet, fit


def fit_dr(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: TrialConfig,
    *,
    epochs: int,
    temperature: float = 1.0,
    rt: Runtime | None = None,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train `model` on the first 32 images with hard DR labels, validate on the rest."""
    rows, val = np.arange(32), np.arange(32, len(images))
    train = TrainSet(rows, {"dr": one_hot(labels[rows], 5)}, {"dr": np.ones(len(rows), dtype=bool)})
    return fit(
        model,
        images,
        train,
        {"dr": (val, labels[val])},
        epochs=epochs,
        temperature=temperature,
        cfg=cfg,
        rt=rt or Runtime.from_config(cfg),
        name="t",
        seed=0,
        on_epoch=on_epoch,
    )
