"""One training loop for every model of the chain: teachers, students and the ablation variants.

A model has one head per entry of `targets`; each row has a target distribution and a mask per
head. Teachers are single-head, hard targets, T = 1; the multi-task student has a head per task
with soft targets where `sa_labels` is on. Which weights are kept is the config's `checkpoint`:
the best epoch on validation accuracy, or the last one (the paper's choice, Sec. III-A). The
learning rate is constant or follows a cosine decay over all steps (`schedule`): a decayed rate
ends training at a settled point, so the last epoch is as good as the best and much less noisy.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from sall.checkpoint import (
    Checkpointer,
    CheckpointSink,
    Progress,
    data_rng_state,
    preemption_signals,
    set_data_rng_state,
)
from sall.config import TrialConfig
from sall.data.loader import Batches
from sall.losses import sall_loss
from sall.model import state_dict_cpu

EpochCallback = Callable[[int, dict[str, float]], None]
# what an epoch keeps (below: `keep_model`); called with the loop, the progress and the epoch's metrics
KeepRule = Callable[["_Loop", Progress, dict[str, float]], None]


@dataclass
class TrainSet:
    rows: np.ndarray  # manifest rows
    targets: dict[str, np.ndarray]  # head -> (n, K) float32 target distributions
    masks: dict[str, np.ndarray]  # head -> (n,) bool: does this row train this head?


@dataclass
class Runtime:
    """How to run (not what): device, precision, memory format, threads, profiling."""

    device: torch.device
    amp: bool
    channels_last: bool
    compile: bool = False
    profile: bool = False
    precision: str = ""  # the arithmetic path in words (`precision_path`), for the run's record

    @classmethod
    def from_config(cls, cfg: TrialConfig) -> Runtime:
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        if cfg.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = torch.device(cfg.device)
        amp, precision = precision_path(cfg, device)
        # auto: on, on CUDA and on the CPU alike (measured on 2 CPU cores: test_resnet at 64 px trains at
        # 337 images/s channels_last vs 268 contiguous, one thread, batch 32)
        channels_last = cfg.channels_last in ("on", "auto")
        return cls(device, amp, channels_last, cfg.compile, cfg.profile, precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync(self) -> None:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize()


# Backbones that `amp=auto` trains with bf16 autocast on a CPU with native bf16 (AMX or AVX512-BF16):
# only those measured faster there with accuracy and seed noise unchanged over 5 seeds
# (bench/seed_noise.py, as the `cpu` preset was chosen). None is yet: no machine with native bf16
# was available to measure accuracy on (docs/performance.md, "bf16 on the CPU"), so `auto` keeps
# fp32 on every CPU and says why in the run's `sall.precision` tag.
BF16_CPU_BACKBONES: frozenset[str] = frozenset()


def cpu_native_bf16() -> str | None:
    """The CPU's native bf16 instructions as torch detects them ("amx", "avx512_bf16"), or None."""
    if torch.cpu._is_amx_tile_supported():
        return "amx"
    if torch.cpu._is_avx512_bf16_supported():
        return "avx512_bf16"
    return None


def precision_path(cfg: TrialConfig, device: torch.device) -> tuple[bool, str]:
    """(bf16 autocast on?, which arithmetic path the training takes and why, in words)."""
    if device.type == "cuda":
        on = cfg.amp in ("auto", "bf16")
        return on, "bf16 autocast (cuda)" if on else "fp32 (cuda, amp=off)"
    native = cpu_native_bf16()
    isa = native or torch.backends.cpu.get_cpu_capability().lower()
    if cfg.amp == "bf16":
        return True, f"bf16 autocast (cpu, amp=bf16, {'native ' + native if native else 'emulated on ' + isa})"
    if cfg.amp == "off":
        return False, f"fp32 (cpu {isa}, amp=off)"
    if native and cfg.backbone in BF16_CPU_BACKBONES:
        return True, f"bf16 autocast (cpu {native}, measured faster for {cfg.backbone})"
    if native:
        return False, f"fp32 (cpu {native}: bf16 not measured for {cfg.backbone})"
    return False, f"fp32 (cpu {isa}: no native bf16)"


@dataclass
class FitResult:
    state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict[str, float]]
    profile: dict[str, float] = field(default_factory=dict)
    resumes: int = 0  # times this training continued from a checkpoint
    epochs_lost: float = 0.0  # work redone after kills, in epochs (a graceful preemption loses none)
    lost_s: float = 0.0  # the seconds of that work
    spent_s: float = 0.0  # training seconds over every attempt, the lost ones included


