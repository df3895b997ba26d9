"""Shared fixtures: small image data sets written with PIL into tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_fixtures import pg_database, postgres_service, s3_bucket, s3_service  # noqa: F401 (fixtures)

from sall.tasks import TASKS


def write_image(path: str | os.PathLike, size: int | tuple[int, int] = 32, seed: int = 0) -> str:
    """Write a small random RGB image; the format follows the extension (.png, .jpg, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    return str(path)


def truncate_file(path: str | os.PathLike, fraction: float = 0.5) -> None:
    """Cut a file to `fraction` of its length (a truncated download)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])


def corrupt_file(path: str | os.PathLike, n: int = 300, seed: int = 0) -> None:
    """Replace a file with random bytes."""
    Path(path).write_bytes(np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes())


@pytest.fixture
def make_image():
    """make_image(path, size=32, seed=0) -> path: writes a random RGB image (format from the extension)."""
    return write_image


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """root/<task>/<grade>/<id>.png with 2 images per grade of every task (22 images)."""
    root = tmp_path / "folder"
    k = 0
    for task, spec in TASKS.items():
        for g in range(spec.num_classes):
            for j in range(2):
                write_image(root / task / str(g) / f"{task}{g}_{j}.png", 24, seed=k)
                k += 1
    return root


@pytest.fixture
def csv_manifest(tmp_path) -> Path:
    """manifest.csv (image, task, grade, patient) with relative paths under img/: 2 images per grade."""
    root = tmp_path / "csvdata"
    lines = ["image,task,grade,patient"]
    k = 0
    for task, spec in TASKS.items():
        for g in range(spec.num_classes):
            for _ in range(2):
                rel = f"img/{k}.png"
                write_image(root / rel, 24, seed=k)
                lines.append(f"{rel},{task},{g},p{k // 2}")
                k += 1
    path = root / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


ODIR_COLUMNS = [
    "ID",
    "Patient Age",
    "Patient Sex",
    "Left-Fundus",
    "Right-Fundus",
    "Left-Diagnostic Keywords",
    "Right-Diagnostic Keywords",
    "N",
    "D",
    "G",
    "C",
    "A",
    "H",
    "M",
    "O",
    "filepath",
    "labels",
    "target",
    "filename",
]

# (ID, left keywords, right keywords); "-" = the eye's image file is absent.
ODIR_PATIENTS: list[tuple[int, str, str]] = [
    (0, "cataract", "normal fundus"),  # left: other only
    (1, "normal fundus", "normal fundus"),
    (2, "moderate non proliferative retinopathy", "normal fundus"),
    (3, "normal fundus", "lens dust，normal fundus"),  # full-width comma, artefact
    (4, "mild nonproliferative retinopathy", "mild nonproliferative retinopathy"),
    (5, "severe nonproliferative retinopathy", "moderate non proliferative retinopathy，cataract"),
    (6, "proliferative diabetic retinopathy", "severe proliferative diabetic retinopathy"),
    (7, "drusen", "normal fundus"),
    (8, "dry age-related macular degeneration", "drusen"),
    (9, "wet age-related macular degeneration", "normal fundus"),
    (10, "hypertensive retinopathy", "normal fundus"),
    (
        11,
        "hypertensive retinopathy，moderate non proliferative retinopathy",
        "hypertensive retinopathy",
    ),  # left: two tasks
    (12, "diabetic retinopathy", "normal fundus"),  # left: ungraded DR
    (13, "normal fundus", "-"),  # right image missing
    (14, "glaucoma", "pathological myopia"),  # other only (both)
    (15, "drusen,mild nonproliferative retinopathy", "normal fundus"),  # left: two tasks (ASCII comma)
    (16, "normal fundus", "normal fundus"),
    (17, "normal fundus", "normal fundus"),
    (18, "normal fundus", "normal fundus"),
    (19, "moderate non proliferative retinopathy", "drusen"),  # straddles dr / amd
    (20, "normal fundus", "normal fundus"),
    (21, "mild nonproliferative retinopathy，laser spot", "normal fundus"),
]


@pytest.fixture
def odir_root(tmp_path) -> Path:
    """A tiny ODIR-5K layout: full_df.csv (real column names, 2 rows per patient) + preprocessed_images/."""
    import pandas as pd

    root = tmp_path / "odir"
    rows = []
    for pid, left, right in ODIR_PATIENTS:
        for side, kw in (("left", left), ("right", right)):
            if kw != "-":
                write_image(root / "preprocessed_images" / f"{pid}_{side}.jpg", 32, seed=pid * 2 + (side == "right"))
        for side in ("left", "right"):  # one table row per original image, like the Kaggle table
            rows.append(
                {
                    "ID": pid,
                    "Patient Age": 60,
                    "Patient Sex": "Female",
                    "Left-Fundus": f"{pid}_left.jpg",
                    "Right-Fundus": f"{pid}_right.jpg",
                    "Left-Diagnostic Keywords": left if left != "-" else "normal fundus",
                    "Right-Diagnostic Keywords": right if right != "-" else "normal fundus",
                    "N": 0,
                    "D": 0,
                    "G": 0,
                    "C": 0,
                    "A": 0,
                    "H": 0,
                    "M": 0,
                    "O": 0,
                    "filepath": f"../input/ODIR-5K/Training Images/{pid}_{side}.jpg",
                    "labels": "['N']",
                    "target": "[1, 0, 0, 0, 0, 0, 0, 0]",
                    "filename": f"{pid}_{side}.jpg",
                }
            )
    pd.DataFrame(rows, columns=ODIR_COLUMNS).to_csv(root / "full_df.csv", index=False)
    return root


@pytest.fixture(scope="session")
def temperature_smoke(tmp_path_factory):
    """(folder, completed process) of one `python sweeps/temperature.py --smoke` run as a user
    runs it, into an MLflow store it creates itself. Several slow tests inspect it (the MLflow
    contract, the answer on the sweep run, teacher runs, progress lines); none of them changes
    its trials, so they share it instead of paying a sweep each."""
    from sweep_helpers import run, sweep_cmd

    d = tmp_path_factory.mktemp("temperature_smoke")
    out = run(sweep_cmd("temperature", d), d, seed=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return d, out


@pytest.fixture(scope="session")
def shared_ray(tmp_path_factory):
    """One real Ray head (cluster/local.py up: 2 CPUs, no worker nodes, no MLflow server) for the
    slow sweep tests to join with `--address auto`, instead of each command starting and
    stopping a local Ray of its own (measured: 53 s -> 38 s for one smoke sweep on 2 cores).
    What is tested is unchanged: the sweep's own trials, store, Tune state and cache; a driver
    that joins a cluster is a mode users run. The main job's own path (a local Ray started by
    the sweep) stays covered by `temperature_smoke` (and its rerun), which runs without it.
    Yields a sweep_helpers.SharedRay; the head is stopped at the end of the session."""
    from sweep_helpers import SharedRay
    from test_local_cluster import start_local_cluster

    with start_local_cluster(tmp_path_factory.mktemp("shared_ray"), workers=0, mlflow=False, head_cpus=2) as c:
        yield SharedRay(env=c.env, marker=c.state["marker"])


@pytest.fixture(scope="session")
def confirmed_sweep(tmp_path_factory, shared_ray):
    """(folder, completed process) of the temperature smoke with its confirmation on the shared Ray:
    baseline and T=8 on folds 0,1 (fold 2 missing) with seed 0, then the setting chosen on
    validation and the baseline again with the fresh seed 1. The analysis tests read its store
    (tables, figures, external evaluation) and tests/test_confirm.py its answer, so both pay
    one sweep."""
    from sweep_helpers import sweep_cmd

    d = tmp_path_factory.mktemp("confirmed")
    out = shared_ray.run(
        sweep_cmd("temperature", d, "--folds", "0,1", "--temperatures", "8", "--confirm-seeds", "1"), d
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return d, out


# With pytest-xdist (`pytest -n 2`), a worker takes whole groups of tests: the modules that read one
# session sweep or the real services go together, so that sweep is made once and one Ceph runs at a
# time; every other module is its own group (its module-scoped fixtures are made once). The group
# is chosen by module because the scheduler sees test ids, not fixtures. (xdist's own
# `--dist loadgroup` marks do nothing under pytest 9: it renames `_nodeid`, which pytest 9 no longer reads.)
MODULE_GROUPS = {
    "test_sweeps": "temperature_smoke",  # and test_review: the temperature smoke sweep
    "test_review": "temperature_smoke",
    "test_analysis": "confirmed_sweep",  # and test_confirm: the sweep with its confirmation
    "test_confirm": "confirmed_sweep",
    "test_services": "services",  # PostgreSQL, Ceph (and a local.py cluster with its own), Slurm
    "test_object_store": "services",
    "test_local_cluster": "services",
    "test_slurm": "services",
}


# The groups that hold whole sweeps or services, costliest first (docs/testing.md has the measured
# costs). The scheduler hands these out before the rest, so no worker picks up a two-minute group
# while the other has nothing left (longest first); every other group follows, most tests first.
COSTLIEST_FIRST = [
    "services",
    "test_sweep_faults",
    "temperature_smoke",
    "confirmed_sweep",
    "test_search",
    "test_resume_sweep",
    "test_tracking_faults",
    "test_synthetic_learnable",
]


def _group(nodeid: str) -> str:
    module = nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    return MODULE_GROUPS.get(module, module)


def _costliest_first(workqueue: dict) -> dict:
    rank = {g: i for i, g in enumerate(COSTLIEST_FIRST)}
    order = sorted(workqueue, key=lambda g: (rank.get(g, len(rank)), -len(workqueue[g])))
    return {g: workqueue[g] for g in order}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

        def _assign_work_unit(self, node) -> None:
            if not getattr(self, "_ordered", False):
                ordered = _costliest_first(self.workqueue)
                self.workqueue.clear()
                self.workqueue.update(ordered)
                self._ordered = True
            super()._assign_work_unit(node)

        def _reschedule(self, node) -> None:
            # xdist gives a worker its next group when 2 of its tests are left; with groups of minutes
            # that commits a long group to a busy worker. A worker runs a test once it holds the next
            # one, so 1 left (the last test, waiting for a successor) is the latest it can be.
            if not node.shutting_down and self.workqueue and self._pending_of(self.assigned_work[node]) > 1:
                return
            super()._reschedule(node)

    return SharedFixtureScheduling(config, log)
