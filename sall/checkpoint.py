"""Checkpoints inside a training, so that a killed or preempted teacher or student goes on where it was.

`fit` (sall/train.py) writes the whole state of a training at the end of every epoch, and within a
long epoch every `SALL_CHECKPOINT_EVERY_S` seconds at a batch boundary: model, optimiser, scheduler,
the position (epoch, batch), the best-so-far weights, the loss sums of the epoch so far, and every
random state the rest of the training draws from (torch, CUDA, numpy, python, and the data order's
own generators as they were at the start of the epoch, which a resume replays up to the batch). So a
resumed model is bit-identical to one trained without a break on the same machine.

A preemption signal (SIGTERM, and SIGUSR1, which Slurm sends before a requeue with `--signal`; the
list is `SALL_PREEMPT_SIGNALS`) makes the training write a checkpoint at the next batch boundary and
raise `Preempted`, which callers record apart from a failure.

Checkpoints live in the artifact store (`put`/`fetch`: atomic, checksummed, verified on read) under
the model's key, so a restart on any node that shares the store resumes it. A small progress record,
written every `SALL_PROGRESS_EVERY_S` seconds, tells a resume how much work a kill lost.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from sall.errors import SallError
from sall.model import state_dict_cpu

KIND = "checkpoints"  # the store's folder (or prefix) of checkpoints
FORMAT = 1  # bumped when the layout of a checkpoint changes: older ones are then ignored


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SallError(f"{name}={text!r} is invalid; expected a number of seconds > 0")
    return value


def every_s() -> float:
    """Seconds between checkpoints within an epoch (one is written at every epoch's end too)."""
    return _env_seconds("SALL_CHECKPOINT_EVERY_S", 600.0)


def progress_every_s() -> float:
    """Seconds between progress records (how far a training got, for counting the work a kill lost)."""
    return _env_seconds("SALL_PROGRESS_EVERY_S", 30.0)


def preempt_signals() -> list[signal.Signals]:
    """The signals that mean "checkpoint and stop": `SALL_PREEMPT_SIGNALS`, names such as TERM,USR1."""
    text = os.environ.get("SALL_PREEMPT_SIGNALS", "TERM,USR1")
    out = []
    for name in filter(None, (s.strip().upper() for s in text.split(","))):
        sig = getattr(signal.Signals, name if name.startswith("SIG") else f"SIG{name}", None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise SallError(f"SALL_PREEMPT_SIGNALS names '{name}'; expected signal names such as TERM,USR1")
        out.append(sig)
    return out


class Preempted(SallError):
    """A training stopped by a preemption signal after writing its checkpoint: a rerun continues it."""


_REQUESTED = threading.Event()


def request_preemption(signum: int | None = None, frame: Any = None) -> None:
    """Ask the running training to checkpoint and stop at its next batch boundary (a signal handler,
    or a call from any thread)."""
    _REQUESTED.set()


def preemption_requested() -> bool:
    return _REQUESTED.is_set()


@contextlib.contextmanager
def preemption_signals() -> Iterator[bool]:
    """While the body runs, the preemption signals request a checkpoint-and-stop instead of ending the
    process; yields whether they do. Only a main thread can take signals: elsewhere (a Ray Tune trial
    runs in a thread) the process keeps its own handlers and `request_preemption` is the way in."""
    _REQUESTED.clear()
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    old = {s: signal.signal(s, request_preemption) for s in preempt_signals()}
    try:
        yield True
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# where checkpoints are kept
class CheckpointSink(Protocol):
    """Where one training keeps its checkpoint and progress record (one writer: the training)."""

    def load(self) -> bytes | None: ...
    def save(self, data: bytes) -> None: ...
    def load_progress(self) -> dict[str, Any] | None: ...
    def save_progress(self, record: dict[str, Any]) -> None: ...
    def clear(self) -> None: ...


class StoreCheckpoints:
    """A training's checkpoint in the artifact store, as `checkpoints/<name>.ckpt` (and `.progress`)."""

    def __init__(self, store: Any, name: str) -> None:
        self.store, self.name = store, name

    def _read(self, suffix: str) -> bytes | None:
        got = self.store.fetch(KIND, self.name, suffix)
        return got.path.read_bytes() if got is not None else None

    def _write(self, suffix: str, data: bytes) -> None:
        self.store.put(KIND, self.name, suffix, lambda p: p.write_bytes(data))

    def load(self) -> bytes | None:
        return self._read(".ckpt")

    def save(self, data: bytes) -> None:
        self._write(".ckpt", data)

    def load_progress(self) -> dict[str, Any] | None:
        data = self._read(".progress")
        return json.loads(data) if data else None

    def save_progress(self, record: dict[str, Any]) -> None:
        self._write(".progress", json.dumps(record).encode())

    def clear(self) -> None:
        """The model is finished: its checkpoint is of no more use."""
        for suffix in (".ckpt", ".progress"):
            self.store.remove(KIND, self.name, suffix)


# ---------------------------------------------------------------------------------------------
# random states
def global_rng_state() -> dict[str, Any]:
    """Every process-wide generator the training may draw from: torch (CPU, CUDA), numpy, python."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_rest": json.dumps({**np_state, "state": {"pos": np_state["state"]["pos"]}}),
        "python": random.getstate(),
    }


def set_global_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    if st["cuda"]:
        torch.cuda.set_rng_state_all(st["cuda"])
    np_state = json.loads(st["numpy_rest"])
    np_state["state"]["key"] = st["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state(np_state)
    random.setstate(st["python"])


def data_rng_state(batches: Any) -> dict[str, Any]:
    """The data order's generators (shuffling, augmentation) of a `Batches`."""
    return {"numpy": json.dumps(batches.rng.bit_generator.state), "torch": batches.generator.get_state()}


def set_data_rng_state(batches: Any, st: dict[str, Any]) -> None:
    batches.rng.bit_generator.state = json.loads(st["numpy"])
    batches.generator.set_state(st["torch"])


def pack(obj: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes) -> dict[str, Any]:
    """Checkpoints hold only tensors and plain data: loaded without unpickling code."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# the training's state
@dataclass
class Progress:
    """Where a training is and what it has gathered: all of it goes into a checkpoint."""

    epoch: int = 1  # the epoch under way (or the next to start)
    batch: int = 0  # batches of it done
    sums: dict[str, float] = field(default_factory=dict)  # the epoch's loss sums so far
    best_score: float = -float("inf")
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    prof: dict[str, float] = field(default_factory=dict)
    data_rng: dict[str, Any] = field(default_factory=dict)  # the data order's state at the start of `epoch`
    spent_s: float = 0.0  # training seconds of every attempt before this one, lost ones included
    resumes: int = 0
    epochs_lost: float = 0.0  # of work redone after kills, summed over resumes
    lost_s: float = 0.0


_PLAIN = ("epoch", "batch", "sums", "best_score", "best_epoch", "history", "prof", "spent_s", "resumes")
_PLAIN += ("epochs_lost", "lost_s")


class Checkpointer:
    """Writes and restores one training's checkpoints, and turns a preemption request into one last
    checkpoint and `Preempted`. Without a sink it does nothing but that check."""

    def __init__(self, sink: CheckpointSink | None, name: str, model, opt, sched, batches) -> None:
        self.sink, self.name = sink, name
        self.model, self.opt, self.sched, self.batches = model, opt, sched, batches
        self.t0 = self.last_save = self.last_mark = time.monotonic()
        self.every_s = every_s() if sink is not None else 0.0
        self.progress_every_s = progress_every_s() if sink is not None else 0.0

    def spent(self, p: Progress) -> float:
        return p.spent_s + time.monotonic() - self.t0

    def _position(self, epoch: int, batch: int) -> int:
        return (epoch - 1) * max(len(self.batches), 1) + batch

    def save(self, p: Progress) -> None:
        if self.sink is None:
            return
        blob = {k: getattr(p, k) for k in _PLAIN}
        blob.update(
            format=FORMAT,
            spent_s=self.spent(p),
            history_json=json.dumps(p.history),
            best_state=p.best_state,
            data_rng=p.data_rng,
            global_rng=global_rng_state(),
            model=state_dict_cpu(self.model),
            opt=self.opt.state_dict(),
            sched=self.sched.state_dict(),
            batches_per_epoch=len(self.batches),
        )
        del blob["history"]
        self.sink.save(pack(blob))
        self._mark(p)
        self.last_save = time.monotonic()

    def _mark(self, p: Progress) -> None:
        self.sink.save_progress({"epoch": p.epoch, "batch": p.batch, "spent_s": self.spent(p)})
        self.last_mark = time.monotonic()

    def resume(self, p: Progress) -> Progress:
        """`p` as the latest checkpoint left it (model, optimiser and random states restored too), or
        `p` itself when there is none (or an unusable one, said in one line)."""
        data = self.sink.load() if self.sink is not None else None
        if data is None:
            return p
        try:
            blob = unpack(data)
            if blob.get("format") != FORMAT or blob["batches_per_epoch"] != len(self.batches):
                raise ValueError("written by another version or for other data")
            self.model.load_state_dict(blob["model"])
            self.opt.load_state_dict(blob["opt"])
            self.sched.load_state_dict(blob["sched"])
        except Exception as e:  # noqa: BLE001 (any unusable checkpoint: train from the start)
            say(f"[{self.name}] checkpoint unusable ({str(e).splitlines()[0][:200]}); training from the start")
            return p
        q = Progress(**{k: blob[k] for k in _PLAIN if k != "history"}, history=json.loads(blob["history_json"]))
        q.best_state, q.data_rng = blob["best_state"], blob["data_rng"]
        set_global_rng_state(blob["global_rng"])
        self._count_loss(q)
        return q

    def _count_loss(self, q: Progress) -> None:
        """Add the resume, and the work the last attempt did beyond the checkpoint, to `q`."""
        rec = self.sink.load_progress() or {}
        lost = max(
            0, self._position(rec.get("epoch", q.epoch), rec.get("batch", q.batch)) - self._position(q.epoch, q.batch)
        )
        lost_epochs = lost / max(len(self.batches), 1)
        lost_s = max(0.0, float(rec.get("spent_s", q.spent_s)) - q.spent_s)
        q.resumes += 1
        q.epochs_lost += lost_epochs
        q.lost_s += lost_s
        q.spent_s += lost_s
        say(
            f"[{self.name}] resuming at epoch {q.epoch}, batch {q.batch} (resume {q.resumes}; "
            f"{lost_epochs:.2f} epochs, {lost_s:.0f}s lost)"
        )

    def at_batch(self, p: Progress) -> None:
        """After each batch: stop on a preemption request; checkpoint or mark progress when due."""
        if preemption_requested():
            self.stop(p)
        if self.sink is None:
            return
        now = time.monotonic()
        if now - self.last_save >= self.every_s:
            self.save(p)
        elif now - self.last_mark >= self.progress_every_s:
            self._mark(p)

    def at_epoch_end(self, p: Progress) -> None:
        """`p` points at the next epoch: checkpoint it, then stop if preemption was requested."""
        self.save(p)
        if preemption_requested():
            self.stop(p, saved=True)

    def stop(self, p: Progress, saved: bool = False) -> None:
        if not saved:
            self.save(p)
        where = "no checkpoint store" if self.sink is None else "checkpoint written"
        raise Preempted(f"{self.name} preempted at epoch {p.epoch}, batch {p.batch} ({where}); rerun to continue")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
