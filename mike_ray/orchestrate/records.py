"""Trial bookkeeping shared by both methods' trial drivers: the trial's typed context, its MLflow
child run (re-opened on resume), its record (written last: its presence means "finished"), its
failure record, and reading them back for the sweep's summary.

Rules a trial driver follows (:mod:`mike_ray.orchestrate.mike_trial`, :mod:`~.mhgd_trial`):

1. ``ctx.finished(trial_id)`` → the trial finished before the sweep driver died: report it, stop.
2. ``trial_run`` opens (or re-opens) the one MLflow run of the trial.
3. On success ``finish_trial``: final metrics, run FINISHED, the record, then the report to Tune.
4. On any exception ``fail_trial``: run FAILED with the one-line reason, a ``trials/failed/`` record.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mike_ray.errors import MikeRayError, find_cause, one_line
from mike_ray.resources import PlacementConfig, WorkersConfig
from mike_ray.tracking import RunLogger, Tracking
from mike_ray.utils import write_json_atomic


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one Tuner receives (frozen; ``tune.with_parameters`` ships it once).

    Attributes:
        sweep: the sweep's name (MLflow tag). sweep_dir: ``<output>/sweeps/<name>`` (records, runs).
        tracking, parent_id: the MLflow store and the sweep's parent run.
        method: the sweep's method (a trial's ``method`` parameter overrides it).
        subsets: teacher subset name → teacher names (the first is the default subset).
        placement, workers: where the trial's shards and trainer workers run.
        import_archs: import-path archs the sweep file names (the only ones stored records may use).
        data_root: the prepared dataset (None when the family needs none). zoo_dir: the teacher zoo.
        settings: the family's own slice of the sweep config (e.g. transfer + downstream for MIKE).
        system_metrics: log the machine's CPU/GPU/memory on each trial run (``mlflow.system_metrics``).
    """

    sweep: str
    sweep_dir: Path
    tracking: Tracking
    parent_id: str
    method: str
    subsets: Mapping[str, tuple[str, ...]]
    placement: PlacementConfig
    workers: WorkersConfig
    import_archs: tuple[str, ...]
    data_root: Path | None
    zoo_dir: Path
    settings: Any
    system_metrics: bool = False  # mlflow.system_metrics: CPU/GPU/memory on every trial run
    report_epochs: bool = False  # study.scheduler: every epoch's metrics go to Tune, which may stop the trial

    def subset(self, params: Mapping[str, Any]) -> tuple[str, list[str]]:
        """The trial's teacher subset: (name, teacher names)."""
        name = params.get("teacher_subset") or next(iter(self.subsets))
        return name, list(self.subsets[name])

    def record_path(self, trial_id: str) -> Path:
        return self.sweep_dir / "trials" / f"{trial_id}.json"

    def finished(self, trial_id: str) -> dict[str, Any] | None:
        """The record of a trial that finished before the driver died (Tune had not saved that yet)."""
        path = self.record_path(trial_id)
        return json.loads(path.read_text()) if path.is_file() else None


