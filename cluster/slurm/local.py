#!/usr/bin/env python3
"""A local Slurm cluster on ONE machine, on 127.0.0.1 only: for testing cluster/slurm/sall.sbatch.

    python cluster/slurm/local.py up [--dir D] [--nodes 2] [--cpus-per-node 1] [--timeout 60]
    python cluster/slurm/local.py env [--dir D]     # export lines for sbatch/squeue, for `eval "$(...)"`
    python cluster/slurm/local.py status [--dir D]
    python cluster/slurm/local.py down [--dir D]

`up` starts `munged` with a freshly generated key on its own socket, `slurmctld`, and one
`slurmd -N <name>` per node (one host, several node names, each with its own port, spool and
log), writes D/slurm.conf and D/slurm.json, and waits (bounded) until every node is idle.
Clients find this cluster through SLURM_CONF (see `env`); the system's /etc/slurm and
/etc/munge are neither read nor touched.

Loopback only: `CommunicationParameters=NoCtldInAddrAny,NoInAddrAny` makes slurmctld, slurmd
and every srun bind the address their host name resolves to instead of all interfaces, and
each daemon runs in its own UTS namespace (`unshare --uts`) named `localhost`, so that
address is 127.0.0.1 on any machine, whatever its own host name resolves to. Jobs inherit
the namespace, so the srun steps inside a job listen on 127.0.0.1 too.

`down` cancels the cluster's jobs, waits (bounded) for them to end, then stops exactly the
daemons `up` started: each runs in its own session, and `down` signals those sessions (plus
any process that carries this cluster's marker variable, which `env` exports to jobs). It
never touches another Slurm or munged on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = "out/local-slurm"
STATE_NAME = "slurm.json"
MARKER_ENV = "SALL_LOCAL_SLURM"
HOSTNAME = "localhost"  # the name every daemon sees in its own UTS namespace (resolves to 127.0.0.1)
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scancel", "squeue", "unshare")
INSTALL_HINT = "install them with cluster/install-services.sh (Debian: slurmctld slurmd slurm-client munge)"


def _load_cluster_local():
    """cluster/local.py (the Ray launcher), for its session-based process helpers."""
    spec = importlib.util.spec_from_file_location("sall_cluster_local", HERE.parent / "local.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


proc = _load_cluster_local()


class SlurmError(RuntimeError):
    pass


# --------------------------------------------------------------------------- configuration


def check_binaries() -> None:
    """Fail with one line if a Slurm/munge binary is not on PATH (a fresh machine has none; the
    daemons live in /usr/sbin, which root's PATH has)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise SlurmError(f"missing {', '.join(missing)}: {INSTALL_HINT}")


def _which(name: str) -> str:
    return shutil.which(name) or name


def _runtime_root(d: Path) -> Path:
    """Short per-cluster folder in /tmp for munge's socket and key: munged insists that every
    folder above its socket is world-executable, which a project folder under /root is not."""
    digest = hashlib.sha1(str(d).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"sall-slurm-{digest}"


def _node_names(n: int) -> list[str]:
    return [f"sall-n{i}" for i in range(1, n + 1)]


def slurm_conf(state: dict) -> str:
    """slurm.conf for one controller and `len(nodes)` slurmd nodes, all on 127.0.0.1."""
    d, nodes = state["dir"], state["nodes"]
    lines = [
        "ClusterName=sall-local",
        f"SlurmctldHost={HOSTNAME}(127.0.0.1)",
        f"SlurmctldPort={state['ctld_port']}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire: also how long a requeued job waits before it starts again (default 120 s)
        f"AuthInfo=socket={state['munge_socket']},cred_expire=30",
        "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
        f"StateSaveLocation={d}/ctld",
        # the spool holds each job step's Unix socket, whose path may not pass 108 bytes: it sits in the
        # short runtime folder, not in --dir (a test's tmp_path under pytest-xdist was 5 bytes too long)
        f"SlurmdSpoolDir={state['runtime']}/spool/%n",
        f"SlurmctldPidFile={d}/ctld/slurmctld.pid",
        f"SlurmdPidFile={state['runtime']}/spool/%n/slurmd.pid",
        f"SlurmctldLogFile={d}/logs/slurmctld.log",
        f"SlurmdLogFile={d}/logs/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "ReturnToService=2",
        "MpiDefault=none",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "InactiveLimit=0",
        "KillWait=10",
        "MinJobAge=60",
    ]
    for n in nodes:
        lines.append(
            f"NodeName={n['name']} NodeHostname={HOSTNAME} NodeAddr=127.0.0.1 Port={n['port']} "
            f"CPUs={state['cpus_per_node']} State=UNKNOWN"
        )
    lines.append(
        f"PartitionName=local Nodes={','.join(n['name'] for n in nodes)} Default=YES MaxTime=INFINITE State=UP"
    )
    return "\n".join(lines) + "\n"


def _new_state(d: Path, nodes: int, cpus_per_node: int) -> dict:
    taken: set[int] = set()
    ports = proc._free_ports("127.0.0.1", nodes + 1, taken)
    rt = _runtime_root(d)
    return {
        "version": 1,
        "dir": str(d),
        "marker": str(d),
        "runtime": str(rt),
        "munge_socket": str(rt / "munge" / "munge.socket"),
        "conf": str(d / "slurm.conf"),
        "ctld_port": ports[0],
        "cpus_per_node": cpus_per_node,
        "nodes": [{"name": name, "port": p} for name, p in zip(_node_names(nodes), ports[1:], strict=True)],
        "pids": {},
        "started": time.time(),
    }


def client_env(state: dict) -> dict[str, str]:
    """What a Slurm client (sbatch, squeue) needs for this cluster; jobs inherit it (and the
    marker, which lets `down` find a job's processes should one escape Slurm's tracking)."""
    return {"SLURM_CONF": state["conf"], MARKER_ENV: state["marker"]}


# --------------------------------------------------------------------------- state


def state_path(d) -> Path:
    return Path(d).resolve() / STATE_NAME


def load_state(d) -> dict:
    p = state_path(d)
    if not p.exists():
        raise SlurmError(f"no local Slurm state at {p} (run `up` first, or pass --dir)")
    return json.loads(p.read_text())


def save_state(state: dict) -> None:
    p = state_path(state["dir"])
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, p)


# --------------------------------------------------------------------------- daemons


def _daemon_env(state: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(client_env(state))
    return env


def _spawn(state: dict, key: str, cmd: list[str]) -> subprocess.Popen:
    """Start one daemon in the foreground, in its own session and its own UTS namespace named
    localhost; record its session id under `key`."""
    wrapped = ["unshare", "--uts", "sh", "-c", f'hostname {HOSTNAME} && exec "$@"', "sh", *cmd]
    log = Path(state["dir"], "logs", f"{key}.out")
    p = proc._spawn(wrapped, log, _daemon_env(state), Path(state["dir"]))
    state["pids"][key] = p.pid
    save_state(state)
    return p


def _make_munge_key(rt: Path) -> Path:
    """A fresh 1 KiB munge key, readable by root only; the socket folder world-executable."""
    shutil.rmtree(rt, ignore_errors=True)
    (rt / "key").mkdir(parents=True, mode=0o700)
    (rt / "munge").mkdir(mode=0o755)
    rt.chmod(0o755)
    key = rt / "key" / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(1024))
    return key


def _start_munged(state: dict) -> subprocess.Popen:
    rt = Path(state["runtime"])
    key = _make_munge_key(rt)
    cmd = [
        _which("munged"), "--foreground",
        f"--socket={state['munge_socket']}",
        f"--key-file={key}",
        f"--pid-file={rt / 'munge' / 'munged.pid'}",
        f"--seed-file={rt / 'key' / 'munged.seed'}",
        f"--log-file={Path(state['dir']) / 'logs' / 'munged.log'}",
    ]  # fmt: skip
    return _spawn(state, "munged", cmd)


def _wait_munge(state: dict, p: subprocess.Popen, deadline: float) -> None:
    """munged is up when its socket exists; fail fast if it exits."""
    sock = Path(state["munge_socket"])
    while not sock.exists():
        _check_alive(state, {"munged": p})
        if time.monotonic() > deadline:
            raise SlurmError(f"munged did not create {sock} in time; log {state['dir']}/logs/munged.out")
        time.sleep(0.05)


def _start_slurm(state: dict) -> dict[str, subprocess.Popen]:
    conf = state["conf"]
    procs = {"slurmctld": _spawn(state, "slurmctld", [_which("slurmctld"), "-D", "-c", "-f", conf])}
    for n in state["nodes"]:
        (Path(state["runtime"]) / "spool" / n["name"]).mkdir(parents=True, exist_ok=True)
        procs[n["name"]] = _spawn(state, n["name"], [_which("slurmd"), "-D", "-N", n["name"], "-f", conf])
    return procs


def _check_alive(state: dict, procs: dict[str, subprocess.Popen]) -> None:
    for key, p in procs.items():
        if p.poll() is not None:
            log = Path(state["dir"], "logs", f"{key}.out")
            raise SlurmError(f"{key} exited with code {p.returncode}; log {log}:\n{proc._tail(log, 15)}")


def node_states(state: dict) -> dict[str, str]:
    """node name -> Slurm state (idle, alloc, down, ...), as sinfo reports it."""
    r = subprocess.run(
        [_which("sinfo"), "-N", "-h", "-o", "%N %T"],
        capture_output=True,
        text=True,
        timeout=10,
        env=_daemon_env(state),
    )
    if r.returncode != 0:
        return {}
    return dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)


