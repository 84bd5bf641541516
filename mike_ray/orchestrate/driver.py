"""The sweep driver: stages, then trials (Tune + Optuna), then the sweep's summary.

Levels (DESIGN.md): this driver → one trial function per trial (shards + TorchTrainer) → the
training loop. Each level sees only its own slice of the configuration.
"""
from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mike_ray.config import SearchConfig, SweepConfig
from mike_ray.orchestrate.stages import ensure_data, ensure_zoo
from mike_ray.tracking import Tracking, start_run


@dataclass
class SweepSummary:
    """What a sweep leaves behind, and the lines printed at its end."""

    name: str
    output: Path
    data_root: Path
    zoo_dir: Path
    tracking: Tracking
    parent_run_id: str
    teachers: dict[str, dict[str, float]] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    family: str = "mike"

    def accuracy_table(self) -> str:
        """MHGD: the Markdown accuracy table (teachers first, then each configuration's mean ± std)."""
        from mike_ray.report.tables import accuracy_table

        return accuracy_table(self.trials, {n: t["best_acc"] for n, t in self.teachers.items()}, self.failed)

    def report(self) -> str:
        lines = [f"sweep '{self.name}'", f"  outputs:       {self.output}",
                 f"  data:          {self.data_root}", f"  teacher zoo:   {self.zoo_dir}"]
        if self.family == "mhgd":
            from mike_ray.report.tables import accuracy_table

            lines.append("  val accuracy, mean ± std over seeds:")
            lines += ["    " + ln for ln in self.accuracy_table().splitlines()]
        elif self.teachers:
            lines.append("  teachers (val mIoU | test mIoU | untrained | chance):")
            for name, t in self.teachers.items():
                weak = any(not m > t["chance_miou"] for m in (t["val_miou"], t["test_miou"]))
                lines.append(f"    {name:4s} {t['val_miou']:.3f} | {t['test_miou']:.3f} | {t['untrained_miou']:.3f} "
                             f"| {t['chance_miou']:.3f}" + ("   not above chance: its task is not normalised (—)"
                                                             if weak else ""))
        if self.trials and self.family == "mike":
            from mike_ray.report.tables import trial_table

            lines.append(trial_table(self.trials))
        for f in self.failed:
            lines.append(f"  FAILED trial {f['trial_id']} ({f['method']}, seed {f['seed']}): {f.get('reason', '')}")
        lines += [f"  MLflow store:  {self.tracking.uri}  (experiment '{self.tracking.experiment}', "
                  f"parent run {self.parent_run_id})",
                  f"  open the UI:   {self.tracking.ui_hint()}"]
        return "\n".join(lines)


