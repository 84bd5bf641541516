"""``study.scheduler``: ASHA stops a search trial that is clearly behind, on a real smoke sweep."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from mike_ray.config import load_sweep
from mike_ray.errors import ConfigError
from mike_ray.orchestrate.driver import run_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "demo.yaml"


def test_the_scheduler_is_checked_as_it_loads(tmp_path) -> None:
    def load(*sets: str):
        return load_sweep(SWEEP, [f"output={tmp_path}", *sets], profile="smoke")

    mike = load("study.scheduler={}")
    assert (mike.study.scheduler.metric, mike.study.scheduler.mode) == ("loss/val/teacher", "min")
    for sets, says in [
        (["study.scheduler={reduction_factor: 1}"], "study.scheduler.reduction_factor"),
        (["study.scheduler={metric: loss/val/pixel_mse}"], "study.scheduler.mode: required"),
        (["study.scheduler={metric: acc/val, mode: max}"], "is not reported every epoch"),
        (["study.scheduler={}", "teacher_subsets={one: [DCH], three: [DCH, CTB, PHB]}",
          "search.teacher_subset=[one, three]"], "do not rank them"),
        (["study.scheduler={metric: loss/train/total, mode: min}", "teacher_subsets={one: [DCH], "
          "three: [DCH, CTB, PHB]}", "search.teacher_subset=[one, three]"], "do not rank them"),
    ]:
        with pytest.raises(ConfigError, match=says):
            load(*sets)
    assert load("study.scheduler={metric: loss/val/pixel_mse, mode: min}", "teacher_subsets={one: [DCH], "
                "three: [DCH, CTB, PHB]}", "search.teacher_subset=[one, three]").study.scheduler.mode == "min"
    with pytest.raises(ConfigError, match="MIKE sweeps only"):
        load_sweep(ROOT / "sweeps" / "mhgd_methods.yaml", [f"output={tmp_path}", "study.scheduler={}"],
                   profile="smoke")


@pytest.mark.slow
def test_asha_stops_a_trial_that_is_clearly_behind_and_records_it(ray_local, tmp_path) -> None:
    """Two search trials, 2 transfer epochs each, run one after the other: learning rate 0.004 and
    1e-6. After its first epoch the second one's val teacher loss is far behind the first's at the
    same epoch, so ASHA (grace period 1, halving) stops it; it is recorded as stopped early, its
    MLflow run ends KILLED with the epoch, and the other trial finishes with all its epochs."""
    cfg = load_sweep(SWEEP, [f"output={tmp_path}", "study.scheduler={grace_period: 1}", "study.baselines=false",
                             "study.control=false", "search.lr=[0.004, 0.000001]", "transfer.epochs=2"],
                     profile="smoke")
    summary = run_sweep(cfg, SWEEP)
    assert [t["params"]["lr"] for t in summary.trials] == [0.004]
    (stopped,) = summary.stopped
    assert not summary.failed  # the stop is not a failure, whatever the trial saw when its trainer went
    assert stopped["params"]["lr"] == 1e-6 and stopped["epochs"] == 1 and stopped["method"] == "mike"
    assert "stopped early by the scheduler: mike three lr=1e-06" in summary.report()
    assert json.loads((cfg.output_dir() / "sweeps" / cfg.name / "trials" / "stopped" /
                       f"{stopped['trial_id']}.json").read_text())["status"] == "stopped"
    client = mlflow.MlflowClient(summary.tracking.uri)
    run = client.get_run(stopped["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["mike_ray.status"] == "stopped_early"
    assert run.data.tags["mike_ray.stopped_at_epoch"] == "1"
    assert client.get_run(summary.parent_run_id).data.metrics["trials/stopped_early"] == 1.0
    finished = client.get_run(summary.trials[0]["mlflow_run_id"])
    assert len(client.get_metric_history(finished.info.run_id, "loss/val/teacher")) == 2
    # the stopped trial's trainer workers are released too (Train's placement-group cleaner), so the
    # CPUs are free for what comes next
    import time

    import ray

    deadline = time.time() + 30
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"], ray.available_resources()
