"""MLflow bookkeeping for sweeps: experiment, parent run, a child run per trial, a run per teacher.

Every write goes through `retry`, so concurrent trials sharing a SQLite file wait for the lock
instead of failing on "database is locked". Runs are found again by tags, so a rerun resumes into
the same parent and never logs a finished trial twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sall.errors import SallError
from tracking import schema as sc

T = TypeVar("T")

# MLflow's client prints "🏃 View run ... at: URL" on stdout whenever it ends a run on a tracking
# server: once per trial, teacher and sweep run, between the sweep's own progress lines, which
# already end with the one link to review. Set before any run ends; a user's own value wins.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def retry(fn: Callable[..., T], *args: Any, attempts: int = 40, **kwargs: Any) -> T:
    """Call an MLflow client method, waiting out SQLite locks and brief server hiccups."""
    delay = 0.05
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MlflowException wraps SQLAlchemy's OperationalError
            text = str(e).lower()
            transient = (
                "database is locked" in text
                or "database table is locked" in text
                or "connection" in text
                and "refused" not in text
                or "503" in text
            )
            if not transient or i == attempts - 1:
                raise
            time.sleep(delay + random.random() * delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


def review_hint(uri: str, experiment_id: str) -> str:
    """How to see an experiment's runs: the command that starts the UI (for a local store) and the
    URL of its run list in the machine-learning view (MLflow 3 otherwise opens its GenAI overview)."""
    path = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{path}"
    return f"mlflow ui --backend-store-uri {uri}, then open http://127.0.0.1:5000/{path}"


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite/file URI absolute, so trials in other working dirs find the same store."""
    try:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).expanduser().resolve())
        if "://" not in uri:
            return Path(uri).expanduser().resolve().as_uri()
    except RuntimeError as e:  # "~nosuchuser/mlflow.db": Could not determine home directory
        raise SallError(
            f"MLflow tracking URI '{uri}' cannot be resolved ({e}); expected e.g. "
            "sqlite:///mlflow.db or http://HOST:5000 (--mlflow-uri)"
        ) from None
    return uri


DB_DEFAULT_PORTS = {"postgresql": 5432}


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail within seconds, naming the URI, when the tracking store cannot be reached or written."""
    try:
        parsed = urllib.parse.urlparse(uri)
        base = parsed.scheme.split("+")[0]
        port = parsed.port if parsed.scheme in ("http", "https") or base in DB_DEFAULT_PORTS else None
    except ValueError as e:  # "Invalid IPv6 URL", "Port out of range 0-65535", a port that is not a number
        raise SallError(
            f"MLflow tracking URI '{_redact(uri)}' is malformed ({e}); expected e.g. http://HOST:5000 or "
            "sqlite:///mlflow.db (--mlflow-uri)"
        ) from None
    if parsed.scheme in ("http", "https"):
        _check_http(uri, parsed, port, timeout)
    elif base in DB_DEFAULT_PORTS:
        _check_database(uri, parsed.hostname or "localhost", port or DB_DEFAULT_PORTS[base], timeout)
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :])
        folder = path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise SallError(
                f"MLflow tracking URI {uri}: folder '{folder}' does not exist or cannot be "
                "written; expected a writable folder for the SQLite file (--mlflow-uri)"
            )
    elif parsed.scheme in ("file", ""):
        folder = Path(parsed.path)
        while not folder.exists():
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            raise SallError(f"MLflow tracking URI {uri} cannot be written; expected a writable folder")


def _redact(uri: str) -> str:
    """The URI with its password (if any) replaced by ***, for error messages."""
    with contextlib.suppress(ValueError):
        parsed = urllib.parse.urlparse(uri)
        if parsed.password:
            return uri.replace(f":{parsed.password}@", ":***@", 1)
    return uri


def _reachable(host: str, port: int, timeout: float, what: str, expected: str) -> None:
    """`what` accepts TCP connections at host:port within `timeout`, else one line saying what was expected."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise SallError(f"{what} cannot be reached ({e.strerror or e}); expected {expected}") from None


