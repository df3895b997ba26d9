"""Sweeps on a real multi-node Ray cluster (cluster/local.py: head + 2 worker nodes + an MLflow
server on loopback): trials spread over nodes, everything lands in the server, nothing is left
behind, and a worker node killed mid-trial costs a retry, not the trial."""
from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest

from test_local_cluster import ROOT, local_cluster, start_local_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def sweep(cluster, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "sweeps" / "temperature.py"), "--address", "auto", "--smoke",
            "--mlflow-uri", cluster.mlflow_uri, "--storage-path", str(cluster.dir / "ray_results"),
            "--cache-dir", str(cluster.dir / "sall-cache"), *extra]


def server_runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("sall-temperature")
    return [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)


def test_temperature_smoke_on_a_three_node_cluster(local_cluster):  # noqa: F811
    out = subprocess.run(sweep(local_cluster), env=local_cluster.env, cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rs = server_runs(local_cluster.mlflow_uri)
    stages = Counter((r.data.tags["sall.stage"], r.info.status) for r in rs)
    assert stages == Counter({("student", "FINISHED"): 9, ("teacher", "FINISHED"): 6, ("teachers", "FINISHED"): 1,
                              ("sweep", "FINISHED"): 1})
    nodes = {r.data.tags["sall.node"] for r in rs if r.data.tags["sall.stage"] == "student"}
    assert len(nodes) > 1, nodes
    local_cluster.down()
    assert local_cluster.processes() == []


def test_a_killed_worker_node_costs_a_retry_not_the_trial(tmp_path):
    with start_local_cluster(tmp_path / "cluster", workers=2, cpus_per_node=1, head_cpus=0) as cluster:
        workers = {w["node_id"]: i + 1 for i, w in enumerate(cluster.state["workers"])}
        cmd = sweep(cluster, "--folds", "0", "--temperatures", "3", "--no-baseline", "--student-epochs", "60",
                    "--max-failures", "3")
        proc = subprocess.Popen(cmd, env=cluster.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        victim = None
        deadline = time.time() + 300
        while time.time() < deadline and victim is None:
            for r in server_runs(cluster.mlflow_uri):
                if (r.data.tags.get("sall.stage") == "student" and r.info.status == "RUNNING"
                        and "train/dr/loss" in r.data.metrics and r.data.tags.get("sall.node") in workers):
                    victim = r
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(1)
        assert victim is not None, "no trial reached a worker node in time"
        cluster.kill_worker(workers[victim.data.tags["sall.node"]])
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        rs = [r for r in server_runs(cluster.mlflow_uri) if r.data.tags["sall.stage"] == "student"]
        assert len(rs) == 1 and rs[0].info.status == "FINISHED"
        assert int(rs[0].data.tags["sall.attempts"]) >= 2
        assert rs[0].data.tags["sall.node"] != victim.data.tags["sall.node"]
