"""cluster/slurm: the sbatch template and the local Slurm it is tested on.

Fast: the template parses (`bash -n`), its #SBATCH lines ask for what a sweep needs and come
before the first command (sbatch stops reading them there), and it refuses a missing setting
with one line; the local launcher names cluster/install-services.sh when Slurm is missing.

Slow: a real local Slurm (munged, slurmctld and two `slurmd -N` nodes on 127.0.0.1) listens on
loopback only, runs a 2-node job, and `down` leaves none of its processes behind.

On demand (cluster/slurm/test-local.sh, or SALL_SLURM_SWEEP=1 in the slow tier): the template,
submitted with `sbatch --nodes=2 --wait`, starts Ray in the allocation and runs a smoke
temperature sweep against an MLflow server started here; every trial FINISHED once, and trials
ran on both Ray nodes. The sweep's tracking server, cache and storage reach the job through its
environment (SALL_MLFLOW_URI, SALL_CACHE_DIR, SALL_STORAGE_PATH; see `sweep_uris`), so the same
test runs against S3/PostgreSQL services by swapping that fixture.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "cluster" / "slurm" / "sall.sbatch"
LOCAL_SLURM = ROOT / "cluster" / "slurm" / "local.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


slurm = _load("sall_cluster_slurm_local", LOCAL_SLURM)
proc = slurm.proc  # cluster/local.py: session-based process helpers


# --------------------------------------------------------------------------- fast: the template


def sbatch_options(text: str) -> dict[str, str]:
    """#SBATCH options of a batch script, as sbatch reads them: up to the first command line."""
    opts = {}
    for line in text.splitlines()[1:]:
        s = line.strip()
        if s and not s.startswith("#"):
            break
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", s)
        if m:
            opts[m.group(1)] = m.group(2) or ""
    return opts


def test_sbatch_template_parses_and_asks_for_a_gpu_allocation():
    r = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = SBATCH.read_text()
    opts = sbatch_options(text)
    # every #SBATCH line is read (none after the first command, where sbatch stops looking)
    assert len(opts) == text.count("\n#SBATCH"), opts
    assert int(opts["nodes"]) >= 2 and opts["ntasks-per-node"] == "1"
    assert int(opts["gpus-per-task"]) >= 1 and int(opts["cpus-per-task"]) >= 1
    assert re.fullmatch(r"(\d+-)?\d+:\d\d:\d\d", opts["time"]), opts["time"]
    assert re.fullmatch(r"B:USR1@\d+", opts["signal"]), opts["signal"]  # the batch shell traps USR1
    assert "requeue" in opts and opts["open-mode"] == "append"
    assert "trap on_time_limit USR1" in text


