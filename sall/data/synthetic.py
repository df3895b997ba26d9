"""The embedded default data set: synthetic fundus-like colour photographs with graded lesions.

Why it exists: the sweeps must run out of the box, on a laptop, without downloading a retinal data
set. The generator draws plausible fundus photographs (dark surround, orange-red fundus with
vignetting, optic disc, macula, vessel tree) and adds grade-dependent lesions for the three tasks.
DR and AMD deliberately share lesion *types* (bright yellow spots: hard exudates / drusen; dark red
blobs: haemorrhages / CNV bleeding), the premise of SALL that one task's teacher has something to say
about the other task's images. Nuisance variation (illumination, colour cast, blur, noise, lesion
counts whose ranges overlap between neighbouring grades, lesion contrast) and ~5 % label noise keep a
small CNN away from 100 % accuracy, so calibration and soft labels are meaningful.

An image is identified by a string such as ``synthetic://dr/00017?g=3&s=0`` (task, index, the grade
that is *rendered*, seed) which fully determines its pixels: :func:`render` derives its random
generator from a SHA-256 of the id, so the rendering is identical across calls, processes and
machines. The manifest's ``grade`` column is the label, equal to the rendered grade except for the
label noise.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from sall.data.manifest import check_manifest
from sall.errors import DataError
from sall.tasks import TASKS

SOURCE = "synthetic"
# Bump when the drawing changes: it is part of the data fingerprint, so cached images and the
# teachers trained on them are not reused across renderer versions.
# 3: DR grades 1 and 4 legible at 64 px (larger, more microaneurysms; wider neovessel tufts and a
# preretinal haemorrhage in every grade-4 eye), so the CPU preset learns DR robustly, not marginally.
RENDER_VERSION = 3
LABEL_NOISE = 0.05

# Grade distributions: imbalanced like the real data sets, every grade well represented.
GRADE_SHARES: dict[str, tuple[float, ...]] = {
    "dr": (0.35, 0.20, 0.20, 0.15, 0.10),
    "amd": (0.35, 0.25, 0.20, 0.20),
    "arter": (0.60, 0.40),
}

_ID_RE = re.compile(r"^synthetic://([a-z]+)/(\d{1,9})\?g=(\d+)&s=(\d{1,12})$")


def image_id(task: str, index: int, grade: int, seed: int) -> str:
    """The id of one synthetic image; it determines the rendering completely."""
    return f"synthetic://{task}/{index:05d}?g={grade}&s={seed}"


def parse_id(image: str) -> tuple[str, int, int, int]:
    """(task, index, rendered grade, seed) of a synthetic image id; DataError if malformed."""
    m = _ID_RE.match(str(image))
    if m is None:
        raise DataError(
            f"synthetic image id '{image}' is malformed; expected synthetic://TASK/INDEX?g=GRADE&s=SEED, "
            "e.g. synthetic://dr/00017?g=3&s=0"
        )
    task, index, grade, seed = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
    if task not in TASKS:
        raise DataError(f"synthetic image id '{image}': unknown task '{task}'; expected one of {', '.join(TASKS)}")
    n = TASKS[task].num_classes
    if not 0 <= grade < n:
        raise DataError(
            f"synthetic image id '{image}': grade {grade} out of range for task {task}; expected 0..{n - 1}"
        )
    return task, index, grade, seed


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded from a SHA-256 of the parts: stable across processes (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _grade_counts(n: int, shares: tuple[float, ...]) -> list[int]:
    """Largest-remainder split of n into the shares, at least one image per grade when n allows."""
    raw = [n * s for s in shares]
    counts = [int(math.floor(r)) for r in raw]
    order = sorted(range(len(shares)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):  # tiny n: take from the largest grade so every grade has one image
        if counts[i] == 0 and max(counts) > 1:
            counts[int(np.argmax(counts))] -= 1
            counts[i] = 1
    return counts


def synthetic_manifest(
    n_per_task: int = 800, seed: int = 0, tasks: tuple[str, ...] = ("dr", "amd", "arter")
) -> pd.DataFrame:
    """The manifest of the embedded synthetic data set: n_per_task images per task.

    Deterministic in (n_per_task, seed, tasks); a task's rows do not depend on which other tasks are
    asked for. Two consecutive images (right eye, left eye) share a patient id, so grouped splits are
    exercised; patient ids carry the task, so no patient straddles tasks. About 5 % of the labels are
    moved to a neighbouring grade (label noise), decided from the seed.
    """
    if isinstance(n_per_task, bool) or not isinstance(n_per_task, (int, np.integer)) or n_per_task < 1:
        raise DataError(f"synthetic data set: n_per_task must be a positive integer, got {n_per_task!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"synthetic data set: seed must be a non-negative integer, got {seed!r}")
    tasks = tuple(tasks)
    if not tasks:
        raise DataError("synthetic data set: no task asked for; expected some of " + ", ".join(TASKS))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise DataError(
            f"synthetic data set: unknown task(s) {', '.join(map(str, unknown))}; expected some of {', '.join(TASKS)}"
        )
    if len(set(tasks)) != len(tasks):
        raise DataError(f"synthetic data set: task listed twice in {', '.join(tasks)}")

    rows = []
    for task in tasks:
        n_cls = TASKS[task].num_classes
        shares = GRADE_SHARES.get(task, tuple([1.0 / n_cls] * n_cls))
        rng = _rng("manifest", task, int(seed))
        true = np.repeat(np.arange(n_cls), _grade_counts(int(n_per_task), shares))
        rng.shuffle(true)
        label = true.copy()
        n_noisy = int(round(LABEL_NOISE * n_per_task))
        for i in rng.choice(n_per_task, size=n_noisy, replace=False):
            g = int(true[i])
            if g == 0:
                label[i] = 1
            elif g == n_cls - 1:
                label[i] = g - 1
            else:
                label[i] = g + (1 if rng.random() < 0.5 else -1)
        for i in range(int(n_per_task)):
            rows.append(
                (image_id(task, i, int(true[i]), int(seed)), task, int(label[i]), f"{task}-p{i // 2:05d}", SOURCE)
            )
    df = pd.DataFrame(rows, columns=["image", "task", "grade", "patient", "source"])
    return check_manifest(df, SOURCE)


# ----------------------------------------------------------------------------------------------
# Rendering. Geometry lives in normalised coordinates (u, v) in [-1, 1], v pointing down, so the
# random draws do not depend on the output size; pixels are drawn at twice the output size and
# box-downsampled (anti-aliasing).

_DARK = np.array([0.50, 0.20, 0.20], np.float32)  # multiplier at full opacity: vessels, haemorrhages
_YELLOW = np.array([1.00, 0.86, 0.36], np.float32)  # hard exudates
_PALE = np.array([0.96, 0.84, 0.56], np.float32)  # drusen, cotton-wool spots, arterial reflex
_CNV = np.array([0.40, 0.42, 0.30], np.float32)  # choroidal neovascular membrane (grey-green)


class _Canvas:
    """Lazily created 8-bit alpha layers, drawn with PIL in pixel coordinates of an R x R canvas."""

    def __init__(self, res: int):
        self.res = res
        self.half = res / 2.0
        self.layers: dict[str, Image.Image] = {}
        self.draws: dict[str, ImageDraw.ImageDraw] = {}

    def draw(self, name: str) -> ImageDraw.ImageDraw:
        if name not in self.draws:
            self.layers[name] = Image.new("L", (self.res, self.res), 0)
            self.draws[name] = ImageDraw.Draw(self.layers[name])
        return self.draws[name]

    def px(self, u: float, v: float) -> tuple[float, float]:
        return ((u + 1.0) * self.half, (v + 1.0) * self.half)

    def ellipse(self, name: str, u: float, v: float, ru: float, rv: float, alpha: float) -> None:
        x, y = self.px(u, v)
        rx, ry = max(ru * self.half, 0.5), max(rv * self.half, 0.5)
        a = alpha
        if rx < 1.0 and ry < 1.0:  # sub-pixel: keep the ink, spread over one pixel
            a = alpha * max(rx * ry * 4.0 / 4.0, 0.35)
            rx = ry = 0.5
        self.draw(name).ellipse((x - rx, y - ry, x + rx, y + ry), fill=int(np.clip(a, 0, 1) * 255))

    def rot_ellipse(self, name: str, u: float, v: float, ru: float, rv: float, ang: float, alpha: float) -> None:
        t = np.linspace(0, 2 * np.pi, 14, endpoint=False)
        ca, sa = math.cos(ang), math.sin(ang)
        eu, ev = ru * np.cos(t), rv * np.sin(t)
        pu, pv = u + eu * ca - ev * sa, v + eu * sa + ev * ca
        pts = [self.px(a, b) for a, b in zip(pu, pv)]
        self.draw(name).polygon(pts, fill=int(np.clip(alpha, 0, 1) * 255))

    def polyline(self, name: str, pts: np.ndarray, width: float, alpha: float) -> None:
        """Line through pts (normalised, shape (n, 2)) of the given width (normalised)."""
        w = width * self.half
        wi = max(1, int(round(w)))
        a = min(1.0, max(0.0, alpha * min(1.0, w / wi)))
        xy = ((pts + 1.0) * self.half).ravel().tolist()
        self.draw(name).line(xy, fill=int(a * 255), width=wi, joint="curve" if wi > 2 else None)

    def alpha(self, name: str, blur: float = 0.0) -> np.ndarray | None:
        """The layer box-downsampled 2x (anti-aliased coverage), then blurred by `blur` pixels."""
        if name not in self.layers:
            return None
        im = self.layers[name].reduce(2)
        if blur > 0.1:
            im = im.filter(ImageFilter.GaussianBlur(blur))
        return np.asarray(im, dtype=np.float32) * (1.0 / 255.0)


def _walk(
    rng: np.random.Generator,
    start: tuple[float, float],
    angle: float,
    length: float,
    curvature: float,
    tortuosity: float,
    step: float = 0.025,
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random curve: points (n, 2) and the direction angle at each point."""
    n = max(2, int(length / step) + 1)
    dtheta = curvature * step + rng.normal(0.0, tortuosity * math.sqrt(step), n - 1)
    # smooth the angular noise so curves bend gently instead of zig-zagging
    dtheta = np.convolve(dtheta, np.ones(3) / 3.0, mode="same") if n > 4 else dtheta
    theta = angle + np.concatenate([[0.0], np.cumsum(dtheta)])
    pts = np.empty((n, 2))
    pts[0] = start
    pts[1:, 0] = start[0] + np.cumsum(np.cos(theta[:-1]) * step)
    pts[1:, 1] = start[1] + np.cumsum(np.sin(theta[:-1]) * step)
    return pts, theta


