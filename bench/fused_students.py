"""Training throughput of K students trained apart vs as one fused model (sall/fused.py), on the CPU.

At the `cpu` preset's settings (test_resnet, 64 px, batch 16, two heads with soft targets) on
random images: for K = 1..4 and 1 and 2 torch threads, K separate `fit`s of one epoch against one
`fit_fused` of K members, interleaved repeat by repeat in one process so that load from elsewhere
hits both alike. images/s counts every member's images (K x the batch per step) over the training
steps only (fit's data_s + step_s). Prints a table of medians, and with --json one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import time

import numpy as np
import torch

from sall.chain import new_model
from sall.config import from_preset
from sall.fused import fit_fused
from sall.train import Runtime, TrainSet, fit

HEADS = {"dr": 5, "amd": 4}


def _trainset(n: int, seed: int) -> TrainSet:
    rng = np.random.default_rng(seed)
    targets = {h: rng.dirichlet(np.ones(k), size=n).astype(np.float32) for h, k in HEADS.items()}
    return TrainSet(np.arange(n), targets, {h: np.ones(n, dtype=bool) for h in HEADS})


def _ips(results, images: int) -> float:
    """Member-images per second over the training steps of `results` (FitResults)."""
    return images / sum(r.profile["data_s"] + r.profile["step_s"] for r in results)


def measure(k: int, cfg, images: np.ndarray, n: int) -> dict[str, float]:
    """images/s of K students trained apart and fused, one epoch of `n` images each."""
    rt = Runtime.from_config(cfg)
    trains = [_trainset(n, seed) for seed in range(k)]
    temps = [float(t) for t in range(1, k + 1)]
    kw = dict(epochs=1, cfg=cfg, rt=rt, name="bench", seed=0)
    with contextlib.redirect_stderr(io.StringIO()):  # fit's epoch lines
        apart = [fit(new_model(cfg, list(HEADS), 0), images, t, {}, temperature=T, **kw) for t, T in zip(trains, temps)]
        members = [new_model(cfg, list(HEADS), 0) for _ in range(k)]
        fused = fit_fused(members, images, trains, {}, temperatures=temps, **kw)
    return {"apart": _ips(apart, k * n), "fused": _ips(fused[:1], k * n)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ks", default="1,2,3,4")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", type=int, default=8, help="training batches per student and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    ks, threads = [int(k) for k in args.ks.split(",")], [int(t) for t in args.threads.split(",")]
    cfg0 = from_preset("cpu", device="cpu")
    n = args.batches * cfg0.batch_size
    images = np.random.default_rng(0).integers(0, 255, size=(n, cfg0.image_size, cfg0.image_size, 3), dtype=np.uint8)
    runs: dict[tuple[int, int], dict[str, list[float]]] = {}
    t0 = time.time()
    measure(1, cfg0.replace(threads=1), images, n)  # warm-up: first calls allocate and pick kernels
    for _ in range(args.repeats):
        for th in threads:
            for k in ks:
                got = measure(k, cfg0.replace(threads=th), images, n)
                for mode, v in got.items():
                    runs.setdefault((th, k), {}).setdefault(mode, []).append(v)
    rows = [_row(th, k, r) for (th, k), r in sorted(runs.items())]
    _print(rows, cfg0, time.time() - t0)
    if args.json:
        print(json.dumps({"rows": rows, "load": os.getloadavg(), "torch": torch.__version__}))
    return 0


def _row(threads: int, k: int, r: dict[str, list[float]]) -> dict:
    apart, fused = statistics.median(r["apart"]), statistics.median(r["fused"])
    ratios = [f / a for a, f in zip(r["apart"], r["fused"])]
    return dict(
        threads=threads, k=k, apart=round(apart, 1), fused=round(fused, 1), ratio=round(statistics.median(ratios), 3)
    )


def _print(rows: list[dict], cfg, seconds: float) -> None:
    print(f"{cfg.backbone}, {cfg.image_size} px, batch {cfg.batch_size}; member-images/s, medians; {seconds:.0f}s")
    print(f"torch {torch.__version__}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("threads  K   apart   fused  fused/apart")
    for r in rows:
        print(f"{r['threads']:>7} {r['k']:>2} {r['apart']:>7.1f} {r['fused']:>7.1f} {r['ratio']:>11.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
