#!/usr/bin/env python3
"""A local multi-node Ray cluster plus an MLflow tracking server, on ONE machine.

    python cluster/local.py up [--workers 2] [--cpus-per-node 1] [--mlflow-port P] [--dir D]
                               [--isolate] [--services]
    python cluster/local.py exec [--dir D] -- CMD...   # run a driver on the head node
    python cluster/local.py status [--dir D] [--json]
    python cluster/local.py env [--dir D]          # the export lines, for `eval "$(...)"`
    python cluster/local.py kill-worker [--index I] [--dir D]   # fault injection
    python cluster/local.py add-worker [--dir D]
    python cluster/local.py down [--dir D]

`up` starts a Ray head and N worker nodes, each its own `ray start --block` (own raylet,
object store, --num-cpus, temp dir and ports), and `mlflow server` backed by SQLite in D.
It waits (bounded) until every node is alive in the GCS and MLflow answers /health, writes
D/cluster.json and prints the addresses to use.

How several raylets share one host:
* every node gets its own ports, picked free at runtime: --node-manager-port,
  --object-manager-port, --dashboard-agent-listen-port (default 52365 would clash), the
  head's --port and --dashboard-port; worker processes use OS-assigned ports
  (--min-worker-port 0 --max-worker-port 0), so no fixed ranges collide;
* every node gets its own --temp-dir (sockets, logs), short enough for the 107-byte
  Unix-socket limit, and its own --node-name;
* loopback: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray keeps 127.0.0.1 as the node IP
  and binds GCS/raylet/agents to it only (otherwise it rewrites 127.0.0.1 to the LAN IP
  and listens on all interfaces). That variable also makes `ray start --address` refuse to
  start a worker node; cluster/_ray_start.py runs Ray's own CLI with that single guard
  lifted. Drivers must carry the same variable (see `env`), or they try the LAN IP.

Nodes that share nothing but the network (`--isolate`, `--services`): with --isolate, every node
runs in its own private mount namespace (`unshare -m`) with its own tmpfs on /tmp, HOME on it,
and the repository read-only, so no node can see another's files or write to a shared folder;
a driver then runs on the head node (`exec`). With --services, cluster/services.py starts
PostgreSQL and a Ceph RADOS Gateway (a real S3 server) on 127.0.0.1; MLflow keeps its runs in
PostgreSQL and its artifacts in S3, and every node gets the S3 endpoint and keys, so
`--cache-dir s3://...` and `--storage-path s3://...` work on every node. The nodes then share
only loopback traffic: Ray's, MLflow's HTTP and S3's HTTP.

Only its own processes: each component is started with start_new_session=True, so it leads
its own session; `down`/`kill-worker` signal exactly the processes in the recorded
sessions (plus any process whose environment carries this cluster's marker variable,
should one have left its session). It never runs `ray stop`, which would kill every Ray
on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
RAY_START_SHIM = HERE / "_ray_start.py"
STATE_NAME = "cluster.json"
DEFAULT_DIR = "out/local-cluster"
MARKER_ENV = "SALL_LOCAL_CLUSTER"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# Variables of the caller's environment that must not leak into the cluster's processes.
IGNORED_USER_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")
GCS_ALIVE = 0  # GcsNodeInfo.GcsNodeState.ALIVE


class ClusterError(RuntimeError):
    pass


# --------------------------------------------------------------------------- processes


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (session id, process group, state), read from /proc (Linux)."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if len(fields) < 4:
            continue
        table[int(name)] = (int(fields[3]), int(fields[2]), fields[0])
    return table


def _has_marker(pid: int, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return f"{MARKER_ENV}={marker}".encode() in env


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return False
    return raw[raw.rfind(")") + 2 :].split()[0] not in ("Z", "X")


def session_members(sids, marker: str | None = None) -> list[int]:
    """Live (non-zombie) processes in the given sessions, or carrying the marker env."""
    sids = {int(s) for s in sids}
    me = os.getpid()
    out = []
    for pid, (sid, _pgid, state) in _proc_table().items():
        if pid == me or state in ("Z", "X"):
            continue
        if sid in sids or (marker is not None and _has_marker(pid, marker)):
            out.append(pid)
    return sorted(out)


def _signal_all(pids, sig) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_sessions(sids, marker: str | None = None, grace: float = 10.0) -> list[int]:
    """SIGTERM the session leaders (graceful Ray/MLflow shutdown), then SIGKILL whatever
    is left of those sessions after `grace` seconds. Returns pids that survived."""
    sids = [int(s) for s in sids]
    _signal_all([s for s in sids if pid_alive(s)], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not session_members(sids, marker):
            return []
        time.sleep(0.2)
    return kill_sessions(sids, marker)


def kill_sessions(sids, marker: str | None = None) -> list[int]:
    """SIGKILL every process of the sessions at once (a node crash, not a shutdown)."""
    for _ in range(3):  # members may fork while we kill; a few rounds
        left = session_members(sids, marker)
        if not left:
            return []
        _signal_all(left, signal.SIGKILL)
        end = time.monotonic() + 3.0
        while time.monotonic() < end and session_members(sids, marker):
            time.sleep(0.1)
    return session_members(sids, marker)


# --------------------------------------------------------------------------- helpers


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _free_ports(host: str, n: int, taken: set[int]) -> list[int]:
    ports = []
    while len(ports) < n:
        p = free_port(host)
        if p not in taken and p not in ports:
            ports.append(p)
    taken.update(ports)
    return ports


def _tail(path, n: int = 25) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:])


def _child_env(state: dict) -> dict:
    env = dict(os.environ)
    for k in IGNORED_USER_ENV:  # a user's settings must not redirect/break our nodes
        env.pop(k, None)
    env.update(state["env"])
    env[MARKER_ENV] = state["marker"]
    return env


def _use_cluster_env(state: dict) -> None:
    """Make this process a client of the cluster (auth mode and token for GcsClient)."""
    for k in IGNORED_USER_ENV:
        os.environ.pop(k, None)
    os.environ.update(state["env"])
    if "ray._raylet" in sys.modules:  # refresh Ray's cached config/token, if already loaded
        with contextlib.suppress(Exception):
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()


def _spawn(cmd: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # own session: what `down` kills, and nothing else
        )


def state_path(d) -> Path:
    return Path(d).resolve() / STATE_NAME


def load_state(d) -> dict:
    p = state_path(d)
    if not p.exists():
        raise ClusterError(f"no local cluster state at {p} (run `up` first, or pass --dir)")
    return json.loads(p.read_text())


def save_state(state: dict) -> None:
    p = state_path(state["dir"])
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, p)


def all_sids(state: dict) -> list[int]:
    sids = [state["head"]["pid"]] + [w["pid"] for w in state["workers"]]
    if state.get("mlflow"):
        sids.append(state["mlflow"]["pid"])
    return sids


def _gcs_nodes(state: dict, timeout: float = 5.0) -> list[dict]:
    """Nodes as the GCS sees them (no driver needed)."""
    _use_cluster_env(state)
    from ray._raylet import GcsClient

    client = GcsClient(address=state["address"])
    nodes = []
    for node_id, info in client.get_all_node_info(timeout=timeout).items():
        nodes.append(
            {
                "node_id": node_id.hex(),
                "name": info.node_name,
                "alive": info.state == GCS_ALIVE,
                "node_manager_port": info.node_manager_port,
                "address": info.node_manager_address,
            }
        )
    return nodes


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback)
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


# --------------------------------------------------------------------------- ray nodes


def _flags(values: dict[str, object]) -> list[str]:
    """`--flag value` pairs, in order, from one mapping (so a node's command reads as a table)."""
    return [str(x) for flag, value in values.items() for x in (f"--{flag}", value)]


def _ray_start_cmd(state: dict, node: dict, head: bool) -> list[str]:
    host = state["host"]
    node_flags = {
        "node-ip-address": host,
        "node-name": node["name"],
        "num-cpus": node["num_cpus"],
        "num-gpus": node["num_gpus"],
        "temp-dir": node["temp_dir"],
        "object-store-memory": state["object_store_memory"],
        "node-manager-port": node["node_manager_port"],
        "object-manager-port": node["object_manager_port"],
        "dashboard-agent-listen-port": node["dashboard_agent_listen_port"],
        "min-worker-port": 0,
        "max-worker-port": 0,
        "log-style": "record",
    }
    cmd = [sys.executable, str(RAY_START_SHIM), "start", "--block", "--disable-usage-stats", *_flags(node_flags)]
    if head:
        head_flags = {
            "port": state["gcs_port"],
            "dashboard-host": host,
            "dashboard-port": state["dashboard_port"],
            "include-dashboard": "true" if state["dashboard"] else "false",
        }
        return [*cmd, "--head", *_flags(head_flags)]
    return [*cmd, *_flags({"address": state["address"]})]


def _new_node(state: dict, name: str, index: int, num_cpus: int, taken: set[int]) -> dict:
    nm, om, agent = _free_ports(state["host"], 3, taken)
    return {
        "name": name,
        "index": index,
        "num_cpus": num_cpus,
        "num_gpus": 0,
        "node_manager_port": nm,
        "object_manager_port": om,
        "dashboard_agent_listen_port": agent,
        "temp_dir": os.path.join(state["temp_root"], f"n{index}"),
        "log": str(Path(state["dir"]) / "logs" / f"{name}.log"),
        "pid": None,
        "node_id": None,
        "killed": False,
    }


NODE_HOME = "/tmp/home"
NODE_TOKEN = "/tmp/.sall-ray-auth-token"


def _isolated(cmd: list[str]) -> list[str]:
    """`cmd` in a private mount namespace: its own tmpfs on /tmp (with HOME on it) and the
    repository read-only. The Ray token is read before /tmp is hidden and put on the new one."""
    repo = shlex.quote(str(HERE.parent))
    script = (
        'set -e; tok=\'\'; [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && tok=$(cat "$RAY_AUTH_TOKEN_PATH"); '
        "mount -t tmpfs -o size=4g,mode=1777 sall-node-tmp /tmp; "
        f"mount --bind {repo} {repo}; mount -o remount,bind,ro {repo}; "
        f"mkdir -p {NODE_HOME}; export HOME={NODE_HOME}; "
        f'if [ -n "$tok" ]; then umask 077; printf %s "$tok" > {NODE_TOKEN}; export RAY_AUTH_TOKEN_PATH={NODE_TOKEN}; fi; '
        'exec "$@"'
    )
    return ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", script, "sall-node", *cmd]


def _start_node(state: dict, node: dict, head: bool) -> subprocess.Popen:
    cmd = _ray_start_cmd(state, node, head)
    proc = _spawn(
        _isolated(cmd) if state.get("isolate") else cmd,
        Path(node["log"]),
        _child_env(state),
        Path(state["dir"]),
    )
    node["pid"] = proc.pid
    return proc


def _wait_nodes(state: dict, procs: dict, nodes: list[dict], deadline: float) -> None:
    """Wait until every node in `nodes` is ALIVE in the GCS; fail fast if its
    `ray start` exits."""
    want = {n["node_manager_port"]: n for n in nodes}
    last_err = None
    while True:
        for n in nodes:
            p = procs.get(n["name"])
            if p is not None and p.poll() is not None:
                raise ClusterError(
                    f"`ray start` for {n['name']} exited with code {p.returncode}; log {n['log']}:\n{_tail(n['log'])}"
                )
        try:
            seen = {x["node_manager_port"]: x for x in _gcs_nodes(state, timeout=3) if x["alive"]}
            for port, n in want.items():
                if port in seen:
                    n["node_id"] = seen[port]["node_id"]
            if all(port in seen for port in want):
                return
        except Exception as e:  # GCS not up yet
            last_err = e
        if time.monotonic() > deadline:
            missing = [n["name"] for n in nodes if not n["node_id"]]
            logs = "\n".join(f"  {n['name']} ({n['log']}):\n{_tail(n['log'], 12)}" for n in nodes if not n["node_id"])
            raise ClusterError(
                f"timed out waiting for Ray nodes {missing} to register with the GCS at "
                f"{state['address']} (last error: {last_err}).\n{logs}"
            )
        time.sleep(0.5)


# --------------------------------------------------------------------------- commands


def _default_temp_root(d: Path) -> str:
    digest = hashlib.sha1(str(d).encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"sall-ray-{digest}")


def up(
    workers: int = 2,
    cpus_per_node: int = 1,
    head_cpus: int | None = None,
    mlflow_port: int | None = None,
    mlflow: bool = True,
    directory: str = DEFAULT_DIR,
    host: str = "127.0.0.1",
    dashboard: bool = False,
    auth: bool = True,
    object_store_mb: int = 256,
    temp_dir: str | None = None,
    timeout: float = 120.0,
    quiet: bool = False,
    isolate: bool = False,
    services: bool = False,
) -> dict:
    """Start a head, `workers` worker nodes and (with `mlflow`) an MLflow server; return the state
    written to <directory>/cluster.json once every node is alive and MLflow answers, all within
    `timeout` seconds. On any failure, everything started so far is stopped again."""
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    _refuse_running(d)
    host = "127.0.0.1" if host == "localhost" else host
    temp_root = _temp_root(temp_dir, d)
    taken: set[int] = set()
    state = _new_state(d, host, temp_root, taken, dashboard, auth, object_store_mb)
    state["isolate"] = isolate
    shutil.rmtree(temp_root, ignore_errors=True)
    if auth:
        _write_token(d / "ray_auth_token")
    head = _new_node(state, "sall-head", 0, cpus_per_node if head_cpus is None else head_cpus, taken)
    state["head"] = head
    deadline = time.monotonic() + timeout
    procs: dict[str, subprocess.Popen] = {}
    try:
        if services:
            _start_services(state)
        procs["sall-head"] = _start_node(state, head, head=True)
        save_state(state)
        ml_proc = _start_mlflow(state, mlflow_port or _free_ports(host, 1, taken)[0]) if mlflow else None
        _wait_nodes(state, procs, [head], deadline)
        _start_workers(state, procs, workers, cpus_per_node, taken)
        _wait_nodes(state, procs, state["workers"], deadline)
        if ml_proc is not None:
            _wait_mlflow(state["mlflow"], ml_proc, deadline)
        save_state(state)
    except BaseException:
        _abort_up(state, d)
        raise
    if not quiet:
        print(describe(state))
    return state


def _refuse_running(d: Path) -> None:
    """One cluster per directory: `up` over a running one would orphan its processes."""
    if state_path(d).exists():
        old = json.loads(state_path(d).read_text())
        if session_members(all_sids(old), old.get("marker")):
            raise ClusterError(f"a local cluster from {d} is already running; run `down --dir {d}` first")


def _temp_root(temp_dir: str | None, d: Path) -> str:
    temp_root = temp_dir or _default_temp_root(d)
    if len(temp_root) > 48:
        raise ClusterError(
            f"--temp-dir {temp_root!r} is too long: Ray's Unix sockets live under it and "
            "the socket path limit is 107 bytes; use a short path such as /tmp/sall-ray"
        )
    return temp_root


def _new_state(
    d: Path, host: str, temp_root: str, taken: set[int], dashboard: bool, auth: bool, object_store_mb: int
) -> dict:
    """The cluster's state before any node starts: addresses, ports and the nodes' environment."""
    gcs_port, dash_port = _free_ports(host, 2, taken)
    return {
        "version": 1,
        "dir": str(d),
        "marker": str(d),
        "host": host,
        "temp_root": temp_root,
        "gcs_port": gcs_port,
        "address": f"{host}:{gcs_port}",
        "dashboard": dashboard,
        "dashboard_port": dash_port,
        "dashboard_url": f"http://{host}:{dash_port}" if dashboard else None,
        "object_store_memory": int(object_store_mb) * 1024 * 1024,
        "env": {
            "RAY_USAGE_STATS_ENABLED": "0",
            # Explicit auth mode: otherwise `ray start` turns token auth on whenever some
            # ~/.ray/auth_token exists (Ray >= 2.5x writes one on a local ray.init()), and
            # clients without that token are refused. Our own token, in our own dir.
            "RAY_AUTH_MODE": "token" if auth else "disabled",
            **({"RAY_AUTH_TOKEN_PATH": str(d / "ray_auth_token")} if auth else {}),
            **({LOOPBACK_ENV: "0"} if host in LOOPBACK_HOSTS else {}),
        },
        "started": time.time(),
        "head": None,
        "workers": [],
        "mlflow": None,
    }


def _write_token(token_file: Path) -> None:
    """A fresh Ray auth token, readable by this user only."""
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def _services_module():
    spec = importlib.util.spec_from_file_location("sall_cluster_services", HERE / "services.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _start_services(state: dict) -> None:
    """PostgreSQL and Ceph's S3 gateway (cluster/services.py), recorded in the state; every node
    and driver gets the S3 endpoint and keys."""
    svc = _services_module()
    try:
        state["services"] = svc.up(str(Path(state["dir"]) / "services"))
    except svc.ServiceError as e:  # one line, as every fault of `up`, not a traceback
        raise ClusterError(str(e)) from None
    state["env"].update(svc.env_for_s3(state["services"]))
    save_state(state)


def _start_mlflow(state: dict, port: int) -> subprocess.Popen:
    """Start `mlflow server` (SQLite and artifacts in the cluster dir) and record it in the state."""
    d, host = Path(state["dir"]), state["host"]
    uri_host = f"[{host}]" if ":" in host else host
    ml = {
        "port": port,
        "uri": f"http://{uri_host}:{port}",
        "backend_store_uri": f"sqlite:///{d / 'mlflow.db'}",
        "artifacts_destination": str(d / "mlartifacts"),
        "log": str(d / "logs" / "mlflow.log"),
    }
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--backend-store-uri", ml["backend_store_uri"],
        "--serve-artifacts",
        "--artifacts-destination", ml["artifacts_destination"],
        "--workers", "1",
    ]  # fmt: skip
    if state.get("services"):  # runs in PostgreSQL, artifacts in S3
        svc = _services_module()
        cmd = svc.mlflow_server_args(state["services"], host, port)
        ml["backend_store_uri"] = "postgresql (cluster/services.py)"
        ml["artifacts_destination"] = f"s3://{state['services']['s3']['bucket']}/mlartifacts"
    # MLflow 3's GenAI job runner off: eight worker processes a sweep never uses, and most of the
    # server's start-up time on 2 cores (cluster/services.py measured 104 s against 34-39 s)
    env = {**_child_env(state), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = _spawn(cmd, Path(ml["log"]), env, d)
    ml["pid"] = proc.pid
    state["mlflow"] = ml
    save_state(state)
    return proc


def _start_workers(state: dict, procs: dict, workers: int, cpus_per_node: int, taken: set[int]) -> None:
    for i in range(1, workers + 1):
        w = _new_node(state, f"sall-worker-{i}", i, cpus_per_node, taken)
        state["workers"].append(w)
        procs[w["name"]] = _start_node(state, w, head=False)
    save_state(state)


def _wait_mlflow(ml: dict, proc: subprocess.Popen, deadline: float) -> None:
    """Wait until MLflow answers /health; fail fast if the server exits."""
    while not _http_ok(ml["uri"] + "/health"):
        if proc.poll() is not None:
            raise ClusterError(
                f"mlflow server exited with code {proc.returncode}; log {ml['log']}:\n{_tail(ml['log'])}"
            )
        if time.monotonic() > deadline:
            raise ClusterError(
                f"timed out waiting for MLflow at {ml['uri']}/health; log {ml['log']}:\n{_tail(ml['log'])}"
            )
        time.sleep(0.5)


def _abort_up(state: dict, d: Path) -> None:
    """Undo a failed `up`: stop what started, drop its temp dirs and its state file."""
    stop_sessions(all_sids_partial(state), state["marker"], grace=5)
    _stop_services(state)
    shutil.rmtree(state["temp_root"], ignore_errors=True)
    with contextlib.suppress(OSError):
        state_path(d).unlink()


def all_sids_partial(state: dict) -> list[int]:
    sids = []
    if state.get("head") and state["head"].get("pid"):
        sids.append(state["head"]["pid"])
    sids += [w["pid"] for w in state.get("workers", []) if w.get("pid")]
    if state.get("mlflow") and state["mlflow"].get("pid"):
        sids.append(state["mlflow"]["pid"])
    return sids


def _stop_services(state: dict) -> None:
    if state.get("services"):
        _services_module().down(str(Path(state["dir"]) / "services"))


def exec_on_head(cmd: list[str], directory: str = DEFAULT_DIR) -> int:
    """Run `cmd` as a driver on the head node: in its mount namespace when the nodes are isolated
    (only there are the head's Ray sockets and private /tmp), with the cluster's environment."""
    state = load_state(directory)
    env = _child_env(state)
    env.pop(MARKER_ENV)  # a driver is not part of the cluster: `down` must not kill it
    env["RAY_ADDRESS"] = state["address"]
    if state.get("mlflow"):
        env["MLFLOW_TRACKING_URI"] = state["mlflow"]["uri"]
    if state.get("isolate"):
        env.update(HOME=NODE_HOME, **({"RAY_AUTH_TOKEN_PATH": NODE_TOKEN} if "RAY_AUTH_TOKEN_PATH" in env else {}))
        # nsenter starts in /: the caller's folder where the head sees it, else the head's HOME
        cd = ["sh", "-c", 'cd "$1" 2>/dev/null || cd "$HOME"; shift; exec "$@"', "sall-driver", os.getcwd()]
        cmd = ["nsenter", "-t", str(state["head"]["pid"]), "-m", "--", *cd, *cmd]
    return subprocess.call(cmd, env=env)


def env_lines(state: dict) -> list[str]:
    lines = [f"export RAY_ADDRESS={state['address']}"]
    for k, v in state["env"].items():
        if k != "RAY_USAGE_STATS_ENABLED":
            lines.append(f"export {k}={v}")
    lines.append("unset RAY_AUTH_TOKEN")
    if state.get("mlflow"):
        lines.append(f"export MLFLOW_TRACKING_URI={state['mlflow']['uri']}")
    return lines


def describe(state: dict) -> str:
    n = len(state["workers"])
    cpus = sum(x["num_cpus"] for x in [state["head"], *state["workers"]])
    out = [
        f"Local Ray cluster up: head + {n} worker node(s), {cpus} CPU(s) in all, state in {state_path(state['dir'])}",
        "",
        "Use it from this shell with:",
        *("  " + line for line in env_lines(state)),
        "",
        "then, for example:",
        "  python sweeps/temperature.py --address auto --smoke"
        + (f" --mlflow-uri {state['mlflow']['uri']}" if state.get("mlflow") else "")
        + f" --storage-path {state['dir']}/ray_results --cache-dir {state['dir']}/sall-cache",
        "",
        f"Ray address: {state['address']}   (--address auto picks it up from RAY_ADDRESS)",
    ]
    if state.get("mlflow"):
        out.append(f"MLflow URI:  {state['mlflow']['uri']}")
    if state.get("dashboard_url"):
        out.append(f"Dashboard:   {state['dashboard_url']}   (ray job submit --address {state['dashboard_url']} ...)")
    out.append(f"Stop it with: python cluster/local.py down --dir {state['dir']}")
    return "\n".join(out)


def status(directory: str = DEFAULT_DIR) -> dict:
    state = load_state(directory)
    gcs = {}
    if pid_alive(state["head"]["pid"]):
        with contextlib.suppress(Exception):
            gcs = {x["node_id"]: x for x in _gcs_nodes(state, timeout=3)}
    rows = []
    for node in [state["head"], *state["workers"]]:
        members = session_members([node["pid"]])
        g = gcs.get(node.get("node_id") or "", {})
        rows.append(
            {
                "component": node["name"],
                "pid": node["pid"],
                "processes": len(members),
                "running": bool(members),
                "gcs_alive": g.get("alive"),
                "node_id": node.get("node_id"),
                "cpus": node["num_cpus"],
                "killed": node.get("killed", False),
            }
        )
    if state.get("mlflow"):
        ml = state["mlflow"]
        members = session_members([ml["pid"]])
        rows.append(
            {
                "component": "mlflow",
                "pid": ml["pid"],
                "processes": len(members),
                "running": bool(members),
                "healthy": _http_ok(ml["uri"] + "/health") if members else False,
                "uri": ml["uri"],
            }
        )
    return {"address": state["address"], "dir": state["dir"], "components": rows}


def kill_worker(index: int | None = None, directory: str = DEFAULT_DIR) -> dict:
    """SIGKILL every process of one worker node (a node failure). `index` is 1-based;
    default: the last worker still running."""
    state = load_state(directory)
    live = [w for w in state["workers"] if not w.get("killed")]
    if index is None:
        if not live:
            raise ClusterError("no running worker node to kill")
        w = live[-1]
    else:
        match = [w for w in state["workers"] if w["index"] == index]
        if not match:
            raise ClusterError(f"no worker with index {index} (have {[w['index'] for w in state['workers']]})")
        w = match[0]
    left = kill_sessions([w["pid"]])
    if left:
        raise ClusterError(f"could not kill worker {w['name']}: pids {left} survive")
    w["killed"] = True
    save_state(state)
    return w


def add_worker(cpus: int | None = None, directory: str = DEFAULT_DIR, timeout: float = 60.0) -> dict:
    state = load_state(directory)
    if not pid_alive(state["head"]["pid"]):
        raise ClusterError("the head node is not running")
    taken = {state["gcs_port"], state["dashboard_port"]}
    for n in [state["head"], *state["workers"]]:
        taken.update([n["node_manager_port"], n["object_manager_port"], n["dashboard_agent_listen_port"]])
    index = max([0] + [w["index"] for w in state["workers"]]) + 1
    cpus = cpus if cpus is not None else (state["workers"][0]["num_cpus"] if state["workers"] else 1)
    w = _new_node(state, f"sall-worker-{index}", index, cpus, taken)
    state["workers"].append(w)
    proc = _start_node(state, w, head=False)
    save_state(state)
    try:
        _wait_nodes(state, {w["name"]: proc}, [w], time.monotonic() + timeout)
    except BaseException:
        kill_sessions([w["pid"]], None)
        state["workers"].remove(w)
        save_state(state)
        raise
    save_state(state)
    return w


def down(directory: str = DEFAULT_DIR, grace: float = 10.0, keep_temp: bool = False) -> list[int]:
    """Stop exactly what `up` started. Returns pids that could not be stopped."""
    state = load_state(directory)
    marker = state.get("marker")
    # workers first, then the head (so raylets do not race a vanished GCS), then MLflow
    left = stop_sessions([w["pid"] for w in state["workers"]], None, grace=grace)
    left += stop_sessions([state["head"]["pid"]], None, grace=grace)
    if state.get("mlflow"):
        left += stop_sessions([state["mlflow"]["pid"]], None, grace=grace)
    # Safety net: anything that left its session but still carries our marker.
    left = stop_sessions(all_sids(state), marker, grace=2) if (left or session_members([], marker)) else []
    _stop_services(state)
    if left:
        raise ClusterError(f"processes still alive after down: {left}")
    if not keep_temp:
        shutil.rmtree(state["temp_root"], ignore_errors=True)
    with contextlib.suppress(OSError):
        Path(state["dir"], "ray_auth_token").unlink()
    state_path(directory).rename(state_path(directory).with_name("cluster.stopped.json"))
    return left


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cluster/local.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def with_dir(p):
        p.add_argument("--dir", default=DEFAULT_DIR, help=f"state/log/MLflow directory (default {DEFAULT_DIR})")
        return p

    p = with_dir(sub.add_parser("up", help="start head + workers + MLflow"))
    p.add_argument("--workers", type=int, default=2, help="worker nodes besides the head (default 2)")
    p.add_argument("--cpus-per-node", type=int, default=1, help="--num-cpus of each node (default 1)")
    p.add_argument("--head-cpus", type=int, default=None, help="--num-cpus of the head (default: --cpus-per-node)")
    p.add_argument("--mlflow-port", type=int, default=None, help="default: a free port")
    p.add_argument("--no-mlflow", action="store_true", help="do not start an MLflow server")
    p.add_argument("--host", default="127.0.0.1", help="IP everything binds to (default 127.0.0.1)")
    p.add_argument("--dashboard", action="store_true", help="full Ray dashboard (for `ray job submit`)")
    p.add_argument("--no-auth", action="store_true", help="no Ray token authentication (default: a token in --dir)")
    p.add_argument("--object-store-mb", type=int, default=256, help="object store per node (default 256)")
    p.add_argument("--temp-dir", default=None, help="root of the nodes' Ray temp dirs (short path)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for everything (default 120)")
    p.add_argument("--isolate", action="store_true", help="each node in its own mount namespace: private /tmp")
    p.add_argument("--services", action="store_true", help="PostgreSQL + Ceph S3 (cluster/services.py) for MLflow")
    p = with_dir(sub.add_parser("exec", help="run a command as a driver on the head node"))
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")

    p = with_dir(sub.add_parser("status", help="what runs"))
    p.add_argument("--json", action="store_true")
    with_dir(sub.add_parser("env", help="print export lines for drivers"))
    p = with_dir(sub.add_parser("kill-worker", help="SIGKILL one worker node (fault injection)"))
    p.add_argument("--index", type=int, default=None, help="1-based worker index (default: last alive)")
    p = with_dir(sub.add_parser("add-worker", help="start one more worker node"))
    p.add_argument("--cpus", type=int, default=None)
    p = with_dir(sub.add_parser("down", help="stop everything `up` started (only that)"))
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--keep-temp", action="store_true", help="keep the Ray temp dirs (session logs)")
    return ap


def _print_status(st: dict) -> None:
    print(f"Ray address {st['address']}  (dir {st['dir']})")
    for r in st["components"]:
        extra = r.get("uri") or r.get("node_id") or ""
        health = f"healthy={r['healthy']}" if "healthy" in r else f"gcs_alive={r['gcs_alive']}"
        print(
            f"  {r['component']:<16} pid {r['pid']:<7} "
            f"{'running' if r['running'] else 'stopped':<8} procs={r['processes']:<3} "
            f"{health:<16} {extra}"
        )


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.cmd == "up":
            up(
                workers=a.workers,
                cpus_per_node=a.cpus_per_node,
                head_cpus=a.head_cpus,
                mlflow_port=a.mlflow_port,
                mlflow=not a.no_mlflow,
                directory=a.dir,
                host=a.host,
                dashboard=a.dashboard,
                auth=not a.no_auth,
                object_store_mb=a.object_store_mb,
                temp_dir=a.temp_dir,
                timeout=a.timeout,
                isolate=a.isolate,
                services=a.services,
            )
        elif a.cmd == "exec":
            return exec_on_head(a.command[1:] if a.command[:1] == ["--"] else a.command, a.dir)
        elif a.cmd == "status":
            st = status(a.dir)
            if a.json:
                print(json.dumps(st, indent=2))
            else:
                _print_status(st)
        elif a.cmd == "env":
            print("\n".join(env_lines(load_state(a.dir))))
        elif a.cmd == "kill-worker":
            w = kill_worker(a.index, a.dir)
            print(f"killed {w['name']} (session {w['pid']}, node {w['node_id']})")
        elif a.cmd == "add-worker":
            w = add_worker(a.cpus, a.dir)
            print(f"started {w['name']} (session {w['pid']}, node {w['node_id']})")
        elif a.cmd == "down":
            down(a.dir, grace=a.grace, keep_temp=a.keep_temp)
            print(f"local cluster in {Path(a.dir).resolve()} stopped")
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
