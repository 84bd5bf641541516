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

from mike_ray.config import SweepConfig
from mike_ray.orchestrate.family import FAMILIES, Family, family_of
from mike_ray.orchestrate.records import load_failed, load_stopped, mark_stopped
from mike_ray.orchestrate.tuning import run_trials
from mike_ray.tracking import RunLogger, Tracking


@dataclass
class SweepSummary:
    """What a sweep leaves behind, and the lines printed at its end."""

    name: str
    output: Path
    data_root: Path | None
    zoo_dir: Path
    tracking: Tracking
    parent_run_id: str
    teachers: dict[str, dict[str, float]] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    family: str = "mike"
    stopped: list[dict[str, Any]] = field(default_factory=list)  # by study.scheduler, before their end

    def accuracy_table(self) -> str:
        """MHGD: the Markdown accuracy table (teachers first, then each configuration's mean ± std)."""
        return FAMILIES["mhgd"].accuracy_table(self)

    def report(self) -> str:
        lines = [f"sweep '{self.name}'", f"  outputs:       {self.output}",
                 f"  data:          {self.data_root}", f"  teacher zoo:   {self.zoo_dir}"]
        lines += FAMILIES[self.family].report_lines(self)
        for f in self.failed:
            lines.append(f"  FAILED trial {f['trial_id']} ({f['method']}, seed {f['seed']}): {f.get('reason', '')}")
        for t in self.stopped:
            lines.append(f"  stopped early by the scheduler: {t.get('run_name') or t['trial_id']} after "
                         f"{t['epochs']} epoch(s)")
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
    return "\n".join(lines + family_of(cfg).plan_lines(cfg))


def _find_parent_run(tracking: Tracking, name: str) -> str | None:
    """The newest unfinished-or-finished parent run of sweep ``name`` (for --resume)."""
    import mlflow

    client = mlflow.MlflowClient(tracking.uri)
    runs = client.search_runs([tracking.experiment_id()],
                              filter_string=f"tags.`mike_ray.sweep` = '{name}' and tags.`mike_ray.stage` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def run_sweep(cfg: SweepConfig, sweep_file: str | Path, resume: bool = False,
              family: Family | None = None) -> SweepSummary:
    """Stages (data, zoo) then trials, under one MLflow parent run. Requires ``ray.init``.

    ``family`` defaults to the sweep method's (:func:`~.family.family_of`); the Tuner bookkeeping
    tests pass one whose trials take milliseconds."""
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
        logger = RunLogger(client, parent_id)
        logger.params(cfg.resolved())
        logger.dict_artifact(cfg.resolved(), "resolved_config.json")
    else:
        client.update_run(parent_id, status="RUNNING")

    status = "FAILED"
    try:
        # --- stages: built once, keyed by config, re-used by every trial -----------------------
        family = family or family_of(cfg)
        data_root, zoo_dir = family.stages(cfg, out, tracking, parent_id)
        summary = SweepSummary(cfg.name, out, data_root, zoo_dir, tracking, parent_id, family=family.name)
        summary.teachers = family.teacher_table(zoo_dir)
        # --- trials ------------------------------------------------------------------------------
        summary.trials = run_trials(cfg, data_root, zoo_dir, tracking, parent_id, resume=resume, family=family)
        summary.failed = load_failed(out / "sweeps" / cfg.name)
        summary.stopped = load_stopped(out / "sweeps" / cfg.name)
        for rec in summary.stopped:  # again: a stopped trial's own process may have tagged it failed since
            mark_stopped(client, rec)
        client.log_metric(parent_id, "trials/finished", float(len(summary.trials)))
        client.log_metric(parent_id, "trials/stopped_early", float(len(summary.stopped)))
        client.log_metric(parent_id, "trials/failed", float(len(summary.failed)))
        family.log_summary(client, parent_id, summary)
        status = "FINISHED"
        return summary
    finally:
        client.set_terminated(parent_id, status=status)
