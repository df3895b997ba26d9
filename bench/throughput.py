"""Training throughput: our student step vs a bare timm + torch loop, and the data loader alone.

Same backbone, batch size, resolution and threads for both. Prints a table, and with --json one
JSON object as the last line: train_vs_bare and loader_vs_train (ratios) and the images/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from sall.cli import guarded


def bare_loop(backbone: str, batch: int, size: int, steps: int, k: int) -> float:
    """images/s of the plainest possible loop: a fixed random batch, one head, CE, Adam."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(backbone, num_classes=k)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, k, (batch,))
    model.train()
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of (our epoch, bare loop)")
    p.add_argument("--cache-dir", default=".sall-cache")
    p.add_argument("--no-prefetch", action="store_true", help="assemble batches in the training thread (before)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import sall.data.loader

    sall.data.loader.PREFETCH = not args.no_prefetch

    from sall.chain import new_model, one_hot, prepare, student_train_rows
    from sall.config import from_preset
    from sall.data.loader import Batches
    from sall.store import ArtifactStore
    from sall.tasks import TASKS
    from sall.train import Runtime, TrainSet, fit

    cfg = from_preset(
        "cpu", backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size, threads=args.threads
    )
    data = prepare(cfg, ArtifactStore(args.cache_dir))
    rt = Runtime.from_config(cfg)
    rows = student_train_rows(cfg, data)
    tasks_of = data.tasks_of(rows)
    rng = np.random.default_rng(0)
    targets, masks = {}, {}
    for t in cfg.tasks:  # a full SALL student: own labels hard, the other tasks' soft
        k = TASKS[t].num_classes
        soft = rng.dirichlet(np.ones(k), size=len(rows)).astype(np.float32)
        own = tasks_of == t
        soft[own] = one_hot(data.labels(rows[own]), k)
        targets[t], masks[t] = soft, np.ones(len(rows), dtype=bool)

    # the data loader alone (index, copy, augment, normalise)
    batches = Batches(
        data.images, rows, cfg.batch_size, shuffle=True, augment=cfg.augment, device=rt.device, drop_last=True
    )
    n = 0
    t0 = time.perf_counter()
    for _ in range(3):
        for x, _pos in batches:
            n += x.shape[0]
    loader_ips = n / (time.perf_counter() - t0)

    # ours and the bare loop alternate, round by round, so that load from elsewhere hits both alike;
    # the medians are reported
    model = new_model(cfg, list(cfg.tasks), 0)
    steps = len(rows) // cfg.batch_size
    train_r, bare_r = [], []
    for r in range(args.rounds):
        res = fit(
            model,
            data.images,
            TrainSet(rows, targets, masks),
            {},
            epochs=1,
            temperature=3.0,
            cfg=cfg,
            rt=rt,
            name="bench student",
            seed=r,
        )
        train_r.append(steps * cfg.batch_size / (res.profile["data_s"] + res.profile["step_s"]))
        bare_r.append(bare_loop(cfg.backbone, cfg.batch_size, cfg.image_size, steps, TASKS[cfg.tasks[0]].num_classes))
    train_ips, bare_ips = float(np.median(train_r)), float(np.median(bare_r))
    ratio = float(np.median(np.array(train_r) / np.array(bare_r)))

    out = dict(
        backbone=cfg.backbone,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        threads=args.threads,
        train_images_per_s=round(train_ips, 1),
        bare_images_per_s=round(bare_ips, 1),
        loader_images_per_s=round(loader_ips, 1),
        train_vs_bare=round(ratio, 3),
        loader_vs_train=round(loader_ips / train_ips, 2),
        data_share_of_train=round(res.profile["data_s"] / (res.profile["data_s"] + res.profile["step_s"]), 3),
        rounds=args.rounds,
        prefetch=not args.no_prefetch,
    )
    print(f"{'student step (ours, incl. data)':<34} {train_ips:9.1f} images/s", file=sys.stderr)
    print(f"{'bare timm + torch loop':<34} {bare_ips:9.1f} images/s", file=sys.stderr)
    print(f"{'data loader alone':<34} {loader_ips:9.1f} images/s", file=sys.stderr)
    print(f"train_vs_bare {out['train_vs_bare']}  loader_vs_train {out['loader_vs_train']}", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":  # a bad flag or a preemption (SIGTERM) is one line, as in `python -m sall run`
    sys.exit(guarded(main, debug=False))