def _wait_idle(state: dict, procs: dict[str, subprocess.Popen], deadline: float) -> None:
    want = {n["name"] for n in state["nodes"]}
    seen: dict[str, str] = {}
    while True:
        _check_alive(state, procs)
        seen = node_states(state)
        if want <= seen.keys() and all(seen[n] == "idle" for n in want):
            return
        if time.monotonic() > deadline:
            raise SlurmError(f"nodes not idle in time (sinfo: {seen or 'no answer'}); logs in {state['dir']}/logs")
        time.sleep(0.2)


# --------------------------------------------------------------------------- commands


def up(directory: str = DEFAULT_DIR, nodes: int = 2, cpus_per_node: int = 1, timeout: float = 60.0) -> dict:
    """Start munged, slurmctld and `nodes` slurmd; return the state once every node is idle,
    within `timeout` seconds. On failure, everything started so far is stopped again."""
    check_binaries()
    if os.geteuid() != 0:
        raise SlurmError("the local Slurm runs its daemons as root (SlurmUser=root); run it as root")
    d = Path(directory).resolve()
    _refuse_running(d)
    for sub in ("logs", "ctld"):
        shutil.rmtree(d / sub, ignore_errors=True)
        (d / sub).mkdir(parents=True)
    state = _new_state(d, nodes, cpus_per_node)
    Path(state["conf"]).write_text(slurm_conf(state))
    deadline = time.monotonic() + timeout
    try:
        m = _start_munged(state)
        _wait_munge(state, m, deadline)
        _wait_idle(state, {"munged": m, **_start_slurm(state)}, deadline)
    except BaseException:
        _stop(state, grace=3)
        raise
    return state


