"""cluster/services.py and the tracking preflight against real servers: PostgreSQL 15 and Ceph's
radosgw from Debian (cluster/install-services.sh), on 127.0.0.1 only.

The centre is `test_mlflow_server_starts_on_the_configs_postgres_driver`: the PostgreSQL driver is
read FROM the cluster configs (aws.yaml, docker/Dockerfile, kuberay/mlflow.yaml), and a real
`mlflow server` with that driver, on a real PostgreSQL, with its artifacts in real S3, takes a run
with an artifact and gives it back. A config whose driver the installed MLflow cannot load fails it.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import secrets
import shlex
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml
from service_fixtures import SERVICES_PY, mlflow_server, services, with_postgres

from sall.errors import SallError
from tracking import client as tr

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
# the pip package that provides each SQLAlchemy PostgreSQL driver (plain postgresql:// is psycopg 3)
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]"}


# --------------------------------------------------------------------------- the configs' driver


def _aws_backend_uri() -> str:
    """--backend-store-uri of the `mlflow server` that aws.yaml's systemd unit starts."""
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    lines = "\n".join(aws["head_setup_commands"]).splitlines()
    words = shlex.split(next(ln for ln in lines if "ExecStart=" in ln and "mlflow server" in ln))
    return words[words.index("--backend-store-uri") + 1]


def _config_postgres_uris() -> dict[str, str]:
    """Every PostgreSQL URI the cluster configs give or suggest for MLflow's backend store."""
    uris = {"aws.yaml": _aws_backend_uri()}
    pattern = re.compile(r"--backend-store-uri[= ](postgres\S+)")
    for name in ("kuberay/mlflow.yaml", "docker/Dockerfile"):
        uris |= {f"{name}#{i}": u for i, u in enumerate(pattern.findall((CLUSTER / name).read_text()))}
    return uris


def _pip_installs(text: str) -> set[str]:
    """Package names given to `pip install` in shell text (versions and quotes stripped)."""
    out = set()
    for m in re.finditer(r"pip install ([^\n&|;]+)", text.replace("\\\n", " ")):
        out |= {re.split(r"[<>=]", w)[0] for w in shlex.split(m.group(1)) if not w.startswith("-")}
    return out


def configs_driver() -> tuple[str, str]:
    """(URI scheme, pip package) of the PostgreSQL driver all configs agree on; fails if they differ."""
    uris = _config_postgres_uris()
    assert "aws.yaml" in uris and len(uris) >= 3, uris  # aws, the KubeRay hint, the Dockerfile note
    schemes = {urllib.parse.urlparse(u).scheme for u in uris.values()}
    assert len(schemes) == 1, f"the configs disagree on the PostgreSQL driver: {uris}"
    (scheme,) = schemes
    assert scheme.split("+")[0] == "postgresql", scheme
    driver = scheme.partition("+")[2] or "psycopg"  # SQLAlchemy 2: plain postgresql:// means psycopg 3
    return scheme, DRIVER_PACKAGES[driver]


def test_configs_install_the_driver_their_uri_names():
    """The package of the driver in the URIs is what aws.yaml and the Dockerfile pip-install, and a
    project dependency (so `pip install -e .` gives the local server the same driver)."""
    _, package = configs_driver()
    aws = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    assert package in _pip_installs("\n".join(aws["head_setup_commands"]))
    assert package in _pip_installs((CLUSTER / "docker" / "Dockerfile").read_text())
    deps = {re.split(r"[<>=\[ ]", d)[0] for d in _pyproject_dependencies()}
    assert package.split("[")[0] in deps, deps


def _pyproject_dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_services_hand_out_the_configs_driver():
    """cluster/services.py's PostgreSQL URIs (the local deployment's) use the configs' driver too."""
    assert services.PG_SCHEME == configs_driver()[0]


