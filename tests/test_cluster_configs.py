"""Offline checks of the cluster configs in cluster/ — no cloud account, no cluster, no network.

What runs here:
- cluster/aws.yaml and cluster/gcp.yaml are validated with jsonschema against the launcher schema that
  ships in the ray wheel (ray/autoscaler/ray-schema.json), then with Ray's own `prepare_config` +
  `validate_config` (ray.autoscaler._private.util: they merge the provider's defaults.yaml from the
  wheel and check node types and worker counts; a guard turns any socket connection during them into a
  test failure). The flags in the start commands are checked against `ray start`'s own options, and
  every command is parsed by `bash -n`.
- Security and cost properties are checked by `launcher_problems` / `kuberay_problems`, which return
  a list of findings; the real configs must give none, and deliberately broken copies must each be
  caught (so these tests can fail).

What cannot run offline (and is therefore not run — nothing is skipped silently):
- The provider bootstrap that `ray up` performs after validation (bootstrap_aws / bootstrap_gcp: IAM
  role or service account, key pair, subnet and security-group lookup, AMI / project checks, instance
  type resource detection): every step is a cloud API call, and `ray up` has no dry run.
- cluster/kuberay-rayjob.yaml is only parsed and checked here: there is no Kubernetes API server or
  KubeRay CRD on this machine. Kubernetes drops unknown fields silently, so the field names used at each
  KubeRay level are checked against allow-lists taken from the KubeRay ray.io/v1 API reference.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
KUBERAY_MANIFEST = CLUSTER / "kuberay-rayjob.yaml"
SWEEP_ENTRYPOINT = "python -m mike_ray.sweep sweeps/teacher_subsets.yaml"

# A Ray token is 32+ hex characters; none may appear in a committed config.
HEX_TOKEN = re.compile(r"\b[0-9a-fA-F]{32,}\b")
WORLD_CIDRS = ("0.0.0.0/0", "::/0")


# ---------------------------------------------------------------------------------------------------
# helpers

def ray_schema() -> dict:
    path = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    with open(path) as f:
        return json.load(f)


def load_launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def load_kuberay() -> list[dict]:
    return [d for d in yaml.safe_load_all(KUBERAY_MANIFEST.read_text()) if d is not None]


def strings_in(obj):
    """Every string value (and dict key) nested in obj."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield str(k)
            yield from strings_in(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings_in(v)


def leading_comment(text: str) -> str:
    """The comment block a file opens with (up to the first line that is neither comment nor blank)."""
    lines = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def start_commands(cfg: dict) -> list[str]:
    return list(cfg.get("head_start_ray_commands", [])) + list(cfg.get("worker_start_ray_commands", []))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (proves the checks are offline)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted during an offline check: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------------------------------------------
# security / cost rules for the cluster-launcher configs

def launcher_problems(cfg: dict) -> list[str]:
    problems: list[str] = []
    node_types = cfg.get("available_node_types", {})
    head_name = cfg.get("head_node_type")
    head = node_types.get(head_name, {})
    provider = cfg.get("provider", {})

    # The head takes no GPU work.
    if head.get("resources", {}).get("GPU") != 0:
        problems.append("head node type must declare GPU: 0 in resources")

    # Head start: dashboard on loopback only, autoscaler on, no GPUs advertised.
    head_cmds = cfg.get("head_start_ray_commands", [])
    head_start = [c for c in head_cmds if "ray start" in c and "--head" in c]
    if len(head_start) != 1:
        problems.append("head_start_ray_commands must contain exactly one `ray start --head`")
    for c in head_start:
        if "--dashboard-host=127.0.0.1" not in c:
            problems.append("head `ray start` must bind the dashboard to 127.0.0.1")
        if "--autoscaling-config=~/ray_bootstrap_config.yaml" not in c:
            problems.append("head `ray start` lacks --autoscaling-config (no autoscaling)")
        if "--num-gpus=0" not in c:
            problems.append("head `ray start` must pass --num-gpus=0")
    for c in start_commands(cfg):
        for host in re.findall(r"--dashboard-host[= ](\S+)", c):
            if host != "127.0.0.1":
                problems.append(f"dashboard bound to {host}")
    for c in start_commands(cfg):  # the tracking server has no authentication: private address only
        for host in re.findall(r"mlflow server\b.*?--host[= ](\S+)", c):
            if host.strip("'\"") in ("0.0.0.0", "::", "[::]"):
                problems.append(f"mlflow server bound to all interfaces ({host}): bind the private address")
    worker_start = [c for c in cfg.get("worker_start_ray_commands", []) if "ray start" in c]
    if len(worker_start) != 1:
        problems.append("worker_start_ray_commands must contain exactly one `ray start`")

    # Token authentication in every start command, token from a file mounted from outside the repo.
    mounts = cfg.get("file_mounts", {}) or {}
    for c in start_commands(cfg):
        if "RAY_AUTH_MODE=token" not in c:
            problems.append(f"start command without RAY_AUTH_MODE=token: {c[:60]}...")
        paths = re.findall(r'RAY_AUTH_TOKEN_PATH="?([^";\s]+)"?', c)
        if not paths:
            problems.append(f"start command without RAY_AUTH_TOKEN_PATH: {c[:60]}...")
        for p in paths:
            remote = p.replace("$HOME/", "~/")
            if remote not in mounts:
                problems.append(f"token file {p} is not a file_mounts target")
            elif not str(mounts[remote]).startswith(("~", "/")):
                problems.append(f"token file is mounted from a path inside the repository: {mounts[remote]}")
    for s in strings_in(cfg):
        if "RAY_AUTH_MODE=disabled" in s:
            problems.append("RAY_AUTH_MODE=disabled found")
        if re.search(r"RAY_AUTH_TOKEN=(?!\$)\S", s):
            problems.append("RAY_AUTH_TOKEN set to a literal value")
        if HEX_TOKEN.search(s):
            problems.append("a hard-coded token-like hex string found")
        if any(w in s for w in WORLD_CIDRS):
            problems.append(f"world-open CIDR in {s!r}")

    # Autoscaling from zero with a cap, and idle nodes removed.
    if not cfg.get("idle_timeout_minutes", 0) > 0:
        problems.append("idle_timeout_minutes must be > 0")
    if not isinstance(cfg.get("max_workers"), int):
        problems.append("global max_workers must be set (cost ceiling)")
    for name, nt in node_types.items():
        if name == head_name:
            continue
        if nt.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers must be 0")
        if not isinstance(nt.get("max_workers"), int) or nt["max_workers"] < 1:
            problems.append(f"{name}: max_workers must be a positive integer")
        if nt.get("resources", {}).get("GPU", 0) < 1:
            problems.append(f"{name}: worker type without GPU")

    # Network: nothing open to the internet; every node in the network the README sets up.
    if provider.get("type") == "aws":
        for name, nt in node_types.items():
            if not nt.get("node_config", {}).get("SecurityGroupIds"):
                problems.append(
                    f"{name}: no SecurityGroupIds — Ray would create its default group with SSH from 0.0.0.0/0"
                )
        for rule in provider.get("security_group", {}).get("IpPermissions", []):
            cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
            cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
            if any(c in WORLD_CIDRS for c in cidrs):
                problems.append(f"ingress rule open to the internet: {rule}")
    elif provider.get("type") == "gcp":
        for name, nt in node_types.items():
            nics = nt.get("node_config", {}).get("networkInterfaces")
            if not nics:
                problems.append(f"{name}: no networkInterfaces — Ray would pick a subnet of the default network")
                continue
            for nic in nics:
                target = nic.get("subnetwork") or nic.get("network") or ""
                if not target or target.rstrip("/").endswith("/default") or target == "default":
                    problems.append(f"{name}: uses the default network (SSH/RDP open to 0.0.0.0/0)")
    else:
        problems.append(f"unexpected provider type {provider.get('type')!r}")

    if cfg.get("docker"):
        problems.append("docker section present: its run_options may publish ports; not expected here")
    return problems


# ---------------------------------------------------------------------------------------------------
# rules for the KubeRay manifest

# Field names per KubeRay ray.io/v1 type (API reference, KubeRay v1.4-v1.6). Kubernetes silently drops
# unknown fields, so a typo here would otherwise go unnoticed until the cluster behaves wrongly.
KUBERAY_FIELDS = {
    "RayJobSpec": {
        "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
        "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
        "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
        "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
    },
    "RayClusterSpec": {
        "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations", "enableInTreeAutoscaling",
        "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs", "authOptions",
    },
    "AuthOptions": {"mode", "secretName", "enableK8sTokenAuth"},
    "AutoscalerOptions": {
        "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode",
        "version", "env", "envFrom", "volumeMounts",
    },
    "HeadGroupSpec": {"template", "headService", "enableIngress", "rayStartParams", "serviceType"},
    "WorkerGroupSpec": {
        "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
        "rayStartParams", "template", "scaleStrategy", "numOfHosts",
    },
}
EXPOSING_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
EXPOSING_KINDS = {"Ingress", "Route", "Gateway", "HTTPRoute"}


def _unknown(level: str, obj: dict) -> list[str]:
    extra = set(obj) - KUBERAY_FIELDS[level]
    return [f"{level}: unknown field(s) {sorted(extra)} (Kubernetes would drop them silently)"] if extra else []


def _containers(group: dict) -> list[dict]:
    return group.get("template", {}).get("spec", {}).get("containers", [])


def kuberay_problems(docs: list[dict]) -> list[str]:
    problems: list[str] = []
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    if len(jobs) != 1:
        return [f"expected exactly one RayJob, found {len(jobs)}"]
    job = jobs[0]
    if job.get("apiVersion") != "ray.io/v1":
        problems.append(f"RayJob apiVersion must be ray.io/v1, not {job.get('apiVersion')!r}")
    spec = job.get("spec", {})
    problems += _unknown("RayJobSpec", spec)
    if SWEEP_ENTRYPOINT not in spec.get("entrypoint", ""):
        problems.append(f"entrypoint must run `{SWEEP_ENTRYPOINT}`")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes must be true")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int):
        problems.append("ttlSecondsAfterFinished must be set")

    rcs = spec.get("rayClusterSpec", {})
    problems += _unknown("RayClusterSpec", rcs)
    if rcs.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {rcs.get('rayVersion')!r} differs from the project's ray {ray.__version__}")
    if rcs.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    auto = rcs.get("autoscalerOptions", {})
    problems += _unknown("AutoscalerOptions", auto)
    if not (isinstance(auto.get("idleTimeoutSeconds"), int) and auto["idleTimeoutSeconds"] > 0):
        problems.append("autoscalerOptions.idleTimeoutSeconds must be a positive integer")
    auth = rcs.get("authOptions", {})
    problems += _unknown("AuthOptions", auth)
    if auth.get("mode") != "token":
        problems.append("rayClusterSpec.authOptions.mode must be token")

    head = rcs.get("headGroupSpec", {})
    problems += _unknown("HeadGroupSpec", head)
    if head.get("serviceType", "ClusterIP") in EXPOSING_SERVICE_TYPES:
        problems.append(f"head serviceType {head['serviceType']} exposes the dashboard outside the cluster")
    if head.get("headService", {}).get("spec", {}).get("type") in EXPOSING_SERVICE_TYPES:
        problems.append("headService exposes the head outside the cluster")
    if head.get("enableIngress"):
        problems.append("enableIngress exposes the dashboard")
    if head.get("rayStartParams", {}).get("num-gpus") != "0":
        problems.append('head rayStartParams must set num-gpus: "0"')
    for c in _containers(head):
        if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}):
            problems.append("head container requests a GPU")

    groups = rcs.get("workerGroupSpecs", [])
    if not groups:
        problems.append("no worker groups")
    images = {c.get("image") for c in _containers(head)}
    for g in groups:
        problems += _unknown("WorkerGroupSpec", g)
        name = g.get("groupName", "?")
        if g.get("minReplicas") != 0:
            problems.append(f"worker group {name}: minReplicas must be 0")
        if not (isinstance(g.get("maxReplicas"), int) and g["maxReplicas"] >= 1):
            problems.append(f"worker group {name}: maxReplicas must be a positive integer")
        if g.get("replicas", 0) != 0:
            problems.append(f"worker group {name}: replicas must start at 0")
        containers = _containers(g)
        if not any(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) >= 1 for c in containers):
            problems.append(f"worker group {name}: no nvidia.com/gpu limit")
        images |= {c.get("image") for c in containers}
    if len(images) != 1:
        problems.append(f"head and workers must run one image (same Ray/Python), found {sorted(map(str, images))}")

    for d in docs:
        kind = d.get("kind")
        if kind == "Service" and d.get("spec", {}).get("type", "ClusterIP") in EXPOSING_SERVICE_TYPES:
            problems.append(f"Service {d['metadata']['name']} is of type {d['spec']['type']}")
        if kind in EXPOSING_KINDS:
            problems.append(f"{kind} {d.get('metadata', {}).get('name')} exposes the cluster")
    problems += _network_policy_problems(docs)
    for d in docs:
        for container in _all_containers(d):
            for env in container.get("env", []):
                if env.get("name") == "RAY_AUTH_MODE" and env.get("value") != "token":
                    problems.append(f"RAY_AUTH_MODE={env.get('value')} in container {container.get('name')}")
                if env.get("name") == "RAY_AUTH_TOKEN" and "value" in env:
                    problems.append("RAY_AUTH_TOKEN given as a literal value (use a Secret)")
    for s in strings_in(docs):
        if HEX_TOKEN.search(s):
            problems.append("a hard-coded token-like hex string found")
    return problems


