"""End-to-end test of cluster/local.py: a real multi-node Ray cluster (head + 2 worker
nodes, one raylet each) and a real MLflow server on this machine, and a sweep on it: a worker
node killed mid-trial costs a retry on the other node, not the trial, everything lands in the
server once, and nothing is left behind (Ray tasks spreading over the nodes are checked too). One cluster serves all of it (each `up` and `down`
costs about 15 s on 2 cores).

To test more on a cluster, use `start_local_cluster` (a context manager yielding a
LocalCluster) and `sweep_on(cluster)`, the smoke sweep's command line for it. Drivers must run
with `cluster.env` (RAY_ADDRESS, MLFLOW_TRACKING_URI and
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps Ray on 127.0.0.1); see cluster/README.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL_PY = ROOT / "cluster" / "local.py"

pytestmark = pytest.mark.slow


def _load_local():
    spec = importlib.util.spec_from_file_location("sall_cluster_local", LOCAL_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


local = _load_local()


def _cli(*args, timeout=180, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, str(LOCAL_PY), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and p.returncode != 0:
        raise AssertionError(f"local.py {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@dataclass
class LocalCluster:
    """A running cluster/local.py cluster. `env` is what a driver process needs."""

    dir: Path
    state: dict
    stopped: bool = False
    killed: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.state["address"]

    @property
    def mlflow_uri(self) -> str | None:
        return (self.state.get("mlflow") or {}).get("uri")

    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in local.IGNORED_USER_ENV}
        env.update(self.state["env"])
        env["RAY_ADDRESS"] = self.address
        if self.mlflow_uri:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        return env

    @property
    def sessions(self) -> list[int]:
        """Session ids (= leader pids) of every component `up` started."""
        return local.all_sids(self.state)

    def processes(self) -> list[int]:
        """Live processes belonging to this cluster."""
        return local.session_members(self.sessions, self.state["marker"])

    def on_head(self, cmd: list[str]) -> list[str]:
        """`cmd` as a driver on the head node (in its mount namespace when the nodes are isolated)."""
        return [sys.executable, str(LOCAL_PY), "exec", "--dir", str(self.dir), "--", *cmd]

    def refresh(self) -> dict:
        path = local.state_path(self.dir)
        if path.exists():
            self.state = json.loads(path.read_text())
        return self.state

    def kill_worker(self, i: int | None = None) -> dict:
        """SIGKILL worker node i (1-based; default: the last one alive)."""
        args = ["kill-worker", "--dir", str(self.dir)] + ([] if i is None else ["--index", str(i)])
        _cli(*args, timeout=60)
        self.refresh()
        w = next(w for w in self.state["workers"] if w["killed"] and w["pid"] not in self.killed)
        self.killed.append(w["pid"])
        return w

    def add_worker(self) -> dict:
        _cli("add-worker", "--dir", str(self.dir), timeout=120)
        return self.refresh()["workers"][-1]

    def status(self) -> dict:
        return json.loads(_cli("status", "--dir", str(self.dir), "--json", timeout=60).stdout)

    def down(self) -> None:
        if not self.stopped:
            _cli("down", "--dir", str(self.dir), timeout=120)
            self.stopped = True


@contextlib.contextmanager
def start_local_cluster(
    directory: Path,
    workers: int = 2,
    cpus_per_node: int = 1,
    mlflow: bool = True,
    head_cpus: int | None = None,
    deployment: bool = False,
):
    """`local.py up`; with `deployment`, nodes that share nothing but the network (--isolate) and
    MLflow on PostgreSQL with artifacts in Ceph's S3 (--services)."""
    args = ["up", "--dir", str(directory), "--workers", str(workers), "--cpus-per-node", str(cpus_per_node)]
    if deployment:
        args += ["--isolate", "--services"]
    if head_cpus is not None:
        args += ["--head-cpus", str(head_cpus)]
    if not mlflow:
        args.append("--no-mlflow")
    _cli(*args, timeout=240)
    cluster = LocalCluster(Path(directory).resolve(), json.loads(local.state_path(directory).read_text()))
    try:
        yield cluster
    finally:
        if not cluster.stopped:
            try:
                cluster.down()
            finally:
                # last resort, still only this cluster's own sessions
                local.kill_sessions(cluster.sessions, cluster.state["marker"])