@pytest.mark.slow
def test_mlflow_server_starts_on_the_configs_postgres_driver(postgres_service, pg_database, s3_bucket, tmp_path):
    """`mlflow server` with the configs' backend URI scheme (driver) on a real PostgreSQL and
    --artifacts-destination in real S3: a run with an artifact goes in through the MLflow client and
    comes back byte for byte; the run is a row in PostgreSQL, the artifact an object in the bucket."""
    from mlflow.tracking import MlflowClient

    scheme, _ = configs_driver()
    uri = scheme + "://" + pg_database.split("://", 1)[1]
    state = with_postgres(s3_bucket, postgres_service, uri)
    payload = secrets.token_bytes(300_000)
    (tmp_path / "teacher.bin").write_bytes(payload)
    with mlflow_server(state, tmp_path / "mlflow.log") as url:
        c = MlflowClient(url)
        run = c.create_run(c.create_experiment("services-test"))
        run_id = run.info.run_id
        c.log_metric(run_id, "acc", 0.5)
        c.log_artifact(run_id, str(tmp_path / "teacher.bin"), "teachers")
        c.set_terminated(run_id, "FINISHED")
        got = Path(c.download_artifacts(run_id, "teachers/teacher.bin", str(tmp_path / "back")))
        assert got.read_bytes() == payload
        assert c.get_run(run_id).data.metrics == {"acc": 0.5}
    assert _run_status_in_postgres(uri, run_id) == "FINISHED"
    objects = services.s3_client(state).list_objects_v2(Bucket=state["s3"]["bucket"], Prefix="mlartifacts/")
    sizes = {o["Key"]: o["Size"] for o in objects.get("Contents", [])}
    assert [k for k in sizes if k.endswith(f"{run_id}/artifacts/teachers/teacher.bin")], sizes
    assert sorted(sizes.values()) == [len(payload)]


def _run_status_in_postgres(uri: str, run_id: str) -> str:
    """The run's status read straight from MLflow's `runs` table (not through MLflow)."""
    from sqlalchemy import create_engine, pool, text

    engine = create_engine(uri, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT status FROM runs WHERE run_uuid = :r"), {"r": run_id}).scalar_one()
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- S3 for the cluster


@pytest.mark.slow
def test_env_for_s3_is_all_a_client_needs(s3_bucket, tmp_path):
    """With only env_for_s3's variables, boto3 and pyarrow (Ray Tune's storage layer) reach the bucket,
    in a fresh process; a second conditional create (If-None-Match: *) is refused by the server."""
    script = textwrap.dedent(
        f"""
        import boto3, pyarrow.fs as pf
        s3 = boto3.client("s3")
        s3.put_object(Bucket="{s3_bucket["s3"]["bucket"]}", Key="k/once", Body=b"first", IfNoneMatch="*")
        try:
            s3.put_object(Bucket="{s3_bucket["s3"]["bucket"]}", Key="k/once", Body=b"second", IfNoneMatch="*")
            print("second create accepted")
        except s3.exceptions.ClientError as e:
            print("second create", e.response["Error"]["Code"])
        fs, path = pf.FileSystem.from_uri("s3://{s3_bucket["s3"]["bucket"]}/k/once")
        with fs.open_input_stream(path) as f:
            print("pyarrow read", f.read().decode())
        """
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **services.env_for_s3(s3_bucket)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["second create PreconditionFailed", "pyarrow read first"]


def test_mlflow_server_args_name_the_backend_and_bucket():
    state = {"postgres": {"uri": "postgresql+psycopg2://u:p@127.0.0.1:1/mlflow"}, "s3": {"bucket": "b"}}
    args = services.mlflow_server_args(state, "127.0.0.1", 4321)
    assert args[1:4] == ["-m", "mlflow", "server"]
    rest = args[4:]
    assert "--serve-artifacts" in rest
    rest.remove("--serve-artifacts")
    flags = dict(zip(rest[::2], rest[1::2]))
    assert flags == {
        "--host": "127.0.0.1",
        "--port": "4321",
        "--workers": "1",
        "--backend-store-uri": state["postgres"]["uri"],
        "--artifacts-destination": "s3://b/mlartifacts",
    }


# --------------------------------------------------------------------------- lifecycle and faults


def _cli(*args: str, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SERVICES_PY), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow  # its own PostgreSQL: about 3 s idle, 6 s on a loaded 2-core machine
def test_cli_up_status_down_leaves_nothing(tmp_path):
    """PostgreSQL through the CLI: up answers on 127.0.0.1 only, status says so, down leaves no
    process of it (its children call setsid), no open port and no data folder outside --dir."""
    d = tmp_path / "svc"
    up = _cli("up", "--no-ceph", "--dir", str(d))
    assert up.returncode == 0, up.stderr
    state = json.loads((d / "services.json").read_text())
    pg = state["postgres"]
    try:
        st = json.loads(_cli("status", "--dir", str(d)).stdout)
        assert st["postgres"]["running"] and st["postgres"]["answers"]
        assert len(services.members([pg["pid"]])) >= 3  # the server and its background processes
        assert _listen_addresses(pg["port"]) == {"127.0.0.1"}
    finally:
        down = _cli("down", "--dir", str(d))
    assert down.returncode == 0 and down.stderr == "", down.stderr
    assert services.members([pg["pid"]], state["marker"]) == []
    assert not _port_open(pg["port"])
    assert Path(pg["root"]).is_relative_to(d) or not Path(pg["root"]).exists()


def _listen_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                found.add(_hex_addr(addr))
    return found


def _hex_addr(addr: str) -> str:
    if len(addr) == 8:
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1])
    words = [bytes.fromhex(addr[i : i + 8])[::-1] for i in range(0, 32, 8)]
    return socket.inet_ntop(socket.AF_INET6, b"".join(words))


