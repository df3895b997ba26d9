"""The embedded synthetic data set: a valid, deterministic manifest and fundus-like renderings whose
lesion content depends on the grade."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from sall.data.manifest import COLUMNS, check_manifest
from sall.data.synthetic import image_id, parse_id, render, synthetic_manifest
from sall.errors import DataError
from sall.tasks import TASKS


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return synthetic_manifest(n_per_task=800, seed=0)


def test_manifest_valid_and_deterministic(manifest):
    assert list(manifest.columns) == list(COLUMNS)
    assert len(manifest) == 3 * 800
    pd.testing.assert_frame_equal(check_manifest(manifest, "synthetic"), manifest)
    pd.testing.assert_frame_equal(synthetic_manifest(n_per_task=800, seed=0), manifest)
    assert (manifest["source"] == "synthetic").all()
    assert manifest["image"].is_unique
    other = synthetic_manifest(n_per_task=800, seed=1)
    assert not other["image"].equals(manifest["image"])
    assert not np.array_equal(other["grade"].to_numpy(), manifest["grade"].to_numpy())


def test_task_rows_do_not_depend_on_other_tasks(manifest):
    only_amd = synthetic_manifest(n_per_task=800, seed=0, tasks=("amd",))
    pd.testing.assert_frame_equal(only_amd, manifest[manifest["task"] == "amd"].reset_index(drop=True))


def test_every_grade_well_represented(manifest):
    for task, spec in TASKS.items():
        counts = manifest.loc[manifest["task"] == task, "grade"].value_counts()
        for g in range(spec.num_classes):
            assert counts.get(g, 0) >= 0.08 * 800, (task, g, counts.to_dict())
        assert counts.get(0) == counts.max(), (task, counts.to_dict())  # imbalanced like real data
    small = synthetic_manifest(n_per_task=20, seed=3)
    for task, spec in TASKS.items():
        assert set(small.loc[small["task"] == task, "grade"]) == set(range(spec.num_classes))


def test_patients_pair_two_eyes_within_one_task(manifest):
    per_patient = manifest.groupby("patient").agg(n=("image", "size"), tasks=("task", "nunique"))
    assert (per_patient["n"] == 2).all()
    assert (per_patient["tasks"] == 1).all()
    assert manifest["patient"].str.match(r"^(dr|amd|arter)-p\d{5}$").all()


def test_label_noise_about_five_percent_to_neighbours(manifest):
    true = manifest["image"].map(lambda s: parse_id(s)[2])
    diff = (manifest["grade"] - true).abs()
    assert set(diff.unique()) <= {0, 1}
    rate = (diff > 0).mean()
    assert 0.03 <= rate <= 0.07, rate


def test_bad_arguments_raise_data_error():
    with pytest.raises(DataError, match="unknown task"):
        synthetic_manifest(n_per_task=10, tasks=("glaucoma",))
    with pytest.raises(DataError, match="n_per_task"):
        synthetic_manifest(n_per_task=0)


def test_render_deterministic_shape_and_dtype():
    iid = image_id("dr", 17, 3, 0)
    assert iid == "synthetic://dr/00017?g=3&s=0"
    for size in (64, 128):
        a = render(iid, size)
        assert a.shape == (size, size, 3) and a.dtype == np.uint8
        assert np.array_equal(a, render(iid, size))
    assert not np.array_equal(render(iid, 64), render(image_id("dr", 18, 3, 0), 64))
    assert not np.array_equal(render(iid, 64), render(image_id("dr", 17, 3, 1), 64))


def test_render_looks_like_a_fundus():
    img = render(image_id("amd", 4, 0, 0), 128).astype(float)
    corner = img[:8, :8].mean()
    centre = img[48:80, 48:80]
    assert corner < 25  # dark surround
    r, g, b = centre[..., 0].mean(), centre[..., 1].mean(), centre[..., 2].mean()
    assert r > g > b and r > 80  # orange-red fundus


@pytest.mark.parametrize(
    "bad",
    [
        "synthetic://dr/00017?g=3",  # no seed
        "synthetic://dr/00017?g=5&s=0",  # grade out of range for dr
        "synthetic://glaucoma/00001?g=0&s=0",  # unknown task
        "file://dr/00017?g=3&s=0",  # wrong scheme
        "synthetic://dr/x?g=1&s=0",  # index not a number
        "",
    ],
)
def test_malformed_id_raises_data_error(bad):
    with pytest.raises(DataError, match="synthetic image id"):
        render(bad, 64)


# ---- grade-dependent signal, measured with a simple colour criterion on 64 px renderings

SIZE = 64
_AX = np.linspace(-1 + 1 / SIZE, 1 - 1 / SIZE, SIZE)
_U, _V = _AX[None, :], _AX[:, None]


def _deviations(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative deviation of each pixel from a median-blurred background, and the fundus mask."""
    f = img.astype(np.float32) + 1
    bg = np.asarray(Image.fromarray(img).filter(ImageFilter.MedianFilter(7)), np.float32) + 1
    return f.mean(2) / bg.mean(2), f[..., 1] / bg[..., 1], bg[..., 0] > 40


def _lesion_pixels(img: np.ndarray) -> int:
    """Dark-red or bright-yellow spots: pixels much darker, or much greener (yellower), than around."""
    lum, green, inside = _deviations(img)
    return int((((lum < 0.85) | (green > 1.2)) & inside).sum())


def _macular_yellow(img: np.ndarray, index: int) -> int:
    """Bright-yellow pixels near the macula (left of centre in right eyes, mirrored in left eyes)."""
    m = 1.0 if index % 2 == 0 else -1.0
    _, green, inside = _deviations(img)
    macula = (_U + m * 0.15) ** 2 + (_V - 0.05) ** 2 < 0.3**2
    return int(((green > 1.2) & inside & macula).sum())


def _peripapillary_dark(img: np.ndarray, index: int) -> int:
    """Dark pixels in a ring around the optic disc (where flame haemorrhages sit)."""
    m = 1.0 if index % 2 == 0 else -1.0
    lum, _, inside = _deviations(img)
    d = np.hypot(_U - m * 0.49, _V + 0.01)
    return int(((lum < 0.8) & inside & (d > 0.15) & (d < 0.6)).sum())


def test_dr_lesions_increase_with_grade():
    n = 30
    means = [np.mean([_lesion_pixels(render(image_id("dr", i, g, 0), SIZE)) for i in range(n)]) for g in range(5)]
    assert means[2] > means[0] + 5, means
    assert means[3] > means[2] + 20, means
    assert means[4] > means[1] + 20, means
    assert np.corrcoef(range(5), means)[0, 1] > 0.8, means


def test_amd_macular_yellow_increases_to_big_drusen():
    n = 30
    means = [np.mean([_macular_yellow(render(image_id("amd", i, g, 0), SIZE), i) for i in range(n)]) for g in range(3)]
    assert means[0] + 2 < means[1] and means[1] + 5 < means[2], means


def test_arteriosclerosis_adds_peripapillary_haemorrhages():
    n = 40
    means = [
        np.mean([_peripapillary_dark(render(image_id("arter", i, g, 0), SIZE), i) for i in range(n)]) for g in range(2)
    ]
    assert means[1] > means[0] + 2, means