def _network_policy_problems(docs: list[dict]) -> list[str]:
    """The MLflow server listens on 0.0.0.0 inside its pod (a Service needs that) and has no
    authentication: a NetworkPolicy must select its pod and admit only pods of the namespace."""
    problems = []
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    for d in docs:
        if d.get("kind") not in ("Deployment", "StatefulSet"):
            continue
        name = d.get("metadata", {}).get("name")
        labels = d.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
        covering = [p for p in policies
                    if "Ingress" in p.get("spec", {}).get("policyTypes", [])
                    and (p["spec"].get("podSelector", {}).get("matchLabels", {}).items() <= labels.items())]
        if not covering:
            problems.append(f"no NetworkPolicy selects the pods of {d['kind']} {name}")
        for p in covering:
            for rule in p["spec"].get("ingress", []):
                sources = rule.get("from")
                if not sources or any(set(src) != {"podSelector"} for src in sources):
                    problems.append(f"NetworkPolicy {p['metadata']['name']} admits sources outside the namespace "
                                    f"to {name}: {rule}")
    return problems


def _all_containers(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                yield from (c for c in v if isinstance(c, dict))
            else:
                yield from _all_containers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _all_containers(v)


# ---------------------------------------------------------------------------------------------------
# launcher configs: schema and Ray's own validation

def test_schema_ships_in_the_ray_wheel():
    schema = ray_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema.get("additionalProperties") is False  # unknown top-level keys are errors


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_matches_ray_schema(name):
    jsonschema.validate(load_launcher(name), ray_schema())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_ray_prepare_and_validate_config_offline(name, no_network):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load_launcher(name)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    # The provider defaults (which pip-install into the system Python and bind the dashboard to
    # 0.0.0.0) must not leak into the merged config: every command list is exactly ours.
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "initialization_commands"):
        assert prepared[key] == cfg[key], key
    assert prepared["head_setup_commands"] == cfg["setup_commands"] + cfg["head_setup_commands"]
    assert prepared["worker_setup_commands"] == cfg["setup_commands"] + cfg["worker_setup_commands"]
    assert prepared["available_node_types"].keys() == cfg["available_node_types"].keys()
    for nt in prepared["available_node_types"].values():
        assert isinstance(nt["max_workers"], int)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_security_and_scaling(name):
    assert launcher_problems(load_launcher(name)) == []


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_header_says_what_how_and_cost(name):
    text = (CLUSTER / name).read_text()
    assert text.startswith("#"), "the file must open with a comment"
    header = leading_comment(text)
    for needle in (
        f"ray up cluster/{name}",
        f"ray dashboard cluster/{name}",
        "RAY_AUTH_MODE=token",
        "ray job submit --address http://127.0.0.1:8265 --working-dir .",
        SWEEP_ENTRYPOINT,
        f"ray down cluster/{name}",
        "ESTIMATE",
    ):
        assert needle in header, f"header of {name} lacks {needle!r}"
    # Every node type's instance/machine type appears in the cost lines with an hourly price.
    cfg = load_launcher(name)
    for nt in cfg["available_node_types"].values():
        kind = nt["node_config"].get("InstanceType") or nt["node_config"].get("machineType")
        assert re.search(rf"{re.escape(kind)}.*\$[0-9.]+/h", header), f"no hourly price for {kind}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # importing Ray's CLI imports Serve's pydantic models
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_start_flags_are_real_ray_start_options(name):
    from ray.scripts.scripts import start

    known = {opt for p in start.params for opt in p.opts}
    for c in start_commands(load_launcher(name)):
        if "ray start" not in c:
            continue
        used = re.findall(r"(--[a-z][a-z0-9-]*)", c.split("ray start", 1)[1])
        unknown = set(used) - known
        assert not unknown, f"`ray start` has no option(s) {sorted(unknown)}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is needed to parse the shell commands")
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_every_command_is_valid_shell(name):
    cfg = load_launcher(name)
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    for key in keys:
        for c in cfg.get(key, []):
            r = subprocess.run(["bash", "-n", "-c", c], capture_output=True, text=True)
            assert r.returncode == 0, f"{name}:{key}: {c!r}: {r.stderr}"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_nodes_install_the_projects_pinned_dependencies(name):
    cfg = load_launcher(name)
    mounts = cfg["file_mounts"]
    targets = [remote for remote, local in mounts.items() if local == "./pyproject.toml"]
    assert len(targets) == 1, "pyproject.toml must be file-mounted to the nodes"
    assert any(f"-r {targets[0]}" in c for c in cfg["setup_commands"]), "setup must install from it"
    # ... and it pins the same Ray as this machine, so laptop and cluster run one Ray version.
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(rf'"ray\[[^\]]*\]=={re.escape(ray.__version__)}"', pyproject)
    # Every node (head and workers) runs the same interpreter version.
    assert any("uv venv --python 3.11" in c for c in cfg["setup_commands"])


