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
    directory: Path, workers: int = 2, cpus_per_node: int = 1, mlflow: bool = True, head_cpus: int | None = None
):
    args = ["up", "--dir", str(directory), "--workers", str(workers), "--cpus-per-node", str(cpus_per_node)]
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
        [sys.executable, "-c", DRIVER, cluster.address],
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


def sweep_on(cluster: LocalCluster, *extra: str, experiment: str = "sall-temperature") -> list[str]:
    """`python sweeps/temperature.py --smoke` on the cluster, into its MLflow server."""
    return [
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
        str(cluster.dir / "ray_results"),
        "--cache-dir",
        str(cluster.dir / "sall-cache"),
        *extra,
    ]


def server_runs(uri: str, experiment: str = "sall-temperature") -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)


def _killed_worker_costs_a_retry_not_the_trial(c: LocalCluster) -> dict:
    """The sweep on the cluster, logging to its MLflow server: a long trial (the head has no CPU,
    so it runs on a worker node); SIGKILL that node while it trains; the trial is retried on the
    other worker and finishes, so the sweep used both workers. Returns the killed worker."""
    exp = "sall-cluster-kill"
    workers = {w["node_id"]: i + 1 for i, w in enumerate(c.state["workers"])}
    cmd = sweep_on(
        c,
        "--folds",
        "0",
        "--temperatures",
        "3",
        "--no-baseline",
        "--student-epochs",
        "60",
        "--max-failures",
        "3",
        experiment=exp,
    )
    proc = subprocess.Popen(cmd, env=c.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim, deadline = None, time.time() + 300
    while time.time() < deadline and victim is None:
        for r in server_runs(c.mlflow_uri, exp):
            if (
                r.data.tags.get("sall.stage") == "student"
                and r.info.status == "RUNNING"
                and "train/dr/loss" in r.data.metrics
                and r.data.tags.get("sall.node") in workers
            ):
                victim = r
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(1)
    assert victim is not None, "no trial reached a worker node in time"
    killed = c.kill_worker(workers[victim.data.tags["sall.node"]])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    runs = server_runs(c.mlflow_uri, exp)
    stages = Counter((r.data.tags["sall.stage"], r.info.status) for r in runs)
    assert stages == Counter(
        {("student", "FINISHED"): 1, ("teacher", "FINISHED"): 2, ("teachers", "FINISHED"): 1, ("sweep", "FINISHED"): 1}
    )  # all of it in the server, each once
    rs = [r for r in runs if r.data.tags["sall.stage"] == "student"]
    assert int(rs[0].data.tags["sall.attempts"]) >= 2
    assert rs[0].data.tags["sall.node"] != victim.data.tags["sall.node"]
    return killed


# --------------------------------------------------------------------------- tests


def test_local_cluster_end_to_end(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    t0 = time.monotonic()
    with _bystander_ray(tmp_path) as (bystander, bystander_log):
        # the head has no CPU: trials and tasks run on the worker nodes, one of which is killed
        with start_local_cluster(tmp_path / "cluster", workers=2, cpus_per_node=1, head_cpus=0) as c:
            t_up = time.monotonic() - t0
            bystander_pids = _wait_bystander(bystander, bystander_log)  # started alongside `up`
            assert c.address.startswith("127.0.0.1:") and c.mlflow_uri.startswith("http://127.0.0.1:")
            assert c.dir == (tmp_path / "cluster").resolve()
            assert (c.dir / "cluster.json").exists()
            st = c.status()
            assert [r["component"] for r in st["components"]] == [
                "sall-head", "sall-worker-1", "sall-worker-2", "mlflow"
            ]  # fmt: skip
            assert all(r["running"] for r in st["components"])
            assert all(r["gcs_alive"] for r in st["components"] if r["component"] != "mlflow")

            # Ray: 3 alive nodes, 2 CPUs (the workers'), and the tasks spread over both workers
            info = _run_driver(c)
            assert info["alive"] == 3, info
            assert info["cpus"] == 2, info
            assert len(info["used"]) > 1, info
            assert set(info["used"]) <= set(info["node_ids"])
            recorded = {n["node_id"] for n in [c.state["head"], *c.state["workers"]]}
            assert set(info["node_ids"]) == recorded

            # MLflow: a run logged through the server (artifact proxied too) reads back
            client = mlflow.MlflowClient(tracking_uri=c.mlflow_uri)
            exp = client.create_experiment("sall-cluster-test")
            run = client.create_run(exp, tags={"sall.stage": "student"})
            client.log_param(run.info.run_id, "temperature", "3")
            client.log_metric(run.info.run_id, "test/dr/acc", 0.75)
            art = tmp_path / "metrics.json"
            art.write_text('{"acc": 0.75}')
            client.log_artifact(run.info.run_id, str(art))
            client.set_terminated(run.info.run_id)
            got = client.get_run(run.info.run_id)
            assert got.data.params["temperature"] == "3"
            assert got.data.metrics["test/dr/acc"] == 0.75
            assert got.data.tags["sall.stage"] == "student"
            assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["metrics.json"]
            assert any((c.dir / "mlartifacts").rglob("metrics.json")), "artifact not on the server's store"
            assert (c.dir / "mlflow.db").exists()

            # a sweep on it, with a worker node killed mid-trial
            w = _killed_worker_costs_a_retry_not_the_trial(c)
            assert w["name"] in ("sall-worker-1", "sall-worker-2")
            assert local.session_members([w["pid"]]) == []  # the killed node left no process
            assert local.pid_alive(c.state["head"]["pid"])

            sessions = c.sessions
            assert local.session_members(sessions, c.state["marker"])
            c.down()

        # nothing of the cluster is left, and the temp dirs are gone ...
        assert local.session_members(sessions, c.state["marker"]) == []
        assert not any(local.pid_alive(p) for p in sessions)
        assert not Path(c.state["temp_root"]).exists()
        assert not (c.dir / "cluster.json").exists()
        # ... while the Ray started independently before it survives
        assert bystander.poll() is None, "down killed a Ray it did not start"
        assert all(local.pid_alive(p) for p in bystander_pids), "down killed a Ray it did not start"
    print(f"\nlocal cluster: up {t_up:.1f}s, whole test {time.monotonic() - t0:.1f}s")
