"""What epoch checkpoints cost: the same training with and without them, interleaved, on a preset.

Random images at the preset's size and model (random init: a pretrained model has the same tensors),
`--n` training images. Reports the median epoch with and without checkpoints, and the seconds of
each whole checkpoint (state copied, packed, written atomically with its checksum) timed directly: on a shared machine
the epochs vary more than a write costs, so `write_share` (write seconds per epoch / epoch seconds)
is the number to trust, the side-by-side ratio its cross-check. --json: one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np

from sall.chain import new_model, one_hot
from sall.checkpoint import Checkpointer, StoreCheckpoints
from sall.config import from_preset
from sall.store import open_store
from sall.train import Runtime, TrainSet, fit

WRITES: list[float] = []  # seconds of each whole checkpoint: state copied, packed, written, progress marked


def _timed(save):
    def timed(self, p) -> None:
        t0 = time.perf_counter()
        save(self, p)
        WRITES.append(time.perf_counter() - t0)

    return timed


Checkpointer.save = _timed(Checkpointer.save)


class SizedSink(StoreCheckpoints):
    """A store sink that remembers the size of the last checkpoint."""

    size = 0

    def save(self, data: bytes) -> None:
        super().save(data)
        self.size = len(data)


def one_fit(cfg, images, labels, epochs: int, sink) -> list[float]:
    """Epoch seconds of one training (with checkpoints into `sink`, or none)."""
    n = len(images) - 32
    rows, val = np.arange(n), np.arange(n, len(images))
    train = TrainSet(rows, {"dr": one_hot(labels[rows], 5)}, {"dr": np.ones(n, dtype=bool)})
    res = fit(
        new_model(cfg, ["dr"], 0),
        images,
        train,
        {"dr": (val, labels[val])},
        epochs=epochs,
        temperature=1.0,
        cfg=cfg,
        rt=Runtime.from_config(cfg),
        name=f"bench {'with' if sink else 'without'}",
        seed=0,
        checkpoints=sink,
    )
    if sink is not None:
        sink.clear()
    return [h["epoch_s"] for h in res.history]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--n", type=int, default=512, help="training images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="with/without pairs, interleaved")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    cfg = from_preset(a.preset, pretrained=False, device="cpu", threads=a.threads)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(a.n + 32, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, size=len(images))
    with_s, without_s, size = [], [], 0
    with tempfile.TemporaryDirectory() as d:
        for _ in range(a.repeats):
            sink = SizedSink(open_store(d), "bench")
            with_s += one_fit(cfg, images, labels, a.epochs, sink)
            size = sink.size
            without_s += one_fit(cfg, images, labels, a.epochs, None)
    out = dict(
        preset=a.preset,
        backbone=cfg.backbone,
        image_size=cfg.image_size,
        n_train=a.n,
        threads=a.threads,
        checkpoint_mb=round(size / 2**20, 2),
        write_s=round(statistics.median(WRITES), 4),
        epoch_with_s=round(statistics.median(with_s), 3),
        epoch_without_s=round(statistics.median(without_s), 3),
    )
    out["write_share"] = round(out["write_s"] * len(WRITES) / len(with_s) / out["epoch_without_s"], 4)
    out["with_vs_without"] = round(out["epoch_with_s"] / out["epoch_without_s"], 3)
    for k, v in out.items():
        print(f"{k:>16}  {v}")
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
