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

        # the client, not mlflow.set_tracking_uri: that also sets $MLFLOW_TRACKING_URI for the whole
        # process, which the next Tracking.resolve (another sweep, another test) would then obey
        client = mlflow.MlflowClient(self.uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(
                self.experiment, artifact_location=Path(self.artifact_root, self.experiment).as_uri()
                if "://" not in self.artifact_root else f"{self.artifact_root}/{self.experiment}")
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(self.experiment)
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


class LazyParentRun:
    """The parent run of one stage's runs (a zoo build's teachers), created in ``tracking`` on the
    first :meth:`id` — a stage with nothing to log adds no run — and ended by :meth:`close`. It is not
    nested under the sweep's run, so a sweep's children are its trials only; ``tags`` link it back."""

    def __init__(self, tracking: Tracking | None, name: str, tags: Mapping[str, str]) -> None:
        self.tracking, self.name, self.tags = tracking, name, dict(tags)
        self._id: str | None = None

    def id(self) -> str | None:
        if self.tracking is None:
            return None
        if self._id is None:
            import mlflow

            client = mlflow.MlflowClient(self.tracking.uri)
            self._id = client.create_run(self.tracking.experiment_id(), run_name=self.name, tags=self.tags).info.run_id
        return self._id

    def close(self, status: str = "FINISHED") -> None:
        if self._id is not None:
            import mlflow

            mlflow.MlflowClient(self.tracking.uri).set_terminated(self._id, status=status)


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

    def metrics(self, metrics: Mapping[str, float], step: int | None = None, model_id: str | None = None) -> None:
        """Log ``metrics`` at ``step``; ``model_id`` links them to a logged model (its page lists them)."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0, model_id=model_id) for k, v in flatten(metrics).items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def dict_artifact(self, data: Any, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def dataset(self, name: str, source: str, digest: str, profile: Mapping[str, Any], context: str) -> None:
        """Record a dataset this run read as an MLflow dataset input (the UI's *Dataset* column):
        its location, a content digest (e.g. a prepared dataset's manifest hash) and a profile (row
        counts); ``context``: "train", "validation", "test", …. Metadata only: nothing is copied."""
        import time
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
            warnings.simplefilter("ignore")
            src = resolve_dataset_source(str(source))
        ds = _PreparedData(src, name=name, digest=digest[:32], profile=dict(profile))
        inputs = [DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])]
        for attempt in range(4):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except Exception as err:  # noqa: BLE001 - two trials registering one dataset at once
                # MLflow gets-or-creates the dataset row non-atomically: the loser of the race hits the
                # unique constraint, and a retry finds the row the winner wrote
                if attempt == 3:
                    print(f"warning: dataset input {name!r} not logged: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200]}")
                    return
                time.sleep(0.2 * (attempt + 1))

    def model(self, model: Any, name: str, input_example: Any) -> str:
        """Log a torch ``model`` as an MLflow model of this run (the UI's *Models* column), loadable
        with ``mlflow.pytorch.load_model(uri)``. Saved as MLflow's ``pt2`` format (``torch.export``):
        a traced graph and its weights, no pickled code — loading it needs neither mike_ray nor trust
        in the file. ``input_example``: a numpy batch of two or more (a batch of one would fix the
        batch size); the signature comes from it and the model's output. Returns the model's id
        (its URI is ``models:/<id>``)."""
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            out = model(torch.as_tensor(input_example)).numpy()
        # the fluent API links the model to its run only through an active run: this one, re-opened
        with fluent_uri(self.client._tracking_client.tracking_uri), mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(
                model, name=name, signature=infer_signature(input_example, out), input_example=input_example,
                serialization_format="pt2",
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])  # not inferred: a pip freeze
        self.client.update_run(self.run_id, status="RUNNING")  # start_run's exit ended it; the caller ends it
        return info.model_id


@contextlib.contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at ``uri`` for the block only: ``mlflow.set_tracking_uri`` also
    sets ``$MLFLOW_TRACKING_URI`` for the whole process, so both are put back afterwards."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets both


class _PreparedData:
    """A dataset as MLflow records it without its content (:class:`mlflow.data.meta_dataset.MetaDataset`
    plus a profile): built lazily so that importing this module never imports mlflow."""

    def __new__(cls, source: Any, name: str, digest: str, profile: dict[str, Any]) -> Any:
        import json

        from mlflow.data.meta_dataset import MetaDataset

        class PreparedData(MetaDataset):
            @property
            def profile(self) -> Any:
                return profile

            def to_dict(self) -> dict[str, str]:
                return {**super().to_dict(), "profile": json.dumps(profile)}

        return PreparedData(source, name=name, digest=digest)


@contextlib.contextmanager
def system_metrics(run: RunLogger, enabled: bool, interval_s: float = 10.0) -> Iterator[None]:
    """CPU, memory (and GPU, where present) of this process's machine logged to ``run`` as
    ``system/...`` every ``interval_s`` while the block runs (MLflow's system-metrics monitor), if
    ``enabled`` (``mlflow.system_metrics`` of the sweep file)."""
    if not enabled:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run.run_id, sampling_interval=interval_s, samples_before_logging=1,
                                   tracking_uri=run.client._tracking_client.tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
