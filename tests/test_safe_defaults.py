"""Safe defaults (issue 6): weights-only checkpoint loads, local services on 127.0.0.1, no secret as an
MLflow param. (The cluster configs' private dashboard/job port and token auth are checked, on the real
files and on broken copies, in test_cluster_configs.py.)"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from mike_ray.errors import ModelError
from mike_ray.tracking import RunLogger, Tracking, safe_params

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "mike_ray").rglob("*.py"))


def _calls(name: str):
    """Every call ``<...>.<name>(...)`` or ``<name>(...)`` in the package, with its file."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called == name:
                    yield path, node


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    loads = [(p, n) for p, n in _calls("load") if isinstance(n.func, ast.Attribute)
             and getattr(n.func.value, "id", None) == "torch"]
    assert loads, "no torch.load found: the scan is broken"
    for path, node in loads:
        kw = {k.arg: k.value for k in node.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
            f"{path.relative_to(ROOT)}:{node.lineno}: torch.load without weights_only=True"


def test_a_pickled_object_in_a_weights_file_is_refused_not_run(tmp_path) -> None:
    from mike_ray.models.registry import load_torch_file

    marker = tmp_path / "ran"

    class Payload:  # unpickling this would create the marker file
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"w": torch.zeros(1), "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="evil.pt"):
        load_torch_file(tmp_path / "evil.pt")
    assert not marker.exists()


def test_ray_init_calls_bind_the_dashboard_to_localhost() -> None:
    inits = list(_calls("init"))
    local = [(p, n) for p, n in inits if not any(k.arg == "address" for k in n.keywords)
             and p.name == "sweep.py"]
    assert local, "the local ray.init was not found"
    for path, node in local:
        kw = {k.arg: k.value for k in node.keywords}
        assert getattr(kw.get("dashboard_host"), "value", None) == "127.0.0.1", f"{path}:{node.lineno}"


def test_documented_and_printed_local_services_listen_on_localhost() -> None:
    """Every `mlflow ui|server` and `ray start --head` a user is told to run locally binds to 127.0.0.1."""
    texts = {p: p.read_text() for p in [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md")),
                                        *SOURCES]}
    seen = 0
    for path, text in texts.items():
        for m in re.finditer(r"mlflow (?:ui|server)\b[^\n`\"]*", text):
            if "--" not in m.group(0):
                continue  # prose ("run the printed `mlflow ui …` command"), not a command line
            seen += 1
            assert "--host 127.0.0.1" in m.group(0), f"{path.name}: {m.group(0)}"
        for m in re.finditer(r"ray start --head[^\n`]*", text):
            seen += 1
            assert "--dashboard-host=127.0.0.1" in m.group(0), f"{path.name}: {m.group(0)}"
    assert seen >= 2
    assert "--host 127.0.0.1" in Tracking("sqlite:///x.db", "/tmp/a", "e").ui_hint()


def test_secrets_never_become_mlflow_params(tmp_path) -> None:
    import mlflow

    config = {"mlflow": {"tracking_uri": "https://alice:hunter2@mlflow.example:5000"},
              "ray": {"auth_token": "tok-123", "address": "ray://head:10001"},
              "cloud": {"aws_secret_access_key": "AKIA-SECRET", "api_key": "k-456", "db_password": "pw-789"},
              "transfer": {"lr": 0.01}}
    assert "hunter2" not in str(safe_params(config))
    tracking = Tracking.resolve(tmp_path, "secrets")
    client = mlflow.MlflowClient(tracking.uri)
    run = client.create_run(tracking.experiment_id())
    RunLogger(client, run.info.run_id).params(config)
    stored = client.get_run(run.info.run_id).data.params
    blob = str(stored)
    for secret in ("hunter2", "tok-123", "AKIA-SECRET", "k-456", "pw-789"):
        assert secret not in blob
    assert stored["transfer/lr"] == "0.01" and stored["ray/address"] == "ray://head:10001"
    assert stored["mlflow/tracking_uri"] == "https://alice:***@mlflow.example:5000"
