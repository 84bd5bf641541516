"""The Tuner level: Ray Tune + Optuna over a family's trials, one MLflow child run per trial.

The search space, each trial's placement group (the trial driver's bundle + one per teacher shard,
so an autoscaler sees the teachers' demand) and the Tuners: the family's baselines and controls,
then the search. What one trial does is the family's trial function
(:mod:`mike_ray.orchestrate.mike_trial`, :mod:`mike_ray.orchestrate.mhgd_trial`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from mike_ray.config import Range, SweepConfig
from mike_ray.models.spec import import_archs
from mike_ray.utils import verbose
from mike_ray.orchestrate.family import Family, family_of
from mike_ray.orchestrate.records import TrialContext, load_records, mark_stopped, warn_errored
from mike_ray.tracking import Tracking


# --- the search space (define-by-run: num_phases only exists for layerwise_progressive) ----------
def _suggest(trial, name: str, dim: Any) -> Any:
    if isinstance(dim, Range):
        if dim.int:
            return trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))
        return trial.suggest_float(name, dim.low, dim.high, log=dim.log, step=dim.step)
    return trial.suggest_categorical(name, list(dim))


class DefineByRun:
    """An Optuna define-by-run space over the sweep's search dimensions (picklable: Tune saves the
    searcher with the experiment state, which is what ``--resume`` restores)."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.search = cfg.search
        self.default_schedule = cfg.transfer.schedule.name

    def __call__(self, trial) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        for name in ("teacher_subset", "method", "embed_channels", "schedule", "pretrain_fraction", "lr",
                     "num_heads", "phase1_epochs"):
            dim = getattr(self.search, name)
            if dim is not None:
                out[name] = _suggest(trial, name, dim)
        # num_phases only exists for the layerwise-progressive schedule
        if self.search.num_phases is not None and out.get("schedule", self.default_schedule) == "layerwise_progressive":
            out["num_phases"] = _suggest(trial, "num_phases", self.search.num_phases)
        return out or None


def _shard_count(cfg: SweepConfig, n_teachers: int) -> int:
    from mike_ray.pool import shard_count

    p = cfg.resources.placement
    return shard_count(n_teachers, p.teachers_per_shard, p.num_shards)


def trial_resources(cfg: SweepConfig, family: Family, methods: list[str], n_teachers: int):
    """Placement group of one trial: the driver's bundle + one bundle per teacher shard (when any of
    the Tuner's ``methods`` needs teachers: a Tuner's trials share one resource shape)."""
    from ray.tune import PlacementGroupFactory

    # the driver's bundle: on the head (a sliver of the resource only a head has) unless told otherwise
    bundles = [{"CPU": max(cfg.resources.trial_cpus, 0.01),
                **({"node:__internal_head__": 0.001} if cfg.resources.trial_on_head else {})}]
    p = cfg.resources.placement
    if p.mode == "ray" and any(m not in family.teacherless for m in methods):
        bundles += [p.bundle for _ in range(_shard_count(cfg, n_teachers))]
    return PlacementGroupFactory(bundles, strategy="PACK")


def search_space(cfg: SweepConfig, seeds: Any) -> dict[str, Any]:
    """The grid search's param space: every combination of the search's choice lists × ``seeds``."""
    import ray.tune

    space = {name: ray.tune.grid_search(list(dim)) for name, dim in cfg.search if dim is not None}
    space["__trial_index__"] = seeds
    return space


def trial_context(cfg: SweepConfig, data_root: Path | None, zoo_dir: Path, tracking: Tracking | None,
                  parent_id: str, sweep_dir: Path, family: Family | None = None) -> TrialContext:
    """The frozen context every trial of this sweep receives: its slice of the config, not the config."""
    return TrialContext(
        sweep=cfg.name, sweep_dir=sweep_dir, tracking=tracking, parent_id=parent_id, method=cfg.method,
        subsets={name: tuple(cfg.subset(name)) for name in cfg.teacher_subsets},
        placement=cfg.resources.placement, workers=cfg.resources.workers,
        import_archs=tuple(sorted(import_archs(cfg.model_dump(mode="json")))),
        data_root=data_root, zoo_dir=zoo_dir, settings=(family or family_of(cfg)).settings(cfg, data_root),
        system_metrics=cfg.mlflow.system_metrics, report_epochs=cfg.study.scheduler is not None)


# --- the Tuners ---------------------------------------------------------------------------------------
def _tuner(trainable, name: str, storage: Path, tune_config, param_space, resume: bool):
    import ray.tune

    path = storage / name
    if resume and ray.tune.Tuner.can_restore(str(path)):
        # finished trials are kept; interrupted and errored ones run again (re-opening their MLflow run)
        return ray.tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    return ray.tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                          run_config=ray.tune.RunConfig(name=name, storage_path=str(storage),
                                                        failure_config=ray.tune.FailureConfig(max_failures=0),
                                                        # Tune's status table every few seconds: --verbose
                                                        # only; each trial prints its own line when it ends
                                                        verbose=1 if verbose() else 0))


def _scheduler(cfg: SweepConfig):
    """``study.scheduler`` as a Tune scheduler (None: every trial runs to its end). Trials then report
    every epoch, and the objective only at their end (see :func:`_lenient_metrics`)."""
    sched = cfg.study.scheduler
    if sched is None:
        return None
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        """ASHA that remembers whom it stopped (Tune's results do not say why a trial ended)."""

        stopped: set[str]

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP:
                self.stopped = getattr(self, "stopped", set()) | {trial.trial_id}
            return action

    # one report per transfer epoch, then the final one (no per-epoch metric: ASHA lets it pass);
    # stop_last_trials=False: a trial that reached the last rung is never stopped there
    return RecordingASHA(time_attr="training_iteration", metric=sched.metric, mode=sched.mode,
                         max_t=cfg.transfer.epochs + 1, grace_period=sched.grace_period,
                         reduction_factor=sched.reduction_factor, stop_last_trials=False)


