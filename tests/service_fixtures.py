"""Real PostgreSQL and S3 (Ceph radosgw) for tests, started by cluster/services.py.

Session-scoped fixtures (registered for every test module by tests/conftest.py):

* `postgres_service`: the services state (a dict, see cluster/services.py) of one PostgreSQL on
  127.0.0.1, started once per test session (about 3 s) and stopped at its end.
  `state["postgres"]["uri"]` is the `mlflow` database's URI, with the driver the cluster configs use.
* `s3_service`: the state of one Ceph cluster with radosgw (about 16 s to start, once per session).
  `state["s3"]` holds endpoint, access_key, secret_key, bucket, region; `services.env_for_s3(state)`
  is the environment for boto3, pyarrow (Ray Tune storage) and MLflow.

Function-scoped fixtures that give a test its own namespace, so tests pass alone and in any order:

* `pg_database`: the URI of a new, empty database (owned by the `mlflow` role) in `postgres_service`.
* `s3_bucket`: a copy of `s3_service`'s state whose `s3.bucket` is a new, empty bucket.

Helpers: `load_services()` (the cluster/services.py module), `new_database(state, name)`,
`new_bucket(state, name)`, `with_postgres(s3_state, pg_state)` (one state holding both, as
`services.mlflow_server_args` expects), and `mlflow_server(state, log)` (a context manager running
`mlflow server` on that PostgreSQL with its artifacts in that bucket; yields its URL).

A missing Debian package fails the fixture with one line naming cluster/install-services.sh.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES_PY = ROOT / "cluster" / "services.py"


def load_services():
    """cluster/services.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("sall_cluster_services", SERVICES_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


services = load_services()


@contextlib.contextmanager
def _started(directory: Path, **which):
    """up() then down(); a start failure becomes one failing line, not a traceback into the daemons."""
    try:
        state = services.up(directory, **which)
    except services.ServiceError as e:
        pytest.fail(f"could not start services: {e}", pytrace=False)
    try:
        yield state
    finally:
        services.down(directory)


@pytest.fixture(scope="session")
def postgres_service(tmp_path_factory):
    """One PostgreSQL for the test session (state dict of cluster/services.py)."""
    with _started(tmp_path_factory.mktemp("pg-service"), postgres=True, ceph=False) as state:
        yield state


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory):
    """One Ceph radosgw (S3) for the test session (state dict of cluster/services.py)."""
    with _started(tmp_path_factory.mktemp("s3-service"), postgres=False, ceph=True) as state:
        yield state


def new_database(state: dict, name: str) -> str:
    """Create database `name` owned by the `mlflow` role; its URI (same driver, user, password)."""
    pg = state["postgres"]
    env = {**os.environ, "PGPASSWORD": pg["superuser_password"], "PGCONNECT_TIMEOUT": "5"}
    psql = [services._pg_bin("psql"), "-h", pg["host"], "-p", str(pg["port"]), "-U", "postgres", "-d", "postgres"]
    sql = f"CREATE DATABASE {name} OWNER {pg['user']}"
    subprocess.run([*psql, "-q", "-c", sql], check=True, env=env, timeout=30, capture_output=True)
    return pg["uri"].rsplit("/", 1)[0] + f"/{name}"


def new_bucket(state: dict, name: str) -> dict:
    """Create bucket `name`; a copy of `state` whose s3.bucket is that bucket."""
    services.s3_client(state).create_bucket(Bucket=name)
    return {**state, "s3": {**state["s3"], "bucket": name}}


def with_postgres(s3_state: dict, pg_state: dict, uri: str | None = None) -> dict:
    """One state with both services (optionally another database's URI), for mlflow_server_args."""
    pg = {**pg_state["postgres"], **({"uri": uri} if uri else {})}
    return {**s3_state, "postgres": pg}


@pytest.fixture
def pg_database(postgres_service) -> str:
    """A new empty database's URI: no test sees another's tables."""
    return new_database(postgres_service, f"t_{secrets.token_hex(6)}")


@pytest.fixture
def s3_bucket(s3_service) -> dict:
    """s3_service's state with a new empty bucket: no test sees another's objects."""
    return new_bucket(s3_service, f"t-{secrets.token_hex(6)}")


def _health(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url + "/health", timeout=2) as r:
        return r.status == 200
    return False


@contextlib.contextmanager
def mlflow_server(state: dict, log: Path, timeout: float = 180.0):
    """`mlflow server` on state's PostgreSQL with artifacts in state's bucket, on 127.0.0.1 and a free
    port; yields its URL once /health answers (bounded), stops its whole session afterwards."""
    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **services.mlflow_server_env(state)}
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            services.mlflow_server_args(state, "127.0.0.1", port),
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
            start_new_session=True,
        )
    try:
        _wait_healthy(url, proc, log, time.monotonic() + timeout)
        yield url
    finally:
        left = services.stop_sessions([proc.pid], None, grace=10)
        proc.wait(timeout=10)
        assert not left, f"mlflow server processes {left} survived"


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    while not _health(url):
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited ({proc.returncode}): {services.log_tail(log)}", pytrace=False)
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server not healthy at {url} in time: {services.log_tail(log)}", pytrace=False)
        time.sleep(0.5)
