"""Every image decoded and resized once into an on-disk uint8 array shared by every trial.

Keyed by the manifest's fingerprint and the image size; built in parallel with a progress line;
published atomically through the artifact store and memory-mapped by readers.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from sall.data.images import load_image
from sall.store import ArtifactStore


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_array(images: list[str], size: int, path: Path, workers: int = 4) -> None:
    """Decode `images` at `size` into a .npy file at `path` (written in place, then published)."""
    n = len(images)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    t0 = time.time()
    step = max(1, n // 10)

    def one(i: int) -> int:
        arr[i] = load_image(images[i], size)
        return i

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, _ in enumerate(pool.map(one, range(n)), 1):
            if done % step == 0 or done == n:
                _progress(f"[image cache] {done}/{n} images at {size}px ({time.time() - t0:.1f}s)")
    arr.flush()
    del arr


def image_array(manifest: pd.DataFrame, fingerprint: str, size: int, store: ArtifactStore) -> np.ndarray:
    """The (N, size, size, 3) uint8 array of the manifest's images, row-aligned, memory-mapped."""
    got = store.get_or_build(
        "images", f"{fingerprint}-{size}", ".npy",
        lambda tmp: build_array(manifest["image"].tolist(), size, tmp),
    )
    return np.load(got.path, mmap_mode="r")
