"""Students of one fold at several temperatures trained as one fused model (issue 27).

Every temperature on a fold trains the same architecture on the same images in the same order;
only the soft targets (and with them the loss) differ. Their parameters are disjoint and Adam
(like SGD) acts element by element, so K students can be one model: each parameter and buffer
stacked along a new first dimension (`torch.func.stack_module_state`), the forward one
`torch.func.vmap` of `functional_call` over that dimension with the images shared, the loss the
sum of the members' losses (each at its own T), one optimiser over the stacked tensors. Each
member's gradient is then its own loss's gradient, and each one's result equals its separate
training up to the order of floating-point sums (vmap batches a member's convolutions into one
grouped convolution; tests/test_fused.py measures the difference).

BatchNorm: timm's layers update their running statistics in place in train mode. vmap refuses
an in-place update of an unbatched tensor by a batched one, which is what a single module's
buffers would be; here the buffers are stacked and vmapped over like the parameters, so each
update is batched into batched and lands in that member's slice of the stacked buffer (checked
against separate models: the same running means). `torch.func.replace_all_batch_norm_modules_`
is not used: it stops tracking running statistics, so evaluation would use batch statistics and
differ from a plain MultiHeadNet's.

The training is `sall.train.fit` itself (its loop, loss, optimiser, scheduler, checkpoints): the
fused module's heads are named `<head>@<member>`, each with its member's temperature, and a
`keep` rule chooses the kept epoch per member. With dropout (not in test_resnet), members draw
their own masks (vmap's randomness="different"), so they equal separate trainings only in
distribution. Measured on a 2-core CPU the fused step is slower than separate ones
(docs/performance.md): this is for GPUs, where one large kernel beats K small ones.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from sall.checkpoint import CheckpointSink, Progress
from sall.config import TrialConfig
from sall.model import MultiHeadNet
from sall.train import EpochCallback, FitResult, KeepRule, Runtime, TrainSet, _Loop, fit, keep_model

SEP = "@"  # a fused head's name: <head>@<member>


def member_head(head: str, k: int) -> str:
    return f"{head}{SEP}{k}"


def _flat(name: str) -> str:
    """A parameter's dotted name as one attribute name (register_parameter refuses dots)."""
    return name.replace(".", "__")