def git_commit() -> str:
    """The code's git commit (or 'unknown' outside a checkout, e.g. a `ray job` working dir)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def trial_plan(cfg: SweepConfig) -> str:
    """Human-readable plan for ``--dry-run``."""
    s = cfg.study
    dims = {k: v for k, v in cfg.search.model_dump().items() if v is not None}
    if s.algorithm == "grid":
        n = math.prod(len(v) for _, v in cfg.search if v is not None)
        head = f"plan: grid of {n} configuration(s) × {s.repeats} seed(s)"
    else:
        head = f"plan: {s.trials} Optuna trial(s) × {s.repeats} seed(s)"
    lines = [f"{head}, concurrency {s.concurrency}, objective {s.objective} ({s.direction}), method {cfg.method}",
             f"  search: {dims or 'nothing (fixed settings)'}",
             f"  teacher subsets: {({k: cfg.subset(k) for k in cfg.teacher_subsets})}"]
    models = math.prod(len(getattr(cfg.search, n) or [None]) for n in SearchConfig.MODEL_DIMS)
    if s.baselines and cfg.method == "mike":
        subsets = cfg.search.teacher_subset or [next(iter(cfg.teacher_subsets))]
        lines.append(f"  + {len(subsets) * s.repeats * models} pixel baseline(s): one per searched teacher subset, "
                     f"seed and autoencoder setting ({', '.join(SearchConfig.MODEL_DIMS)})")
    if s.control and cfg.method == "mike":
        lines.append(f"  + {s.repeats * models} control(s): an untrained frozen encoder per seed and autoencoder setting")
    elif s.baselines and cfg.family == "mhgd" and "student" not in (cfg.search.method or [cfg.method]):
        lines.append(f"  + {s.repeats} student-alone baseline(s): one per seed")
    if cfg.method == "mike" and cfg.resources.placement.teachers_per_shard == "auto":
        lines += _shard_plan(cfg)
    return "\n".join(lines)


def _shard_plan(cfg: SweepConfig) -> list[str]:
    """``teachers_per_shard: auto``: each searched subset's shards, balanced by expected work (the
    zoo's model FLOPs × its task's share; shares are taken as equal here — the trial balances on the
    prepared data's actual counts and logs its plan as the ``shards`` parameter)."""
    from mike_ray.data.tasks import TASKS
    from mike_ray.teachers.shard import describe_plan, forward_flops, partition

    p = cfg.resources.placement
    lines = [f"  shards (teachers_per_shard: auto, num_shards {p.num_shards}; expected work = forward "
             f"FLOPs × task share, shares assumed equal):"]
    flops: dict[int, float] = {}
    for name in cfg.search.teacher_subset or [next(iter(cfg.teacher_subsets))]:
        teachers = cfg.subset(name)
        work = []
        for t in teachers:
            k = len(TASKS[t])
            if k not in flops:
                flops[k] = forward_flops({**cfg.zoo.model, "num_classes": k}, imports="any")  # the sweep's
            work.append(flops[k] / len(teachers))
        plan = describe_plan(partition(teachers, "auto", work, p.num_shards), work, teachers)
        lines += [f"    {name}: " + plan.replace("\n", " | ")]
    return lines


def _find_parent_run(tracking: Tracking, name: str) -> str | None:
    """The newest unfinished-or-finished parent run of sweep ``name`` (for --resume)."""
    import mlflow

    client = mlflow.MlflowClient(tracking.uri)
    runs = client.search_runs([tracking.experiment_id()],
                              filter_string=f"tags.`mike_ray.sweep` = '{name}' and tags.`mike_ray.stage` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def run_sweep(cfg: SweepConfig, sweep_file: str | Path, resume: bool = False) -> SweepSummary:
    """Stages (data, zoo) then trials, under one MLflow parent run. Requires ``ray.init``."""
    import mlflow

    out = cfg.output_dir()
    tracking = Tracking.resolve(out, cfg.mlflow.experiment, cfg.mlflow.tracking_uri)
    client = mlflow.MlflowClient(tracking.uri)
    parent_id = _find_parent_run(tracking, cfg.name) if resume else None
    if parent_id is None:
        run = client.create_run(tracking.experiment_id(), run_name=f"sweep-{cfg.name}", tags={
            "mike_ray.stage": "sweep", "mike_ray.sweep": cfg.name, "mike_ray.sweep_file": str(sweep_file),
            "mike_ray.git_commit": git_commit(), "mike_ray.method": cfg.method})
        parent_id = run.info.run_id
        from mike_ray.tracking import RunLogger

        logger = RunLogger(client, parent_id)
        logger.params(cfg.resolved())
        logger.dict_artifact(cfg.resolved(), "resolved_config.json")
    else:
        client.update_run(parent_id, status="RUNNING")

    status = "FAILED"
    try:
        # --- stages: built once, keyed by config, re-used by every trial -----------------------
        needs_data = cfg.family == "mike" or cfg.classification.source == "crops"
        data_root = ensure_data(cfg.data, out) if needs_data else None
        if cfg.family == "mike":
            zoo_dir = ensure_zoo(cfg.zoo, data_root, out, tracking, parent_id)
        else:
            from mike_ray.orchestrate.stages import ensure_classifier_zoo

            zoo_dir = ensure_classifier_zoo(cfg.classifier_zoo, cfg.classification, data_root, out, tracking, parent_id)
        summary = SweepSummary(cfg.name, out, data_root, zoo_dir, tracking, parent_id, family=cfg.family)
        summary.teachers = _teacher_table(zoo_dir) if cfg.family == "mike" else _classifier_table(zoo_dir)
        # --- trials ------------------------------------------------------------------------------
        from mike_ray.orchestrate.tuning import load_failed, run_trials

        summary.trials = run_trials(cfg, data_root, zoo_dir, tracking, parent_id, resume=resume)
        summary.failed = load_failed(out / "sweeps" / cfg.name)
        if cfg.family == "mike":
            _log_sweep_summary(client, parent_id, summary)
        else:
            _log_accuracy_summary(client, parent_id, summary)
        status = "FINISHED"
        return summary
    finally:
        client.set_terminated(parent_id, status=status)


def _teacher_table(zoo_dir: Path) -> dict[str, dict[str, float]]:
    from mike_ray.teachers.zoo import read_zoo

    table = {}
    for name, rec in read_zoo(zoo_dir).items():
        table[name] = {"val_miou": rec.val_miou, "test_miou": rec.test_miou, "untrained_miou": rec.untrained_miou,
                       "chance_miou": rec.chance_miou}
    return table


def _classifier_table(zoo_dir: Path) -> dict[str, dict[str, float]]:
    from mike_ray.mhgd.zoo import read_classifier_zoo

    return {n: {"best_acc": r["best_acc"], "last_acc": r["last_acc"]} for n, r in read_classifier_zoo(zoo_dir).items()}


def _log_accuracy_summary(client, parent_id: str, summary: SweepSummary) -> None:
    """The end of an MHGD sweep: the accuracy table (Markdown + JSON) on the parent run."""
    import json
    import tempfile

    from mike_ray.report.tables import accuracy_rows

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "accuracy_table.md").write_text(summary.accuracy_table() + "\n")
        (d / "accuracy_table.json").write_text(json.dumps(
            {"rows": accuracy_rows(summary.trials), "teachers": summary.teachers, "trials": summary.trials,
             "failed": summary.failed}, indent=2, default=str))
        client.log_artifact(parent_id, str(d / "accuracy_table.md"))
        client.log_artifact(parent_id, str(d / "accuracy_table.json"))
    rows = accuracy_rows(summary.trials)
    if rows:
        client.log_metric(parent_id, "acc/best_mean_of_best_config", rows[0]["best_mean"] / 100)
    client.log_metric(parent_id, "trials/failed", float(len(summary.failed)))


