"""Generated malformed input (hypothesis): manifests, image folders, ODIR tables and flags.

Every case either runs, or ends with exit code 2 and exactly one `error:` line on stderr that
names the input at fault; never a traceback, and nothing is written to the MLflow store or the
cache dir. All cases go through the in-process entry points (`sall.cli.main`, a sweep's
`run_sweep`, the service checks under `guarded`) with `--dry-run`, so nothing trains and no
Ray starts: over 2,000 cases in well under a minute.

A failure found here gets a named regression test (`test_regression_*`) below or beside the code.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from conftest import corrupt_file, truncate_file, write_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sall.cli import guarded, main

SETTINGS = dict(
    deadline=None, database=None, derandomize=False, print_blob=True, suppress_health_check=list(HealthCheck)
)

# Characters a command line can hold (no NUL, no lone surrogates).
ARG_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
ARG_TEXT = st.text(ARG_CHARS, max_size=12)
# Data summaries are progress lines printed before the data's own checks may fail.
PROGRESS = ("data: ", "  ")


# ------------------------------------------------------------------------------- helpers


def call(fn) -> tuple[int, str, str]:
    """Run an entry point in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = fn()
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def check_outcome(code: int, err: str, names: list[str], work: Path) -> None:
    """Runs, or exit 2 with one error line naming one of `names`; never a traceback; nothing written."""
    assert "Traceback" not in err, err
    if code != 0:
        assert code == 2, (code, err)
        lines = err.strip().splitlines()
        errors = [ln for ln in lines if ln.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], err
        assert all(ln.startswith(PROGRESS) for ln in lines[:-1]), err
        assert any(n and n in errors[0] for n in names), f"{errors[0]!r} names none of {names!r}"
    written = [p for p in (work / "cache").rglob("*") if p.is_file()] if (work / "cache").exists() else []
    assert not written, f"written to the cache dir: {written}"
    assert not (work / "cache").exists(), "the cache dir was created"
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists(), "an MLflow store was written"