# --------------------------------------------------------------------------- helpers


DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import ray
    ray.init(address=sys.argv[1], log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]

    @ray.remote(num_cpus=1)
    def where(i):
        time.sleep(1.0)  # long enough that one node cannot take all of them
        return ray.get_runtime_context().get_node_id()

    used = ray.get([where.remote(i) for i in range(6)])
    print(json.dumps({"alive": len(nodes),
                      "node_ids": sorted(n["NodeID"] for n in nodes),
                      "cpus": ray.cluster_resources().get("CPU"),
                      "used": sorted(set(used))}))
    ray.shutdown()
    """
)


def _run_driver(cluster: LocalCluster, timeout: float = 90) -> dict:
    p = subprocess.run(
        cluster.on_head([sys.executable, "-c", DRIVER, cluster.address]),
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cluster.dir,
    )
    assert p.returncode == 0, f"driver failed:\n{p.stdout}\n{p.stderr[-4000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _bystander_ray(tmp_path):
    """A Ray instance started independently of local.py (a user's own), own session."""
    temp = f"/tmp/sall-bystander-{os.getpid()}"
    port = local.free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items() if k not in local.IGNORED_USER_ENV}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    log = open(tmp_path / "bystander.log", "wb")
    cmd = [
        sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()",
        "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "1", "--temp-dir", temp, "--include-dashboard", "false",
        "--dashboard-port", str(local.free_port("127.0.0.1")),
        "--dashboard-agent-listen-port", str(local.free_port("127.0.0.1")),
        "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc, tmp_path / "bystander.log"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
        local.kill_sessions([proc.pid])
        log.close()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def _wait_bystander(proc, log: Path, timeout: float = 60) -> list[int]:
    """Wait until `ray start --block` reports the runtime started; its processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"bystander Ray exited:\n{log.read_text()[-3000:]}"
        if "Ray runtime started" in log.read_text(errors="replace"):
            members = local.session_members([proc.pid])
            assert len(members) >= 3, members  # ray start, gcs_server, raylet, ...
            return members
        time.sleep(0.5)
    raise AssertionError(f"bystander Ray did not come up:\n{log.read_text()[-3000:]}")


def s3_keys(state: dict, prefix: str) -> list[str]:
    """The keys under `prefix` in the cluster's bucket (Ceph radosgw)."""
    from service_fixtures import services

    bucket = state["services"]["s3"]["bucket"]
    pages = (
        services.s3_client(state["services"]).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def sweep_on(cluster: LocalCluster, *extra: str, experiment: str = "sall-temperature") -> list[str]:
    """`python sweeps/temperature.py --smoke` on the cluster, run on its head node, with the cache
    and Tune's results in its object store and the runs in its MLflow server."""
    bucket = cluster.state["services"]["s3"]["bucket"]
    return cluster.on_head(
        [
            sys.executable,
            str(ROOT / "sweeps" / "temperature.py"),
            "--address",
            "auto",
            "--smoke",
            "--mlflow-uri",
            cluster.mlflow_uri,
            "--experiment",
            experiment,
            "--storage-path",
            f"s3://{bucket}/ray_results",
            "--cache-dir",
            f"s3://{bucket}/sall-cache",
            *extra,
        ]
    )


def server_runs(uri: str, experiment: str = "sall-temperature") -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)


def _kill_a_busy_worker(c: LocalCluster, proc: subprocess.Popen, exp: str, workers: dict) -> dict:
    """SIGKILL a worker node that has finished a trial and is training another one now."""
    deadline = time.time() + 400
    while time.time() < deadline:
        students = [r for r in server_runs(c.mlflow_uri, exp) if r.data.tags.get("sall.stage") == "student"]
        done = {r.data.tags.get("sall.node") for r in students if r.info.status == "FINISHED"}
        for r in students:
            node = r.data.tags.get("sall.node")
            if r.info.status == "RUNNING" and "train/dr/loss" in r.data.metrics and node in workers and node in done:
                return c.kill_worker(workers[node])
        assert proc.poll() is None, "the sweep ended before a worker could be killed mid-trial"
        time.sleep(0.5)
    raise AssertionError("no worker node was busy with its second trial in time")


def _sweep_with_a_worker_killed_then_rerun(c: LocalCluster) -> tuple[dict, list]:
    """The smoke sweep on one fold (3 trials, 2 teachers) on the two worker nodes (the head has no
    CPU); the worker that takes the third trial is killed while it trains it; then the same command
    again. Returns the killed worker and the experiment's runs."""
    exp = "sall-deployment"
    workers = {w["node_id"]: w["index"] for w in c.state["workers"]}
    cmd = sweep_on(c, "--folds", "0", "--student-epochs", "20", "--max-failures", "3", experiment=exp)
    proc = subprocess.Popen(cmd, env=c.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = _kill_a_busy_worker(c, proc, exp, workers)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    again = subprocess.run(cmd, env=c.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[teachers]" not in again.stderr  # every teacher is in the store and has its run
    return killed, server_runs(c.mlflow_uri, exp)


def _check_exactly_once(c: LocalCluster, runs: list, killed: dict) -> None:
    """Every trial finished once, on both workers; each teacher trained once across the cluster and
    every student learnt from that one published copy; the cache lives in S3 only."""
    stages = Counter((r.data.tags["sall.stage"], r.info.status) for r in runs)
    assert stages == Counter(
        {("student", "FINISHED"): 3, ("teacher", "FINISHED"): 2, ("teachers", "FINISHED"): 1, ("sweep", "FINISHED"): 1}
    ), stages
    students = [r for r in runs if r.data.tags["sall.stage"] == "student"]
    assert len({r.data.tags["sall.config_key"] for r in students}) == 3
    assert any(int(r.data.tags["sall.attempts"]) >= 2 for r in students)  # the killed trial, retried
    nodes = {r.data.tags["sall.node"] for r in students}
    assert nodes == {w["node_id"] for w in c.state["workers"]}, nodes  # trials ran on both workers
    assert killed["node_id"] in nodes
    teachers = {r.data.tags["sall.teacher_key"]: r for r in runs if r.data.tags["sall.stage"] == "teacher"}
    assert len(teachers) == 2 and all(t.data.tags["sall.trained_now"] == "True" for t in teachers.values())
    assert all(r.data.tags["sall.teachers_trained"] == "none" for r in students)  # the teacher stage did
    for r in students:
        for task in ("dr", "amd"):
            if f"sall.teacher_key.{task}" in r.data.tags:
                t = teachers[r.data.tags[f"sall.teacher_key.{task}"]]
                assert r.data.tags[f"sall.teacher_sha256.{task}"] == t.data.tags["sall.teacher_sha256"]
    # one training per teacher, counted from the store: each was built under exactly one lease
    leases = Counter(k.split("/")[2] for k in s3_keys(c.state, "sall-cache/leases/teachers-"))
    assert len(leases) == 2 and set(leases.values()) == {1}, leases
    assert len([k for k in s3_keys(c.state, "sall-cache/teachers/") if k.endswith(".pt")]) == 2
    assert s3_keys(c.state, "ray_results/")  # Tune's state is in the object store too


# --------------------------------------------------------------------------- tests


def test_deployment_on_nodes_that_share_only_the_network(tmp_path):
    """PostgreSQL, Ceph's S3, MLflow on both, a head and two workers each in its own mount
    namespace (private /tmp, the repository read-only): the smoke sweep with a worker killed
    mid-trial, then rerun; `down` leaves no process, mount or temp folder, and spares a Ray it
    did not start."""
    mlflow = pytest.importorskip("mlflow")
    t0 = time.monotonic()
    with _bystander_ray(tmp_path) as (bystander, bystander_log):
        with start_local_cluster(tmp_path / "cluster", workers=2, cpus_per_node=1, head_cpus=0, deployment=True) as c:
            t_up = time.monotonic() - t0
            bystander_pids = _wait_bystander(bystander, bystander_log)  # started alongside `up`
            assert c.address.startswith("127.0.0.1:") and c.mlflow_uri.startswith("http://127.0.0.1:")
            st = c.status()
            assert [r["component"] for r in st["components"]] == [
                "sall-head", "sall-worker-1", "sall-worker-2", "mlflow"
            ]  # fmt: skip
            assert all(r["running"] for r in st["components"])
            assert all(r["gcs_alive"] for r in st["components"] if r["component"] != "mlflow")
            assert _node_tmps() == 3  # a private /tmp per node

            # Ray: 3 alive nodes, 2 CPUs (the workers'), and the tasks spread over both workers
            info = _run_driver(c)
            assert info["alive"] == 3 and info["cpus"] == 2 and len(info["used"]) > 1, info
            recorded = {n["node_id"] for n in [c.state["head"], *c.state["workers"]]}
            assert set(info["node_ids"]) == recorded

            # MLflow: a run and its artifact through the server, into PostgreSQL and S3
            client = mlflow.MlflowClient(tracking_uri=c.mlflow_uri)
            run = client.create_run(client.create_experiment("sall-cluster-test"))
            client.log_metric(run.info.run_id, "test/dr/acc", 0.75)
            (tmp_path / "metrics.json").write_text('{"acc": 0.75}')
            client.log_artifact(run.info.run_id, str(tmp_path / "metrics.json"))
            assert client.get_run(run.info.run_id).data.metrics["test/dr/acc"] == 0.75
            assert any(k.endswith("/metrics.json") for k in s3_keys(c.state, "mlartifacts/"))
            assert not (c.dir / "mlflow.db").exists() and not (c.dir / "mlartifacts").exists()

            killed, runs = _sweep_with_a_worker_killed_then_rerun(c)
            _check_exactly_once(c, runs, killed)
            assert not list(tmp_path.rglob("*.pt")) and not list(ROOT.rglob("sall-cache"))  # no local cache
            _postgres_down_is_one_line(c)
            sessions = c.sessions
            c.down()

        assert local.session_members(sessions, c.state["marker"]) == []
        assert not any(local.pid_alive(p) for p in sessions)
        assert _node_tmps() == 0  # the namespaces and their mounts went with their processes
        assert not (c.dir / "cluster.json").exists()
        assert bystander.poll() is None, "down killed a Ray it did not start"
        assert all(local.pid_alive(p) for p in bystander_pids), "down killed a Ray it did not start"
    print(f"\ndeployment: up {t_up:.1f}s, whole test {time.monotonic() - t0:.1f}s")


def _postgres_down_is_one_line(c: LocalCluster) -> None:
    """The tracking server's PostgreSQL stops (MLflow's /health still answers): the next sweep says
    so in one line at preflight, before anything runs."""
    from service_fixtures import services

    pg = c.state["services"]["postgres"]
    assert services.stop_sessions([pg["pid"]], None, signal.SIGINT, grace=20) == []
    out = subprocess.run(sweep_on(c, "--folds", "0"), env=c.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-3000:]
    assert f"MLflow tracking server {c.mlflow_uri}" in errors[0]
    assert "expected its backend database (e.g. PostgreSQL) to be up" in errors[0]


def _node_tmps() -> int:
    """How many mount namespaces on the machine have an isolated node's private /tmp."""
    spaces = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if "sall-node-tmp /tmp" in Path(f"/proc/{pid}/mounts").read_text():
                    spaces.add(os.readlink(f"/proc/{pid}/ns/mnt"))
    return len(spaces)
