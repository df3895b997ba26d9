"""Bad input fails fast and clearly: one line naming the problem, no traceback, nothing started.

Every case runs both `python -m sall run` and a sweep script, as a user would type them.
"""

from __future__ import annotations

import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import corrupt_file, truncate_file, write_image

ROOT = Path(__file__).resolve().parents[1]


def make_csv(root: Path, rows: list[tuple[str, str, str]], header: str = "image,task,grade") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for img, _, _ in rows:
        if not (root / img).exists() and not img.startswith("missing"):
            write_image(root / img, 24, seed=zlib.crc32(img.encode()) % 1000)  # stable across processes
    p = root / "manifest.csv"
    p.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")
    return p


def full_rows(n: int = 3) -> list[tuple[str, str, str]]:
    rows = []
    for task, k in (("dr", 5), ("amd", 4)):
        for g in range(k):
            for i in range(n):
                rows.append((f"img/{task}_{g}_{i}.png", task, str(g)))
    return rows


def invoke(
    kind: str, args: list[str], cwd: Path, subprocess_: bool = False, sweep: str = "temperature"
) -> subprocess.CompletedProcess:
    """Run `python -m sall run` or `python sweeps/<sweep>.py` with `args`: in this process (the
    same entry points, fast) or, with `subprocess_`, exactly as a user types it."""
    common = ["--cache-dir", str(cwd / "cache")] if "--cache-dir" not in args else []
    if kind == "run":
        argv = ["run", *common, *args]
        cmd = [sys.executable, "-m", "sall", *argv]
    else:
        argv = ["--storage-path", str(cwd / "ray"), *common, *args]
        if "--mlflow-uri" not in args:
            argv += ["--mlflow-uri", f"sqlite:///{cwd / 'mlflow.db'}"]
        cmd = [sys.executable, str(ROOT / "sweeps" / f"{sweep}.py"), *argv]
    if subprocess_:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            if kind == "run":
                from sall.cli import main

                code = main(argv)
            else:
                import importlib

                t = importlib.import_module(f"sweeps.{sweep}")
                code = t.run_sweep(sweep, t.__doc__, t.grid, t.add_args, getattr(t, "smoke", None), argv=argv)
        except SystemExit as e:  # argparse
            code = e.code
    return subprocess.CompletedProcess(cmd, code, "", err.getvalue())


def assert_clear_failure(out: subprocess.CompletedProcess, cwd: Path, *needles: str, seconds: float = 60) -> None:
    assert out.returncode != 0
    err = out.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: ")
    for n in needles:
        assert n in last, f"{n!r} not in {last!r}"
    assert not (cwd / "mlflow.db").exists(), "an MLflow store was created"
    assert not (cwd / "ray").exists(), "a Ray Tune experiment was started"


CASES = {
    "manifest missing": (lambda d: ["--dataset", str(d / "nope.csv")], ["nope.csv"]),
    "wrong columns": (
        lambda d: ["--dataset", str(make_csv(d / "c", full_rows(), header="file,task,grade"))],
        ["missing column", "image"],
    ),
    "unknown task": (
        lambda d: ["--dataset", str(make_csv(d / "c", full_rows() + [("img/x.png", "glaucoma", "1")]))],
        ["unknown task 'glaucoma'"],
    ),
    "grade out of range": (
        lambda d: ["--dataset", str(make_csv(d / "c", full_rows() + [("img/x.png", "amd", "7")]))],
        ["grade 7 out of range", "0..3"],
    ),
    "image missing": (
        lambda d: ["--dataset", str(make_csv(d / "c", full_rows() + [("missing.png", "dr", "1")]))],
        ["missing.png"],
    ),
    "image corrupt": (lambda d: ["--dataset", str(_broken(d, corrupt_file))], ["img/dr_1_0.png"]),
    "image truncated": (lambda d: ["--dataset", str(_broken(d, truncate_file))], ["img/dr_1_0.png", "truncated"]),
    "class left empty": (
        lambda d: ["--dataset", str(make_csv(d / "c", [r for r in full_rows() if r[1:] != ("dr", "4")]))],
        ["task dr has no image of grade(s) 4"],
    ),
    "cap of zero": (lambda d: ["--class-cap", "0", "--smoke"], ["class_cap 0"]),
    "temperature zero": (lambda d: ["--smoke", "-T", "0"], ["temperature 0"]),
    "fold out of range": (lambda d: ["--smoke", "--fold", "5"], ["fold 5 out of range"]),
    "unknown preset": (lambda d: ["--preset", "gpu-xl"], ["unknown preset 'gpu-xl'"]),
    "unknown backbone": (lambda d: ["--smoke", "--backbone", "resnet9000"], ["unknown backbone 'resnet9000'"]),
    "odir without root": (lambda d: ["--dataset", "odir"], ["--data-root"]),
    "cache not writable": (
        lambda d: ["--smoke", "--cache-dir", str(_file(d) / "sub")],
        ["cache dir", "cannot be written"],
    ),
    "pretrained offline": (
        lambda d: ["--smoke", "--pretrained-path", str(d / "weights.pth")],
        ["weights.pth", "does not exist"],
    ),
}


def _broken(d: Path, how) -> Path:
    p = make_csv(d / "c", full_rows())
    how(d / "c" / "img" / "dr_1_0.png")
    return p


def _file(d: Path) -> Path:
    f = d / "a-file"
    f.write_text("x")
    return f


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_bad_input(tmp_path, case, kind):
    make_args, needles = CASES[case]
    args = make_args(tmp_path)
    if kind == "sweep":
        args = [a if a != "-T" else "--temperatures" for a in args]
        args = [a for a in args if a != "--fold"] if "--fold" not in args else ["--folds", "5"]
        if case == "fold out of range":
            needles = ["--folds '5'", "fold 5 out of range"]
    t0 = time.time()
    # one case end to end as a user types it (a subprocess pays ~10 s of imports; the rest in-process)
    out = invoke(kind, args, tmp_path, subprocess_=(case, kind) == ("image truncated", "run"))
    assert_clear_failure(out, tmp_path, *needles)
    assert time.time() - t0 < 60
    import ray

    assert not ray.is_initialized()


def test_sweep_temperature_zero(tmp_path):
    out = invoke("sweep", ["--smoke", "--temperatures", "0,3"], tmp_path)
    assert_clear_failure(out, tmp_path, "temperature 0")


def test_sample_count_larger_than_the_data(tmp_path):
    out = invoke("sweep", ["--smoke", "--fractions", "100000"], tmp_path, sweep="data_ratio")
    assert_clear_failure(out, tmp_path, "sample count 100000", "exceeds")


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_no_cluster_at_address(tmp_path, address):
    t0 = time.time()
    out = invoke("sweep", ["--smoke", "--address", address], tmp_path, subprocess_=True)
    assert_clear_failure(out, tmp_path, "does not answer")
    assert time.time() - t0 < 30


def test_unreachable_mlflow(tmp_path):
    t0 = time.time()
    out = invoke("sweep", ["--smoke", "--mlflow-uri", "http://127.0.0.1:1"], tmp_path, subprocess_=True)
    assert_clear_failure(out, tmp_path, "http://127.0.0.1:1", "cannot be reached")
    assert time.time() - t0 < 30


def test_debug_shows_the_traceback(tmp_path):
    out = invoke("run", ["--smoke", "-T", "0", "--debug"], tmp_path, subprocess_=True)
    assert out.returncode != 0 and "Traceback" in out.stderr
