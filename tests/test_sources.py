"""Data sources -> validated manifest: every source on small generated fixtures, every error message."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import corrupt_file, truncate_file, write_image
from PIL import Image, ImageFile

from sall.data.images import check_images, load_image, read_image
from sall.data.manifest import COLUMNS
from sall.data.sources import format_summary, load_manifest
from sall.errors import DataError
from sall.tasks import TASKS

REAL_ODIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "odir5k"


def _write_csv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- images


def test_read_image_crops_resizes_and_converts(tmp_path):
    # A wide image whose left and right thirds are red and the centre square is green.
    arr = np.zeros((40, 120, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)
    arr[:, 40:80] = (0, 255, 0)
    arr[:, 80:] = (255, 0, 0)
    p = tmp_path / "wide.png"
    Image.fromarray(arr).save(p)
    out = read_image(str(p), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[..., 1] > 200).all() and (out[..., 0] < 50).all()  # only the centre square is left

    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((20, 20), 77, np.uint8), "L").save(grey)
    g = read_image(str(grey), 8)
    assert g.shape == (8, 8, 3) and (g == 77).all()

    big = write_image(tmp_path / "big.jpg", (200, 150))
    assert read_image(big, 32).shape == (32, 32, 3)


def test_read_image_rejects_truncated_jpeg_even_if_flag_flipped(tmp_path):
    p = write_image(tmp_path / "t.jpg", 64)
    truncate_file(p)
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # some other library did this
    try:
        with pytest.raises(DataError) as e:
            read_image(p, 16)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert "t.jpg" in _one_line(e) and "truncated or corrupt" in str(e.value)


def test_read_image_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.png.*does not exist"):
        read_image(str(tmp_path / "nope.png"), 16)


def test_load_image_dispatches_synthetic(tmp_path):
    p = write_image(tmp_path / "a.png", 20)
    assert load_image(p, 10).shape == (10, 10, 3)
    synthetic = pytest.importorskip("sall.data.synthetic")
    df = synthetic.synthetic_manifest(2, 0, ("dr",))
    img = load_image(df["image"].iloc[0], 16)
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8


def test_check_images_names_first_bad_and_counts_others(tmp_path):
    good = [write_image(tmp_path / f"{i}.png", 16, seed=i) for i in range(5)]
    bad1, bad2 = tmp_path / "bad1.png", tmp_path / "bad2.jpg"
    write_image(bad1, 16)
    corrupt_file(bad1)
    write_image(bad2, 64)
    truncate_file(bad2)
    paths = good[:2] + [str(bad1)] + good[2:] + [str(bad2), str(tmp_path / "gone.png")]
    check_images(good, "x.csv")  # all fine
    with pytest.raises(DataError) as e:
        check_images(paths, "x.csv", workers=4)
    msg = _one_line(e)
    assert msg.startswith("x.csv: image '") and "bad1.png" in msg and "(row 4)" in msg
    assert "2 other image(s) are bad too" in msg


# ---------------------------------------------------------------- CSV manifest


def test_csv_manifest_loads(csv_manifest):
    df, summary = load_manifest(str(csv_manifest))
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 2 * sum(s.num_classes for s in TASKS.values())
    assert all(os.path.isabs(p) and os.path.exists(p) for p in df["image"])
    assert summary["counts"] == {t: {g: 2 for g in range(s.num_classes)} for t, s in TASKS.items()}
    assert summary["skipped"] == {}
    assert df["patient"].iloc[0] == "p0" and df["grade"].dtype.kind == "i"
    assert "dr" in format_summary(summary)


def test_csv_absolute_paths_optional_patient_and_task_filter(tmp_path, make_image):
    a = make_image(tmp_path / "elsewhere" / "a.png")
    make_image(tmp_path / "m" / "b.png")
    path = _write_csv(tmp_path / "m" / "manifest.csv", ["image,task,grade", f"{a},dr,1", "b.png,amd,3"])
    df, summary = load_manifest(str(path), tasks=("dr",))
    assert df["image"].tolist() == [a] and df["patient"].tolist() == [a]
    assert summary["skipped"] == {"task not requested": 1}


def test_csv_missing_manifest_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_manifest(str(tmp_path / "missing.csv"))
    assert "missing.csv" in _one_line(e) and "does not exist" in str(e.value)


def test_csv_wrong_columns(tmp_path, make_image):
    make_image(tmp_path / "a.png")
    path = _write_csv(tmp_path / "bad.csv", ["path,label", "a.png,1"])
    with pytest.raises(DataError) as e:
        load_manifest(str(path))
    msg = _one_line(e)
    assert "bad.csv" in msg and "image, task, grade" in msg and "path, label" in msg


@pytest.mark.parametrize("rows", [[], ["a.png,dr,1,p1"], ["a.png,dr,1,"]], ids=["no rows", "a row", "empty patient"])
def test_regression_issue13_header_file_disease_level_patient(tmp_path, make_image, capsys, rows):
    """Issue 13: this header ended in KeyError: 'image' (the patient fill-in read the missing column)."""
    from sall.cli import guarded

    make_image(tmp_path / "a.png")
    path = _write_csv(tmp_path / "x.csv", ["file,disease,level,patient", *rows])
    assert guarded(lambda: load_manifest(str(path)) and 0, debug=False) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {path}: missing column(s) image, task, grade; expected columns image, task, grade "
        "(patient optional), found file, disease, level, patient\n"
    )


@pytest.mark.parametrize(
    "row, expected",
    [
        ("a.png,glaucoma,1", r"row 3 \(a.png\): unknown task 'glaucoma'; expected one of dr, amd, arter"),
        ("a.png,dr,7", r"row 3 \(a.png\): grade 7 out of range for task dr; expected 0..4"),
        ("a.png,arter,-1", r"row 3 \(a.png\): grade -1 out of range for task arter; expected 0..1"),
        ("a.png,amd,mild", r"row 3 \(a.png\): grade 'mild' is not an integer; expected 0..3"),
        ("a.png,amd,1.5", r"grade '1.5' is not an integer"),
        ("a.png,amd,", r"grade '' is not an integer"),
    ],
)
def test_csv_label_errors(tmp_path, make_image, row, expected):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    path = _write_csv(tmp_path / "labels.csv", ["image,task,grade", "b.png,dr,0", row])
    with pytest.raises(DataError) as e:
        load_manifest(str(path))
    assert "labels.csv" in _one_line(e)
    assert re.search(expected, str(e.value)), str(e.value)


def test_csv_image_missing(tmp_path, make_image):
    make_image(tmp_path / "img" / "0.png")
    path = _write_csv(tmp_path / "manifest.csv", ["image,task,grade", "img/0.png,dr,0", "img/9.png,dr,1"])
    with pytest.raises(DataError) as e:
        load_manifest(str(path))
    msg = _one_line(e)
    assert "manifest.csv: image 'img/9.png' (row 3) does not exist" in msg
    # check_files=False skips the file check
    df, _ = load_manifest(str(path), check_files=False)
    assert len(df) == 2


@pytest.mark.parametrize("kind", ["corrupt", "truncated_png", "truncated_jpg"])
def test_csv_image_corrupt_or_truncated(tmp_path, make_image, kind):
    ext = "jpg" if kind.endswith("jpg") else "png"
    bad = tmp_path / "img" / f"3.{ext}"
    make_image(bad, 64, seed=3)
    if kind == "corrupt":
        corrupt_file(bad)
    else:
        truncate_file(bad)
    lines = ["image,task,grade"]
    for i in range(3):
        make_image(tmp_path / "img" / f"{i}.png", 16, seed=i)
        lines.append(f"img/{i}.png,amd,{i}")
    lines.append(f"img/3.{ext},amd,3")
    path = _write_csv(tmp_path / "manifest.csv", lines)
    with pytest.raises(DataError) as e:
        load_manifest(str(path))
    msg = _one_line(e)
    assert f"manifest.csv: image 'img/3.{ext}' (row 5)" in msg
    assert "expected a readable image file" in msg
    assert ("not an image" in msg) if kind == "corrupt" else ("truncated or corrupt" in msg)


def test_csv_duplicate_images(tmp_path, make_image):
    make_image(tmp_path / "img" / "0.png")
    path = _write_csv(tmp_path / "dup.csv", ["image,task,grade", "img/0.png,dr,0", "img/0.png,amd,0"])
    with pytest.raises(DataError) as e:
        load_manifest(str(path))
    assert "dup.csv: image 'img/0.png' is listed 2 times (rows 2, 3)" in _one_line(e)
    # the same file written two ways
    path = _write_csv(tmp_path / "dup2.csv", ["image,task,grade", "img/0.png,dr,0", "./img/0.png,amd,0"])
    with pytest.raises(DataError) as e:
        load_manifest(str(path))
    assert "dup2.csv: rows 2, 3" in _one_line(e) and "same image file" in str(e.value)


def test_csv_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataError, match="empty.csv"):
        load_manifest(str(path))


# ---------------------------------------------------------------- image folder


def test_folder_loads(image_folder):
    (image_folder / "dr" / "0" / "notes.txt").write_text("x")
    (image_folder / "README.md").write_text("x")
    df, summary = load_manifest(str(image_folder))
    assert len(df) == 22 and set(df["task"]) == set(TASKS)
    assert summary["counts"]["amd"] == {0: 2, 1: 2, 2: 2, 3: 2}
    row = df[df["image"].str.endswith("amd3_1.png")].iloc[0]
    assert (row.task, row.grade, row.patient) == ("amd", 3, "amd3_1")
    assert summary["skipped"] == {"file outside root/<task>/<grade>/": 1, "not an image file (extension)": 1}


def test_folder_empty(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DataError) as e:
        load_manifest(str(root))
    assert str(root) in _one_line(e) and "no image files" in str(e.value)
    (root / "dr" / "0").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        load_manifest(str(root))


@pytest.mark.parametrize(
    "rel, expected",
    [
        ("glaucoma/1/a.png", "folder 'glaucoma' is not a task"),
        ("dr/5/a.png", "grade 5 out of range for task dr; expected 0..4"),
        ("arter/yes/a.png", "grade folder 'yes' is not an integer; expected 0..1"),
    ],
)
def test_folder_label_errors(tmp_path, make_image, rel, expected):
    make_image(tmp_path / "root" / "dr" / "0" / "ok.png")
    make_image(tmp_path / "root" / rel)
    with pytest.raises(DataError) as e:
        load_manifest(str(tmp_path / "root"))
    msg = _one_line(e)
    assert expected in msg and str(tmp_path / "root") in msg


def test_folder_corrupt_image(image_folder):
    bad = image_folder / "arter" / "1" / "arter1_0.png"
    truncate_file(bad)
    with pytest.raises(DataError) as e:
        load_manifest(str(image_folder))
    assert "image 'arter/1/arter1_0.png' is truncated or corrupt" in _one_line(e)


# ---------------------------------------------------------------- ODIR-5K layout


def test_odir_fixture(odir_root):
    df, summary = load_manifest("odir", str(odir_root), seed=0)
    by_file = {os.path.basename(p): (t, g) for p, t, g in zip(df["image"], df["task"], df["grade"])}
    # graded findings
    assert by_file["2_left.jpg"] == ("dr", 2) and by_file["2_right.jpg"] == ("dr", 0)
    assert by_file["4_left.jpg"] == ("dr", 1)
    assert by_file["5_left.jpg"] == ("dr", 3)
    assert by_file["5_right.jpg"] == ("dr", 2)  # finding + unrelated cataract: kept
    assert by_file["6_left.jpg"] == ("dr", 4) and by_file["6_right.jpg"] == ("dr", 4)
    assert by_file["21_left.jpg"] == ("dr", 1)  # full-width comma + laser spot
    assert by_file["7_left.jpg"] == ("amd", 1) and by_file["8_left.jpg"] == ("amd", 2)
    assert by_file["9_left.jpg"] == ("amd", 3) and by_file["9_right.jpg"] == ("amd", 0)
    assert by_file["10_left.jpg"] == ("arter", 1) and by_file["11_right.jpg"] == ("arter", 1)
    assert by_file["3_right.jpg"][1] == 0  # "lens dust，normal fundus" is normal
    # dropped / skipped
    for f in [
        "0_left.jpg",
        "14_left.jpg",
        "14_right.jpg",
        "11_left.jpg",
        "15_left.jpg",
        "12_left.jpg",
        "19_left.jpg",
        "13_right.jpg",
    ]:
        assert f not in by_file, f
    assert by_file["19_right.jpg"] == ("amd", 1)  # straddling patient: the rarer task keeps them
    assert summary["skipped"] == {
        "other conditions only": 3,
        "eye with findings of two tasks": 2,
        "ungraded diabetic retinopathy": 1,
        "image file missing": 1,
        "patient's eyes in two tasks": 1,
    }
    assert len(df) == 36 and summary["images"] == 36
    assert summary["counts"]["dr"][1] == 3 and summary["counts"]["amd"][1] == 3
    assert summary["counts"]["arter"][1] == 2
    assert all(summary["counts"][t].get(0, 0) >= 1 for t in TASKS)
    # patient-disjoint: every patient in one task; the patient is the ID
    assert df.groupby("patient")["task"].nunique().max() == 1
    assert set(df["patient"]) <= {str(p) for p in range(22)}
    assert (df["source"] == "odir").all() and all(os.path.isabs(p) for p in df["image"])
    # deterministic
    again, _ = load_manifest("odir", str(odir_root), seed=0)
    assert again.equals(df)


def test_odir_requested_tasks_only(odir_root):
    df, summary = load_manifest("odir", str(odir_root), tasks=("dr", "arter"), check_files=False)
    assert set(df["task"]) == {"dr", "arter"}
    # AMD patients 7, 8, 9 (all 6 eyes: their normal eyes stay with their task) and 19's AMD eye
    assert summary["skipped"]["task not requested"] == 7
    assert "19_left.jpg" in {os.path.basename(p) for p in df["image"]}  # no longer straddling


def test_odir_needs_data_root(tmp_path):
    with pytest.raises(DataError) as e:
        load_manifest("odir")
    assert _one_line(e) == (
        "--dataset odir needs --data-root pointing at a folder with full_df.csv and preprocessed_images/"
    )
    with pytest.raises(DataError, match="full_df.csv' does not exist"):
        load_manifest("odir", str(tmp_path))


def test_odir_corrupt_image(odir_root):
    truncate_file(odir_root / "preprocessed_images" / "9_left.jpg")
    with pytest.raises(DataError) as e:
        load_manifest("odir", str(odir_root))
    assert "full_df.csv: image 'preprocessed_images/9_left.jpg' is truncated or corrupt" in _one_line(e)


def test_odir_wrong_table(tmp_path):
    (tmp_path / "preprocessed_images").mkdir()
    _write_csv(tmp_path / "full_df.csv", ["ID,labels", "0,N"])
    with pytest.raises(DataError) as e:
        load_manifest("odir", str(tmp_path))
    assert "full_df.csv: missing column(s) Left-Diagnostic Keywords" in _one_line(e)


# ---------------------------------------------------------------- dispatch


def test_unknown_dataset():
    with pytest.raises(DataError) as e:
        load_manifest("kaggle-dr")
    assert _one_line(e).startswith(
        "unknown dataset 'kaggle-dr'; expected synthetic, odir, a CSV manifest path or an image folder"
    )


def test_synthetic_source():
    pytest.importorskip("sall.data.synthetic")
    df, summary = load_manifest("synthetic", synthetic_n=3, seed=1)
    assert list(df.columns) == list(COLUMNS)
    assert df["image"].str.startswith("synthetic://").all()
    assert summary["dataset"] == "synthetic" and summary["images"] == len(df)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ODIR.exists(), reason="the real ODIR-5K copy is not present")
def test_real_odir():
    df, summary = load_manifest("odir", str(REAL_ODIR))
    assert summary["images"] > 4000
    assert df.groupby("patient")["task"].nunique().max() == 1
    for task, spec in TASKS.items():
        assert set(summary["counts"][task]) == set(range(spec.num_classes))