def _template_env(**over: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SALL_"))}
    env.update(over)
    return env


@pytest.mark.parametrize(
    ("unset", "words"),
    [
        ("SALL_MLFLOW_URI", "tracking server"),
        ("SALL_CACHE_DIR", "s3://"),
        ("SALL_STORAGE_PATH", "Ray Tune"),
    ],
)
def test_sbatch_template_refuses_a_missing_setting_in_one_line(unset, words):
    given = {"SALL_MLFLOW_URI": "http://127.0.0.1:9", "SALL_CACHE_DIR": "/c", "SALL_STORAGE_PATH": "/s"}
    given.pop(unset)
    r = subprocess.run(
        ["bash", str(SBATCH)], env=_template_env(SLURM_JOB_ID="1", **given), capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: set {unset} ") and words in r.stderr, r.stderr


def test_sbatch_template_outside_slurm_says_so():
    uris = {"SALL_MLFLOW_URI": "http://127.0.0.1:9", "SALL_CACHE_DIR": "/c", "SALL_STORAGE_PATH": "/s"}
    r = subprocess.run(["bash", str(SBATCH)], env=_template_env(**uris), capture_output=True, text=True, cwd=ROOT)
    assert (r.returncode, r.stderr) == (2, "error: run this with sbatch (no SLURM_JOB_ID)\n")


def test_local_slurm_without_slurm_names_the_installer(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no munged, slurmctld, slurmd, sbatch ...
    r = subprocess.run(
        [sys.executable, str(LOCAL_SLURM), "up", "--dir", str(tmp_path / "s")], env=env, capture_output=True, text=True
    )
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "missing munged, slurmctld, slurmd" in r.stderr, r.stderr
    assert "cluster/install-services.sh" in r.stderr
    assert not (tmp_path / "s" / "slurm.json").exists()


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def local_slurm(d: Path, nodes: int = 2):
    """A running cluster/slurm/local.py Slurm (its state dict); `down` when the block ends."""
    slurm.check_binaries()
    t0 = time.monotonic()
    state = slurm.up(str(d), nodes=nodes, cpus_per_node=1, timeout=60)
    state["up_s"] = time.monotonic() - t0
    try:
        yield state
    finally:
        if slurm.state_path(d).exists():
            slurm.down(str(d))


def slurm_env(state: dict, **extra: str) -> dict:
    """The environment of an sbatch/srun against this cluster (and so of its jobs)."""
    drop = ("SLURM_", "SALL_", "RAY_ADDRESS", "RAY_AUTH_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(slurm.client_env(state))
    env.update(extra)
    return env


def listening_addresses(pids: list[int]) -> set[str]:
    """IPv4/IPv6 addresses on which these processes hold listening TCP sockets."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                    found.add(_ip(f[1].split(":")[0], width))
    return found


def _ip(hexaddr: str, width: int) -> str:
    raw = bytes.fromhex(hexaddr)
    if width == 8:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
    return str(ipaddress.IPv6Address(b"".join(words)))


# --------------------------------------------------------------------------- slow: the local Slurm


@pytest.mark.slow
def test_local_slurm_runs_a_two_node_job_on_loopback_and_down_leaves_nothing(tmp_path):
    with local_slurm(tmp_path / "slurm") as st:
        assert st["up_s"] < 30, st["up_s"]
        assert slurm.node_states(st) == {"sall-n1": "idle", "sall-n2": "idle"}
        daemons = slurm.processes(st)
        assert len(daemons) >= 4  # munged, slurmctld (+ slurmscriptd), 2 x slurmd
        assert listening_addresses(daemons) == {"127.0.0.1"}
        job = tmp_path / "job.sh"
        job.write_text(
            "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n"
            "srun bash -c 'echo \"step on $SLURMD_NODENAME in $(hostname)\"'\n"
        )
        r = subprocess.run(
            ["sbatch", "--wait", f"--output={tmp_path / 'job.out'}", str(job)],
            env=slurm_env(st),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        out = (tmp_path / "job.out").read_text()
        assert sorted(re.findall(r"step on (\S+) in localhost", out)) == ["sall-n1", "sall-n2"], out
        sessions = list(st["pids"].values())
    assert slurm.processes(st) == []
    assert not any(proc.pid_alive(p) for p in sessions)
    assert not Path(st["runtime"]).exists()  # the munge key is gone
    assert (tmp_path / "slurm" / "slurm.stopped.json").exists()


# --------------------------------------------------------------------------- on demand: the sweep


@contextlib.contextmanager
def mlflow_server(d: Path):
    """`mlflow server` on 127.0.0.1 (SQLite, artifacts proxied into d), not yet waited for:
    the job waits for /health itself, so the server's ~20 s start overlaps Ray's."""
    port = proc.free_port("127.0.0.1")
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", str(d / "mlartifacts"), "--workers", "1",
    ]  # fmt: skip
    p = proc._spawn(cmd, d / "mlflow.log", {**os.environ, "MLFLOW_TRACKING_URI": ""}, d)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop_sessions([p.pid], None, grace=10)


@pytest.fixture
def sweep_uris(tmp_path):
    """The sweep's tracking server, cache and Tune storage, as the job's environment carries them.
    Here: an MLflow server on SQLite and local folders (every Slurm node is this host)."""
    d = tmp_path / "services"
    d.mkdir()
    with mlflow_server(d) as uri:
        yield {
            "SALL_MLFLOW_URI": uri,
            "SALL_CACHE_DIR": str(tmp_path / "sall-cache"),
            "SALL_STORAGE_PATH": str(tmp_path / "ray_results"),
        }


@pytest.fixture
def one_host_env():
    """The template's knobs for two Ray nodes on one host, loopback only: every node on
    127.0.0.1 with its own temp dir and free ports, the shim's loopback variable. The nodes'
    temp dirs (Ray's session logs) are removed afterwards."""
    temp_root = f"/tmp/sall-sj-{secrets.token_hex(3)}"  # short: Ray's Unix socket paths live under it
    yield {
        "SALL_PYTHON": sys.executable,
        "SALL_RAY_PORT": str(proc.free_port("127.0.0.1")),
        "SALL_RAY_NODE_IP": "127.0.0.1",
        "SALL_RAY_TEMP_ROOT": temp_root,
        "SALL_RAY_SHARED_HOST": "1",
        "SALL_RAY_HEAD_ARGS": "--include-dashboard false --object-store-memory 268435456",
        "SALL_RAY_NODE_ARGS": "--object-store-memory 268435456",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    shutil.rmtree(temp_root, ignore_errors=True)


def sweep_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)


def job_ray_nodes(out: str) -> dict[str, str]:
    """Ray node id -> Slurm node name, from the job's `ray node ...` lines (cluster/slurm/wait_ray.py)."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^ray node (\w+) (\S+) ", out, re.M)}


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SALL_SLURM_SWEEP") != "1", reason="on demand: cluster/slurm/test-local.sh (SALL_SLURM_SWEEP=1)"
)
def test_sweep_in_a_two_node_slurm_job(tmp_path, sweep_uris, one_host_env):
    t0 = time.monotonic()
    exp = "sall-slurm"
    with local_slurm(tmp_path / "slurm") as st:
        env = slurm_env(
            st,
            **sweep_uris,
            **one_host_env,
            SALL_SWEEP_ARGS=f"--smoke --folds 0 --experiment {exp}",
        )
        cmd = ["sbatch", "--nodes=2", "--wait", "--cpus-per-task=1", "--gpus-per-task=0"]
        cmd += ["--time=10:00", f"--output={tmp_path / 'job.out'}", str(SBATCH)]
        t_job = time.monotonic()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        t_job = time.monotonic() - t_job
        out = (tmp_path / "job.out").read_text()
        assert r.returncode == 0, f"{r.stderr}\n{out[-4000:]}"
        nodes = job_ray_nodes(out)
        assert sorted(nodes.values()) == ["sall-n1", "sall-n2"], out[-4000:]
        runs = sweep_runs(sweep_uris["SALL_MLFLOW_URI"], exp)
        stages = Counter((r.data.tags.get("sall.stage"), r.info.status) for r in runs)
        assert stages == Counter(
            {
                ("student", "FINISHED"): 3,
                ("teacher", "FINISHED"): 2,
                ("teachers", "FINISHED"): 1,
                ("sweep", "FINISHED"): 1,
            }
        ), stages  # baseline, T=1 and T=8 on fold 0, each once; the DR and AMD teachers once
        students = [r for r in runs if r.data.tags["sall.stage"] == "student"]
        assert len({r.info.run_name for r in students}) == 3
        used = {r.data.tags["sall.node"] for r in students}
        assert used == set(nodes), (used, nodes)  # trials ran on both Ray nodes of the job
    assert slurm.processes(st) == []  # the job's Ray nodes and the daemons are gone
    print(f"\nslurm sweep: slurm up {st['up_s']:.1f}s, sbatch --wait {t_job:.1f}s, test {time.monotonic() - t0:.1f}s")


def _wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finished_students(uri: str, experiment: str) -> dict[str, str]:
    """run name -> run id of the student runs FINISHED so far."""
    runs = sweep_runs(uri, experiment)
    return {
        r.info.run_name: r.info.run_id
        for r in runs
        if r.data.tags.get("sall.stage") == "student" and r.info.status == "FINISHED"
    }


def job_field(env: dict, job_id: str, field: str) -> str:
    r = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=10)
    m = re.search(rf"\b{field}=(\S+)", r.stdout)
    return m.group(1) if m else ""


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SALL_SLURM_SWEEP") != "1", reason="on demand: cluster/slurm/test-local.sh (SALL_SLURM_SWEEP=1)"
)
def test_time_limit_signal_requeues_the_job_and_the_rerun_resumes(tmp_path, sweep_uris, one_host_env):
    """The --signal=B:USR1 path, as Slurm takes it 5 minutes before the time limit: the job
    interrupts the sweep after its first trial (the others mid-training: 150 student epochs),
    stops Ray and requeues itself; the requeued run finishes the sweep without rerunning the
    finished trial, and every trial ends with one MLflow run."""
    t0 = time.monotonic()
    exp, out_file = "sall-slurm-requeue", tmp_path / "job.out"
    with local_slurm(tmp_path / "slurm") as st:
        env = slurm_env(
            st,
            **sweep_uris,
            **one_host_env,
            SALL_SWEEP_ARGS=f"--smoke --folds 0 --student-epochs 150 --experiment {exp}",
        )
        cmd = ["sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", "--gpus-per-task=0"]
        job = subprocess.run(
            [*cmd, "--time=20:00", f"--output={out_file}", str(SBATCH)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        ).stdout.strip()
        assert job.isdigit(), job
        text = lambda: out_file.read_text() if out_file.exists() else ""  # noqa: E731
        _wait_for(lambda: "[trial]" in text(), 400, "the first finished trial")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=10)
        first = finished_students(sweep_uris["SALL_MLFLOW_URI"], exp)
        _wait_for(lambda: job_field(env, job, "Restarts") == "1", 300, "the job to requeue itself")
        assert len(finished_students(sweep_uris["SALL_MLFLOW_URI"], exp)) < 3  # something is left to resume
        _wait_for(lambda: job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 600, "the job's end")
        out = text()
        print(out[-6000:])
        assert job_field(env, job, "JobState") == "COMPLETED", out[-4000:]
        assert job_field(env, job, "Restarts") == "1", out[-4000:]
        assert "time limit near: interrupting the sweep and requeueing" in out
        assert len(re.findall(r"sall\.sbatch: sweep exited with code", out)) == 2, out[-4000:]
        students = [
            r for r in sweep_runs(sweep_uris["SALL_MLFLOW_URI"], exp) if r.data.tags.get("sall.stage") == "student"
        ]
        assert Counter((r.info.run_name, r.info.status) for r in students) == Counter(
            {("baseline fold0", "FINISHED"): 1, ("T=1 fold0", "FINISHED"): 1, ("T=8 fold0", "FINISHED"): 1}
        )  # one run per trial: the interrupted ones were resumed, not logged again
        assert first and set(first.items()) <= {(r.info.run_name, r.info.run_id) for r in students}  # not rerun
    assert slurm.processes(st) == []
    print(f"\nslurm requeue: test {time.monotonic() - t0:.1f}s")
