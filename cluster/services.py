#!/usr/bin/env python3
"""Real backing services for a cluster on ONE machine: PostgreSQL and an S3 server (Ceph radosgw).

    python cluster/services.py up [--dir D] [--no-postgres] [--no-ceph]
    python cluster/services.py status [--dir D]
    python cluster/services.py env [--dir D]       # export lines for `eval "$(...)"`
    python cluster/services.py down [--dir D]

Why: a cluster's nodes share nothing but the network, so MLflow needs a database server and the
cache and Tune's storage need an object store. These are the real daemons from Debian's packages
(`cluster/install-services.sh` installs them), not mocks, bound to 127.0.0.1 on free ports, with
everything under D (logs in D/logs, state in D/services.json).

* PostgreSQL: `initdb` into D/postgres, the server started with listen_addresses=127.0.0.1,
  no Unix socket and fsync=off (a test database), a role and database `mlflow`. Its URI carries
  the driver the cluster configs use (PG_SCHEME: psycopg2, from psycopg2-binary), because
  SQLAlchemy 2 reads a plain `postgresql://` as psycopg 3. PostgreSQL refuses to run as root: as
  root it runs as the `postgres` user, and when that user cannot reach D (pytest's folders are
  0700) its data folder is a private temp folder instead, removed by `down`.
* Ceph: one monitor, one memory-backed OSD (memstore: no disk, nothing mounted), and radosgw with
  its beast frontend on 127.0.0.1; auth off inside Ceph, S3 keys from `radosgw-admin user create`;
  one bucket (`sall`) made with boto3.

Use from Python (importlib by path, like cluster/local.py):

    state = up(d)                       # dict, also in d/services.json; raises ServiceError
    state["postgres"]["uri"]            # postgresql+psycopg2://mlflow:PW@127.0.0.1:PORT/mlflow
    state["s3"]["endpoint"], state["s3"]["bucket"], state["s3"]["access_key"], ...
    env_for_s3(state)                   # AWS_* / MLFLOW_S3_ENDPOINT_URL for boto3, pyarrow, MLflow
    mlflow_server_args(state, "127.0.0.1", port)   # argv of `mlflow server` on PG, artifacts in S3
    mlflow_server_env(state)            # ... and the variables to run it with
    down(d)                             # stops every process it started; raises if one survives

Only its own processes: each daemon leads its own session (start_new_session=True) and carries a
marker variable; `down` signals exactly those sessions and marked processes, nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

STATE_NAME = "services.json"
DEFAULT_DIR = "out/services"
HOST = "127.0.0.1"
MARKER_ENV = "SALL_SERVICES"
INSTALL_HINT = "run cluster/install-services.sh (as root) to install it"
# The PostgreSQL driver every cluster config uses (aws.yaml, docker/Dockerfile, kuberay/mlflow.yaml):
# SQLAlchemy's psycopg2 dialect, from the psycopg2-binary package.
PG_SCHEME = "postgresql+psycopg2"
PG_DRIVER_PACKAGE = "psycopg2-binary"
DEFAULT_BUCKET = "sall"
S3_REGION = "us-east-1"
CEPH_BINARIES = ("monmaptool", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph")
RGW_NAME = "client.rgw.sall"


class ServiceError(RuntimeError):
    """A service could not be started or stopped; the message is one line naming the component."""


# --------------------------------------------------------------------------- processes


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state) of every process, read from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if len(fields) >= 4:
            table[int(name)] = (int(fields[1]), int(fields[3]), fields[0])
    return table


def _has_marker(pid: int, marker: str) -> bool:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{MARKER_ENV}={marker}".encode() in env


def members(sids, marker: str | None = None) -> list[int]:
    """Live (non-zombie) processes of the given sessions and their descendants (PostgreSQL's
    children call setsid and overwrite their environment with their titles), plus, with `marker`,
    any process carrying this directory's marker variable."""
    sids = {int(s) for s in sids}
    table = {pid: row for pid, row in _proc_table().items() if pid != os.getpid() and row[2] not in ("Z", "X")}
    found = {pid for pid, (_pp, sid, _st) in table.items() if sid in sids}
    if marker:
        found |= {pid for pid in table if _has_marker(pid, marker)}
    grew = True
    while grew:  # add children of what was found, until nothing new
        more = {pid for pid, (ppid, _sid, _st) in table.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return sorted(found)


def _signal(pids, sig) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_sessions(sids, marker: str | None, sig=signal.SIGTERM, grace: float = 10.0) -> list[int]:
    """Send `sig` to the session leaders, wait up to `grace` s, then SIGKILL what is left of the
    sessions (a few rounds, bounded). Returns the pids that survived (none, normally)."""
    _signal([s for s in sids if s], sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and members(sids, marker):
        time.sleep(0.1)
    for _ in range(3):
        left = members(sids, marker)
        if not left:
            return []
        _signal(left, signal.SIGKILL)
        end = time.monotonic() + 3.0
        while time.monotonic() < end and members(sids, marker):
            time.sleep(0.1)
    return members(sids, marker)


def _reap(pids) -> None:
    """Collect the exit status of daemons this process started (no zombies left in a long test run)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError, TypeError):
            os.waitpid(pid, os.WNOHANG)


def _spawn(cmd: list[str], log: Path, marker: str, user: pwd.struct_passwd | None = None, cwd=None) -> subprocess.Popen:
    """Start a daemon in the foreground, in its own session, its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, MARKER_ENV: marker}
    ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    with open(log, "ab") as f:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd or log.parent,
            start_new_session=True,  # own session: what `down` signals, and nothing else
            **ids,
        )


