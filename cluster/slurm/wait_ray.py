#!/usr/bin/env python3
"""Wait (bounded) until a Ray cluster has N alive nodes; print them; used by cluster/slurm/sall.sbatch.

    python cluster/slurm/wait_ray.py --address HOST:PORT --nodes N [--timeout S] [--watch PID ...]
    python cluster/slurm/wait_ray.py --mlflow http://HOST:PORT [--timeout S]

Asks the GCS directly (no driver, so no job shows up in the cluster), with whatever Ray auth
the environment carries (RAY_AUTH_MODE, RAY_AUTH_TOKEN). Prints one line per alive node,
`ray node <node id> <node name> <ip>`, so a job's output says which Ray node ran where (the
sweeps tag each trial run with its Ray node id). Exits 1 with one line when the time is up,
or as soon as a watched process (the `srun` that runs a `ray start`) has ended, instead of
waiting out the timeout for a node that will never come.

With --mlflow, it waits instead until an http(s) tracking server answers /health: on a Slurm
cluster the server is often a job of its own, submitted just before the sweep, so a job that
waits a little for it beats one that fails on a server still starting (the sweep's own
preflight still fails with one line if it never answers). Other URIs return at once.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

GCS_ALIVE = 0  # GcsNodeInfo.GcsNodeState.ALIVE


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie (an exited, unreaped child of the batch shell)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return False
    return raw[raw.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def alive_nodes(address: str) -> list[tuple[str, str, str]]:
    """(node id, node name, ip) of every alive node, as the GCS sees them."""
    from ray._raylet import GcsClient

    infos = GcsClient(address=address).get_all_node_info(timeout=3).items()
    return [
        (nid.hex(), i.node_name, i.node_manager_address) for nid, i in infos if i.state == GCS_ALIVE
    ]  # fmt: skip


def wait(address: str, n: int, timeout: float, watch: list[int]) -> list[tuple[str, str, str]]:
    """Poll until n nodes are alive; raise SystemExit with one line on timeout or a dead watch."""
    deadline, last, err = time.monotonic() + timeout, [], None
    while True:
        dead = [p for p in watch if not pid_alive(p)]
        if dead:
            sys.exit(f"error: a `ray start` step ended (pid {dead}) before {n} Ray nodes were up; see the job output")
        try:
            last = alive_nodes(address)
            if len(last) >= n:
                return last
        except Exception as e:  # the GCS is not up yet
            err = e
        if time.monotonic() > deadline:
            sys.exit(
                f"error: {len(last)} of {n} Ray nodes alive at {address} after {timeout:.0f} s"
                + (f" (last error: {str(err).splitlines()[0]})" if err and not last else "")
            )
        time.sleep(1.0)


def wait_mlflow(uri: str, timeout: float) -> None:
    """Poll uri/health until it answers 200; raise SystemExit with one line when the time is up."""
    if not uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3) as r:  # noqa: S310
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError, ValueError) as e:
            err = e
        if time.monotonic() > deadline:
            sys.exit(f"error: MLflow tracking server {uri} did not answer /health in {timeout:.0f} s ({err})")
        time.sleep(1.0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", help="the head's GCS, HOST:PORT")
    ap.add_argument("--nodes", type=int, default=1, help="how many alive nodes to wait for")
    ap.add_argument("--mlflow", help="wait for this tracking server instead of Ray nodes")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds (default 300)")
    ap.add_argument("--watch", type=int, nargs="*", default=[], help="pids whose end means failure")
    a = ap.parse_args(argv)
    if a.mlflow:
        wait_mlflow(a.mlflow, a.timeout)
        return 0
    if not a.address:
        ap.error("--address is required (or --mlflow)")
    for node_id, name, ip in wait(a.address, a.nodes, a.timeout, a.watch):
        print(f"ray node {node_id} {name} {ip}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