def _refuse_running(d: Path) -> None:
    """One cluster per folder: a second `up` would orphan the first one's daemons."""
    if state_path(d).exists():
        old = json.loads(state_path(d).read_text())
        if proc.session_members(old["pids"].values(), old["marker"]):
            raise SlurmError(f"a local Slurm from {d} is already running; run `down --dir {d}` first")


def _cancel_jobs(state: dict, timeout: float = 30.0) -> None:
    """scancel every job of this cluster and wait (bounded) until none is left running: Slurm
    then stops the jobs' processes itself (TERM, then KILL after KillWait)."""
    env = _daemon_env(state)
    if not proc.pid_alive(state["pids"].get("slurmctld", -1)):
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run([_which("scancel"), "--full", "--user", "root"], env=env, capture_output=True, timeout=10)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = subprocess.run(
                [_which("squeue"), "-h", "-t", "R,CG,PD,S", "-o", "%i"], env=env, capture_output=True, timeout=10
            )
        except subprocess.TimeoutExpired:
            return
        if r.returncode != 0 or not r.stdout.strip():
            return
        time.sleep(0.5)


def _stop(state: dict, grace: float = 10.0) -> list[int]:
    """Stop the jobs, then slurmd, slurmctld and munged (in that order), then anything left
    that carries the marker. Returns pids that survived."""
    _cancel_jobs(state)
    pids = state["pids"]
    order = [n["name"] for n in state["nodes"]] + ["slurmctld", "munged"]
    for key in order:
        if key in pids:
            proc.stop_sessions([pids[key]], None, grace=grace)
    left = proc.stop_sessions(list(pids.values()), state["marker"], grace=2)
    shutil.rmtree(state["runtime"], ignore_errors=True)
    return left


