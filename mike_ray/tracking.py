"""MLflow destinations that survive Ray's working-directory moves.

Ray runs workers inside ``/tmp/ray/session_*``; MLflow's defaults (``./mlflow.db``, ``./mlruns``) are
relative to the *current* directory, so runs and artifacts logged from workers would vanish there
(see shared/notes/ray-2.60.md). Everything here resolves to absolute paths once, in the driver, and
the resolved :class:`Tracking` is what travels to Ray tasks and workers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import contextlib
import re

SECRET_MARKERS = ("token", "secret", "password", "passwd", "api_key", "apikey", "credential")


@dataclass(frozen=True)
class Tracking:
    """Where runs go. ``uri`` is an MLflow tracking URI; ``artifact_root`` an absolute path or URI."""

    uri: str
    artifact_root: str
    experiment: str

    @classmethod
    def resolve(cls, out_root: str | Path, experiment: str, uri: str | None = None) -> "Tracking":
        """Default: a sqlite store and an artifact folder under ``out_root`` (absolute).

        An explicit ``uri`` wins, then ``$MLFLOW_TRACKING_URI``.
        """
        out = Path(out_root).resolve()
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            out.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{out / 'mlflow.db'}"
        elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # a relative sqlite path would be re-resolved inside every Ray worker's cwd
            uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
        return cls(uri=uri, artifact_root=str(out / "mlartifacts"), experiment=experiment)

    def experiment_id(self) -> str:
        """Create the experiment (with an absolute artifact location) if missing; return its id."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return mlflow.create_experiment(
                self.experiment, artifact_location=Path(self.artifact_root, self.experiment).as_uri()
                if "://" not in self.artifact_root else f"{self.artifact_root}/{self.experiment}")
        except Exception:  # created concurrently by another process
            exp = mlflow.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def ui_hint(self) -> str:
        """The command that opens the MLflow UI on this store (bound to localhost)."""
        return f"mlflow ui --backend-store-uri '{self.uri}' --host 127.0.0.1 --port 5000"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping → ``{"a/b/c": value}`` (metric and param names are paths)."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@")


def safe_params(d: Mapping[str, Any]) -> dict[str, str]:
    """Flattened config as MLflow params, with anything that looks like a secret left out: keys
    naming a token/secret/password/…, and the password of any ``scheme://user:password@host`` value."""
    out = {}
    for k, v in flatten(d).items():
        if any(m in k.lower() for m in SECRET_MARKERS):
            continue
        s = _URL_CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", str(v))
        out[k] = s if len(s) <= 6000 else s[:5997] + "..."
    return out


@contextlib.contextmanager
def start_run(tracking: Tracking, run_name: str, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """Start (and end) an MLflow run in ``tracking``'s experiment, nested under ``parent_run_id``."""
    import mlflow

    exp_id = tracking.experiment_id()
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    client = mlflow.MlflowClient(tracking.uri)
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    status = "FAILED"
    try:
        yield RunLogger(client, run.info.run_id)
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status=status)


class RunLogger:
    """Thin handle on one run through ``MlflowClient`` (no global active-run state, so it is safe
    inside Ray tasks and threads)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in safe_params(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in flatten(metrics).items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def dict_artifact(self, data: Any, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)