@dataclass
class _Loop:
    """What every epoch of one `fit` works with."""

    model: torch.nn.Module
    step_model: torch.nn.Module  # the model, or its compiled form
    images: np.ndarray
    batches: Batches
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    targets: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    val: dict[str, tuple[np.ndarray, np.ndarray]]
    temperature: float | Mapping[str, float]  # one T, or a T per head (sall/fused.py)
    epochs: int
    cfg: TrialConfig
    rt: Runtime
    ck: Checkpointer
    keep: KeepRule


def _train_epoch(loop: _Loop, p: Progress) -> None:
    """One pass over the shuffled training batches, from batch `p.batch` on (the ones before are
    drawn and dropped, so the data order and augmentation match an unbroken epoch)."""
    p.sums = {t: p.sums.get(t, 0.0) for t in loop.targets}
    with contextlib.closing(iter(loop.batches)) as it:  # a stop mid-epoch ends the prefetching thread
        for _ in range(p.batch):
            next(it)
        _steps(loop, it, p)


def _steps(loop: _Loop, it, p: Progress) -> None:
    """Train on the rest of `it`: the summed loss of each head goes into `p.sums`, the time spent
    waiting for data and stepping into `p.prof`, and the checkpointer may write (or stop) after
    each batch."""
    rt, heads = loop.rt, list(loop.targets)
    while True:
        t0 = time.perf_counter()
        try:
            x, pos = next(it)
        except StopIteration:
            break
        rt.sync()
        t1 = time.perf_counter()
        pos_t = torch.from_numpy(pos).to(rt.device)
        with rt.autocast():
            logits = loop.step_model(x)
        loss, parts = sall_loss(
            logits,
            {t: loop.targets[t][pos_t] for t in heads},
            {t: loop.masks[t][pos_t] for t in heads},
            loop.temperature,
        )
        loop.opt.zero_grad(set_to_none=True)
        loss.backward()
        loop.opt.step()
        loop.sched.step()
        rt.sync()
        t2 = time.perf_counter()
        p.prof["data_s"] += t1 - t0
        p.prof["step_s"] += t2 - t1
        for t in heads:
            p.sums[t] += parts[t]
        p.batch += 1
        loop.ck.at_batch(p)


def _val_accuracy(
    model: torch.nn.Module, images: np.ndarray, val: dict[str, tuple[np.ndarray, np.ndarray]], rt: Runtime
) -> dict[str, float]:
    """Accuracy of each head on its own task's validation rows (0 where it has none)."""
    accs = {}
    for t, (rows, labels) in val.items():
        z = predict(model, images, rows, rt)[t]
        accs[t] = float((z.argmax(1) == labels).mean()) if len(labels) else 0.0
    return accs


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrialConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule: constant, or cosine decay from lr to 0 over the run."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)