def down(directory: str = DEFAULT_DIR, grace: float = 10.0) -> None:
    """Stop exactly what `up` started (and the jobs it ran); raise if something survives."""
    state = load_state(directory)
    left = _stop(state, grace)
    if left:
        raise SlurmError(f"processes still alive after down: {left}")
    state_path(directory).rename(state_path(directory).with_name("slurm.stopped.json"))


def processes(state: dict) -> list[int]:
    """Live processes of this cluster: the daemons' sessions and anything with the marker."""
    return proc.session_members(state["pids"].values(), state["marker"])


def env_lines(state: dict) -> list[str]:
    return [f"export {k}={v}" for k, v in client_env(state).items()]


def describe(state: dict) -> str:
    names = ", ".join(n["name"] for n in state["nodes"])
    return "\n".join(
        [
            f"Local Slurm up: slurmctld on 127.0.0.1:{state['ctld_port']}, nodes {names} "
            f"({state['cpus_per_node']} CPU each), state in {state_path(state['dir'])}",
            "Use it from this shell with:",
            *("  " + line for line in env_lines(state)),
            "then, for example: sinfo; sbatch --nodes=2 --wait cluster/slurm/sall.sbatch (see cluster/slurm/README.md)",
            f"Stop it with: python cluster/slurm/local.py down --dir {state['dir']}",
        ]
    )


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cluster/slurm/local.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ps = {c: sub.add_parser(c) for c in ("up", "env", "status", "down")}
    for p in ps.values():
        p.add_argument("--dir", default=DEFAULT_DIR, help=f"state, config and logs (default {DEFAULT_DIR})")
    ps["up"].add_argument("--nodes", type=int, default=2, help="slurmd nodes (default 2)")
    ps["up"].add_argument("--cpus-per-node", type=int, default=1, help="CPUs each node offers (default 1)")
    ps["up"].add_argument("--timeout", type=float, default=60.0, help="seconds to wait for idle nodes (default 60)")
    ps["down"].add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    return ap


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        if a.cmd == "up":
            print(describe(up(a.dir, a.nodes, a.cpus_per_node, a.timeout)))
        elif a.cmd == "env":
            print("\n".join(env_lines(load_state(a.dir))))
        elif a.cmd == "status":
            st = load_state(a.dir)
            print(json.dumps({"nodes": node_states(st), "processes": processes(st)}, indent=2))
        elif a.cmd == "down":
            down(a.dir, a.grace)
            print(f"local Slurm in {Path(a.dir).resolve()} stopped")
    except (SlurmError, proc.ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
