"""Every image decoded and resized once into on-disk uint8 arrays shared by every trial.

One array per task, keyed by the manifest's fingerprint, the image size and the task: a run of
two tasks never decodes (or renders) the third task's images. Built in parallel with a progress
line, published atomically through the artifact store and memory-mapped by readers.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from sall.data.images import load_image
from sall.store import Store


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fill(path: str, images: list[str], start: int, size: int) -> int:
    """Worker: decode images[...] into rows start.. of the array at path (opened read-write)."""
    arr = np.load(path, mmap_mode="r+")
    for i, image in enumerate(images):
        arr[start + i] = load_image(image, size)
    arr.flush()
    return len(images)


def build_array(images: list[str], size: int, path: Path, workers: int | None = None) -> None:
    """Decode `images` at `size` into a .npy file at `path` (written in place, then published).

    Decoding and especially rendering the synthetic images are Python-bound (threads do not help:
    measured 3.9 s serial vs 3.7 s with 4 threads for 300 renders), so chunks go to worker
    processes, one per core, each writing its rows of the memory-mapped array."""
    n = len(images)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    del arr  # the header and size are on disk; workers fill the rows
    if hasattr(os, "posix_fallocate"):  # Linux: reserve the blocks now, so a full disk is ENOSPC here
        with open(path, "r+b") as f:  # (the store's one-line error), not SIGBUS in a worker later
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    t0 = time.time()
    workers = workers or min(os.cpu_count() or 1, 8)
    chunk = max(50, -(-n // (workers * 8)))
    starts = range(0, n, chunk)
    done, step = 0, max(1, n // 10)
    if workers == 1 or n <= 2 * chunk:
        jobs = (_fill(str(path), images[s : s + chunk], s, size) for s in starts)
        pool = None
    else:  # fork: the workers only decode and draw (no torch), and start in milliseconds
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        jobs = pool.map(
            _fill, [str(path)] * len(starts), [images[s : s + chunk] for s in starts], starts, [size] * len(starts)
        )
    try:
        for k in jobs:
            done_before, done = done, done + k
            if done // step != done_before // step or done == n:
                _progress(f"[image cache] {done}/{n} images at {size}px ({time.time() - t0:.1f}s)")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


class TaskImages:
    """The manifest's images as one array indexed by manifest row, backed by one memory-mapped
    array per loaded task. Indexing a row of a task that was not loaded, or a row left out (its
    task None), is an error."""

    def __init__(self, arrays: dict[str, np.ndarray], row_tasks: np.ndarray, size: int) -> None:
        self.arrays = arrays
        self.row_tasks = np.asarray(row_tasks, dtype=object)
        self.local = np.zeros(len(row_tasks), dtype=np.int64)  # a row's index in its task's array
        for task in {t for t in self.row_tasks if t is not None}:
            mine = self.row_tasks == task
            self.local[mine] = np.arange(int(mine.sum()))
        self.shape = (len(row_tasks), size, size, 3)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: int | np.ndarray) -> np.ndarray:
        if np.ndim(rows) == 0:
            return self[np.array([rows])][0]
        rows = np.asarray(rows)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        tasks = self.row_tasks[rows]
        for task in set(tasks):
            if task not in self.arrays:
                what = "rows left out" if task is None else f"images of task '{task}'"
                raise KeyError(f"{what} were not loaded (loaded: {', '.join(self.arrays)})")
            mine = tasks == task
            out[mine] = self.arrays[task][self.local[rows[mine]]]
        return out


def image_array(
    manifest: pd.DataFrame,
    fingerprint: str,
    size: int,
    store: Store,
    tasks: tuple[str, ...] | list[str] | None = None,
    rows: np.ndarray | None = None,
) -> TaskImages:
    """The manifest's images at `size`, indexed by manifest row: the rows of `tasks` (default: all
    of the manifest's tasks), each task's array decoded once and memory-mapped. With `rows`, only
    those rows: a manifest that one replicate alone uses (data drawn for it) is not drawn in full."""
    row_tasks = manifest["task"].to_numpy()
    loaded = np.ones(len(manifest), dtype=bool)
    suffix = ""
    if rows is not None:
        loaded[:] = False
        loaded[np.asarray(rows)] = True
        suffix = "-rows" + hashlib.sha256(np.flatnonzero(loaded).tobytes()).hexdigest()[:12]
    wanted = [t for t in dict.fromkeys(row_tasks) if tasks is None or t in tasks]
    arrays = {}
    for task in wanted:
        images = manifest["image"].to_numpy()[(row_tasks == task) & loaded].tolist()
        got = store.get_or_build(
            "images",
            f"{fingerprint}-{size}-{task}{suffix}",
            ".npy",
            lambda tmp, images=images: build_array(images, size, tmp),
        )
        arrays[task] = np.load(got.path, mmap_mode="r")
    return TaskImages(arrays, np.where(loaded, row_tasks, None), size)