@contextmanager
def _lenient_metrics(on: bool) -> Iterator[None]:
    """Tune checks that every result carries the searcher's and the scheduler's metric; with a
    scheduler, per-epoch results lack the objective and the final one the per-epoch metric. Tune's
    own switch turns the check off, for this Tuner only."""
    key = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
    before = os.environ.get(key)
    if on:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if on:
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before


def _final_result_optuna():
    """OptunaSearch that learns from a trial's final result only: the per-epoch reports a scheduler
    needs do not carry the objective (the downstream score exists only at the end)."""
    from ray.tune.search.optuna import OptunaSearch

    class FinalResultOptuna(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            return

    return FinalResultOptuna


def record_stopped(results, ctx: TrialContext, stopped: set[str]) -> list[dict[str, Any]]:
    """Trials the scheduler stopped (``stopped``: their Tune ids, as it recorded them; a trial cut off
    by Ctrl-C is not one of them). Each gets a ``trials/stopped/<id>.json`` record and its MLflow run
    ends KILLED, tagged ``stopped early`` with the epoch it was stopped at."""
    import mlflow

    from mike_ray.utils import write_json_atomic

    out = []
    client = mlflow.MlflowClient(ctx.tracking.uri) if ctx.tracking is not None else None
    for r in results:
        tid = (r.metrics or {}).get("trial_id")
        if tid not in stopped or ctx.record_path(tid).is_file():  # finished before the stop took effect
            continue
        # the stop kills the trial's Train controller, which the trial may have seen as a failure first
        (ctx.sweep_dir / "trials" / "failed" / f"{tid}.json").unlink(missing_ok=True)
        rec = {"trial_id": tid, "status": "stopped", "epochs": int(r.metrics.get("training_iteration", 0)),
               "params": {k: v for k, v in (r.config or {}).items() if not k.startswith("__")},
               # the val losses it was ranked on (loss/val/teacher, loss/val/pixel_mse), not its every term
               "last": {k: v for k, v in r.metrics.items() if k.startswith("loss/val/") and k.count("/") == 2}}
        if client is not None:
            found = client.search_runs([ctx.tracking.experiment_id()],
                                       f"tags.`mike_ray.trial_id` = '{tid}' and tags.`mlflow.parentRunId` = "
                                       f"'{ctx.parent_id}'", max_results=1)
            if found:
                rec.update(method=found[0].data.tags.get("mike_ray.method"), run_name=found[0].info.run_name,
                           mlflow_run_id=found[0].info.run_id)
                mark_stopped(client, rec)
        write_json_atomic(ctx.sweep_dir / "trials" / "stopped" / f"{tid}.json", rec)
        out.append(rec)
    return out


def run_trials(cfg: SweepConfig, data_root: Path | None, zoo_dir: Path, tracking: Tracking, parent_id: str,
               resume: bool = False, family: Family | None = None) -> list[dict[str, Any]]:
    """The family's extra studies (baselines, controls), then the search; returns the trial records."""
    import ray.tune
    from ray.tune.search import ConcurrencyLimiter, Repeater

    family = family or family_of(cfg)
    sweep_dir = cfg.output_dir() / "sweeps" / cfg.name
    if sweep_dir.exists() and not resume:
        # a new run of the same sweep: keep the previous one's files beside it, start clean
        import time

        sweep_dir.rename(sweep_dir.with_name(f"{cfg.name}.{time.strftime('%Y%m%d-%H%M%S')}"))
    storage = sweep_dir / "tune"
    ctx = trial_context(cfg, data_root, zoo_dir, tracking, parent_id, sweep_dir, family)
    study = cfg.study
    seeds = ray.tune.grid_search(list(range(study.repeats)))

    def trainable(methods: list[str], n_teachers: int):
        return ray.tune.with_resources(ray.tune.with_parameters(family.trial_fn, ctx=ctx),
                                       trial_resources(cfg, family, methods, n_teachers))

    # --- baselines and controls first: every search trial's matched pair exists when it finishes ------
    for name, methods, space in family.extra_studies(cfg, seeds):
        tuner = _tuner(trainable(methods, 0), name, storage,
                       ray.tune.TuneConfig(max_concurrent_trials=study.concurrency), space, resume)
        warn_errored(tuner.fit(), name.rstrip("s"))

    # --- the search: every combination (grid) or an Optuna study -------------------------------------
    n_max = max(len(cfg.subset(s)) for s in cfg.teacher_subsets)
    scheduler = _scheduler(cfg)
    if study.algorithm == "grid":
        space = search_space(cfg, seeds)
        tune_config = ray.tune.TuneConfig(max_concurrent_trials=study.concurrency, scheduler=scheduler)
    else:
        searcher = _final_result_optuna()(space=DefineByRun(cfg), metric=study.objective, mode=study.direction,
                                          seed=study.seed)
        if study.repeats > 1:
            searcher = Repeater(searcher, repeat=study.repeats, set_index=True)
        searcher = ConcurrencyLimiter(searcher, max_concurrent=study.concurrency)
        space = {}
        tune_config = ray.tune.TuneConfig(search_alg=searcher, num_samples=study.trials * study.repeats,
                                          scheduler=scheduler)
    tuner = _tuner(trainable(list(cfg.search.method or [cfg.method]), n_max), "search", storage, tune_config,
                   space, resume)
    with _lenient_metrics(scheduler is not None):
        results = tuner.fit()
    warn_errored(results, "search")
    if scheduler is not None:
        record_stopped(results, ctx, getattr(scheduler, "stopped", set()))
    return load_records(sweep_dir)