def _check_http(uri: str, parsed: urllib.parse.ParseResult, port: int | None, timeout: float) -> None:
    """A tracking server: its port accepts connections and /health answers 200."""
    host, port = parsed.hostname, port or (443 if parsed.scheme == "https" else 80)
    if not host:
        raise SallError(f"MLflow tracking URI '{uri}' names no host; expected e.g. http://HOST:5000 (--mlflow-uri)")
    _reachable(
        host, port, timeout, f"MLflow tracking server {uri}", "a running `mlflow server` at that address (--mlflow-uri)"
    )
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                raise OSError(f"HTTP {r.status}")
    except urllib.error.HTTPError as e:
        raise SallError(
            f"MLflow tracking server {uri} is unhealthy: /health answered HTTP {e.code} {e.reason}; expected "
            "200 from a running `mlflow server` (see its log: its database or artifact store may be down) "
            "(--mlflow-uri)"
        ) from None
    except OSError as e:
        raise SallError(
            f"MLflow tracking server {uri} did not answer /health ({e}); expected a "
            "running `mlflow server` (--mlflow-uri)"
        ) from None
    _check_store_behind(uri, timeout)


def _check_store_behind(uri: str, timeout: float) -> None:
    """/health answers without touching the server's database: one real read does, so a server whose
    PostgreSQL is down is one line now, not an error from deep inside the first run's creation."""
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    wait = max(timeout, 30)
    try:
        with urllib.request.urlopen(url, timeout=wait):
            pass
    except urllib.error.HTTPError as e:
        if e.code < 500:
            return  # an auth layer or an old server: not what this check is about
        detail = " ".join(e.read().decode(errors="replace").split())[:200]
        raise SallError(
            f"MLflow tracking server {uri} cannot read its backend store (HTTP {e.code}: {detail}); expected its "
            "backend database (e.g. PostgreSQL) to be up (--mlflow-uri)"
        ) from None
    except OSError as e:  # a server whose PostgreSQL is down waits on it: a timeout
        raise SallError(
            f"MLflow tracking server {uri} answers /health but not a search within {wait:g} s ({e}); expected its "
            "backend database (e.g. PostgreSQL) to be up (--mlflow-uri)"
        ) from None


