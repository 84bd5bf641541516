"""The MHGD family: one trial (classifier shards → one-worker TorchTrainer → accuracy), its
student-alone baseline, its accuracy table.

The counterpart of :mod:`mike_ray.orchestrate.mike_trial`, with the same bookkeeping
(:mod:`mike_ray.orchestrate.records`); the objective is the student's best val accuracy.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mike_ray.config import SweepConfig
from mike_ray.config_base import StrictModel
from mike_ray.data.sources import ClassificationData
from mike_ray.mhgd.config import MHGDConfig
from mike_ray.orchestrate.records import TrialContext, begin_trial, log_data, log_trained_model, shown_params
from mike_ray.tracking import RunLogger, Tracking, system_metrics
from mike_ray.utils import config_key

#: the searched dimensions a trial's params may set on its MHGDConfig
SEARCHED = ("method", "lr", "num_heads", "phase1_epochs")


class MHGDSettings(StrictModel):
    """The MHGD slice of a sweep config that a trial needs: the base run (method = the sweep's) and
    the classification data (root resolved)."""

    mhgd: MHGDConfig
    classification: ClassificationData


def mhgd_settings(ctx: TrialContext, params: dict[str, Any]) -> tuple[MHGDConfig, str, list[str]]:
    """A trial's params → (its MHGDConfig, teacher subset name, teacher names)."""
    base = ctx.settings.mhgd
    update = {k: params[k] for k in SEARCHED if k in params}
    run = MHGDConfig.model_validate({**base.model_dump(), **update,
                                     "seed": base.seed + int(params.get("__trial_index__", 0) or 0)})
    subset, teachers = ctx.subset(params)
    return run, subset, teachers


def mhgd_trial_fn(config: dict[str, Any], ctx: TrialContext) -> None:
    """One MHGD trial (see the module docstring)."""
    import ray

    from mike_ray.mhgd.shard import MHGDShardPool
    from mike_ray.mhgd.zoo import read_classifier_zoo
    from mike_ray.orchestrate.classify import classifier_refs, run_mhgd

    t_start = time.perf_counter()
    params = dict(config)
    run_cfg, subset, teachers = mhgd_settings(ctx, params)
    data = ctx.settings.classification
    method = run_cfg.method
    uses_teachers = method != "student"
    trial = begin_trial(ctx, params, family="mhgd", method=method, subset=subset if uses_teachers else "-",
                        teachers=teachers if uses_teachers else [], seed=run_cfg.seed, report=final_metrics)
    if trial is None:  # finished before the driver died: its stored result was re-reported
        return
    trial_id, run = trial.trial_id, trial.run
    run.params({"trial": shown_params(params), "mhgd": run_cfg.model_dump(mode="json"),
                "teachers": ",".join(teachers) if uses_teachers else "", "teacher_subset": subset,
                "classification": data.model_dump(mode="json")})
    with trial.failing(), system_metrics(run, ctx.system_metrics):
        if data.source == "crops":  # the classification data as an MLflow dataset input
            log_data(run, data.root, "train", data.tasks, "classification/train")
            log_data(run, data.root, "val", data.tasks, "classification/validation")
        else:
            run.dataset(f"{data.source}:{data.root}", data.root, config_key(data.model_dump(mode="json")),
                        {"limit_train": data.limit_train, "limit_val": data.limit_val}, "classification")
        # --- the student's run: shards in this trial's placement group, the worker in Train's own -------
        refs = classifier_refs(ctx.zoo_dir, teachers, ctx.import_archs)
        shards = None
        if uses_teachers and ctx.placement.mode == "ray":
            shards = MHGDShardPool(refs, run_cfg, ctx.placement,
                                   placement_group=ray.util.get_current_placement_group(), first_bundle=1)
        try:
            res = run_mhgd(run_cfg, data, refs, ctx.placement, ctx.workers, ctx.sweep_dir / "runs", trial_id,
                           shards=shards, report_epochs=ctx.report_epochs)
        finally:
            if shards is not None:
                shards.shutdown()
        for h in res.history:
            run.metrics({k: v for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))
        run.tags({"mike_ray.checkpoint": res.checkpoint_path})

        # --- the record, the trial's artifacts, then Tune -------------------------------------------------
        zoo = read_classifier_zoo(ctx.zoo_dir)
        record = {**trial.base, "status": "finished", "score": res.best_acc, "best_acc": res.best_acc,
                  "last_acc": res.last_acc, "teacher_acc": {t: zoo[t]["best_acc"] for t in teachers},
                  "checkpoint": res.checkpoint_path, "retries": res.retries,
                  "train_seconds": sum(h.get("time/epoch_s", 0.0) for h in res.history),
                  "trial_seconds": time.perf_counter() - t_start}
        _artifacts(run, record, res.history)
        # the student's class count is the data's, as the zoo's teachers recorded it
        classes = next(iter(zoo.values()))["model"]["num_classes"]
        model_id = log_trained_model(run, {**run_cfg.student.model_dump(), "num_classes": classes}, res.state,
                                     data.image_size or (32 if data.source == "cifar100" else 64), "student")
        trial.finish(record, final_metrics(record), model_id)


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


# --- the family: what the sweep driver and the Tuner ask of MHGD ------------------------------------
class MHGDFamily:
    """MHGD and its baselines (classifier student + accuracy): see :class:`~.family.Family`."""

    name = "mhgd"
    baseline = "student"
    teacherless = frozenset({"student"})
    trial_fn = staticmethod(mhgd_trial_fn)

    def stages(self, cfg: SweepConfig, out: Path, tracking: Tracking, parent_id: str) -> tuple[Path | None, Path]:
        from mike_ray.orchestrate.stages import ensure_classifier_zoo, ensure_data

        data_root = ensure_data(cfg.data, out) if cfg.classification.source == "crops" else None
        return data_root, ensure_classifier_zoo(cfg.classifier_zoo, cfg.classification, data_root, out, tracking,
                                                parent_id)

    def settings(self, cfg: SweepConfig, data_root: Path | None) -> MHGDSettings:
        return MHGDSettings(mhgd=cfg.mhgd_run(), classification=cfg.classification.resolve(data_root))

    def extra_studies(self, cfg: SweepConfig, seeds: Any) -> list[tuple[str, list[str], dict[str, Any]]]:
        """The student alone, one per seed (the floor every distillation method must beat)."""
        if cfg.study.baselines and "student" not in (cfg.search.method or [cfg.method]):
            return [("baselines", ["student"], {"method": "student", "__trial_index__": seeds})]
        return []

    def teacher_table(self, zoo_dir: Path) -> dict[str, dict[str, float]]:
        from mike_ray.mhgd.zoo import read_classifier_zoo

        return {n: {"best_acc": r["best_acc"], "last_acc": r["last_acc"]}
                for n, r in read_classifier_zoo(zoo_dir).items()}

    def plan_lines(self, cfg: SweepConfig) -> list[str]:
        if cfg.study.baselines and "student" not in (cfg.search.method or [cfg.method]):
            return [f"  + {cfg.study.repeats} student-alone baseline(s): one per seed"]
        return []

    def accuracy_table(self, summary: Any) -> str:
        """The Markdown accuracy table (teachers first, then each configuration's mean ± std)."""
        from mike_ray.report.tables import accuracy_table

        return accuracy_table(summary.trials, {n: t["best_acc"] for n, t in summary.teachers.items()},
                              summary.failed)

    def report_lines(self, summary: Any) -> list[str]:
        return ["  val accuracy, mean ± std over seeds:"] + \
            ["    " + ln for ln in self.accuracy_table(summary).splitlines()]

    def log_summary(self, client: Any, parent_id: str, summary: Any) -> None:
        """The accuracy table (Markdown + JSON) on the parent run."""
        import json
        import tempfile

        from mike_ray.report.tables import accuracy_rows

        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            (d / "accuracy_table.md").write_text(self.accuracy_table(summary) + "\n")
            (d / "accuracy_table.json").write_text(json.dumps(
                {"rows": accuracy_rows(summary.trials), "teachers": summary.teachers, "trials": summary.trials,
                 "failed": summary.failed}, indent=2, default=str))
            client.log_artifact(parent_id, str(d / "accuracy_table.md"))
            client.log_artifact(parent_id, str(d / "accuracy_table.json"))
        rows = accuracy_rows(summary.trials)
        if rows:
            client.log_metric(parent_id, "acc/best_mean_of_best_config", rows[0]["best_mean"] / 100)
