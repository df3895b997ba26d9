"""Fast checks of the cluster configs in cluster/: the AWS launcher config against Ray's own
schema, and the KubeRay / MLflow manifests for the fields the sweeps depend on."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBE = CLUSTER / "kuberay"
SWEEP_FLAGS = {"--address", "--preset", "--mlflow-uri", "--storage-path", "--cache-dir"}


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _flags(cmd: str) -> dict[str, str]:
    """--flag value / --flag=value pairs of a shell command line."""
    toks = shlex.split(cmd)
    out = {}
    for i, t in enumerate(toks):
        if t.startswith("--"):
            if "=" in t:
                k, v = t.split("=", 1)
                out[k] = v
            else:
                out[t] = toks[i + 1] if i + 1 < len(toks) and not toks[i + 1].startswith("--") else ""
    return out


# --------------------------------------------------------------------------- AWS


@pytest.fixture(scope="module")
def aws():
    return _load(CLUSTER / "aws.yaml")


def test_aws_config_matches_rays_schema(aws):
    jsonschema = pytest.importorskip("jsonschema")
    ray_autoscaler = pytest.importorskip("ray.autoscaler")
    schema_path = Path(ray_autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(aws, schema)


def test_aws_config_survives_ray_up_preparation(aws):
    """What `ray up` does before it talks to AWS: merge the provider defaults, validate."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(aws)
    util.validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_aws_node_types(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "trials must not land on the head"
    gpu = [t for n, t in types.items() if n != aws["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu, "an autoscaling GPU worker type is required"
    assert all(t.get("min_workers", 0) < t["max_workers"] for t in gpu)
    assert sum(t.get("min_workers", 0) for t in types.values()) <= aws["max_workers"]


def _shell_words(commands: list[str]) -> list[list[str]]:
    """Each simple command (split at &&, ||, ;, parentheses) of a list of shell lines, as words."""
    out = []
    for line in commands:
        for part in re.split(r"&&|\|\||;|\(|\)", line):
            words = shlex.split(part.replace("\n", " "))
            if words:
                out.append(words[1:] if words[0] == "sudo" else words)
    return out


def test_aws_setup_installs_project_and_mounts_shared_storage(aws):
    """The synced checkout is what pip installs (editable, with the dev extra); the shared file
    system is mounted from the provider's region, and the folders made on it are on the mount."""
    remote = next(k for k, v in aws["file_mounts"].items() if v == ".")
    cmds = _shell_words(aws["setup_commands"])
    editable = [w[i + 1] for w in cmds if w[:2] == ["pip", "install"] for i, x in enumerate(w) if x == "-e"]
    assert len(editable) == 1, editable
    path, _, extras = editable[0].partition("[")
    assert path.replace("$HOME", "~") == remote.rstrip("/") and "dev" in extras
    (mount,) = [w for w in cmds if w[:1] == ["mount"]]
    source, target = mount[-2], mount[-1]
    assert mount[mount.index("-t") + 1].startswith("nfs")
    host = source.split(":")[0]
    assert host.endswith(f".efs.{aws['provider']['region']}.amazonaws.com"), host
    made = [p for w in cmds if w[:2] == ["mkdir", "-p"] for p in w[2:] if p != target]
    assert made and all(p.startswith(target.rstrip("/") + "/") for p in made), made


def _click_options(command) -> set[str]:
    return {o for p in command.params for o in p.opts}


def test_aws_commands_use_only_flags_the_installed_tools_accept(aws):
    """Every `mlflow server` and `ray start` in the launcher config passes only options that the
    installed MLflow and Ray define (read from their click commands, not from a list here), so a
    renamed or misspelt flag fails here rather than on a head node booting in the cloud."""
    from mlflow.cli import server
    from ray.scripts.scripts import start

    lines = [
        ln
        for k in ("head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
        for c in aws[k]
        for ln in c.splitlines()
    ]
    mlflow_lines = [ln.split("mlflow server", 1)[1] for ln in lines if "mlflow server" in ln]
    ray_lines = [ln.split("ray start", 1)[1] for ln in lines if "ray start" in ln]
    assert mlflow_lines and len(ray_lines) == 2  # the head's and the workers'
    for tail, known in [(t, _click_options(server)) for t in mlflow_lines] + [
        (t, _click_options(start)) for t in ray_lines
    ]:
        unknown = set(_flags(tail)) - known
        assert not unknown, (unknown, tail)


def test_aws_head_runs_mlflow_with_s3_artifacts(aws):
    head_setup = "\n".join(aws["head_setup_commands"])
    exec_start = next(line for line in head_setup.splitlines() if "ExecStart=" in line)
    flags = _flags(exec_start.split("=", 1)[1])
    assert flags["--port"] == "5000"
    assert "--serve-artifacts" in flags
    assert flags["--artifacts-destination"].startswith("s3://")
    # the driver named: to SQLAlchemy 2 a plain postgresql:// means psycopg 3, which the head lacks (it
    # installs psycopg2-binary), and the server would exit at start (tests/test_services.py starts it)
    assert flags["--backend-store-uri"].startswith(("postgresql+psycopg2://", "sqlite:///"))
    start = "\n".join(aws["head_start_ray_commands"])
    assert "systemctl restart mlflow" in start
    assert "ray start --head" in start and "--dashboard-host=127.0.0.1" in start
    # every node resolves "mlflow" to the head, so one URI works cluster-wide
    assert any("mlflow" in c and "/etc/hosts" in c for c in aws["head_setup_commands"])
    assert any("$RAY_HEAD_IP mlflow" in c for c in aws["worker_start_ray_commands"])
    assert any("--address=$RAY_HEAD_IP:6379" in c for c in aws["worker_start_ray_commands"])


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_aws_placeholders_are_marked():
    """Every REPLACE_ME in the config's values is one the header comment explains, and no value
    is left to a templating step."""
    text = (CLUSTER / "aws.yaml").read_text()
    token = re.compile(r"[\w.:-]*REPLACE_ME[\w.:-]*")
    documented = {
        t.strip(":") for line in text.splitlines() if line.lstrip().startswith("#") for t in token.findall(line)
    } - {"REPLACE_ME"}  # named ones only
    strings = list(_strings(_load(CLUSTER / "aws.yaml")))
    used = {t for v in strings for t in token.findall(v)}
    assert used, "the account-specific values are expected to be marked REPLACE_ME"
    unexplained = {t for t in used if not any(d in t for d in documented)}
    assert not unexplained, f"placeholders not explained in the header: {unexplained}"
    assert not any("${" in v.replace("${BASH_SOURCE", "") for v in strings)  # no unresolved templating


# --------------------------------------------------------------------------- KubeRay


@pytest.fixture(scope="module")
def kube():
    docs = {}
    for f in ("raycluster.yaml", "rayjob.yaml", "mlflow.yaml", "pvc.yaml"):
        for d in _load_all(KUBE / f):
            docs[(d["kind"], d["metadata"]["name"])] = d
    return docs


def _one(kube, kind):
    found = [d for (k, _), d in kube.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod_specs(raycluster):
    spec = raycluster["spec"]
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]


def _entrypoint_flags(rayjob):
    entry = rayjob["spec"]["entrypoint"]
    sweep = entry[entry.index("python sweeps/temperature.py") :]
    return entry, _flags(sweep)


def test_kube_manifests_are_well_formed(kube):
    for (kind, name), d in kube.items():
        assert d.get("apiVersion"), (kind, name)
        assert d["metadata"].get("name"), (kind, name)
    assert _one(kube, "RayCluster")["apiVersion"] == "ray.io/v1"
    assert _one(kube, "RayJob")["apiVersion"] == "ray.io/v1"


def test_raycluster_images_and_gpu_workers(kube):
    rc = _one(kube, "RayCluster")
    images = set()
    for _, pod in _pod_specs(rc):
        for c in pod["containers"]:
            assert c.get("image"), c["name"]
            images.add(c["image"])
    assert len(images) == 1, f"head and workers must run the same image, got {images}"
    groups = rc["spec"]["workerGroupSpecs"]
    gpu_groups = [
        g
        for g in groups
        if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, "a worker group must request nvidia.com/gpu"
    for g in gpu_groups:
        for c in g["template"]["spec"]["containers"]:
            r = c["resources"]
            assert r["limits"]["nvidia.com/gpu"] == r["requests"]["nvidia.com/gpu"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["maxReplicas"] >= 1
    assert rc["spec"]["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


def test_rayjob_runs_the_temperature_sweep_on_the_cluster(kube):
    rc, job = _one(kube, "RayCluster"), _one(kube, "RayJob")
    entry, flags = _entrypoint_flags(job)
    assert "python sweeps/temperature.py" in entry
    assert SWEEP_FLAGS <= flags.keys()
    assert flags["--address"] == "auto"
    assert flags["--preset"] == "paper"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    # the project path it cds into is where the image installs it
    docker = (CLUSTER / "docker" / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR\s+(\S+)", docker, re.M).group(1)
    assert f"cd {workdir}" in entry


def test_mlflow_service_matches_the_uri_the_sweep_uses(kube):
    job = _one(kube, "RayJob")
    _, flags = _entrypoint_flags(job)
    m = re.fullmatch(r"http://([\w.-]+):(\d+)/?", flags["--mlflow-uri"])
    assert m, flags["--mlflow-uri"]
    host, port = m.group(1), int(m.group(2))
    svc = kube[("Service", host.split(".")[0])]
    ports = {p["port"]: p for p in svc["spec"]["ports"]}
    assert port in ports
    deploy = _one(kube, "Deployment")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert ports[port]["targetPort"] in {p["containerPort"] for p in c["ports"]}
    args = _flags(" ".join(c["command"][1:] + c["args"]))
    assert int(args["--port"]) == ports[port]["targetPort"]
    assert "--serve-artifacts" in args
    assert c.get("image")
    # the Host header the sweeps send must be allowed by MLflow's security middleware
    allowed = args["--allowed-hosts"].split(",")
    assert host in allowed and f"{host}:*" in allowed
    # the server's own storage is a mounted volume backed by a claim in the manifests
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = deploy["spec"]["template"]["spec"]["volumes"]
    for v in vols:
        if "persistentVolumeClaim" in v:
            assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in kube
    db = args["--backend-store-uri"]
    assert db.startswith("sqlite:///") and any(db[len("sqlite:///") :].startswith(p) for p in mounts.values())
    # the PostgreSQL alternative the header suggests names the driver the image installs
    text = (KUBE / "mlflow.yaml").read_text()
    hints = re.findall(r"--backend-store-uri[= ](postgres\S*)", text)
    assert hints and all(h.startswith("postgresql+psycopg2://") for h in hints), hints


def test_shared_volume_mounted_where_the_sweep_writes(kube):
    rc, job = _one(kube, "RayCluster"), _one(kube, "RayJob")
    _, flags = _entrypoint_flags(job)
    for group, pod in _pod_specs(rc):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        for c in pod["containers"]:
            mounted = {m["mountPath"]: claims[m["name"]] for m in c["volumeMounts"] if m["name"] in claims}
            for flag in ("--storage-path", "--cache-dir"):
                path = flags[flag]
                hits = [mp for mp in mounted if path == mp or path.startswith(mp.rstrip("/") + "/")]
                assert hits, f"{group}: {flag} {path} is not on a mounted claim ({mounted})"
                claim = mounted[hits[0]]
                pvc = kube[("PersistentVolumeClaim", claim)]
                assert "ReadWriteMany" in pvc["spec"]["accessModes"], claim


def _load_local():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sall_cluster_local_cfg", CLUSTER / "local.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("cmd", ["status", "env", "kill-worker", "add-worker", "exec", "down"])
def test_local_cluster_commands_without_a_cluster(tmp_path, capsys, cmd):
    """Each command the README and the tests use exists and, with no cluster in --dir, says so in one
    line and exits non-zero, touching nothing (no state, no process; `down` kills nothing)."""
    local = _load_local()
    d = tmp_path / "none"
    assert local.main([cmd, "--dir", str(d)]) == 1
    err = capsys.readouterr().err.strip()
    expected = f"error: no local cluster state at {d / 'cluster.json'} (run `up` first, or pass --dir)"
    assert err.splitlines() == [expected]
    assert not d.exists()


def test_local_cluster_rejects_unknown_commands(capsys):
    local = _load_local()
    with pytest.raises(SystemExit) as e:
        local.main(["stop-everything"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_local_cluster_ray_start_commands_parse_with_the_installed_ray():
    """cluster/local.py's head and worker commands, given to Ray's own `ray start` parser: every flag
    exists and takes the value it is given (a renamed flag fails here, not when a node starts)."""
    from ray.scripts.scripts import start

    local = _load_local()
    state = dict(host="127.0.0.1", object_store_memory=10**8, gcs_port=1, dashboard_port=2, dashboard=False)
    node = dict(name="n", num_cpus=1, num_gpus=0, temp_dir="/tmp/x", node_manager_port=3)
    node |= dict(object_manager_port=4, dashboard_agent_listen_port=5)
    head = local._ray_start_cmd(state, node, head=True)
    worker = local._ray_start_cmd(state | {"address": "127.0.0.1:1"}, node, head=False)
    for cmd in (head, worker):
        assert cmd[2] == "start"
        ctx = start.make_context("start", cmd[3:])
        assert ctx.params["num_cpus"] == 1 and ctx.params["block"]
    assert start.make_context("start", head[3:]).params["head"]
    assert start.make_context("start", worker[3:]).params["address"] == "127.0.0.1:1"
