"""The synthetic renderer's pixels are pinned: a refactoring of sall/data/synthetic.py must keep them.

Why: the rendered pixels are part of the data fingerprint only through ``RENDER_VERSION``, so a change
of the drawing that does not bump it would silently reuse cached images and teachers of another data
set. Any change of the random-draw order, a lesion, the compositing or the acquisition moves whole
lesions or shifts colours, and these tests catch it. If a change of the pictures is intended, bump
``RENDER_VERSION`` and recompute SIGNATURES (``_signature`` for every key).

Why not an exact digest: machines differ in floating point. numpy picks its SIMD kernels by CPU, and
an AVX-512 machine renders 3 of these 286 images with one channel of one pixel one level apart from an
AVX2 machine (measured here with ``NPY_DISABLE_CPU_FEATURES="X86_V4 AVX512_ICL"``: (dr, 3, 128),
(dr, 4, 299), (arter, 1, 299), exactly the cases a sha256 digest failed on in CI). So each key is pinned
by four exact integer projections of its pixels (their sum and three fixed +-1 patterns), and a
projection may move by at most SLACK levels: that absorbs up to SLACK one-level rounding flips, while a
single pixel changed by more than SLACK levels, a moved lesion or a colour shift moves the projections
by far more (``test_signature_tells_rounding_from_a_change`` checks both sides).

The cases cover every task and grade, both eyes of a patient (mirrored geometry, shared traits),
several seeds, and the image sizes of the presets (32 smoke, 64 cpu, 128 gpu, 299
paper); together they reach every lesion branch of the renderer, the random ones included (e.g. the
tiny drusen of a normal AMD eye, both kinds of DR neovessels, the exudate ring around a CNV membrane).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import pytest

from sall.data.synthetic import RENDER_VERSION, image_id, render
from sall.tasks import TASKS

#: (index, seed) of the images rendered for every (task, grade); the first two are the two eyes of a patient.
CASES = ((0, 0), (1, 0), (5, 3), (12, 11), (33, 2), (2, 1), (7, 5), (20, 9))

#: How far a projection may move, in grey levels summed over channels and pixels (see the docstring):
#: 16x the largest cross-CPU difference measured (1), and below one lesion pixel's contrast.
SLACK = 16

#: Projections of the CASES' concatenated uint8 pixels (only the first two at 299 px), as of
#: RENDER_VERSION 3: (sum, +-1 pattern 1, pattern 2, pattern 3).
SIGNATURES: dict[tuple[str, int, int], tuple[int, int, int, int]] = {
    ("amd", 0, 32): (1765395, 5857, 17799, -257),
    ("amd", 0, 64): (7067882, -24054, -11244, 10166),
    ("amd", 0, 128): (28249577, -12721, -14765, -15473),
    ("amd", 0, 299): (48615516, 31076, -92770, 18450),
    ("amd", 1, 32): (1508383, 3295, 12997, 47),
    ("amd", 1, 64): (6035996, -15846, -7566, 10690),
    ("amd", 1, 128): (24132128, 146, -23408, -29570),
    ("amd", 1, 299): (36500847, 41481, -67621, 2799),
    ("amd", 2, 32): (1653784, 4826, 20446, 1782),
    ("amd", 2, 64): (6622788, -46556, -7510, 3798),
    ("amd", 2, 128): (26449162, -23302, -20048, -12918),
    ("amd", 2, 299): (34282384, 21178, -74452, 9756),
    ("amd", 3, 32): (1530247, 5023, 20047, 4709),
    ("amd", 3, 64): (6126153, -27253, -32957, 5223),
    ("amd", 3, 128): (24491429, -10895, -29403, -10937),
    ("amd", 3, 299): (32328186, 45716, -40070, -3690),
    ("arter", 0, 32): (1884137, 2137, 23631, 8697),
    ("arter", 0, 64): (7540364, -29632, -31842, 2064),
    ("arter", 0, 128): (30143864, -4892, -17982, 5018),
    ("arter", 0, 299): (39724801, 16545, -86205, 54501),
    ("arter", 1, 32): (1814486, 4668, 33044, 4422),
    ("arter", 1, 64): (7269050, -44558, -30638, 180),
    ("arter", 1, 128): (29084189, -18755, -42983, -20729),
    ("arter", 1, 299): (39971114, 35358, -60624, 23254),
    ("dr", 0, 32): (1702152, 208, 23370, 4922),
    ("dr", 0, 64): (6816549, -45381, -26269, 5283),
    ("dr", 0, 128): (27257996, -33620, -24976, -21270),
    ("dr", 0, 299): (35020237, 62139, -48015, 27695),
    ("dr", 1, 32): (1639582, -2526, 20084, 3810),
    ("dr", 1, 64): (6565773, -36269, -5957, 2093),
    ("dr", 1, 128): (26255627, 11183, -23963, -6701),
    ("dr", 1, 299): (44634141, 60443, -79157, 45765),
    ("dr", 2, 32): (1791991, 15491, 20887, 1609),
    ("dr", 2, 64): (7175509, -24301, -26483, 8721),
    ("dr", 2, 128): (28686084, -4524, -35124, -20376),
    ("dr", 2, 299): (41465675, 25049, -79207, 41315),
    ("dr", 3, 32): (1823247, 8807, 18241, -819),
    ("dr", 3, 64): (7292434, -26250, -18388, -2832),
    ("dr", 3, 128): (29179371, -22297, -33015, -2823),
    ("dr", 3, 299): (46498784, 51772, -69126, 18934),
    ("dr", 4, 32): (1631283, 9609, 21395, 2829),
    ("dr", 4, 64): (6539163, -31579, -18357, 5905),
    ("dr", 4, 128): (26186342, -22432, -46194, -7520),
    ("dr", 4, 299): (41308834, 21962, -71282, 43922),
}


@functools.cache
def _signs(n: int, pattern: int) -> np.ndarray:
    """A fixed +-1 vector of length n from SHAKE-256: the same on every machine and numpy version.

    Cached: the 44 keys share four lengths, so each pattern is drawn once per image size."""
    raw = hashlib.shake_256(f"sall-pixels-{pattern}".encode()).digest((n + 7) // 8)
    return np.unpackbits(np.frombuffer(raw, np.uint8))[:n].astype(np.int64) * 2 - 1


def _signature(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """Exact integer projections of uint8 pixels: their sum and three fixed +-1 patterns."""
    flat = pixels.ravel().astype(np.int64)
    return (int(flat.sum()),) + tuple(int(flat @ _signs(flat.size, k)) for k in (1, 2, 3))


def _pixels(task: str, grade: int, size: int) -> np.ndarray:
    cases = CASES if size != 299 else CASES[:2]
    return np.concatenate([render(image_id(task, index, grade, seed), size).ravel() for index, seed in cases])


def _within_slack(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return all(abs(g - w) <= SLACK for g, w in zip(got, want, strict=True))


def test_signatures_cover_every_task_and_grade():
    want = {(t, g) for t, spec in TASKS.items() for g in range(spec.num_classes)}
    assert {(t, g) for t, g, _ in SIGNATURES} == want
    assert RENDER_VERSION == 3, "the renderer changed version: recompute SIGNATURES for the new pictures"


def test_render_is_deterministic_on_one_machine():
    """On one machine there is no excuse for any difference at all."""
    image = image_id("amd", 5, 3, 3)
    assert np.array_equal(render(image, 64), render(image, 64))


def test_signature_tells_rounding_from_a_change():
    """The slack absorbs rounding flips but not one lesion-sized spot, a mirrored picture or another seed."""
    pixels = render(image_id("dr", 5, 2, 3), 128)
    want = _signature(pixels)
    flipped = pixels.astype(np.int16).ravel()
    flipped[np.arange(0, 8 * 997, 997)] += 1  # 8 one-level flips, as another CPU's rounding would give
    assert _within_slack(_signature(np.clip(flipped, 0, 255).astype(np.uint8)), want)
    spot = pixels.astype(np.int16)
    spot[60:62, 70:72, 0] -= 30  # a 2x2 red-channel dot, a microaneurysm's size and contrast
    assert not _within_slack(_signature(np.clip(spot, 0, 255).astype(np.uint8)), want)
    assert not _within_slack(_signature(np.flip(pixels, axis=1)), want)  # same picture, mirrored
    assert not _within_slack(_signature(render(image_id("dr", 5, 2, 4), 128)), want)  # another seed


@pytest.mark.parametrize("task,grade,size", sorted(SIGNATURES))
def test_render_pixels_unchanged(task, grade, size):
    got, want = _signature(_pixels(task, grade, size)), SIGNATURES[(task, grade, size)]
    assert _within_slack(got, want), (
        f"render({task}, grade {grade}, {size} px) draws other pixels than RENDER_VERSION 3 did: "
        f"projections {got}, pinned {want} (slack {SLACK})"
    )