def make_optimizer(model: torch.nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(
        model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


@torch.no_grad()
def predict(
    model: torch.nn.Module, images: np.ndarray, rows: np.ndarray, rt: Runtime, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Logits of every head on `rows` (no augmentation), in the order of `rows`."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {}
    order: list[np.ndarray] = []
    for x, pos in Batches(
        images, rows, batch_size, shuffle=False, augment=False, device=rt.device, channels_last=rt.channels_last
    ):
        with rt.autocast():
            logits = model(x)
        order.append(pos)
        for t, z in logits.items():
            out.setdefault(t, []).append(z.float().cpu().numpy())
    inv = np.argsort(np.concatenate(order)) if order else np.zeros(0, dtype=np.int64)
    return {t: np.concatenate(v)[inv] for t, v in out.items()}


def fit(
    model: torch.nn.Module,
    images: np.ndarray,
    train: TrainSet,
    val: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    epochs: int,
    temperature: float | Mapping[str, float],
    cfg: TrialConfig,
    rt: Runtime,
    name: str,
    seed: int,
    on_epoch: EpochCallback | None = None,
    checkpoints: CheckpointSink | None = None,
    keep: KeepRule | None = None,
) -> FitResult:
    """Train for `epochs`; keep the best epoch by mean validation accuracy over the heads, or
    the last one (`cfg.checkpoint`).

    `val` maps a head to (rows, labels) of its own task's validation images. It is measured after
    every epoch with checkpoint=best, and only after the last with checkpoint=last, where it
    chooses nothing.

    With `checkpoints`, the training writes its state there (sall/checkpoint.py) and starts from
    the one it finds: the epochs it restores are passed to `on_epoch` again, so a caller that logs
    them keeps no hole (and, logging each step once, no duplicate). The caller clears the sink once
    the model is kept. A preemption signal stops it with `Preempted` after a checkpoint.

    `temperature` may be a T per head, and `keep` another rule than `keep_model` for what an epoch
    keeps: both for several students trained as one model (sall/fused.py).
    """
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if rt.compile else model
    opt = make_optimizer(model, cfg)
    heads = list(train.targets)
    targets = {t: torch.from_numpy(train.targets[t]).to(rt.device) for t in heads}
    masks = {t: torch.from_numpy(train.masks[t]).to(rt.device) for t in heads}
    batches = Batches(
        images,
        train.rows,
        cfg.batch_size,
        shuffle=True,
        augment=cfg.augment,
        device=rt.device,
        seed=seed,
        channels_last=rt.channels_last,
        drop_last=True,
    )
    sched = make_scheduler(opt, cfg, epochs * len(batches))
    ck = Checkpointer(checkpoints, name, model, opt, sched, batches)
    loop = _Loop(
        model,
        step_model,
        images,
        batches,
        opt,
        sched,
        targets,
        masks,
        val,
        temperature,
        epochs,
        cfg,
        rt,
        ck,
        keep or keep_model,
    )
    fresh = Progress(best_state=state_dict_cpu(model), prof={"data_s": 0.0, "step_s": 0.0, "eval_s": 0.0})
    fresh.data_rng = data_rng_state(batches)
    p = ck.resume(fresh)
    if p is not fresh:
        set_data_rng_state(batches, p.data_rng)
        for h in p.history if on_epoch is not None else ():
            on_epoch(int(h["epoch"]), {k: v for k, v in h.items() if k != "epoch"})
    with preemption_signals():
        while p.epoch <= epochs:
            _epoch(loop, p)
            _report(name, epochs, p.history[-1], on_epoch)
            ck.at_epoch_end(p)
    model.load_state_dict(p.best_state)
    return FitResult(p.best_state, p.best_epoch, p.history, p.prof, p.resumes, p.epochs_lost, p.lost_s, ck.spent(p))


def _epoch(loop: _Loop, p: Progress) -> None:
    """Epoch `p.epoch` from batch `p.batch`: train, validate where it chooses, keep the best so far;
    leaves `p` at the start of the next epoch with the epoch's metrics in `p.history`."""
    cfg, epoch = loop.cfg, p.epoch
    t_epoch = time.time()
    loop.model.train()
    _train_epoch(loop, p)
    t3 = time.perf_counter()
    metrics: dict[str, float] = {f"train/{t}/loss": p.sums[t] / max(p.batch, 1) for t in loop.targets}
    # with checkpoint=last the validation split chooses nothing: measure it once, at the end
    validate = cfg.checkpoint != "last" or epoch == loop.epochs or cfg.validate_every_epoch
    accs = _val_accuracy(loop.model, loop.images, loop.val, loop.rt) if validate else {}
    metrics.update({f"val/{t}/acc": acc for t, acc in accs.items()})
    p.prof["eval_s"] += time.perf_counter() - t3
    loop.keep(loop, p, metrics)
    metrics["epoch_s"] = time.time() - t_epoch
    p.history.append({"epoch": epoch, **metrics})
    p.epoch, p.batch, p.sums = epoch + 1, 0, {}
    p.data_rng = data_rng_state(loop.batches)  # where the next epoch's data order starts


def keep_model(loop: _Loop, p: Progress, metrics: dict[str, float]) -> None:
    """The whole model's weights of epoch `p.epoch` into `p.best_state` if it is the one to keep:
    the last epoch (checkpoint=last), or one whose mean validation accuracy over the heads beats
    the best so far (best; the negated summed training loss where nothing was validated)."""
    accs = [v for k, v in metrics.items() if k.startswith("val/")]
    score = float(np.mean(accs)) if accs else -float(sum(p.sums.values()))
    keep = p.epoch == loop.epochs if loop.cfg.checkpoint == "last" else score > p.best_score
    if keep:
        p.best_score, p.best_epoch, p.best_state = score, p.epoch, state_dict_cpu(loop.model)


def _report(name: str, epochs: int, h: dict[str, float], on_epoch: EpochCallback | None) -> None:
    """An epoch's line on stderr, and its metrics to the caller."""
    metrics = {k: v for k, v in h.items() if k != "epoch"}
    shown = " ".join(f"{k.split('/')[1]} {k.split('/')[0]} {v:.3f}" for k, v in metrics.items() if "/" in k)
    print(f"[{name}] epoch {int(h['epoch'])}/{epochs} {shown} ({metrics['epoch_s']:.1f}s)", file=sys.stderr, flush=True)
    if on_epoch is not None:
        on_epoch(int(h["epoch"]), metrics)