def _draw_vessel(cv: _Canvas, layer: str, pts: np.ndarray, w0: float, w1: float, alpha: float, pieces: int = 3) -> None:
    """A tapering vessel: the polyline drawn in a few pieces of decreasing width (cheap)."""
    n = len(pts)
    step = max(1, -(-(n - 1) // pieces))
    for i in range(0, n - 1, step):
        w = w0 + (w1 - w0) * ((i + 0.5 * step) / max(1, n - 1))
        cv.polyline(layer, pts[i : min(n, i + step + 1)], w, alpha)


def _spots(
    rng: np.random.Generator,
    n: int,
    centre: tuple[float, float],
    spread: float,
    fundus_r: float,
    avoid: tuple[float, float, float],
) -> np.ndarray:
    """n positions around centre (Gaussian spread), inside the fundus and outside the disc."""
    if n <= 0:
        return np.zeros((0, 2))
    cand = np.asarray(centre) + rng.normal(0.0, spread, (4 * n + 8, 2))
    ok = (np.hypot(cand[:, 0], cand[:, 1]) < 0.9 * fundus_r) & (
        np.hypot(cand[:, 0] - avoid[0], cand[:, 1] - avoid[1]) > 1.15 * avoid[2]
    )
    good = cand[ok]
    if len(good) < n:  # extremely unlikely: fall back to the candidates regardless
        good = np.concatenate([good, cand[~ok]])
    return good[:n]


def _box(u: float, v: float, rad: float, ax: np.ndarray) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Row/column slices of the pixels within rad of (u, v) and their local coordinate grids."""
    n = len(ax)
    lo = lambda c: int(np.clip(np.floor((c - rad + 1.0) * n / 2.0), 0, n))  # noqa: E731
    hi = lambda c: int(np.clip(np.ceil((c + rad + 1.0) * n / 2.0) + 1, 0, n))  # noqa: E731
    sy, sx = slice(lo(v), hi(v)), slice(lo(u), hi(u))
    return sy, sx, ax[sx][None, :], ax[sy][:, None]


@dataclass(frozen=True)
class _Traits:
    """Traits of a patient, shared by both eyes: drawn from the patient's generator, not the image's."""

    tint: np.ndarray  # fundus colour, from the pigmentation
    caliber: float  # vessel width scale
    texture_amp: float  # amplitude of the choroidal texture


@dataclass(frozen=True)
class _Geometry:
    """Where the fundus, optic disc and macula of one eye lie, in normalised coordinates."""

    m: float  # +1 right eye (disc on the right), -1 left eye (mirrored)
    fr: float  # fundus radius
    fc: list[float]  # fundus centre
    disc: tuple[float, float]
    disc_r: float
    mac: tuple[float, float]
    mac_r: float

    @property
    def avoid(self) -> tuple[float, float, float]:
        """The disc as (u, v, r): lesions keep out of it."""
        return (self.disc[0], self.disc[1], self.disc_r)


@dataclass
class _Vessels:
    """The drawn vein paths and vessel widths/opacities, which some lesions follow or cross."""

    veins: list[tuple[np.ndarray, np.ndarray]]  # (points, direction angles) of each vein and branch
    vein_w: float
    art_w: float
    vein_alpha: float
    art_alpha: float


@dataclass
class _Painter:
    """What every lesion draws with: the image's generator, the canvas, the eye, and how visible
    this image's lesions are (``contrast``). The methods are the lesion types that several grades
    and tasks share; each draws its random numbers in a fixed order."""

    rng: np.random.Generator
    cv: _Canvas
    geo: _Geometry
    contrast: float

    def spots(self, n: int, centre: tuple[float, float], spread: float) -> np.ndarray:
        return _spots(self.rng, n, centre, spread, self.geo.fr, self.geo.avoid)

    def dots(self, n: int, spread: float) -> np.ndarray:
        """n positions around the macula, where most lesions of the three tasks sit."""
        return self.spots(n, self.geo.mac, spread)

    def dust(self) -> None:
        """Nuisance: a few faint dust specks / pigment spots on every image."""
        rng = self.rng
        for u, v in self.spots(int(rng.integers(0, 3)), (0.0, 0.0), 0.45):
            self.cv.ellipse("dark", u, v, 0.012, 0.012, rng.uniform(0.15, 0.35))

    def microaneurysms(self, n: int) -> None:
        rng = self.rng
        for u, v in self.dots(n, 0.33):
            r = rng.uniform(0.016, 0.026)
            self.cv.ellipse("dark", u, v, r, r, self.contrast * rng.uniform(0.8, 1.0))

    def haemorrhages(self, n: int, rmin: float, rmax: float, spread: float = 0.40) -> None:
        rng = self.rng
        for u, v in self.dots(n, spread):
            r = rng.uniform(rmin, rmax)
            for _ in range(int(rng.integers(1, 4))):  # blot: a few overlapping ellipses
                self.blob("dark", (u, v), r, (0.8, 1.0))

    def blob(self, layer: str, c: tuple[float, float], r: float, opacity: tuple[float, float]) -> None:
        """One ellipse of an irregular blot of radius ~r around c (haemorrhage, CNV membrane), its
        opacity contrast * U(opacity), drawn last."""
        rng = self.rng
        self.cv.rot_ellipse(
            layer,
            c[0] + rng.normal(0, 0.3 * r),
            c[1] + rng.normal(0, 0.3 * r),
            r * rng.uniform(0.6, 1.0),
            r * rng.uniform(0.5, 0.9),
            rng.uniform(0, np.pi),
            self.contrast * rng.uniform(*opacity),
        )

    def exudates(self, n: int, rmin: float, rmax: float) -> None:
        if n <= 0:
            return
        rng = self.rng
        centres = self.dots(int(rng.integers(1, 4)), 0.22)
        for i in range(n):
            u, v = centres[i % len(centres)] + rng.normal(0.0, 0.06, 2)
            r = rng.uniform(rmin, rmax)
            self.cv.rot_ellipse(
                "yellow",
                u,
                v,
                r,
                r * rng.uniform(0.6, 1.0),
                rng.uniform(0, np.pi),
                self.contrast * rng.uniform(0.75, 1.0),
            )

    def cotton_wool(self, n: int) -> None:
        rng, (disc, mac) = self.rng, (self.geo.disc, self.geo.mac)
        for u, v in self.spots(n, ((disc[0] + mac[0]) / 2, (disc[1] + mac[1]) / 2), 0.35):
            r = rng.uniform(0.025, 0.045)
            self.cv.rot_ellipse(
                "pale",
                u,
                v,
                r,
                r * rng.uniform(0.5, 0.8),
                rng.uniform(0, np.pi),
                self.contrast * rng.uniform(0.45, 0.7),
            )

    def drusen(self, n: int, rmin: float, rmax: float, spread: float) -> None:
        rng = self.rng
        for u, v in self.dots(n, spread):
            r = rng.uniform(rmin, rmax)
            a = self.contrast * rng.uniform(0.6, 0.95)
            self.cv.ellipse("pale", u, v, r, r * rng.uniform(0.8, 1.0), a * 0.6)
            self.cv.ellipse("pale", u, v, 0.6 * r, 0.6 * r, a)


def render(image_id: str, size: int) -> np.ndarray:
    """The synthetic fundus photograph named by image_id, as a (size, size, 3) uint8 RGB array.

    Deterministic in (image_id, size): the random generator is seeded from a SHA-256 of the id, and
    all geometry is drawn in size-independent coordinates, so different sizes show the same eye.
    The steps below draw from one generator in a fixed order (tests/test_synthetic_pixels.py pins
    the pixels): reordering them changes every image and needs a RENDER_VERSION bump.
    """
    task, index, grade, seed = parse_id(image_id)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= 4096:
        raise DataError(f"synthetic image {image_id}: size must be an integer in 8..4096, got {size!r}")
    size = int(size)
    rng = _rng("image", image_id)
    traits = _patient_traits(_rng("patient", task, index // 2, seed))
    geo = _geometry(rng, 1.0 if index % 2 == 0 else -1.0)
    img = _base_fundus(rng, geo, traits, size)
    painter = _Painter(rng, _Canvas(2 * size), geo, contrast=rng.uniform(0.55, 1.0))
    vessels = _vessel_tree(painter, traits.caliber, hyper=task == "arter" and grade == 1)
    painter.dust()
    _LESIONS[task](painter, grade, vessels)
    img = _composite(img, painter.cv, size)
    img = _illuminate(rng, img, geo, size)
    return _camera(rng, img, size)


def _patient_traits(prng: np.random.Generator) -> _Traits:
    pig = prng.uniform(0.0, 1.0)  # pigmentation: lighter orange .. darker brown-red
    tint = np.array([0.93 - 0.13 * pig, 0.40 - 0.14 * pig, 0.17 - 0.07 * pig], np.float32)
    return _Traits(tint, caliber=prng.uniform(0.85, 1.15), texture_amp=prng.uniform(0.03, 0.10))


def _geometry(rng: np.random.Generator, m: float) -> _Geometry:
    fr = rng.uniform(0.90, 0.99)
    fc = [float(x) for x in rng.normal(0.0, 0.015, 2)]
    disc = (m * rng.uniform(0.42, 0.56) + fc[0], rng.uniform(-0.10, 0.08) + fc[1])
    disc_r = rng.uniform(0.10, 0.13)
    mac = (disc[0] - m * rng.uniform(0.58, 0.72), disc[1] + rng.uniform(0.0, 0.10))
    return _Geometry(m, fr, fc, disc, disc_r, mac, mac_r=rng.uniform(0.16, 0.24))


def _axis(size: int) -> np.ndarray:
    """Normalised coordinates of the pixel centres along one axis of the output image."""
    return np.linspace(-1.0 + 1.0 / size, 1.0 - 1.0 / size, size, dtype=np.float32)


def _base_fundus(rng: np.random.Generator, geo: _Geometry, traits: _Traits, size: int) -> np.ndarray:
    """Textured fundus, macula and optic disc as float32 RGB at the output size (smooth, so no
    supersampling)."""
    low = rng.uniform(-1.0, 1.0, (9, 9)).astype(np.float32)
    tex = np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.BICUBIC), dtype=np.float32)
    img = traits.tint * (1.0 + traits.texture_amp * tex)[:, :, None]
    ax = _axis(size)
    _darken_macula(rng, img, geo, ax)
    _draw_disc(rng, img, geo, ax)
    return img


def _darken_macula(rng: np.random.Generator, img: np.ndarray, geo: _Geometry, ax: np.ndarray) -> None:
    """Macula: darker, browner, drawn in place in its bounding box only."""
    mac, mac_s = geo.mac, 0.55 * geo.mac_r
    sy, sx, lu, lv = _box(mac[0], mac[1], 3.0 * mac_s, ax)
    mac_dark = rng.uniform(0.22, 0.45) * np.exp(((lu - mac[0]) ** 2 + (lv - mac[1]) ** 2) * (-0.5 / mac_s**2))
    img[sy, sx] *= 1.0 - mac_dark[:, :, None] * np.array([0.75, 1.0, 0.9], np.float32)


def _draw_disc(rng: np.random.Generator, img: np.ndarray, geo: _Geometry, ax: np.ndarray) -> None:
    """Optic disc, in place: bright yellow-pink rim, paler cup, faint halo."""
    disc, disc_r = geo.disc, geo.disc_r
    dr_u, dr_v = disc_r * rng.uniform(0.9, 1.0), disc_r * rng.uniform(1.0, 1.12)
    sy, sx, lu, lv = _box(disc[0], disc[1], 2.6 * disc_r, ax)
    dd = np.sqrt(((lu - disc[0]) / dr_u) ** 2 + ((lv - disc[1]) / dr_v) ** 2)
    disc_a = 1.0 / (1.0 + np.exp(np.clip((dd - 1.0) * 14.0, -30, 30)))
    cup_r = rng.uniform(0.3, 0.6)
    cup_a = (1.0 / (1.0 + np.exp(np.clip((dd - cup_r) * 18.0, -30, 30))))[:, :, None]
    halo = 0.25 * np.exp(-np.maximum(dd - 1.0, 0.0) * 3.0) * (1.0 - disc_a)
    disc_col = np.array([1.0, 0.78, 0.50], np.float32) * np.float32(rng.uniform(0.95, 1.1))
    cup_col = np.array([1.0, 0.93, 0.78], np.float32)
    disc_a = disc_a[:, :, None]
    img[sy, sx] = (
        img[sy, sx] * (1.0 - disc_a)
        + disc_a * (disc_col * (1.0 - cup_a) + cup_col * cup_a)
        + halo[:, :, None] * np.array([0.25, 0.18, 0.08], np.float32)
    )


# The vessel tree: four arcades (temporal arcs around the macula, nasal) + a few small ones, each a
# vein and an artery: (start angle in the right-eye frame, curvature, length, width scale).
_ARCADES = (
    (math.pi + 1.0, -1.0, 1.4, 1.0),
    (math.pi - 1.0, 1.0, 1.4, 1.0),
    (-1.15, 0.5, 0.95, 0.75),
    (1.15, -0.5, 0.95, 0.75),
    (math.pi + 0.2, -0.3, 0.45, 0.45),
    (0.1, 0.0, 0.6, 0.5),
)


def _vessel_tree(p: _Painter, caliber: float, hyper: bool) -> _Vessels:
    """Veins and arteries from the disc; with hypertensive arteriosclerosis (``hyper``) the arteries
    are narrower, paler and straighter, with a bright central reflex."""
    rng = p.rng
    art_factor = rng.uniform(0.50, 0.78) if hyper else rng.uniform(0.78, 1.08)
    art_tort = 0.5 if hyper else 1.0
    vein_w, art_w = 0.019 * caliber, 0.013 * caliber * art_factor
    vein_alpha = rng.uniform(0.75, 0.95)
    art_alpha = vein_alpha * (rng.uniform(0.45, 0.6) if hyper else rng.uniform(0.6, 0.75))
    vessels = _Vessels([], vein_w, art_w, vein_alpha, art_alpha)
    for arcade in _ARCADES:
        ws = arcade[3]
        vessels.veins += _vessel(p, arcade, False, 0.45, vein_w * ws, vein_alpha, hyper)
        _vessel(p, arcade, True, art_tort * 0.45, art_w * ws, art_alpha, hyper)
    return vessels


def _vessel(
    p: _Painter,
    arcade: tuple[float, float, float, float],
    artery: bool,
    tort: float,
    w: float,
    alpha: float,
    reflex: bool,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One vessel from the disc along its arcade with 1-3 branches, drawn; its (points, angles) paths.
    ``reflex`` adds the "copper wire" central reflex (drawn on veins too, as it always was)."""
    rng, geo, m = p.rng, p.geo, p.geo.m
    a0, curv, length, _ = arcade
    da = rng.normal(0.0, 0.12) + (0.14 if artery else 0.0) * np.sign(a0 - math.pi + 1e-9)
    ln = length * rng.uniform(0.85, 1.15)
    start = (geo.disc[0] + m * rng.normal(0.0, 0.015), geo.disc[1] + rng.normal(0.0, 0.02))
    pts, th = _walk(rng, (0.0, 0.0), a0 + da, ln, curv * rng.uniform(0.8, 1.2), tort)
    pts[:, 0] = start[0] + m * pts[:, 0]
    pts[:, 1] += start[1]
    th = np.where(m > 0, th, math.pi - th)
    _draw_vessel(p.cv, "dark", pts, w, 0.45 * w, alpha)
    paths = [(pts, th)]
    for _ in range(int(rng.integers(1, 4))):
        paths.append(_branch(p, pts, th, ln, tort, w, alpha))
    if reflex:
        p.cv.polyline("pale", pts[: int(len(pts) * 0.7)], max(w * 0.35, 0.004), rng.uniform(0.35, 0.6))
    return paths


def _branch(
    p: _Painter, pts: np.ndarray, th: np.ndarray, ln: float, tort: float, w: float, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """A thinner side branch leaving the vessel (pts, th) from its middle half, drawn."""
    rng = p.rng
    k = int(rng.integers(len(pts) // 4, max(len(pts) // 4 + 1, 3 * len(pts) // 4)))
    side = 1.0 if rng.random() < 0.5 else -1.0
    ba = th[k] + side * rng.uniform(0.45, 1.0)
    bpts, bth = _walk(rng, tuple(pts[k]), ba, ln * rng.uniform(0.2, 0.45), rng.normal(0.0, 0.8), tort)
    bw = w * (1.0 - 0.55 * k / len(pts)) * 0.6
    _draw_vessel(p.cv, "dark", bpts, bw, 0.5 * bw, alpha * 0.9)
    return bpts, bth


# ---- lesions, one function per task: (painter, rendered grade, vessel tree)


def _dr_lesions(p: _Painter, grade: int, vessels: _Vessels) -> None:
    """Diabetic retinopathy: microaneurysms, haemorrhages, exudates, cotton-wool spots growing with
    the grade; neovessels and a preretinal haemorrhage in proliferative DR (grade 4)."""
    rng = p.rng
    if grade == 0:
        return
    if grade == 1:
        p.microaneurysms(int(rng.integers(4, 11)))
        p.haemorrhages(int(rng.random() < 0.5), 0.012, 0.020)
        p.exudates(int(rng.random() < 0.2) * int(rng.integers(1, 3)), 0.008, 0.013)
    elif grade == 2:
        p.microaneurysms(int(rng.integers(3, 12)))
        p.haemorrhages(int(rng.integers(1, 7)), 0.013, 0.030)
        p.exudates(int(rng.integers(0, 11)), 0.010, 0.020)
        p.cotton_wool(int(rng.random() < 0.3))
    else:
        severe = grade == 3
        p.microaneurysms(int(rng.integers(6, 18)) if severe else int(rng.integers(4, 16)))
        p.haemorrhages(int(rng.integers(6, 19)) if severe else int(rng.integers(4, 17)), 0.018, 0.045, 0.5)
        p.exudates(int(rng.integers(5, 26)) if severe else int(rng.integers(2, 21)), 0.012, 0.028)
        p.cotton_wool(int(rng.integers(0, 5)) if severe else int(rng.integers(0, 4)))
    if grade == 4:
        _neovessels(p, vessels)
        u, v = p.dots(1, 0.3)[0]  # preretinal (boat-shaped) haemorrhage
        r = rng.uniform(0.08, 0.13)
        p.cv.rot_ellipse("dark", u, v, r, r * rng.uniform(0.6, 0.9), rng.normal(0, 0.2), 0.95)


def _neovessels(p: _Painter, vessels: _Vessels) -> None:
    """Fine tortuous tufts at the disc (NVD) or along a vein (NVE)."""
    rng, geo = p.rng, p.geo
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.6:
            ang = rng.uniform(0, 2 * np.pi)
            c = (geo.disc[0] + math.cos(ang) * geo.disc_r * 1.1, geo.disc[1] + math.sin(ang) * geo.disc_r * 1.1)
        else:
            pts, _ = vessels.veins[int(rng.integers(0, len(vessels.veins)))]
            c = tuple(pts[int(rng.integers(0, len(pts)))])
        for _ in range(int(rng.integers(4, 9))):
            tuft, _ = _walk(
                rng,
                (c[0] + rng.normal(0, 0.02), c[1] + rng.normal(0, 0.02)),
                rng.uniform(0, 2 * np.pi),
                rng.uniform(0.08, 0.2),
                rng.normal(0, 12.0),
                9.0,
                step=0.008,
            )
            p.cv.polyline("dark", tuft, 0.013, p.contrast * rng.uniform(0.7, 1.0))


def _amd_lesions(p: _Painter, grade: int, vessels: _Vessels) -> None:
    """Age-related macular degeneration: drusen growing with the grade, pigment clumps in the dry
    form, a choroidal neovascular membrane in the wet form (grade 3)."""
    rng = p.rng
    if grade == 0:
        if rng.random() < 0.15:  # a couple of tiny hard drusen are common in normal eyes
            p.drusen(int(rng.integers(1, 3)), 0.010, 0.016, 0.12)
    elif grade == 1:
        p.drusen(int(rng.integers(4, 19)), 0.014, 0.028, 0.12)
    elif grade == 2:
        p.drusen(int(rng.integers(0, 13)), 0.014, 0.026, 0.14)
        p.drusen(int(rng.integers(4, 15)), 0.028, 0.055, 0.09)
        for u, v in p.dots(int(rng.integers(0, 4)), 0.1):  # pigment clumps
            p.cv.ellipse("dark", u, v, 0.01, 0.01, p.contrast * 0.6)
    else:
        p.drusen(int(rng.integers(0, 11)), 0.008, 0.035, 0.14)
        _cnv(p)


def _cnv(p: _Painter) -> None:
    """A grey-green membrane near the fovea, ringed by haemorrhage and, in half the eyes, exudate."""
    rng = p.rng
    c = np.asarray(p.geo.mac) + rng.normal(0.0, 0.04, 2)
    r = rng.uniform(0.05, 0.10)
    for _ in range(int(rng.integers(3, 8))):  # haemorrhage around the membrane
        ang = rng.uniform(0, 2 * np.pi)
        rr = r * rng.uniform(0.8, 1.3)
        p.cv.rot_ellipse(
            "dark",
            c[0] + math.cos(ang) * rr,
            c[1] + math.sin(ang) * rr,
            r * rng.uniform(0.4, 0.8),
            r * rng.uniform(0.3, 0.6),
            ang,
            p.contrast * rng.uniform(0.75, 1.0),
        )
    for _ in range(int(rng.integers(2, 5))):  # the membrane
        p.blob("cnv", c, r, (0.7, 1.0))
    if rng.random() < 0.5:  # exudate ring
        for _ in range(int(rng.integers(2, 7))):
            ang = rng.uniform(0, 2 * np.pi)
            rr = r * rng.uniform(1.4, 1.9)
            p.cv.ellipse("yellow", c[0] + math.cos(ang) * rr, c[1] + math.sin(ang) * rr, 0.012, 0.012, p.contrast * 0.8)


def _arter_lesions(p: _Painter, grade: int, vessels: _Vessels) -> None:
    """Hypertensive arteriosclerosis (grade 1; its thin, reflecting arteries are drawn with the
    vessel tree): arteriovenous nicking, flame-shaped haemorrhages, cotton-wool spots."""
    if grade != 1:
        return
    rng = p.rng
    for _ in range(int(rng.integers(2, 5))):
        _av_nicking(p, vessels)
    for _ in range(int(rng.integers(2, 9))):
        _flame_haemorrhage(p, vessels)
    p.cotton_wool(int(rng.integers(0, 4)))


def _av_nicking(p: _Painter, vessels: _Vessels) -> None:
    """The vein tapers away on both sides of a crossing artery."""
    rng = p.rng
    pts, th = vessels.veins[int(rng.integers(0, len(vessels.veins)))]
    k = int(rng.integers(len(pts) // 5, max(len(pts) // 5 + 1, 4 * len(pts) // 5)))
    u, v = pts[k]
    t = th[k]
    p.cv.rot_ellipse("dark", u, v, 0.045, vessels.vein_w * 0.9, t, vessels.vein_alpha * 0.25)
    ca = t + math.pi / 2 + rng.normal(0, 0.3)
    seg = np.array(
        [[u - math.cos(ca) * 0.06, v - math.sin(ca) * 0.06], [u + math.cos(ca) * 0.06, v + math.sin(ca) * 0.06]]
    )
    p.cv.polyline("dark", seg, vessels.art_w, vessels.art_alpha)
    p.cv.polyline("pale", seg, max(vessels.art_w * 0.35, 0.004), 0.5)


def _flame_haemorrhage(p: _Painter, vessels: _Vessels) -> None:
    """Elongated, beside and along a vein near the disc."""
    rng = p.rng
    pts, th = vessels.veins[int(rng.integers(0, len(vessels.veins)))]
    k = int(rng.integers(1, max(2, len(pts) // 3)))
    side = rng.uniform(0.012, 0.03) * (1.0 if rng.random() < 0.5 else -1.0)
    u = pts[k][0] - math.sin(th[k]) * side
    v = pts[k][1] + math.cos(th[k]) * side
    p.cv.rot_ellipse(
        "dark",
        u,
        v,
        rng.uniform(0.04, 0.08),
        rng.uniform(0.015, 0.024),
        th[k] + rng.normal(0, 0.15),
        p.contrast * rng.uniform(0.75, 1.0),
    )


_LESIONS = {"dr": _dr_lesions, "amd": _amd_lesions, "arter": _arter_lesions}

# Tinted layers over the darkened fundus: (layer, colour, blur in pixels at 128 px).
_TINTS = (("cnv", _CNV, 1.2), ("yellow", _YELLOW, 0.3), ("pale", _PALE, 1.0))


def _composite(img: np.ndarray, cv: _Canvas, size: int) -> np.ndarray:
    """The canvas layers over the fundus: dark ones multiply, tinted ones blend towards their colour."""
    a = cv.alpha("dark", blur=0.2 * size / 64)
    if a is not None:
        img *= 1.0 - a[:, :, None] * (1.0 - _DARK)
    for name, col, blur in _TINTS:
        a = cv.alpha(name, blur=blur * size / 128)
        if a is not None:
            a = a[:, :, None]
            img = img * (1.0 - a) + a * col * np.maximum(img[:, :, :1], 0.55)
    return img


def _illuminate(rng: np.random.Generator, img: np.ndarray, geo: _Geometry, size: int) -> np.ndarray:
    """Illumination (gain, vignetting, gradient), colour cast, haze and the circular mask."""
    ax = _axis(size)
    U, V = ax[None, :], ax[:, None]
    fc, fr = geo.fc, geo.fr
    r2 = ((U - fc[0]) ** 2 + (V - fc[1]) ** 2) / (fr * fr)
    gain = rng.uniform(0.7, 1.25)
    vig = rng.uniform(0.25, 0.65)
    g = [float(x) for x in rng.normal(0.0, 0.18, 2)]
    illum = gain * (1.0 - vig * r2**1.5) + g[0] * U + g[1] * V
    illum = np.clip(illum, 0.08, None)
    cast = rng.uniform(0.88, 1.12, 3).astype(np.float32)
    img = img * illum[:, :, None] * cast + rng.uniform(0.0, 0.06)
    edge = np.clip((1.0 - np.sqrt(r2)) * fr * size * 0.5 + 0.5, 0.0, 1.0)  # ~1 px soft edge
    bg = rng.uniform(0.0, 0.03)
    return img * edge[:, :, None] + bg * (1.0 - edge[:, :, None])


def _camera(rng: np.random.Generator, img: np.ndarray, size: int) -> np.ndarray:
    """Acquisition: 8-bit quantisation, defocus blur, sensor noise; the final uint8 image."""
    out = Image.fromarray((np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="RGB")
    blur = rng.uniform(0.0, 1.3) ** 1.5 * size / 128
    if blur > 0.15:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(out, dtype=np.int16)
    sigma = rng.uniform(1.0, 7.0)
    noise = rng.standard_normal((size, size, 4), dtype=np.float32) * np.float32(sigma)
    arr = arr + (noise[:, :, :1] * 0.6 + noise[:, :, 1:] * 0.4).astype(np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)