@contextlib.contextmanager
def workdir():
    d = Path(tempfile.mkdtemp(prefix="sall-gen-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_dry(work: Path, *args: str) -> tuple[int, str, str]:
    return call(
        lambda: main(["run", "--dry-run", "--smoke", "--no-pretrained", "--cache-dir", str(work / "cache"), *args])
    )


# ------------------------------------------------------------------------------- image pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Files a manifest may point at: good images (several formats), zero-byte, truncated, corrupt,
    a text file, a folder, symlinks (good, dangling, to a folder, a loop)."""
    d = tmp_path_factory.mktemp("pool")
    for i in range(12):
        write_image(d / f"ok{i}.png", 16, seed=i)
    write_image(d / "ok.jpg", 16, seed=99)
    write_image(d / "ok.bmp", 16, seed=98)
    (d / "zero.png").write_bytes(b"")
    write_image(d / "trunc.png", 32, seed=5)
    truncate_file(d / "trunc.png")
    write_image(d / "trunc.jpg", 64, seed=6)
    truncate_file(d / "trunc.jpg", 0.3)
    write_image(d / "junk.png", 16, seed=7)
    corrupt_file(d / "junk.png")
    (d / "text.png").write_text("not an image")
    (d / "folder.png").mkdir()
    os.symlink(d / "ok0.png", d / "link.png")
    os.symlink(d / "absent.png", d / "dangling.png")
    os.symlink(d / "folder.png", d / "dirlink.png")
    os.symlink(d / "loop.png", d / "loop.png")
    return d


POOL_FILES = [f"ok{i}.png" for i in range(12)] + [
    "ok.jpg",
    "ok.bmp",
    "zero.png",
    "trunc.png",
    "trunc.jpg",
    "junk.png",
    "text.png",
    "folder.png",
    "link.png",
    "dangling.png",
    "dirlink.png",
    "loop.png",
    "absent.png",
]


def image_ref(pool: Path) -> st.SearchStrategy[str]:
    """How a manifest row may name an image: relative to the CSV, absolute, outside the root, odd."""
    name = st.sampled_from(POOL_FILES)
    return st.one_of(
        name.map(lambda n: f"../pool/{n}"),
        name.map(lambda n: str(pool / n)),
        name.map(lambda n: f"../pool/./{n}"),
        st.sampled_from(
            [
                "",
                " ",
                "..",
                "/",
                "/etc/passwd",
                "../../../../etc/hostname",
                "nan",
                "NaN",
                "None",
                "null",
                "NA",
                "#N/A",
                "-",
                '"quoted.png"',
                "a,b.png",
                "ünï.png",
                "C:\\img\\x.png",
                "~/x.png",
                "../pool",
                "x" * 300 + ".png",
            ]
        ),
        ARG_TEXT,
    )


TASK_CELL = st.one_of(
    st.sampled_from(
        ["dr", "amd", "arter", "DR", " dr", "amd ", "glaucoma", "", "nan", "None", "dr,amd", '"dr"', "ａｍｄ"]
    ),
    ARG_TEXT,
)
GRADE_CELL = st.one_of(
    st.integers(-3, 6).map(str),
    st.integers().map(str),
    st.sampled_from(
        [
            "",
            " ",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "1e400",
            "-0",
            "+1",
            "1.0",
            "1.5",
            "01",
            "0x1",
            "1_0",
            "٣",
            "²",
            "１",
            "None",
            "NULL",
            "#N/A",
            "1e3",
            "4.0000000000000001",
            "true",
        ]
    ),
    st.floats().map(repr),
    ARG_TEXT,
)
PATIENT_CELL = st.one_of(st.sampled_from(["", "p1", "p2", "nan", "NA", " "]), ARG_TEXT)
HEADERS = st.one_of(
    st.sampled_from(
        [
            "image,task,grade",
            "image,task,grade,patient",
            "file,disease,level,patient",
            "image,task",
            "Image,Task,Grade",
            " image , task , grade ",
            "image,task,grade,grade",
            "image,image,task,grade",
            "image;task;grade",
            "image\ttask\tgrade",
            "",
            "image,task,grade,source",
            "\ufeffimage,task,grade",
            "image,task,grade,patient,extra,,",
            '"image","task","grade"',
        ]
    ),
    st.lists(st.sampled_from(["image", "task", "grade", "patient", "source", "x", "", "Image", "nan"]), max_size=6).map(
        ",".join
    ),
)


def csv_text(pool: Path) -> st.SearchStrategy[str]:
    good_row = st.tuples(
        st.sampled_from([f"../pool/ok{i}.png" for i in range(12)]),
        st.sampled_from(["dr", "amd"]),
        st.integers(0, 3).map(str),
        PATIENT_CELL,
    )
    any_row = st.tuples(image_ref(pool), TASK_CELL, GRADE_CELL, PATIENT_CELL)
    row = st.one_of(good_row, good_row, any_row).map(lambda r: ",".join(r))
    sep = st.sampled_from(["\n", "\r\n", "\r"])
    return st.builds(
        lambda h, rows, s, extra: s.join([h, *rows]) + extra,
        HEADERS,
        st.lists(row, max_size=14),
        sep,
        st.sampled_from(["", "\n", "\n\n", ",,,\n", '"unterminated\n']),
    )


ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252", "utf-32"])


# ------------------------------------------------------------------------------- CSV manifests


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_generated_csv_manifests(pool, data):
    text = data.draw(csv_text(pool), label="csv")
    encoding = data.draw(ENCODINGS, label="encoding")
    with workdir() as work:
        os.symlink(pool, work / "pool")
        d = work / "m"
        d.mkdir()
        csv = d / f"{uuid.uuid4().hex[:8]}.csv"
        csv.write_bytes(text.encode(encoding, errors="replace"))
        code, _, err = run_dry(
            work,
            "--dataset",
            str(csv),
            "--tasks",
            data.draw(st.sampled_from(["dr,amd", "dr", "amd,arter"]), label="tasks"),
        )
        check_outcome(code, err, [str(csv)], work)


# ------------------------------------------------------------------------------- image folders

FOLDER_NAMES = st.one_of(
    st.sampled_from(
        [
            "dr",
            "amd",
            "arter",
            "DR",
            "glaucoma",
            ".hidden",
            "0",
            "1",
            "4",
            "9",
            "-1",
            "01",
            "1.0",
            "x",
            "__MACOSX",
            " 1",
        ]
    ),
    ARG_TEXT,
)
ENTRY = st.tuples(
    st.lists(FOLDER_NAMES.filter(lambda s: s not in ("", ".", "..") and "/" not in s), max_size=4),
    st.sampled_from(POOL_FILES[:16] + ["notes.txt", "Thumbs.db", ".DS_Store", "x.PNG", "y.jpeg"]),
)


def _plausible_tree() -> list[tuple[list[str], str]]:
    return [([t, str(g)], f"ok{(3 * i + g) % 12}.png") for i, t in enumerate(["dr", "amd"]) for g in range(4)]


@settings(max_examples=100, **SETTINGS)
@given(
    entries=st.lists(ENTRY, max_size=12),
    plausible=st.booleans(),
    links=st.lists(st.sampled_from(["file", "dangling", "dir", "loop", "root"]), max_size=3),
)
def test_generated_image_folders(pool, entries, plausible, links):
    with workdir() as work:
        root = work / "data"
        root.mkdir()
        for parts, fname in (_plausible_tree() if plausible else []) + entries:
            folder = root.joinpath(*parts)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                src = pool / fname
                if src.is_file() and not src.is_symlink():
                    shutil.copy(src, folder / fname)
                else:
                    (folder / fname).write_bytes(b"stray")
            except OSError:  # a name the file system refuses, or a file where a folder should be
                continue
        target = root / "dr" / "1"
        target.mkdir(parents=True, exist_ok=True)
        for k, kind in enumerate(links):
            link = target / f"link{k}.png"
            src = {
                "file": pool / "ok1.png",
                "dangling": pool / "absent.png",
                "dir": pool / "folder.png",
                "loop": link,
                "root": root,
            }[kind]
            if kind == "root":
                link = target / f"up{k}"
            os.symlink(src, link)
        code, _, err = run_dry(work, "--dataset", str(root))
        check_outcome(code, err, [str(root)], work)


# ------------------------------------------------------------------------------- ODIR tables

ODIR_REQUIRED = ["ID", "Left-Diagnostic Keywords", "Right-Diagnostic Keywords"]
KEYWORDS = st.one_of(
    st.lists(
        st.sampled_from(
            [
                "normal fundus",
                "mild nonproliferative retinopathy",
                "drusen",
                "moderate non proliferative retinopathy",
                "hypertensive retinopathy",
                "wet age-related macular degeneration",
                "cataract",
                "lens dust",
                "diabetic retinopathy",
                "",
                "nan",
                "proliferative diabetic retinopathy",
            ]
        ),
        max_size=3,
    ).map("，".join),
    ARG_TEXT,
)
ODIR_ID = st.one_of(st.integers(0, 40).map(str), st.sampled_from(["", "nan", "1.0", "../1", "x/y", " 3"]), ARG_TEXT)


@settings(max_examples=100, **SETTINGS)
@given(data=st.data())
def test_generated_odir_tables(pool, data):
    header = data.draw(
        st.one_of(
            st.just(ODIR_REQUIRED + ["Patient Age"]),
            st.lists(
                st.sampled_from(ODIR_REQUIRED + ["id", "Left-Diagnostic-Keywords", "Patient Sex", "", " ID ", "ID"]),
                max_size=5,
            ),
        ),
        label="header",
    )
    rows = data.draw(st.lists(st.tuples(ODIR_ID, KEYWORDS, KEYWORDS, st.just("60")), max_size=30), label="rows")
    images = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, 40),
                st.sampled_from(["left", "right"]),
                st.sampled_from(["ok3.png", "ok4.png", "zero.png", "junk.png"]),
            ),
            max_size=30,
        ),
        label="images",
    )
    encoding = data.draw(ENCODINGS, label="encoding")
    with workdir() as work:
        root = work / "odir"
        (root / "preprocessed_images").mkdir(parents=True)
        for pid, side, src in images:
            shutil.copy(pool / src, root / "preprocessed_images" / f"{pid}_{side}.jpg")
        lines = [",".join(header)] + [",".join(r[: len(header)]) for r in rows]
        (root / "full_df.csv").write_bytes("\n".join(lines).encode(encoding, errors="replace"))
        code, _, err = run_dry(work, "--dataset", "odir", "--data-root", str(root))
        check_outcome(code, err, [str(root), "odir:"], work)


# ------------------------------------------------------------------------------- flags of `sall run`


def numberish(lo: int = -10, hi: int = 10) -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(lo, hi).map(str),
        st.integers().map(str),
        st.floats().map(repr),
        st.sampled_from(
            [
                "",
                " ",
                "nan",
                "inf",
                "-inf",
                "1e999",
                "-0",
                "0x10",
                "1,2",
                "1.5",
                "٣",
                "one",
                "None",
                "-",
                "--",
                "1e-400",
                "2.0",
            ]
        ),
        ARG_TEXT,
    )


TASK_LISTS = st.one_of(
    st.lists(st.sampled_from(["dr", "amd", "arter", "DR", "", " ", "glaucoma", "dr ", "all"]), max_size=4).flatmap(
        lambda ts: st.sampled_from([",", ";", " ", ",,"]).map(lambda s: s.join(ts))
    ),
    ARG_TEXT,
)

# flag -> (values, words its error line may name it by)
RUN_FLAGS: dict[str, tuple[st.SearchStrategy[str], list[str]]] = {
    "--temperature": (numberish(-2, 60), ["temperature", "-T"]),
    "--fold": (numberish(-3, 5), ["fold"]),
    "--class-cap": (numberish(-3, 10**9), ["class_cap", "class-cap"]),
    "--tasks": (TASK_LISTS, ["task"]),
    "--synthetic-n": (
        st.one_of(st.integers(-5, 40).map(str), st.sampled_from(["0", "-1", "1.5", "x", ""])),
        ["synthetic_n", "synthetic-n", "synthetic", "fold"],
    ),
    "--image-size": (numberish(-3, 64), ["image_size", "image-size"]),
    "--batch-size": (numberish(-3, 64), ["batch_size", "batch-size"]),
    "--teacher-epochs": (numberish(-3, 5), ["teacher_epochs", "teacher-epochs"]),
    "--student-epochs": (numberish(-3, 5), ["student_epochs", "student-epochs"]),
    "--lr": (numberish(-1, 1), ["lr"]),
    "--seed": (numberish(-5, 5), ["seed"]),
    "--preset": (st.one_of(st.sampled_from(["cpu", "paper", "gpu", "CPU", ""]), ARG_TEXT), ["preset"]),
    "--backbone": (
        st.one_of(st.sampled_from(["test_resnet", "resnet9000", "resnet18", "", "../x"]), ARG_TEXT),
        ["backbone"],
    ),
    "--device": (
        st.one_of(st.sampled_from(["cpu", "cuda", "cuda:7", "tpu", "", "cpu:0", "auto", "mps"]), ARG_TEXT),
        ["device"],
    ),
    "--amp": (st.one_of(st.sampled_from(["auto", "bf16", "off", "fp16"]), ARG_TEXT), ["amp"]),
    "--threads": (numberish(-2, 4), ["threads"]),
    "--cache-dir": (st.sampled_from(["~nosuchuser/c", "/dev/null/c", "/proc/sall-c"]), ["cache dir"]),
}
SWITCHES = ["--baseline", "--no-multitask", "--no-sa-labels", "--no-augment", "--full", "--profile"]


def _names(flag: str, value: str, words: list[str]) -> list[str]:
    out = [flag, value.strip(), *words]
    with contextlib.suppress(ValueError, OverflowError):
        out += [str(float(value)), f"{float(value):g}", str(int(float(value)))]
    return out


@settings(max_examples=500, **SETTINGS)
@given(
    flags=st.dictionaries(st.sampled_from(sorted(RUN_FLAGS)), st.none(), min_size=1, max_size=3),
    data=st.data(),
    switches=st.lists(st.sampled_from(SWITCHES), max_size=2, unique=True),
)
def test_generated_run_flags(flags, data, switches):
    argv: list[str] = []
    names: list[str] = []
    for flag in flags:
        values, words = RUN_FLAGS[flag]
        value = data.draw(values, label=flag)
        argv.append(f"{flag}={value}")  # `--flag=value`: a value may start with '-'
        names += _names(flag, value, words)
    with workdir() as work:
        code, _, err = run_dry(work, *argv, *switches)
        check_outcome(code, err, names, work)


@pytest.mark.parametrize("kind", ["absent", "folder", "empty", "junk", "text"])
def test_bad_pretrained_paths(kind):
    with workdir() as work:
        p = work / f"w-{kind}.pth"
        if kind == "folder":
            p.mkdir()
        elif kind == "empty":
            p.write_bytes(b"")
        elif kind == "junk":
            p.write_bytes(os.urandom(200))
        elif kind == "text":
            p.write_text("{}")
        code, _, err = call(
            lambda: main(
                [
                    "run",
                    "--dry-run",
                    "--smoke",
                    "--pretrained",
                    "--pretrained-path",
                    str(p),
                    "--cache-dir",
                    str(work / "cache"),
                ]
            )
        )
        check_outcome(code, err, [str(p)], work)


# ------------------------------------------------------------------------------- sweep flags

SWEEP_FLAGS: dict[str, dict[str, st.SearchStrategy[str]]] = {
    "temperature": {"--temperatures": st.lists(numberish(-1, 12), min_size=0, max_size=3).map(",".join)},
    "ablation": {"--temperatures": st.lists(numberish(-1, 5), min_size=0, max_size=2).map(",".join)},
    "data_ratio": {
        "--fractions": st.lists(st.one_of(st.floats(-1, 2).map(repr), numberish(-2, 3)), max_size=2).map(",".join),
        "--ratio-temperature": numberish(-1, 5),
    },
    "sample_caps": {
        "--caps": st.lists(numberish(-2, 40), max_size=2).map(",".join),
        "--caps-temperature": numberish(-1, 9),
    },
    "task_count": {"--count-temperature": numberish(-1, 9)},
}
COMMON_SWEEP_FLAGS: dict[str, st.SearchStrategy[str]] = {
    "--folds": st.one_of(st.lists(numberish(-1, 3), max_size=3).map(",".join), ARG_TEXT),
    "--seeds": st.one_of(st.lists(numberish(-1, 2), max_size=2).map(",".join), ARG_TEXT),
    "--tasks": TASK_LISTS,
    "--class-cap": numberish(-2, 10**6),
    "--cpus-per-trial": numberish(-1, 4),
    "--gpus-per-trial": numberish(-1, 2),
    "--max-concurrent-trials": numberish(-1, 4),
    "--max-failures": numberish(-2, 3),
    "--preset": st.sampled_from(["cpu", "paper", "gpu"]),
}


def _sweep(name: str):
    import importlib

    return importlib.import_module(f"sweeps.{name}")


@settings(max_examples=80, **SETTINGS)
@given(sweep=st.sampled_from(sorted(SWEEP_FLAGS)), data=st.data())
def test_generated_sweep_flags(sweep, data):
    mod = _sweep(sweep)
    pool_ = {**COMMON_SWEEP_FLAGS, **SWEEP_FLAGS[sweep]}
    chosen = data.draw(st.lists(st.sampled_from(sorted(pool_)), min_size=1, max_size=3, unique=True), label="flags")
    argv: list[str] = []
    names: list[str] = []
    for flag in chosen:
        value = data.draw(pool_[flag], label=flag)
        argv.append(f"{flag}={value}")
        names += _names(
            flag,
            value,
            [flag.strip("-").replace("-", "_"), "fold", "temperature", "task", "sample count", "class_cap", "cap"],
        )
    with workdir() as work:
        # one fold and 40 synthetic images per task unless drawn: a valid grid is checked in ~0.1 s
        argv = [
            "--dry-run",
            "--smoke",
            "--no-pretrained",
            "--folds=0",
            "--synthetic-n=40",
            "--cache-dir",
            str(work / "cache"),
            "--mlflow-uri",
            f"sqlite:///{work / 'mlflow.db'}",
            "--storage-path",
            str(work / "ray"),
            *argv,
        ]
        code, _, err = call(
            lambda: mod.run_sweep(sweep, mod.__doc__, mod.grid, mod.add_args, getattr(mod, "smoke", None), argv=argv)
        )
        check_outcome(code, err, names, work)
        assert not (work / "ray").exists()


# ------------------------------------------------------------------------------- services

URI_HOSTS = st.sampled_from(["127.0.0.1", "localhost", "[::1]", "[::1", "256.0.0.1", "", "h o s t", "::1"])
URIS = st.one_of(
    st.builds(
        lambda s, h, p, path: f"{s}://{h}{':' + p if p is not None else ''}{path}",
        st.sampled_from(["http", "https", "HTTP"]),
        URI_HOSTS,
        st.one_of(st.none(), st.integers(-1, 70000).map(str), st.sampled_from(["", "x", "1e3", "٣"])),
        st.sampled_from(["", "/", "/mlflow", "?x=1", "#f"]),
    ),
    st.builds(
        lambda p: f"sqlite:///{p}",
        st.sampled_from(
            ["{w}/mlflow.db", "{w}/no/such/dir/m.db", "{w}/file/m.db", "", "relative.db", "{w}", "{w}/ü m.db"]
        ),
    ),
    st.builds(lambda p: f"file://{p}", st.sampled_from(["{w}/runs", "{w}/file/runs", "", "{w}/file"])),
    st.sampled_from(
        [
            "",
            "://",
            "sqlite://",
            "sqlite:",
            "postgresql://u@127.0.0.1:1/db",
            "databricks",
            "{w}/file",
            "ftp://127.0.0.1:1",
        ]
    ),
    ARG_TEXT,
)


@settings(max_examples=600, **SETTINGS)
@given(uri=URIS)
def test_generated_mlflow_uris(uri):
    from tracking import client as tr

    with workdir() as work:
        (work / "file").write_text("x")
        uri = uri.replace("{w}", str(work))
        code, _, err = call(
            lambda: guarded(lambda: tr.check_tracking_uri(tr.resolve_uri(uri), timeout=0.5) or 0, debug=False)
        )
        check_outcome(code, err, [uri, "MLflow", "--mlflow-uri"], work)


ADDRESSES = st.one_of(
    st.builds(
        lambda pre, h, p: f"{pre}{h}:{p}",
        st.sampled_from(["", "ray://", "http://", "ray:/"]),
        st.sampled_from(["127.0.0.1", "localhost", "", "256.1.1.1", "[::1]", "::1", "h o s t"]),
        st.one_of(st.integers(-5, 70000).map(str), st.sampled_from(["", "x", "1", "99999999999999999999", "٣", " 1"])),
    ),
    st.sampled_from(["", ":", "auto", "127.0.0.1", "ray://", "::::"]),
    ARG_TEXT,
)


def _check_address(address: str) -> int:
    from sweeps.runner import check_ray_address

    check_ray_address(address, timeout=0.5)
    return 0


@settings(max_examples=600, **SETTINGS)
@given(address=ADDRESSES)
def test_generated_ray_addresses(address, monkeypatch_env):
    with workdir() as work:
        code, _, err = call(lambda: guarded(lambda: _check_address(address), debug=False))
        check_outcome(code, err, [address.strip(), "--address", "RAY_ADDRESS", "Ray"], work)


@pytest.fixture
def monkeypatch_env(monkeypatch, tmp_path):
    """No Ray of the machine leaks in: --address auto sees no RAY_ADDRESS and no session file."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))


# ------------------------------------------------------------------------------- regressions
# Each failure the generated cases found, as a named test.


def _one_error(code: int, err: str, *needles: str) -> str:
    assert code == 2 and "Traceback" not in err, (code, err)
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.mark.parametrize("flag", ["--temperature", "--fold", "--class-cap", "--lr", "--batch-size"])
def test_regression_flag_left_without_value_run(tmp_path, flag):
    """`--fold=--` gave fold == [] (argparse drops '--') and a TypeError deep in the config checks."""
    code, _, err = run_dry(tmp_path, f"{flag}=--")
    _one_error(code, err, flag, "expected one value")


def test_regression_flag_left_without_value_sweep(tmp_path):
    import sweeps.temperature as t

    argv = ["--dry-run", "--smoke", "--temperatures=--", "--cache-dir", str(tmp_path / "cache")]
    code, _, err = call(lambda: t.run_sweep("temperature", t.__doc__, t.grid, t.add_args, t.smoke, argv=argv))
    _one_error(code, err, "--temperatures", "expected one value")


@pytest.mark.parametrize(
    "uri, needle",
    [
        ("http://127.0.0.1:x", "malformed"),
        ("http://[::1", "malformed"),
        ("http://127.0.0.1:70000", "malformed"),
        ("http://:5000", "names no host"),
        ("sqlite:///~nosuchuser/m.db", "cannot be resolved"),
    ],
)
def test_regression_malformed_mlflow_uri(uri, needle):
    """A port that is not a number, an open IPv6 bracket, a port out of range: ValueError from urllib;
    ~nosuchuser: RuntimeError from pathlib."""
    from tracking import client as tr

    code, _, err = call(
        lambda: guarded(lambda: tr.check_tracking_uri(tr.resolve_uri(uri), timeout=0.5) or 0, debug=False)
    )
    _one_error(code, err, uri, needle)


def test_regression_cache_dir_of_an_unknown_user(tmp_path):
    """`--cache-dir ~nosuchuser/c`: RuntimeError (Could not determine home directory) from pathlib."""
    code, _, err = run_dry(tmp_path, "--cache-dir", "~nosuchuser/c")
    _one_error(code, err, "cache dir '~nosuchuser/c'")


@pytest.mark.parametrize("n", ["5"])
def test_regression_too_few_images_to_split_into_folds(tmp_path, n):
    """`--synthetic-n 5`: scikit-learn's ValueError (n_splits=4 cannot be greater than the number of
    members in each class) escaped from the fold split."""
    code, _, err = run_dry(tmp_path, "--synthetic-n", n)
    _one_error(code, err, "too few to split into folds")


def test_regression_too_few_images_in_a_csv(tmp_path, pool):
    os.symlink(pool, tmp_path / "pool")
    rows = [f"pool/ok{i}.png,dr,{i % 5},p{i}" for i in range(10)]
    csv = tmp_path / "small.csv"
    csv.write_text("image,task,grade,patient\n" + "\n".join(rows) + "\n")
    code, _, err = run_dry(tmp_path, "--dataset", str(csv), "--tasks", "dr")
    _one_error(code, err, str(csv), "too few to split into folds")


@pytest.mark.parametrize("caps", ["0.0", "x", "-3", "1,,0", ""])
def test_regression_sample_caps_that_are_not_integers(tmp_path, caps):
    """sweeps/sample_caps.py parsed --caps with a bare int(): ValueError on '0.0'."""
    import sweeps.sample_caps as m

    argv = ["--dry-run", "--smoke", "--folds=0", f"--caps={caps}", "--cache-dir", str(tmp_path / "cache")]
    code, _, err = call(lambda: m.run_sweep("sample_caps", m.__doc__, m.grid, m.add_args, None, argv=argv))
    if caps == "":  # no caps: the default, scaled caps
        assert code == 0, err
    else:
        _one_error(code, err, "--caps")


def test_regression_control_character_in_a_cell_stays_one_line(tmp_path, pool):
    """A CSV cell with \\x1c (a line break to str.splitlines, and to some terminals) was echoed raw, so
    the error spanned two lines; user text in an error is now shown escaped."""
    os.symlink(pool, tmp_path / "pool")
    csv = tmp_path / "ctl.csv"
    csv.write_text("image,task,grade\npool/ok0.png,dr,0\x1c0\n")
    code, _, err = run_dry(tmp_path, "--dataset", str(csv))
    line = _one_error(code, err, str(csv), "\\x1c")
    assert len(err.strip().splitlines()) == 1 and line.isprintable()


# Failures found in sweeps/runner.py and sall/config.py, fixed there.


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_regression_cpus_per_trial_not_finite(tmp_path, value):
    import sweeps.temperature as t

    argv = ["--dry-run", "--smoke", "--folds=0", f"--cpus-per-trial={value}", "--cache-dir", str(tmp_path / "c")]
    code, _, err = call(lambda: t.run_sweep("temperature", t.__doc__, t.grid, t.add_args, t.smoke, argv=argv))
    _one_error(code, err, "--cpus-per-trial")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_regression_fraction_not_finite(tmp_path, value):
    import sweeps.data_ratio as m

    argv = ["--dry-run", "--smoke", "--folds=0", f"--fractions={value}", "--cache-dir", str(tmp_path / "c")]
    code, _, err = call(lambda: m.run_sweep("data_ratio", m.__doc__, m.grid, m.add_args, m.smoke, argv=argv))
    _one_error(code, err, "sample count")


def test_regression_ray_address_port_beyond_a_c_long(monkeypatch_env):
    address = "127.0.0.1:99999999999999999999"
    code, _, err = call(lambda: guarded(lambda: _check_address(address), debug=False))
    _one_error(code, err, address)


def test_regression_sweep_cache_dir_of_an_unknown_user(tmp_path):
    import sweeps.temperature as t

    argv = ["--dry-run", "--smoke", "--folds=0", "--cache-dir", "~nosuchuser/c"]
    code, _, err = call(lambda: t.run_sweep("temperature", t.__doc__, t.grid, t.add_args, t.smoke, argv=argv))
    _one_error(code, err, "~nosuchuser")