def _log_sweep_summary(client, parent_id: str, summary: SweepSummary) -> None:
    """The end of a sweep: the trial table and the combined radar chart (paper fig. 4) on the parent."""
    import tempfile

    from mike_ray.report.plots import radar_chart
    from mike_ray.report.tables import best_per_subset, to_json, trial_table

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "trials.txt").write_text(trial_table(summary.trials) + "\n")
        (d / "trials.json").write_text(to_json(summary.trials))
        client.log_artifact(parent_id, str(d / "trials.txt"))
        client.log_artifact(parent_id, str(d / "trials.json"))
        series = {}
        for subset, rows in best_per_subset(summary.trials).items():
            if "best" in rows:
                series[f"MIKE {subset}"] = rows["best"]["per_task"]
            if "baseline" in rows:
                series[f"pixel {subset}"] = rows["baseline"]["per_task"]
        if series:
            client.log_artifact(parent_id, str(radar_chart(series, d / "radar_best_per_subset.png",
                                                           "best encoder per teacher subset (on val) vs its pixel "
                                                           "baseline: normalised test IoU")),
                                "plots")
    from mike_ray.report.tables import summarize, verdict

    rows = summarize(summary.trials)
    mike = [r for r in rows if r["method"] == "mike" and r["mean"] == r["mean"]]
    if mike:  # the configuration chosen on val, and its test score
        best = max(mike, key=lambda r: r["mean"])
        client.log_metric(parent_id, "score/best_mean_norm_iou", best["mean"])
        if best["test_mean"] == best["test_mean"]:
            client.log_metric(parent_id, "score/test/best_mean_norm_iou", best["test_mean"])
    client.set_tag(parent_id, "mike_ray.verdict", verdict(rows)[:5000])