def _run(component: str, cmd: list[str], timeout: float, user=None, env=None, cwd=None) -> str:
    """Run a setup command to completion (bounded); its stdout, or ServiceError with its last words."""
    ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env, cwd=cwd, **ids
        )
    except subprocess.TimeoutExpired:
        raise ServiceError(f"{component}: `{' '.join(cmd[:2])}` did not finish within {timeout:.0f} s") from None
    if p.returncode != 0:
        words = _gist((p.stderr or p.stdout).splitlines())
        raise ServiceError(f"{component}: `{' '.join(cmd[:2])}` failed (exit {p.returncode}): {words}")
    return p.stdout


# --------------------------------------------------------------------------- helpers


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on `host` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _gist(lines: list[str], n: int = 3) -> str:
    """One line from a command's or log's last words: its last lines that say error, failed or abort
    (a crash's backtrace follows its reason), else its last `n` lines."""
    lines = [ln for ln in lines if ln.strip()]
    errs = [ln for ln in lines if any(w in ln.lower() for w in ("error", "fail", "abort", "fatal", "unable"))]
    return _one_line((errs or lines)[-n:])


def _one_line(lines) -> str:
    return " | ".join(ln.strip() for ln in lines if ln.strip()) or "(nothing)"


def log_tail(path, n: int = 3) -> str:
    """The last `n` non-empty lines of a log, joined into one line (for one-line errors)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return _gist(lines[-200:], n)


def _fail(component: str, what: str, log) -> ServiceError:
    return ServiceError(f"{component}: {what}; log {log}: {log_tail(log)}")


def _tcp_open(port: int, host: str = HOST) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback only)
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError, ValueError):
        return None


def state_path(d) -> Path:
    return Path(d).resolve() / STATE_NAME


def load_state(d) -> dict:
    """The state `up` wrote into D, or ServiceError saying there is none."""
    p = state_path(d)
    if not p.exists():
        raise ServiceError(f"no services state at {p} (run `up` first, or pass --dir)")
    return json.loads(p.read_text())


def save_state(state: dict) -> None:
    p = state_path(state["dir"])
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, p)


def _sids(state: dict) -> list[int]:
    """Session ids (= leader pids) of every daemon recorded in the state."""
    pg = [state["postgres"]["pid"]] if state.get("postgres", {}).get("pid") else []
    return pg + [p for p in state.get("ceph", {}).get("pids", {}).values() if p]


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin(name: str) -> str:
    """A PostgreSQL server binary: the newest /usr/lib/postgresql/*/bin (Debian), else PATH."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    path = found[-1] if found else shutil.which(name)
    if not path:
        raise ServiceError(f"PostgreSQL: `{name}` not found; {INSTALL_HINT}")
    return path


def _pg_user() -> pwd.struct_passwd | None:
    """Who runs the server: this user, or `postgres` when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError(f"PostgreSQL: running as root needs a `postgres` user; {INSTALL_HINT}") from None


def _reachable(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether `user` may traverse every folder from / down to `path` (permission bits only)."""
    groups = {g for g in os.getgrouplist(user.pw_name, user.pw_gid)}
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _pg_root(d: Path, user) -> tuple[Path, bool]:
    """The folder for the cluster's files, and whether it is a private temp folder outside D."""
    if user is None or _reachable(d, user):
        root = d / "postgres"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        return root, False
    root = Path(tempfile.mkdtemp(prefix="sall-pg-"))
    root.chmod(0o711)  # the server's user may enter, not list
    return root, True


def _pg_prepare(d: Path, user, port: int | None = None) -> dict:
    """Folders and passwords of a new cluster (nothing started yet)."""
    root, outside = _pg_root(d, user)
    data = root / "data"
    data.mkdir(mode=0o700)
    if user:
        os.chown(data, user.pw_uid, user.pw_gid)
    port, password = port or free_port(), secrets.token_hex(12)
    return {
        "root": str(root),
        "root_outside_dir": outside,
        "data_dir": str(data),
        "port": port,
        "host": HOST,
        "user": "mlflow",
        "password": password,
        "database": "mlflow",
        "superuser_password": secrets.token_hex(12),
        "run_as": user.pw_name if user else None,
        "log": str(d / "logs" / "postgres.log"),
        "uri": f"{PG_SCHEME}://mlflow:{password}@{HOST}:{port}/mlflow",
        "pid": None,
    }


def _pg_initdb(pg: dict, user) -> None:
    """initdb: superuser `postgres` (password auth over TCP), UTF-8, no fsync of the new files."""
    pwfile = Path(pg["root"]) / "pwfile"
    pwfile.write_text(pg["superuser_password"] + "\n")
    if user:
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    pwfile.chmod(0o600)
    cmd = [_pg_bin("initdb"), "-D", pg["data_dir"], "-U", "postgres", "-E", "UTF8", "--locale=C"]
    cmd += ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "--no-sync"]
    _run("PostgreSQL", cmd, timeout=60, user=user, cwd=pg["root"])
    pwfile.unlink()


def _pg_start(pg: dict, user, marker: str) -> subprocess.Popen:
    """The server in the foreground (pg_ctl would setsid it out of our session), TCP on 127.0.0.1 only."""
    settings = {
        "listen_addresses": HOST,
        "unix_socket_directories": "",  # no socket file: nothing outside the data folder
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
    }
    cmd = [_pg_bin("postgres"), "-D", pg["data_dir"], "-p", str(pg["port"])]
    cmd += [x for k, v in settings.items() for x in ("-c", f"{k}={v}")]
    proc = _spawn(cmd, Path(pg["log"]), marker, user, cwd=pg["root"])
    pg["pid"] = proc.pid
    return proc


def _pg_wait(pg: dict, proc: subprocess.Popen, deadline: float) -> None:
    """Until `pg_isready` says the server accepts connections; fail fast if it exits."""
    cmd = [_pg_bin("pg_isready"), "-h", HOST, "-p", str(pg["port"]), "-t", "1", "-q"]
    while subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=10).returncode != 0:
        if proc.poll() is not None:
            raise _fail("PostgreSQL", f"server exited with code {proc.returncode}", pg["log"])
        if time.monotonic() > deadline:
            raise _fail("PostgreSQL", f"not accepting connections on {HOST}:{pg['port']} in time", pg["log"])
        time.sleep(0.1)


def _pg_create_db(pg: dict) -> None:
    """Role and database `mlflow`, owned by that role (what MLflow's schema migration needs)."""
    env = {**os.environ, "PGPASSWORD": pg["superuser_password"], "PGCONNECT_TIMEOUT": "5"}
    psql = [_pg_bin("psql"), "-h", HOST, "-p", str(pg["port"]), "-U", "postgres", "-d", "postgres"]
    sql = [
        f"CREATE ROLE {pg['user']} LOGIN PASSWORD '{pg['password']}'",
        f"CREATE DATABASE {pg['database']} OWNER {pg['user']}",
    ]
    _run("PostgreSQL", [*psql, "-v", "ON_ERROR_STOP=1", "-q", *(x for s in sql for x in ("-c", s))], 30, env=env)


def start_postgres(state: dict, deadline: float, port: int | None = None) -> None:
    """initdb, start, wait, create the `mlflow` role and database; record all in state['postgres']."""
    t0 = time.monotonic()
    user = _pg_user()
    pg = _pg_prepare(Path(state["dir"]), user, port)
    state["postgres"] = pg
    save_state(state)
    _pg_initdb(pg, user)
    proc = _pg_start(pg, user, state["marker"])
    save_state(state)
    _pg_wait(pg, proc, deadline)
    _pg_create_db(pg)
    state["timings"]["postgres_s"] = round(time.monotonic() - t0, 2)
    save_state(state)


# --------------------------------------------------------------------------- Ceph


def _ceph_check_installed() -> None:
    missing = [b for b in CEPH_BINARIES if not shutil.which(b)]
    if missing:
        raise ServiceError(f"Ceph: {', '.join(missing)} not found; {INSTALL_HINT}")


def _ceph_conf_text(c: dict) -> str:
    """A one-node, one-replica, loopback-only cluster without auth, all files under c['root']."""
    r = c["root"]
    return f"""[global]
fsid = {c["fsid"]}
mon host = v1:{HOST}:{c["mon_port"]}
public addr = {HOST}
cluster addr = {HOST}
ms bind ipv6 = false
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 4294967296
osd op num shards = 1
osd op num threads per shard = 1
run dir = {r}/run
admin socket =
log file = {c["log_dir"]}/ceph-$name.log
pid file = {r}/run/$name.pid
keyring = {r}/keyring
mon data = {r}/mon/$name
osd data = {r}/osd/$name
[{RGW_NAME}]
rgw frontends = beast endpoint={HOST}:{c["rgw_port"]}
# Replaced and deleted objects' data is freed by radosgw's garbage collector, by default two hours
# later: a sweep that rewrites its checkpoints every epoch then fills the memory-backed OSD, which
# blocks every write (seen: MLflow's artifact uploads timed out). Collect within seconds instead.
rgw gc obj min wait = 2
rgw gc processor period = 5
rgw gc processor max time = 5
"""


def _ceph_prepare(d: Path, bucket: str) -> dict:
    """Ports, folders and the config file of a new cluster (nothing started yet)."""
    root = d / "ceph"
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("run", "mon", "osd/osd.0"):
        (root / sub).mkdir(parents=True)
    mon_port = free_port()
    rgw_port = free_port()
    while rgw_port == mon_port:
        rgw_port = free_port()
    c = {
        "root": str(root),
        "conf": str(root / "ceph.conf"),
        "fsid": str(uuid.uuid4()),
        "mon_port": mon_port,
        "rgw_port": rgw_port,
        "log_dir": str(d / "logs"),
        "pids": {"mon": None, "osd": None, "rgw": None},
    }
    (d / "logs").mkdir(parents=True, exist_ok=True)
    Path(c["conf"]).write_text(_ceph_conf_text(c))
    return c


def _ceph_log(c: dict, daemon: str) -> str:
    return str(Path(c["log_dir"]) / f"ceph-{daemon}.out")


def _ceph_cli(c: dict, *args: str, timeout: float = 30) -> str:
    """`ceph` with this cluster's config (never /etc/ceph), bounded in time."""
    return _run("Ceph", ["ceph", "-c", c["conf"], "--connect-timeout", "15", *args], timeout=timeout)


def _ceph_cli_when_ready(c: dict, *args: str, wait: float = 60) -> str:
    """`ceph` retried while a monitor that has just started still refuses commands: under load it
    answers EPERM ("problem getting command descriptions from mon") for a moment before it serves
    them. At most `wait` seconds, once a second; any other failure at once."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return _ceph_cli(c, *args)
        except ServiceError as e:
            if "EPERM" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def _start_mon(c: dict, marker: str) -> subprocess.Popen:
    monmap = str(Path(c["root"]) / "monmap")
    _run(
        "Ceph mon",
        ["monmaptool", "--create", "--fsid", c["fsid"], "--addv", "a", f"[v1:{HOST}:{c['mon_port']}]", monmap],
        30,
    )
    _run("Ceph mon", ["ceph-mon", "-c", c["conf"], "--mkfs", "-i", "a", "--monmap", monmap], 30)
    proc = _spawn(["ceph-mon", "-c", c["conf"], "-i", "a", "-f"], Path(_ceph_log(c, "mon")), marker)
    c["pids"]["mon"] = proc.pid
    return proc


def _start_osd(c: dict, marker: str) -> subprocess.Popen:
    """Register OSD 0 with the monitor (which waits for the monitor) under a uuid of our own, mkfs it
    with that uuid, start it. (Without one, the OSD sometimes booted with a uuid the monitor had not
    recorded and exited on 'wrong fsid'.)"""
    osd_uuid = str(uuid.uuid4())
    osd_id = _ceph_cli_when_ready(c, "osd", "create", osd_uuid).strip()  # the same uuid: the same id
    if osd_id != "0":
        raise ServiceError(f"Ceph osd: the monitor gave OSD id {osd_id!r}, expected 0 on a new cluster")
    _run("Ceph osd", ["ceph-osd", "-c", c["conf"], "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], 60)
    proc = _spawn(["ceph-osd", "-c", c["conf"], "-i", "0", "-f"], Path(_ceph_log(c, "osd")), marker)
    c["pids"]["osd"] = proc.pid
    return proc


def _start_rgw(c: dict, marker: str) -> subprocess.Popen:
    proc = _spawn(["radosgw", "-c", c["conf"], "-n", RGW_NAME, "-f"], Path(_ceph_log(c, "rgw")), marker)
    c["pids"]["rgw"] = proc.pid
    return proc


def _osd_lost_boot_race(c: dict) -> bool:
    """The OSD exited on 'wrong fsid': it asked the monitor before it had the cluster's id (a race in
    Ceph 16's OSD start, seen about one start in three under load); starting it again works."""
    return "'wrong fsid'" in Path(_ceph_log(c, "osd")).read_text(errors="replace")


def _spawn_osd(c: dict, cmd: list[str], marker: str) -> subprocess.Popen:
    Path(_ceph_log(c, "osd")).write_text("")  # the next start's words only
    proc = _spawn(cmd, Path(_ceph_log(c, "osd")), marker)
    c["pids"]["osd"] = proc.pid
    return proc


def _wait_rgw(c: dict, procs: dict[str, subprocess.Popen], deadline: float, marker: str) -> None:
    """Until radosgw answers S3 on its port (it first creates its pools, which needs the OSD up);
    fail fast, naming the daemon and its log, if any of the three exits."""
    url = f"http://{HOST}:{c['rgw_port']}/"
    restarts = 0
    while _http_status(url, timeout=1.0) != 200:
        for name, p in procs.items():
            if name == "osd" and p.poll() is not None and restarts < 3 and _osd_lost_boot_race(c):
                restarts += 1  # Ceph 16 sometimes boots the OSD before it has the monitor's map
                procs["osd"] = _spawn_osd(c, procs["osd"].args, marker)
                continue
            if p.poll() is not None:
                raise _fail(f"Ceph {name}", f"exited with code {p.returncode}", _ceph_log(c, name))
        if time.monotonic() > deadline:
            raise _fail("Ceph rgw", f"no S3 answer at {url} in time", _ceph_log(c, "rgw"))
        time.sleep(0.2)


def _rgw_user(c: dict) -> tuple[str, str]:
    """An S3 user; its access key and secret (generated by radosgw-admin)."""
    cmd = ["radosgw-admin", "-c", c["conf"], "-n", "client.admin", "user", "create"]
    out = _run("Ceph rgw", [*cmd, "--uid", "sall", "--display-name", "sall"], timeout=60)
    key = json.loads(out)["keys"][0]
    return key["access_key"], key["secret_key"]


def s3_client(state: dict):
    """A boto3 S3 client for the state's radosgw (path-style addressing, bounded timeouts)."""
    import boto3
    from botocore.config import Config

    s3 = state["s3"]
    cfg = Config(
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3},
        connect_timeout=5,
        read_timeout=30,
    )
    return boto3.client(
        "s3",
        endpoint_url=s3["endpoint"],
        aws_access_key_id=s3["access_key"],
        aws_secret_access_key=s3["secret_key"],
        region_name=s3["region"],
        config=cfg,
    )


def _make_bucket(state: dict) -> None:
    try:
        s3_client(state).create_bucket(Bucket=state["s3"]["bucket"])
    except ImportError:
        raise ServiceError("Ceph rgw: boto3 is not installed (pip install -e . installs it)") from None
    except Exception as e:  # botocore's ClientError / EndpointConnectionError
        raise ServiceError(f"Ceph rgw: creating bucket {state['s3']['bucket']!r} failed: {e}") from None


def start_ceph(state: dict, deadline: float, bucket: str = DEFAULT_BUCKET) -> None:
    """Monitor, OSD and radosgw; an S3 user and a bucket; record all in state['ceph'] and state['s3']."""
    t0 = time.monotonic()
    _ceph_check_installed()
    c = _ceph_prepare(Path(state["dir"]), bucket)
    state["ceph"] = c
    save_state(state)
    procs = {"mon": _start_mon(c, state["marker"])}
    save_state(state)
    procs["osd"] = _start_osd(c, state["marker"])
    procs["rgw"] = _start_rgw(c, state["marker"])
    save_state(state)
    _wait_rgw(c, procs, deadline, state["marker"])
    access, secret = _rgw_user(c)
    endpoint = f"http://{HOST}:{c['rgw_port']}"
    state["s3"] = {"endpoint": endpoint, "access_key": access, "secret_key": secret, "bucket": bucket}
    state["s3"]["region"] = S3_REGION
    _make_bucket(state)
    state["timings"]["ceph_s"] = round(time.monotonic() - t0, 2)
    save_state(state)


# --------------------------------------------------------------------------- API


def _refuse_running(d: Path) -> None:
    """One set of services per directory: `up` over running ones would orphan their processes."""
    if state_path(d).exists():
        old = json.loads(state_path(d).read_text())
        if members(_sids(old), old.get("marker")):
            raise ServiceError(f"services from {d} are already running; run `down --dir {d}` first")


def up(
    directory=DEFAULT_DIR,
    postgres: bool = True,
    ceph: bool = True,
    bucket: str = DEFAULT_BUCKET,
    timeout: float = 120.0,
    pg_port: int | None = None,
):
    """Start PostgreSQL and/or Ceph (radosgw) on 127.0.0.1 with state in `directory`; return the state
    once every service answers, within `timeout` s. Ports are free ones (PostgreSQL's is `pg_port`
    if given). On failure, stop what started and raise ServiceError (one line naming the component
    and its log's gist)."""
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    _refuse_running(d)
    state = {"version": 1, "dir": str(d), "marker": f"{d}:{secrets.token_hex(4)}", "host": HOST}
    state.update({"started": time.time(), "timings": {}, "postgres": {}, "ceph": {}, "s3": {}})
    save_state(state)
    deadline = time.monotonic() + timeout
    try:
        if postgres:
            start_postgres(state, deadline, pg_port)
        if ceph:
            start_ceph(state, deadline, bucket)
    except BaseException:
        _stop(state)
        raise
    return state


def _stop(state: dict) -> list[int]:
    """Stop every recorded daemon (PostgreSQL: SIGINT, its fast shutdown; Ceph: SIGKILL; then SIGKILL)
    and remove the folders outside D. Returns pids that survived."""
    marker = state.get("marker")
    pg, ceph = state.get("postgres") or {}, state.get("ceph") or {}
    left = stop_sessions([pg["pid"]], None, signal.SIGINT, grace=10) if pg.get("pid") else []
    # Ceph's data lives in memory (memstore) and is thrown away: SIGKILL at once, no 5-10 s shutdown
    left += stop_sessions([p for p in ceph.get("pids", {}).values() if p], None, signal.SIGKILL, grace=3)
    left += stop_sessions([], marker, signal.SIGKILL, grace=0)  # anything marked that left its session
    _reap([pg.get("pid"), *ceph.get("pids", {}).values()])
    if pg.get("root_outside_dir"):
        shutil.rmtree(pg["root"], ignore_errors=True)
    state["stopped"] = time.time()
    save_state(state)
    return sorted(set(left))


def down(directory=DEFAULT_DIR) -> None:
    """Stop every process `up` started in `directory` (and nothing else); ServiceError if one
    survives SIGKILL. Ceph's data was in memory; logs and state stay in D for reading."""
    left = _stop(load_state(directory))
    if left:
        raise ServiceError(f"processes {left} of the services in {directory} survived SIGKILL")


def status(directory=DEFAULT_DIR) -> dict:
    """Per service: whether its processes run and whether it answers (pg port, S3 HTTP 200)."""
    state = load_state(directory)
    out = {}
    if state.get("postgres"):
        pg = state["postgres"]
        out["postgres"] = {"running": bool(members([pg["pid"]])), "answers": _tcp_open(pg["port"]), "uri": pg["uri"]}
    if state.get("ceph"):
        pids = state["ceph"]["pids"]
        running = {k: bool(v and members([v])) for k, v in pids.items()}
        endpoint = state.get("s3", {}).get("endpoint")
        answers = bool(endpoint) and _http_status(endpoint + "/", 2.0) == 200
        out["ceph"] = {"running": running, "answers": answers, "endpoint": endpoint}
    return out


def env_for_s3(state: dict) -> dict[str, str]:
    """The environment under which boto3, MLflow (server and client), pyarrow/Ray Tune reach this
    radosgw: keys, endpoint, region, and no instance-metadata lookups (they would leave the machine)."""
    s3 = state["s3"]
    return {
        "AWS_ACCESS_KEY_ID": s3["access_key"],
        "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
        "AWS_DEFAULT_REGION": s3["region"],
        "AWS_REGION": s3["region"],
        "AWS_ENDPOINT_URL": s3["endpoint"],
        "AWS_ENDPOINT_URL_S3": s3["endpoint"],
        "MLFLOW_S3_ENDPOINT_URL": s3["endpoint"],
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def mlflow_server_env(state: dict) -> dict[str, str]:
    """Variables for the `mlflow server` process of mlflow_server_args: the S3 ones, and MLflow 3's
    GenAI job runner off (eight extra worker processes that sweeps never use; with them the server
    took 104 s instead of 34-39 s to answer /health on this 2-core machine under load)."""
    return {**env_for_s3(state), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def s3_uri(state: dict, path: str = "") -> str:
    """s3://<bucket>/<path> in this radosgw (reached through env_for_s3's endpoint)."""
    return f"s3://{state['s3']['bucket']}/{path.lstrip('/')}"


def mlflow_server_args(state: dict, host: str = HOST, port: int = 5000, workers: int = 1) -> list[str]:
    """argv of `mlflow server` with its runs in this PostgreSQL and its artifacts proxied to
    s3://<bucket>/mlartifacts; run it with mlflow_server_env(state) added to its environment."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
        "--backend-store-uri", state["postgres"]["uri"],
        "--serve-artifacts",
        "--artifacts-destination", s3_uri(state, "mlartifacts"),
    ]  # fmt: skip


def env_lines(state: dict) -> list[str]:
    lines = [f"export {k}={v}" for k, v in env_for_s3(state).items()] if state.get("s3") else []
    if state.get("postgres"):
        lines.append(f"export SALL_BACKEND_STORE_URI={state['postgres']['uri']}")
    return lines


def describe(state: dict) -> str:
    t = state["timings"]
    out = [f"Services up, state in {state_path(state['dir'])}"]
    if state.get("postgres"):
        out.append(f"PostgreSQL ({t['postgres_s']} s): {state['postgres']['uri']}")
    if state.get("s3"):
        s3 = state["s3"]
        out.append(f"S3 (Ceph radosgw, {t['ceph_s']} s): {s3['endpoint']} bucket {s3['bucket']}")
    out.append(f'Environment: eval "$(python cluster/services.py env --dir {state["dir"]})"')
    out.append(f"Stop with: python cluster/services.py down --dir {state['dir']}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["up", "down", "status", "env"])
    ap.add_argument("--dir", default=DEFAULT_DIR, help=f"state, logs and data (default {DEFAULT_DIR})")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--no-ceph", action="store_true")
    ap.add_argument("--bucket", default=DEFAULT_BUCKET)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    try:
        if args.command == "up":
            print(describe(up(args.dir, not args.no_postgres, not args.no_ceph, args.bucket, args.timeout)))
        elif args.command == "down":
            down(args.dir)
            print(f"services in {Path(args.dir).resolve()} stopped")
        elif args.command == "status":
            print(json.dumps(status(args.dir), indent=2))
        else:
            print("\n".join(env_lines(load_state(args.dir))))
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
