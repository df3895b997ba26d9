"""A small training with checkpoints in a store, run in-process by the tests or as a child process
that they kill (`python tests/checkpoint_helpers.py STORE OUT`): the weights' hash and the curve
go to OUT as JSON; a preemption exits with code 3 and its one line."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from sall.chain import new_model, one_hot
from sall.checkpoint import Preempted, StoreCheckpoints
from sall.config import from_preset
from sall.store import open_store
from sall.train import FitResult, Runtime, TrainSet, fit

N_TRAIN, N_VAL, EPOCHS = 96, 16, 4


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """One hash of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def train(store_dir: str | None, on_epoch=None, epochs: int = EPOCHS, checkpoint: str = "best") -> FitResult:
    """Train the small DR model (random images, so the best epoch moves about) with its checkpoints
    in `store_dir` (none without)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(N_TRAIN + N_VAL, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, size=len(images))
    cfg = from_preset("cpu", smoke=True, image_size=16, batch_size=8, device="cpu", checkpoint=checkpoint)
    rows = np.arange(N_TRAIN)
    train_set = TrainSet(rows, {"dr": one_hot(labels[rows], 5)}, {"dr": np.ones(len(rows), dtype=bool)})
    sink = StoreCheckpoints(open_store(store_dir), "test-model") if store_dir else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same in the test process and its children: the same arithmetic
    try:
        return _fit(cfg, images, labels, train_set, sink, epochs, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _fit(cfg, images, labels, train_set, sink, epochs, on_epoch) -> FitResult:
    val = np.arange(N_TRAIN, len(images))
    return fit(
        new_model(cfg, ["dr"], 0),
        images,
        train_set,
        {"dr": (val, labels[val])},
        epochs=epochs,
        temperature=1.0,
        cfg=cfg,
        rt=Runtime.from_config(cfg),
        name="small",
        seed=0,
        on_epoch=on_epoch,
        checkpoints=sink,
    )


def summary(res: FitResult) -> dict:
    """What must not change across a resume: the weights, the kept epoch, the curve (not its timing)."""
    curve = [{k: v for k, v in h.items() if k != "epoch_s"} for h in res.history]
    return dict(hash=state_hash(res.state), best_epoch=res.best_epoch, history=curve, resumes=res.resumes)


if __name__ == "__main__":
    try:
        out = summary(train(sys.argv[1]))
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    Path(sys.argv[2]).write_text(json.dumps(out))