def _check_database(uri: str, host: str, port: int, timeout: float) -> None:
    """A database backend (MLflow without a server): the port accepts connections, the driver the URI
    names is installed, and the user, password and database of the URI let us in."""
    shown = _redact(uri)
    _reachable(
        host,
        port,
        timeout,
        f"MLflow backend database {host}:{port} ({shown})",
        "a running PostgreSQL server accepting connections there (--mlflow-uri)",
    )
    from sqlalchemy import create_engine, exc, pool, text

    try:
        engine = create_engine(uri, poolclass=pool.NullPool, connect_args={"connect_timeout": max(1, int(timeout))})
    except (ImportError, exc.NoSuchModuleError, exc.ArgumentError) as e:
        raise SallError(
            f"MLflow tracking URI {shown}: its database driver cannot be loaded ({e}); expected "
            "postgresql+psycopg2:// with psycopg2-binary installed (--mlflow-uri)"
        ) from None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except exc.DBAPIError as e:
        reason = str(e.orig).strip().splitlines()[0] if e.orig else type(e).__name__
        raise SallError(
            f"MLflow backend database {host}:{port} refused the connection ({reason}); expected the user, "
            f"password and database of {shown} to exist (--mlflow-uri)"
        ) from None
    finally:
        engine.dispose()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating it (and, for SQLite, the schema) once, from the driver."""
    c = client(uri)
    exp = retry(c.get_experiment_by_name, name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            retry(c.restore_experiment, exp.experiment_id)
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # keep artifacts next to the database, not in a trial's cwd
        artifact_location = (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
    try:
        return retry(c.create_experiment, name, artifact_location=artifact_location)
    except Exception:
        exp = retry(c.get_experiment_by_name, name)  # created concurrently
        if exp is None:
            raise
        return exp.experiment_id


def find_runs(uri: str, experiment_id: str, filter_string: str, max_results: int = 1000) -> list:
    c = client(uri)
    return retry(c.search_runs, [experiment_id], filter_string=filter_string, max_results=max_results)


def sweep_costs(uri: str, experiment_id: str, parent_id: str) -> dict[str, float]:
    """What the sweep run `parent_id` spent training, summed over its trials and the teachers it
    trained itself (a teacher found in the cache cost this sweep nothing): `cost/<name>` of
    `sc.COST_NAMES`, the seconds lost to kills included. Runs logged without costs count nothing."""
    mine = f"tags.`{sc.TAG_PARENT}` = '{parent_id}'"
    students = find_runs(uri, experiment_id, f"{mine} and tags.`{sc.TAG_STAGE}` = '{sc.STAGE_STUDENT}'", 5000)
    groups = find_runs(uri, experiment_id, f"{mine} and tags.`{sc.TAG_STAGE}` = '{sc.STAGE_TEACHERS}'")
    teachers = [
        t
        for g in groups
        for t in find_runs(
            uri,
            experiment_id,
            f"tags.`{sc.TAG_PARENT}` = '{g.info.run_id}' and tags.`{sc.TAG_STAGE}` = '{sc.STAGE_TEACHER}'",
            5000,
        )
        if t.data.tags.get(sc.TAG_TRAINED_NOW) == "True"
    ]
    names = [f"{sc.COST}/{n}" for n in sc.COST_NAMES]
    return {n: float(sum(r.data.metrics.get(n, 0.0) for r in [*students, *teachers])) for n in names}


def sweep_filter(sweep_id: str) -> str:
    """The search filter of the parent run of invocation `sweep_id` (resumed, or superseded)."""
    return f"tags.`{sc.TAG_SWEEP_ID}` = '{sweep_id}' and tags.`{sc.TAG_STAGE}` = '{sc.STAGE_SWEEP}'"


def parent_run(uri: str, experiment_id: str, sweep: str, sweep_id: str, params: dict[str, str]) -> str:
    """The parent run of this sweep invocation: reused when the same sweep is resumed."""
    runs = find_runs(uri, experiment_id, sweep_filter(sweep_id))
    c = client(uri)
    if runs:
        run_id = runs[0].info.run_id
        retry(c.update_run, run_id, status="RUNNING")
        return run_id
    run = retry(
        c.create_run,
        experiment_id,
        run_name=f"{sweep} sweep",
        tags={sc.TAG_STAGE: sc.STAGE_SWEEP, sc.TAG_SWEEP: sweep, sc.TAG_SWEEP_ID: sweep_id},
    )
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """All params in one write (one SQLite transaction instead of one per param)."""
    from mlflow.entities import Param

    batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(batch), 90):
        retry(client(uri).log_batch, run_id, params=batch[i : i + 90])


def end_run(uri: str, run_id: str, status: str) -> None:
    retry(client(uri).set_terminated, run_id, status=status)


def log_dict_artifact(uri: str, run_id: str, obj: Any, name: str, artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_text(json.dumps(obj, indent=2, default=str))
        retry(client(uri).log_artifact, run_id, str(p), artifact_path)


def write_task_artifacts(
    root: Path, task: str, m: dict[str, Any], confusion_title: str, reliability_title: str
) -> None:
    """A task's confusion matrix and reliability diagram, each as PNG and CSV, into `root` (logged
    with the run's other artifacts). One writer for trials and external evaluations, so both kinds
    of run carry the same files under the same names. The reliability title gets the ECE added."""
    from sall.plots import confusion_csv, plot_confusion, plot_reliability, reliability_csv
    from sall.tasks import TASKS

    names = list(TASKS[task].grades)
    plot_confusion(m["confusion"], names, confusion_title, str(root / sc.task_file(sc.CONFUSION, task, "png")))
    confusion_csv(m["confusion"], names, str(root / sc.task_file(sc.CONFUSION, task, "csv")))
    plot_reliability(
        m["reliability"],
        f"{reliability_title} (ECE {m['ece']:.3f})",
        str(root / sc.task_file(sc.RELIABILITY, task, "png")),
    )
    reliability_csv(m["reliability"], str(root / sc.task_file(sc.RELIABILITY, task, "csv")))


def write_predictions(root: Path, task: str, p: dict[str, Any], images: Any = None) -> None:
    """A task's per-image predictions as CSV: row, image (when given), label, prob_0 ... The
    bootstrap of analysis/tables.py pairs two runs' files on `row`."""
    import pandas as pd

    cols = {"row": p["rows"], **({"image": images} if images is not None else {}), "label": p["labels"]}
    cols.update({f"prob_{k}": p["probs"][:, k] for k in range(p["probs"].shape[1])})
    pd.DataFrame(cols).to_csv(root / sc.task_file(sc.PREDICTIONS, task, "csv"), index=False, float_format="%.6g")


def log_metrics(uri: str, run_id: str, metrics: dict[str, float | None], step: int = 0) -> None:
    """Log finite scalars in one batch (NaN/None, e.g. `err` with no wrong prediction, is skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if v is not None and v == v and abs(float(v)) != float("inf")
    ]
    for i in range(0, len(batch), 900):
        retry(client(uri).log_batch, run_id, metrics=batch[i : i + 900])