class FusedStudents(nn.Module):
    """K MultiHeadNets of one architecture as one module: their parameters and buffers stacked on
    a new first dimension, the forward vmapped over it. forward(x) gives every member's logits of
    every head, keyed `<head>@<member>`."""

    def __init__(self, members: Sequence[MultiHeadNet]) -> None:
        super().__init__()
        params, buffers = stack_module_state(list(members))
        persistent = set(members[0].state_dict())
        self.k, self.heads = len(members), list(members[0].heads)
        self.param_names, self.buffer_names = list(params), list(buffers)
        for n, t in params.items():
            self.register_parameter(_flat(n), nn.Parameter(t.detach().clone()))
        for n, t in buffers.items():
            self.register_buffer(_flat(n), t.clone(), persistent=n in persistent)
        # the members' architecture without storage: functional_call supplies every tensor; in a
        # list, so that it is no submodule (its tensors would be counted as the fused model's)
        self._shell = [copy.deepcopy(members[0]).to("meta")]

    def train(self, mode: bool = True) -> FusedStudents:
        super().train(mode)
        self._shell[0].train(mode)  # BatchNorm's mode lives on the shell's layers
        return self

    def to(self, *args, memory_format: torch.memory_format | None = None, **kwargs) -> FusedStudents:
        """As nn.Module.to, except that a memory format applies to each member's slice: torch's
        channels_last is defined for 4-D tensors, and the stacked convolution weights are 5-D."""
        if memory_format is not None:
            self._apply(lambda t: _per_member_format(t, memory_format))
        return super().to(*args, **kwargs) if args or kwargs else self

    def _one(self, params: dict, buffers: dict, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return functional_call(self._shell[0], (params, buffers), (x,))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        params = {n: getattr(self, _flat(n)) for n in self.param_names}
        buffers = {n: getattr(self, _flat(n)) for n in self.buffer_names}
        out = vmap(self._one, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
        return {member_head(h, k): out[h][k] for k in range(self.k) for h in self.heads}


def _per_member_format(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A stacked 5-D weight whose every member slice is in `fmt` (channels_last: channels
    innermost); other tensors as they are."""
    if t.dim() != 5 or fmt != torch.channels_last:
        return t
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def member_state(state: dict[str, torch.Tensor], members: FusedStudents, k: int) -> dict[str, torch.Tensor]:
    """Member k's weights, from a fused state dict, as a plain MultiHeadNet's state dict."""
    names = [n for n in members.param_names + members.buffer_names if _flat(n) in state]
    return {n: state[_flat(n)][k].clone() for n in names}


def member_metrics(metrics: dict[str, float], k: int) -> dict[str, float]:
    """Member k's metrics, named as a separate training names them (`train/dr/loss`), from the
    fused ones (`train/dr@k/loss`); metrics of no head (epoch, epoch_s) are shared."""
    out = {}
    for name, v in metrics.items():
        parts = name.split("/")
        if len(parts) < 2:
            out[name] = v
        elif parts[1].endswith(f"{SEP}{k}"):
            out["/".join([parts[0], parts[1].rsplit(SEP, 1)[0], *parts[2:]])] = v
    return out


def _member_score(metrics: dict[str, float]) -> float:
    """What `keep_model` ranks a model's epoch by, for one member's metrics: mean validation
    accuracy, else the negated training loss (a mean over batches: the same ranking as its sum)."""
    accs = [v for n, v in metrics.items() if n.startswith("val/")]
    if accs:
        return float(np.mean(accs))
    return -float(sum(v for n, v in metrics.items() if n.startswith("train/")))


def keep_members(members: FusedStudents) -> KeepRule:
    """The fused model's `keep` rule: with checkpoint=last the last epoch (as `keep_model`); with
    best, each member's slices of the weights are replaced where that member's own score beats its
    best of the earlier epochs (in `p.history`), so each keeps the epoch a separate training would."""

    def keep(loop: _Loop, p: Progress, metrics: dict[str, float]) -> None:
        if loop.cfg.checkpoint == "last":
            keep_model(loop, p, metrics)
            return
        now = loop.model.state_dict()
        for k in range(members.k):
            best = max((_member_score(member_metrics(h, k)) for h in p.history), default=-float("inf"))
            if _member_score(member_metrics(metrics, k)) > best:
                for n, v in now.items():  # p.best_state holds copies of its own (fit's, or a checkpoint's)
                    p.best_state[n][k] = v[k].detach().cpu()
                p.best_epoch = p.epoch

    return keep


def kept_epoch(history: list[dict[str, float]], cfg: TrialConfig) -> int:
    """The epoch a separate training of this member keeps: the last, or the first best."""
    if cfg.checkpoint == "last":
        return int(history[-1]["epoch"])
    scores = [_member_score(h) for h in history]
    return int(history[int(np.argmax(scores))]["epoch"])


def _check_members(members: Sequence[MultiHeadNet], trains: Sequence[TrainSet], temperatures: Sequence[float]) -> None:
    """Fusion needs one architecture, one set of heads and one row order for every member."""
    if not (len(members) == len(trains) == len(temperatures) > 0):
        raise ValueError(f"{len(members)} members, {len(trains)} training sets, {len(temperatures)} temperatures")
    shapes = [{n: tuple(v.shape) for n, v in m.state_dict().items()} for m in members]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("fused members must share one architecture (the same state dict names and shapes)")
    if any(not np.array_equal(t.rows, trains[0].rows) or set(t.targets) != set(members[0].heads) for t in trains):
        raise ValueError("fused members must train on the same rows, with one target per head")


def _fused_trainset(trains: Sequence[TrainSet]) -> TrainSet:
    """The members' training sets as one, their targets and masks under `<head>@<member>`."""
    targets, masks = {}, {}
    for k, t in enumerate(trains):
        for h in t.targets:
            targets[member_head(h, k)], masks[member_head(h, k)] = t.targets[h], t.masks[h]
    return TrainSet(trains[0].rows, targets, masks)


def fit_fused(
    members: Sequence[MultiHeadNet],
    images: np.ndarray,
    trains: Sequence[TrainSet],
    val: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    epochs: int,
    temperatures: Sequence[float],
    cfg: TrialConfig,
    rt: Runtime,
    name: str,
    seed: int,
    on_epoch: Sequence[EpochCallback | None] | None = None,
    checkpoints: CheckpointSink | None = None,
) -> list[FitResult]:
    """`fit` for K students at once: member k starts from `members[k]`'s weights (one seed for all,
    or states of its own), trains on `trains[k]` at `temperatures[k]`, and ends with its kept
    weights loaded into `members[k]` and a FitResult of its own (its state, kept epoch and
    history as `fit` gives them; the profile and costs are the fused training's, shared).

    `val` is per head as in `fit` (every member validates on the same rows). `on_epoch[k]`
    receives member k's metrics, as `fit` would pass them. The checkpoint is the fused training's.
    """
    _check_members(members, trains, temperatures)
    fused = FusedStudents(members)
    callbacks = list(on_epoch) if on_epoch is not None else [None] * fused.k

    def report(epoch: int, metrics: dict[str, float]) -> None:
        for k, cb in enumerate(callbacks):
            if cb is not None:
                cb(epoch, member_metrics(metrics, k))

    res = fit(
        fused,
        images,
        _fused_trainset(trains),
        {member_head(h, k): v for k in range(fused.k) for h, v in val.items()},
        epochs=epochs,
        temperature={member_head(h, k): t for k, t in enumerate(temperatures) for h in fused.heads},
        cfg=cfg,
        rt=rt,
        name=name,
        seed=seed,
        on_epoch=report,
        checkpoints=checkpoints,
        keep=keep_members(fused),
    )
    return [_member_result(res, fused, k, members[k], cfg) for k in range(fused.k)]


def _member_result(res: FitResult, fused: FusedStudents, k: int, model: MultiHeadNet, cfg: TrialConfig) -> FitResult:
    """Member k's part of the fused training's result, its kept weights loaded into `model`."""
    state = member_state(res.state, fused, k)
    model.load_state_dict(state)
    history = [member_metrics(h, k) for h in res.history]
    return FitResult(
        state, kept_epoch(history, cfg), history, res.profile, res.resumes, res.epochs_lost, res.lost_s, res.spent_s
    )