@pytest.mark.slow  # its own PostgreSQL: about 3 s idle, 6 s on a loaded 2-core machine
def test_postgres_that_cannot_bind_fails_in_one_line_and_stops(tmp_path):
    """A port already taken on 127.0.0.1: one line naming PostgreSQL, its log and the reason from
    the log; nothing of it keeps running."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(services.ServiceError) as e:
            services.up(tmp_path / "svc", ceph=False, pg_port=port, timeout=60)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("PostgreSQL: server exited"), msg
    assert "postgres.log" in msg and "could not" in msg, msg
    state = json.loads((tmp_path / "svc" / "services.json").read_text())
    assert services.members([state["postgres"]["pid"]], state["marker"]) == []


def test_missing_ceph_names_the_install_script(tmp_path):
    """Without Ceph's programs on PATH, `up` says in one line which are missing and what installs
    them, and leaves nothing running."""
    empty = tmp_path / "bin"
    empty.mkdir()
    out = _cli("up", "--no-postgres", "--dir", str(tmp_path / "svc"), env={**os.environ, "PATH": str(empty)})
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "error: Ceph: monmaptool, ceph-mon, ceph-osd, radosgw, radosgw-admin, ceph not found; "
        "run cluster/install-services.sh (as root) to install it"
    ]


def test_up_refuses_a_folder_whose_services_run(postgres_service):
    with pytest.raises(services.ServiceError, match="already running"):
        services.up(postgres_service["dir"], ceph=False)
    assert _port_open(postgres_service["postgres"]["port"])  # the running one is untouched


def test_install_script_is_quick_when_everything_is_there():
    """What .ci/run calls before every run: with the packages present, one line, no apt, < 5 s."""
    t0 = time.monotonic()
    out = subprocess.run([str(CLUSTER / "install-services.sh")], capture_output=True, text=True, timeout=60)
    if "installed" in out.stdout and "all present" not in out.stdout:
        pytest.skip("the packages were missing and have just been installed; rerun to time the quick path")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith("install-services: all present") and out.stdout.count("\n") == 1
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------- tracking preflight


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line_error(uri: str, timeout: float = 2.0) -> str:
    t0 = time.monotonic()
    with pytest.raises(SallError) as e:
        tr.check_tracking_uri(uri, timeout=timeout)
    assert time.monotonic() - t0 < timeout + 3
    msg = str(e.value)
    assert "\n" not in msg and "--mlflow-uri" in msg, msg
    return msg


def test_tracking_postgres_down_names_host_port():
    port = _closed_port()
    msg = _one_line_error(f"postgresql+psycopg2://mlflow:s3cret@127.0.0.1:{port}/mlflow")
    assert f"database 127.0.0.1:{port}" in msg and "PostgreSQL" in msg and "Connection refused" in msg, msg
    assert "s3cret" not in msg


def test_tracking_server_unhealthy_is_one_line():
    """An HTTP server that answers /health with 503 (an MLflow whose database is gone does so)."""

    class Unhealthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(503 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unhealthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        msg = _one_line_error(uri)
    finally:
        server.shutdown()
        server.server_close()
    assert msg.startswith(f"MLflow tracking server {uri} is unhealthy: /health answered HTTP 503"), msg


def test_tracking_postgres_up_passes(pg_database):
    tr.check_tracking_uri(pg_database, timeout=5)


def test_tracking_postgres_wrong_password_is_one_line(postgres_service):
    pg = postgres_service["postgres"]
    uri = pg["uri"].replace(f":{pg['password']}@", ":wrong@")
    msg = _one_line_error(uri, timeout=5)
    assert f"database 127.0.0.1:{pg['port']} refused" in msg and "password authentication failed" in msg, msg
    assert "wrong" not in msg and pg["password"] not in msg


def test_tracking_plain_postgresql_without_psycopg3_is_one_line(postgres_service):
    """Issue 24's first failure: plain postgresql:// means psycopg 3 to SQLAlchemy 2."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg 3 is installed here, so plain postgresql:// loads")
    uri = "postgresql://" + postgres_service["postgres"]["uri"].split("://", 1)[1]
    msg = _one_line_error(uri, timeout=5)
    assert "driver cannot be loaded" in msg and "psycopg" in msg, msg