def shown_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's searched values without Tune's bookkeeping keys (``__trial_index__``)."""
    return {k: v for k, v in params.items() if not k.startswith("__")}


def trial_name(method: str, subset: str, params: Mapping[str, Any], seed: int) -> str:
    """What a trial run is called in MLflow: method, teacher subset, searched values, seed
    (``mike three schedule=uniform seed 1``; a control has no subset)."""
    shown = " ".join(f"{k}={v}" for k, v in sorted(shown_params(params).items())
                     if k not in ("method", "teacher_subset"))
    return " ".join(p for p in (method, "" if subset == "-" else subset, shown, f"seed {seed}") if p)


def trial_run(ctx: TrialContext, trial_id: str, tags: dict[str, str], name: str | None = None) -> RunLogger:
    """The trial's MLflow child run; a resumed trial re-opens its run instead of adding one."""
    import mlflow

    client = mlflow.MlflowClient(ctx.tracking.uri)
    exp = ctx.tracking.experiment_id()
    found = client.search_runs([exp], filter_string=f"tags.`mike_ray.trial_id` = '{trial_id}' and "
                                                    f"tags.`mlflow.parentRunId` = '{ctx.parent_id}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return RunLogger(client, found[0].info.run_id)
    run = client.create_run(exp, run_name=name or f"trial-{trial_id}", tags={
        "mlflow.parentRunId": ctx.parent_id, "mike_ray.trial_id": trial_id, "mike_ray.sweep": ctx.sweep,
        "mike_ray.stage": "trial", **tags})
    return RunLogger(client, run.info.run_id)


@dataclass(frozen=True)
class OpenTrial:
    """A trial that runs now: its context, its MLflow run, and what every record of it carries."""

    ctx: TrialContext
    run: RunLogger
    base: dict[str, Any]  # trial_id, family, method, subset, teachers, params, seed, …, mlflow_run_id

    @property
    def trial_id(self) -> str:
        return self.base["trial_id"]

    @contextmanager
    def failing(self) -> Iterator[None]:
        """Around the trial's body: an exception ends the trial as :func:`fail_trial` says, then re-raises."""
        try:
            yield
        except BaseException as err:
            # a trial stopped from outside (study.scheduler) is the driver's to record: Tune's stop event,
            # or its trainer's controller ended by Ray on purpose (not a crash) before that was visible
            if not (_stopped_by_tune() or "INTENDED_SYSTEM_EXIT" in str(err)):
                fail_trial(self.run, self.ctx.sweep_dir, self.base, err)
            raise

    def finish(self, record: dict[str, Any], final: dict[str, float], model_id: str | None = None) -> None:
        """:func:`finish_trial` with this trial's run and record path (``model_id``: the trial's
        logged model, which its final metrics are linked to)."""
        finish_trial(self.run, self.ctx.record_path(self.trial_id), record, final, model_id)


def begin_trial(ctx: TrialContext, params: Mapping[str, Any], *, family: str, method: str, subset: str,
                teachers: list[str], seed: int, report: Callable[[dict[str, Any]], dict[str, float]],
                **extra: Any) -> OpenTrial | None:
    """Every family's trial opens here. A trial that finished before the driver died has its stored
    result re-reported to Tune (``report(record)``) and gets None; any other gets its MLflow run
    (re-opened on a resume, tagged with method, subset and seed) and the fields its records share."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    if (prev := ctx.finished(trial_id)) is not None:
        ray.tune.report(report(prev))
        return None
    run = trial_run(ctx, trial_id, {"mike_ray.teacher_subset": subset, "mike_ray.method": method,
                                    "mike_ray.seed": str(seed)}, trial_name(method, subset, params, seed))
    base = {"trial_id": trial_id, "family": family, "method": method, "subset": subset, "teachers": teachers,
            "params": shown_params(params), "seed": seed, **extra, "mlflow_run_id": run.run_id}
    return OpenTrial(ctx, run, base)


def finish_trial(run: RunLogger, done: Path, record: dict[str, Any], final: dict[str, float],
                 model_id: str | None = None) -> None:
    """A trial's last steps, in this order: final metrics (linked to its logged model), MLflow run
    FINISHED, the trial record (its presence means "complete": a resumed sweep skips the trial), then
    the report to Tune."""
    import ray.tune

    run.metrics({k: v for k, v in final.items() if not (isinstance(v, float) and math.isnan(v))}, model_id=model_id)
    run.client.set_terminated(run.run_id, status="FINISHED")
    write_json_atomic(done, record)
    # the one line a trial leaves in the sweep's log (Tune's status tables are --verbose only)
    name = run.client.get_run(run.run_id).info.run_name
    shown = ", ".join(f"{k} {v:.4g}" for k, v in list(final.items())[:2] if isinstance(v, (int, float)))
    print(f"trial finished: {name}: {shown} ({record.get('trial_seconds', 0.0):.0f}s)", flush=True)
    ray.tune.report(final)


def log_data(run: RunLogger, root: str | Path, split: str, tasks: list[str] | None, context: str) -> None:
    """The data a trial reads, as an MLflow dataset input (name, manifest digest, row counts). The
    name starts with its role (``query``, ``downstream``) — MLflow keeps one input per name and
    digest, and the query and the downstream tasks may be the same crops."""
    from mike_ray.data.query import describe_data

    name, digest, profile = describe_data(root, split, tasks)
    run.dataset(f"{context.split('/')[0]} {name}", str(root), digest, profile, context)


def log_trained_model(run: RunLogger, spec: Mapping[str, Any], state: Mapping[str, Any], image_size: int,
                      name: str) -> str | None:
    """The trial's trained network (``spec`` + ``state``) as an MLflow model of its run, loadable with
    ``mlflow.pytorch.load_model``; its input example is two 3×S×S images. Returns its model id, or
    None when logging it failed (a model ``torch.export`` cannot trace, a store error): the trial's
    results stand, the run says why in the tag ``mike_ray.model_not_logged`` and a warning is printed."""
    import numpy as np

    from mike_ray.models import build_model

    try:
        model = build_model(dict(spec), imports="any")  # the sweep's own spec
        model.load_state_dict(dict(state))
        model.eval()
        example = np.random.default_rng(0).random((2, 3, image_size, image_size), dtype=np.float32)
        return run.model(model, name, example)
    except Exception as err:  # noqa: BLE001 - the trial finished; losing its score over the model is worse
        why = f"{type(err).__name__}: {one_line(str(err))[:300]}"
        print(f"warning: the trial's {name} was not logged as an MLflow model: {why}")
        run.tags({"mike_ray.model_not_logged": why})
        return None


def _stopped_by_tune() -> bool:
    """Whether Tune has told this trial to stop (a scheduler's decision, or the sweep ending): its
    session's stop event is set, and what the trial raises next is the stop, not a failure."""
    try:
        from ray.train._internal.session import get_session

        session = get_session()
        return bool(session is not None and session.stop_event.is_set())
    except Exception:  # noqa: BLE001 - no Tune session here: not stopped by Tune
        return False


def fail_trial(run: RunLogger, sweep_dir: Path, base: dict[str, Any], err: BaseException) -> None:
    """A trial that raised: its MLflow run ends FAILED with the one-line reason as a tag, and a
    ``trials/failed/<id>.json`` record keeps it in the sweep's summary. Tune marks the trial ERROR
    with the same message; the sweep goes on with the other trials."""
    reason = one_line(str(err)) if isinstance(err, MikeRayError) else f"{type(err).__name__}: {one_line(str(err))}"
    try:
        if (sweep_dir / "trials" / "stopped" / f"{base['trial_id']}.json").is_file() or \
                run.client.get_run(run.run_id).info.status == "KILLED":
            return  # the scheduler stopped it, and the driver has recorded that already
    except Exception:  # noqa: BLE001 - the store is unreachable: record the failure as best we can
        pass
    try:
        run.tags({"mike_ray.status": "failed", "mike_ray.failure_reason": reason[:5000]})
        run.client.set_terminated(run.run_id, status="FAILED")
        write_json_atomic(sweep_dir / "trials" / "failed" / f"{base['trial_id']}.json",
                          {**base, "status": "failed", "reason": reason})
    except Exception:  # noqa: BLE001 - never hide the trial's own error behind a logging one
        pass


def warn_errored(results, what: str) -> None:
    """Errored trials do not stop the sweep; each is listed with its reason."""
    for r in results:
        if r.error is not None:
            cause = find_cause(r.error)
            lines = [ln.strip() for ln in str(r.error).splitlines() if ln.strip()]
            why = str(cause) if cause is not None else (lines[-1] if lines else type(r.error).__name__)
            print(f"warning: a {what} trial failed: {why[:300]}")


def load_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every finished trial's record (written atomically at the end of the trial)."""
    return [json.loads(p.read_text()) for p in sorted((Path(sweep_dir) / "trials").glob("*.json"))]


def load_failed(sweep_dir: Path) -> list[dict[str, Any]]:
    """Records of trials that raised (status "failed", reason), minus those finished by a later resume
    and those the scheduler stopped (a stopped trial may see its trainer die before it sees the stop)."""
    done = {p.stem for p in (Path(sweep_dir) / "trials").glob("*.json")} | \
        {p.stem for p in (Path(sweep_dir) / "trials" / "stopped").glob("*.json")}
    return [json.loads(p.read_text()) for p in sorted((Path(sweep_dir) / "trials" / "failed").glob("*.json"))
            if p.stem not in done]


def mark_stopped(client: Any, rec: Mapping[str, Any]) -> None:
    """A stopped trial's MLflow run: KILLED, tagged ``stopped_early`` with its epoch, no failure
    reason (idempotent: the driver applies it when it records the stop and again at the sweep's end,
    after any late failure handler of the stopped trial's own process)."""
    run_id = rec.get("mlflow_run_id")
    if not run_id:
        return
    client.set_tag(run_id, "mike_ray.status", "stopped_early")
    client.set_tag(run_id, "mike_ray.stopped_at_epoch", str(rec["epochs"]))
    if "mike_ray.failure_reason" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "mike_ray.failure_reason")
    client.set_terminated(run_id, status="KILLED")


def load_stopped(sweep_dir: Path) -> list[dict[str, Any]]:
    """Records of search trials the scheduler stopped early (``study.scheduler``), minus any finished
    by a later resume."""
    done = {p.stem for p in (Path(sweep_dir) / "trials").glob("*.json")}
    return [json.loads(p.read_text()) for p in sorted((Path(sweep_dir) / "trials" / "stopped").glob("*.json"))
            if p.stem not in done]
