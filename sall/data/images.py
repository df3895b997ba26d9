"""Decoding and up-front validation of image files.

- `read_image(path, size)`: decode a file (PIL), RGB, center-crop to a square, resize -> uint8 HxWx3.
- `load_image(image, size)`: the same for any manifest `image` value (`synthetic://...` ids are rendered).
- `check_images(paths, origin)`: before any training, every file must exist and decode fully
  (truncated files included); fails with one DataError line naming the first bad file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageFile

from sall.errors import DataError

SYNTHETIC_PREFIX = "synthetic://"
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# PIL must refuse truncated files instead of padding them with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Large fundus photographs (e.g. 4000x3000 or bigger) are legitimate; keep the guard only against absurd sizes.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 400_000_000)


def _open_full(path: str) -> Image.Image:
    """Open and fully decode `path`; raises OSError/ValueError etc. on unreadable or truncated data."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have flipped it
    img = Image.open(path)
    img.load()
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit grey: scale the actual range to 0..255 instead of clipping.
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))  # fundus photos have a black surround
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def _center_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def read_image(path: str, size: int) -> np.ndarray:
    """Decode an image file to a uint8 array of shape (size, size, 3).

    RGB; non-square images are center-cropped to a square first (fundus photographs are
    centred), then resized with bilinear filtering (antialiased when downscaling).
    Raises DataError naming the file when it is missing, unreadable, truncated or corrupt.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(path) as img:
            if img.format == "JPEG":
                # Let libjpeg decode at a reduced scale when the file is much larger than needed.
                w, h = img.size
                s = min(w, h)
                if s >= 2 * size:
                    scale = size / s
                    img.draft("RGB", (max(size, int(w * scale)), max(size, int(h * scale))))
            img.load()
            out = _to_rgb(img)
            out = _center_square(out)
            if out.size != (size, size):
                out = out.resize((size, size), Image.BILINEAR)
            arr = np.asarray(out, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image '{path}' does not exist; expected a readable image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(
            f"image '{path}' is truncated or corrupt: {_reason(e)}; expected a readable image file"
        ) from None
    return np.ascontiguousarray(arr)


def load_image(image: str, size: int) -> np.ndarray:
    """A manifest `image` value -> uint8 (size, size, 3): synthetic ids are rendered, paths decoded."""
    if image.startswith(SYNTHETIC_PREFIX):
        from sall.data.synthetic import render  # lazy: only synthetic runs need it

        return render(image, size)
    return read_image(image, size)


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


def _problem(path: str) -> str | None:
    """None when the file decodes fully, else a short description of the problem."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isdir(path):
        return "is a folder, not a file"
    try:
        img = _open_full(path)
        img.close()
    except PermissionError:
        return "is not readable (permission denied)"
    except Image.UnidentifiedImageError:
        return "is not an image PIL can read (unknown format or corrupt header)"
    except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
        return f"is truncated or corrupt: {_reason(e)}"
    return None


def check_images(
    paths: Sequence[str],
    origin: str,
    workers: int = 8,
    *,
    names: Sequence[str] | None = None,
    first_row: int | None = 2,
) -> None:
    """Every image must exist and decode completely; fail with one DataError line otherwise.

    `paths` are the files to check, in manifest order; `names` (same length, optional) is how
    each one is written in the user's input (e.g. the CSV's relative path) for the message;
    row numbers are `first_row + index` (2 = a CSV with a header line; None: no row number in the
    message, e.g. for an image folder). Synthetic ids are skipped.
    """
    paths = [str(p) for p in paths]
    if names is not None and len(names) != len(paths):
        raise ValueError("names must have the same length as paths")
    todo = [i for i, p in enumerate(paths) if not p.startswith(SYNTHETIC_PREFIX)]
    if not todo:
        return
    workers = max(1, min(int(workers), len(todo)))
    if workers == 1:
        problems = [_problem(paths[i]) for i in todo]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            problems = list(pool.map(lambda i: _problem(paths[i]), todo))
    bad = [(i, p) for i, p in zip(todo, problems) if p is not None]
    if not bad:
        return
    i, problem = bad[0]
    name = names[i] if names is not None else paths[i]
    others = f" ({len(bad) - 1} other image(s) are bad too)" if len(bad) > 1 else ""
    row = f" (row {first_row + i})" if first_row is not None else ""
    raise DataError(f"{origin}: image '{name}'{row} {problem}; expected a readable image file{others}")