# ---------------------------------------------------------------------------------------------------
# the checks must be able to fail

@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_schema_and_ray_reject_an_unknown_top_level_key(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = load_launcher(name)
    broken["dashboard_host"] = "127.0.0.1"  # not a launcher key
    with pytest.raises(jsonschema.ValidationError, match="dashboard_host"):
        jsonschema.validate(broken, ray_schema())
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_schema_rejects_fractional_node_resources(name):
    broken = load_launcher(name)
    broken["available_node_types"]["trainer_gpu"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


def _replace_in(commands: list[str], old: str, new: str) -> list[str]:
    return [c.replace(old, new) for c in commands]


LAUNCHER_BREAKAGES = {
    "dashboard on all interfaces": (
        lambda c: c.update(head_start_ray_commands=_replace_in(
            c["head_start_ray_commands"], "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")),
        "dashboard",
    ),
    "worker without token auth": (
        lambda c: c.update(worker_start_ray_commands=_replace_in(
            c["worker_start_ray_commands"], "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")),
        "RAY_AUTH_MODE",
    ),
    "hard-coded token": (
        lambda c: c.update(worker_start_ray_commands=_replace_in(
            c["worker_start_ray_commands"], "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=" + "ab" * 32)),
        "token",
    ),
    "GPU workers kept running": (
        lambda c: c["available_node_types"]["teacher_gpu"].update(min_workers=1),
        "min_workers",
    ),
    "GPU on the head": (
        lambda c: c["available_node_types"]["head"]["resources"].update(GPU=1),
        "GPU: 0",
    ),
    "no idle timeout": (lambda c: c.update(idle_timeout_minutes=0), "idle_timeout"),
    "mlflow on all interfaces": (
        lambda c: c.update(head_start_ray_commands=[re.sub(r"mlflow server --host \S+ ", "mlflow server --host 0.0.0.0 ",
                                                           x) for x in c["head_start_ray_commands"]]),
        "mlflow server bound to all interfaces",
    ),
}


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
@pytest.mark.parametrize("breakage", sorted(LAUNCHER_BREAKAGES))
def test_security_check_catches_broken_launcher_copy(name, breakage):
    mutate, expected = LAUNCHER_BREAKAGES[breakage]
    broken = load_launcher(name)
    mutate(broken)
    problems = launcher_problems(broken)
    assert problems, f"{breakage} was not caught"
    assert any(expected in p for p in problems), problems


def test_security_check_catches_open_aws_network():
    no_group = load_launcher("aws.yaml")
    del no_group["available_node_types"]["trainer_gpu"]["node_config"]["SecurityGroupIds"]
    assert any("SecurityGroupIds" in p for p in launcher_problems(no_group))

    open_rule = load_launcher("aws.yaml")
    open_rule["provider"]["security_group"] = {"IpPermissions": [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    assert any("internet" in p for p in launcher_problems(open_rule))


def test_security_check_catches_default_gcp_network():
    broken = load_launcher("gcp.yaml")
    broken["available_node_types"]["head"]["node_config"]["networkInterfaces"] = [
        {"network": "global/networks/default"}]
    assert any("default network" in p for p in launcher_problems(broken))
    broken = load_launcher("gcp.yaml")
    del broken["available_node_types"]["trainer_gpu"]["node_config"]["networkInterfaces"]
    assert any("networkInterfaces" in p for p in launcher_problems(broken))


# ---------------------------------------------------------------------------------------------------
# KubeRay

def test_kuberay_rayjob_manifest():
    docs = load_kuberay()
    text = KUBERAY_MANIFEST.read_text()
    assert text.startswith("#"), "the file must open with a comment"
    header = leading_comment(text)
    for needle in ("kubectl -n mike-ray apply -f cluster/kuberay-rayjob.yaml", "kubectl -n mike-ray port-forward",
                   "RAY_AUTH_MODE=token", "ESTIMATE"):
        assert needle in header, f"header lacks {needle!r}"
    assert re.search(r"\$[0-9.]+/h", header), "header lacks an hourly cost"
    job = next(d for d in docs if d.get("kind") == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"] == SWEEP_ENTRYPOINT
    rcs = spec["rayClusterSpec"]
    assert rcs["enableInTreeAutoscaling"] is True
    assert rcs["authOptions"]["mode"] == "token"
    assert all(g["minReplicas"] == 0 for g in rcs["workerGroupSpecs"])
    # The job's MLflow destination is a Service defined in the same file.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    uri = runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
    service = re.match(r"http://([a-z0-9-]+):(\d+)$", uri)
    assert service, uri
    assert any(d.get("kind") == "Service" and d["metadata"]["name"] == service.group(1) for d in docs)
    assert kuberay_problems(docs) == []


KUBERAY_BREAKAGES = {
    "dashboard behind a LoadBalancer": (
        lambda docs: _job(docs)["spec"]["rayClusterSpec"]["headGroupSpec"].update(serviceType="LoadBalancer"),
        "LoadBalancer",
    ),
    "NodePort service": (
        lambda docs: docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "dash"},
                                  "spec": {"type": "NodePort", "ports": [{"port": 8265}]}}),
        "NodePort",
    ),
    "GPU group kept running": (
        lambda docs: _job(docs)["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=1),
        "minReplicas",
    ),
    "no token auth": (
        lambda docs: _job(docs)["spec"]["rayClusterSpec"].pop("authOptions"),
        "authOptions",
    ),
    "misspelled autoscaling field": (
        lambda docs: _job(docs)["spec"]["rayClusterSpec"].update(
            enableInTreeAutoScaling=_job(docs)["spec"]["rayClusterSpec"].pop("enableInTreeAutoscaling")),
        "unknown field",
    ),
    "other entrypoint": (
        lambda docs: _job(docs)["spec"].update(entrypoint="python train.py"),
        "entrypoint",
    ),
    "literal token": (
        lambda docs: _job(docs)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        .setdefault("env", []).append({"name": "RAY_AUTH_TOKEN", "value": "cd" * 32}),
        "literal",
    ),
}


def _job(docs):
    return next(d for d in docs if d.get("kind") == "RayJob")


@pytest.mark.parametrize("breakage", sorted(KUBERAY_BREAKAGES))
def test_kuberay_check_catches_broken_copy(breakage):
    mutate, expected = KUBERAY_BREAKAGES[breakage]
    docs = load_kuberay()
    mutate(docs)
    problems = kuberay_problems(docs)
    assert problems, f"{breakage} was not caught"
    assert any(expected in p for p in problems), problems


# The class-8 catalogue (tests/bad_inputs/cluster/): each file is a textual patch of a shipped config
# that a careless edit could make; the checks above must name what it breaks.
BAD_CLUSTER = sorted((REPO / "tests" / "bad_inputs" / "cluster").glob("*.yaml"))


def test_cluster_catalogue_covers_every_shipped_config():
    bases = {yaml.safe_load(p.read_text())["base"] for p in BAD_CLUSTER}
    assert bases == set(LAUNCHER_CONFIGS) | {KUBERAY_MANIFEST.name}, bases
    assert len(BAD_CLUSTER) >= 3


@pytest.mark.parametrize("entry", BAD_CLUSTER, ids=[p.stem for p in BAD_CLUSTER])
def test_cluster_catalogue_entry_is_caught(entry):
    spec = yaml.safe_load(entry.read_text())
    assert set(spec) == {"base", "replace", "expect"}, entry
    text = (CLUSTER / spec["base"]).read_text()
    for r in spec["replace"]:
        assert r["old"] in text, f"{entry.name}: {r['old']!r} is no longer in {spec['base']} (update the entry)"
        text = text.replace(r["old"], r["new"])
    if spec["base"] == KUBERAY_MANIFEST.name:
        problems = kuberay_problems([d for d in yaml.safe_load_all(text) if d is not None])
    else:
        problems = launcher_problems(yaml.safe_load(text))
    assert any(spec["expect"] in p for p in problems), (entry.name, problems)
