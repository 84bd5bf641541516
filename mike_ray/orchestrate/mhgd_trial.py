"""One MHGD Tune trial: classifier shards → one-worker TorchTrainer → accuracy → Tune + MLflow.

The MHGD counterpart of :func:`mike_ray.orchestrate.tuning.trial_fn`: same MLflow child run (re-opened
on resume), same "trial record written last" rule, the objective is the student's best val accuracy.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mike_ray.config import SweepConfig
from mike_ray.tracking import RunLogger, Tracking


def mhgd_settings(cfg: SweepConfig, params: dict[str, Any]):
    """A trial's params → (its MHGDConfig, teacher subset name, teacher names)."""
    run = cfg.mhgd_run(params)
    run = run.model_copy(update={"seed": cfg.mhgd.seed + int(params.get("__trial_index__", 0) or 0)})
    subset = params.get("teacher_subset") or next(iter(cfg.teacher_subsets))
    return run, subset, cfg.subset(subset)


def mhgd_trial_fn(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """One MHGD trial (see the module docstring); ``ctx`` is built by ``run_trials``."""
    import ray
    import ray.tune

    from mike_ray.data.classification import ClassificationData
    from mike_ray.mhgd.shard import ShardTeachers
    from mike_ray.orchestrate.classify import classifier_refs, run_mhgd
    from mike_ray.models.registry import import_archs
    from mike_ray.orchestrate.tuning import _fail_trial, _finish_trial, _trial_run

    t_start = time.perf_counter()
    cfg = SweepConfig.model_validate(ctx["sweep"])
    tracking = Tracking(**ctx["tracking"])
    params = dict(config)
    run_cfg, subset, teachers = mhgd_settings(cfg, params)
    trial_id = ray.tune.get_context().get_trial_id()
    sweep_dir = Path(ctx["sweep_dir"])
    done = sweep_dir / "trials" / f"{trial_id}.json"
    if done.is_file():  # finished before the driver died: report, do not re-run
        ray.tune.report(final_metrics(json.loads(done.read_text())))
        return
    data = ClassificationData.model_validate(ctx["classification"])
    zoo_dir = Path(ctx["classifier_zoo_dir"])
    shown = {k: v for k, v in params.items() if not k.startswith("__")}
    method = run_cfg.method
    uses_teachers = method != "student"
    run = _trial_run(tracking, ctx["parent_id"], trial_id, cfg.name, {
        "mike_ray.teacher_subset": subset if uses_teachers else "-", "mike_ray.method": method,
        "mike_ray.seed": str(run_cfg.seed)})
    run.params({"trial": shown, "mhgd": run_cfg.model_dump(mode="json"),
                "teachers": ",".join(teachers) if uses_teachers else "", "teacher_subset": subset,
                "classification": data.model_dump(mode="json")})
    base = {"trial_id": trial_id, "family": "mhgd", "method": method, "subset": subset if uses_teachers else "-",
            "teachers": teachers if uses_teachers else [], "params": shown, "seed": run_cfg.seed,
            "mlflow_run_id": run.run_id}
    try:
        # --- the student's run: shards in this trial's placement group, the worker in Train's own -------
        refs = classifier_refs(zoo_dir, teachers, import_archs(cfg.model_dump(mode="json")))
        shards = None
        if uses_teachers and cfg.resources.placement.mode == "ray":
            pg = ray.util.get_current_placement_group()
            shards = ShardTeachers(refs, run_cfg, cfg.resources.placement, placement_group=pg, first_bundle=1)
        try:
            res = run_mhgd(run_cfg, data, refs, cfg.resources.placement, cfg.resources.workers,
                           sweep_dir / "runs", trial_id, shards=shards)
        finally:
            if shards is not None:
                shards.shutdown()
        for h in res.history:
            run.metrics({k: v for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))
        run.tags({"mike_ray.checkpoint": res.checkpoint_path})

        # --- the record, the trial's artifacts, then Tune -------------------------------------------------
        from mike_ray.mhgd.zoo import read_classifier_zoo

        zoo = read_classifier_zoo(zoo_dir)
        record = {**base, "status": "finished", "score": res.best_acc, "best_acc": res.best_acc,
                  "last_acc": res.last_acc, "teacher_acc": {t: zoo[t]["best_acc"] for t in teachers},
                  "checkpoint": res.checkpoint_path, "retries": res.retries,
                  "train_seconds": sum(h.get("time/epoch_s", 0.0) for h in res.history),
                  "trial_seconds": time.perf_counter() - t_start}
        _artifacts(run, record, res.history)
        _finish_trial(run, done, record, final_metrics(record))
    except BaseException as err:
        _fail_trial(run, sweep_dir, base, err)
        raise


def final_metrics(record: dict[str, Any]) -> dict[str, float]:
    """What a finished MHGD trial reports to Tune (and MLflow)."""
    return {"acc/best": record["best_acc"], "acc/last": record["last_acc"],
            "shard/retries_total": float(record.get("retries", 0))}


def _artifacts(run: RunLogger, record: dict[str, Any], history: list[dict[str, float]]) -> None:
    """The accuracy curve (val and train per epoch) and the trial record."""
    import tempfile

    from mike_ray.report.plots import accuracy_curve

    with tempfile.TemporaryDirectory() as d:
        run.artifact(accuracy_curve(history, Path(d) / "accuracy.png",
                                    f"{record['method']} (seed {record['seed']})"), "plots")
    run.dict_artifact(record, "trial.json")
