"""Batches straight from the in-memory image array: no DataLoader workers, no per-image Python.

The images are already decoded and resized (the image cache), so a batch is one fancy-index of
a uint8 array, one host-to-device copy (pinned and non-blocking on CUDA) and one batched
augmentation on the device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from sall.data.augment import augment_batch, to_float

_END = object()
PREFETCH = True  # benchmarks switch it off to measure what the background thread buys


class Batches:
    """Iterate (x, positions) over `rows` of `images`; x is float NCHW in [0, 1] (the model
    standardises it for its weights); positions index into `rows`."""

    def __init__(
        self,
        images: np.ndarray,
        rows: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        device: torch.device,
        seed: int = 0,
        channels_last: bool = False,
        drop_last: bool = False,
        prefetch: bool | None = None,
    ) -> None:
        self.images = images
        self.rows = np.asarray(rows)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.device = device
        self.channels_last = channels_last
        self.drop_last = drop_last and len(self.rows) > batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.pin = device.type == "cuda"
        self.prefetch = PREFETCH if prefetch is None else prefetch

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        if not self.prefetch:
            yield from self._batches()
            return
        # one batch ahead in a background thread: numpy indexing and torch kernels release the
        # GIL, so the next batch is assembled while the model computes on this one
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def produce() -> None:
            try:
                for item in self._batches():
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(_END)
            except BaseException as e:  # surfaced in the consumer
                q.put(e)

        t = threading.Thread(target=produce, daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join(timeout=5)

    def _batches(self) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        order = self.rng.permutation(len(self.rows)) if self.shuffle else np.arange(len(self.rows))
        for b in range(len(self)):
            pos = order[b * self.batch_size : (b + 1) * self.batch_size]
            rows = self.rows[pos]
            # sorted reads are faster on a memory map; the batch order itself does not matter
            srt = np.argsort(rows, kind="stable")
            pos, rows = pos[srt], rows[srt]
            x = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
            if self.pin:
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
            x = to_float(x)
            if self.augment:  # in [0, 1] (the model standardises), so padding is black like the fundus border
                x = augment_batch(x, self.generator)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, pos
