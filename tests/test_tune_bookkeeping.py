"""The Tuner level's bookkeeping on a real local Ray, real Tune and a real MLflow store, with trials that
take milliseconds: the sweep driver and the Tuners are MIKE's own (``run_sweep``, ``MikeFamily``'s
baselines and controls, the grid, the records, the MLflow child runs, the report); only the trial's
body — shards, TorchTrainer, downstream — is replaced by a score computed from its params.

What the real sweeps would cost minutes to show (tests/test_sweep_e2e.py keeps one real sweep, with
real faults): a trial that raises is recorded with its one-line reason in Tune, MLflow and the
report, and the sweep goes on; baselines run before the search; ``--resume`` skips finished trials,
re-runs the errored ones in the MLflow run they already had, and a failed record is dropped once its
trial finishes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from mike_ray.config import load_sweep
from mike_ray.errors import TrainingError
from mike_ray.orchestrate.driver import run_sweep
from mike_ray.orchestrate.mike_trial import MikeFamily, final_metrics, trial_settings
from mike_ray.orchestrate.records import TrialContext, begin_trial

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "demo.yaml"
BAD_LR = 13.0  # a trial at this lr "diverges" (raises as a real one would)
TASKS = ["DCH", "CTB", "PHB"]


def quick_trial_fn(config: dict[str, Any], ctx: TrialContext) -> None:
    """A MIKE trial's bookkeeping exactly as ``mike_trial_fn`` does it, around a body that takes
    milliseconds: each call is appended to ``calls.jsonl``; a file ``preempt-<seed>`` in the zoo dir
    makes that seed's MIKE trials fail once, as a lost node would."""
    params = dict(config)
    method, tcfg, subset, teachers = trial_settings(ctx, params)
    trial = begin_trial(ctx, params, family="mike", method=method, subset=subset, teachers=teachers,
                        seed=tcfg.seed, report=final_metrics, model=tcfg.model)
    if trial is None:
        return
    trial_id, run = trial.trial_id, trial.run
    with open(ctx.sweep_dir / "calls.jsonl", "a") as f:
        f.write(json.dumps({"trial_id": trial_id, "method": method, "seed": tcfg.seed, "run": run.run_id}) + "\n")
    with trial.failing():
        if tcfg.lr == BAD_LR and method == "mike":
            raise TrainingError(f"transfer loss is nan at epoch 1: lower the lr (lr {tcfg.lr})")
        preempt = ctx.zoo_dir / f"preempt-{tcfg.seed}"
        if method == "mike" and preempt.exists():
            raise RuntimeError("the node was preempted")
        run.metrics({"loss/val/teacher": 1.0 / (1 + tcfg.seed)}, step=1)
        # a score that tells the methods apart: control < pixel < mike, spread over seeds
        score = {"control": 0.0, "pixel": 0.4, "mike": 0.6}[method] + 0.01 * tcfg.seed
        down = {t: {"iou": score / 2, "norm_iou": score, "test_iou": score / 2, "test_norm_iou": score - 0.01}
                for t in TASKS}
        record = {**trial.base, "status": "finished", "score": score, "score_tasks": len(TASKS),
                  "test_score": score - 0.01, "test_tasks": len(TASKS), "downstream": down, "checkpoint": None, "retries": 0}
        trial.finish(record, final_metrics(record))


class QuickFamily(MikeFamily):
    """MIKE's Tuner-facing parts (baselines, controls, settings, report) with the quick trial and no
    stages to build (no data, an empty zoo dir)."""

    trial_fn = staticmethod(quick_trial_fn)

    def stages(self, cfg, out, tracking, parent_id):
        zoo = out / "zoo"
        zoo.mkdir(parents=True, exist_ok=True)
        return None, zoo

    def teacher_table(self, zoo_dir):
        return {}


def _calls(summary) -> list[dict]:
    path = summary.output / "sweeps" / summary.name / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def swept(ray_local, tmp_path_factory):
    """The smoke demo sweep, grid lr ∈ {0.004, BAD_LR}, + its pixel baseline and control; the MIKE
    trials are preempted once. The store as the first run left it, then ``--resume`` with the
    preemption gone."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    out = tmp_path_factory.mktemp("quick")
    cfg = load_sweep(SWEEP, [f"output={out}", f"search.lr=[0.004, {BAD_LR}]", "study.concurrency=2",
                             "resources.trial_cpus=0.25", "resources.placement.cpus_per_shard=0.1"],
                     profile="smoke")
    preempt = out / "zoo" / f"preempt-{cfg.transfer.seed}"
    preempt.parent.mkdir()
    preempt.touch()
    first = run_sweep(cfg, SWEEP, family=QuickFamily())
    client, runs = _trial_runs(first)
    stored = {"runs": {r.info.run_id: (r.info.status, r.data.tags.get("mike_ray.failure_reason")) for r in runs},
              "parent": client.get_run(first.parent_run_id).data.metrics, "calls": _calls(first)}
    preempt.unlink()
    second = run_sweep(cfg, SWEEP, resume=True, family=QuickFamily())
    return cfg, first, stored, second, _calls(second)


def _trial_runs(summary):
    import mlflow

    client = mlflow.MlflowClient(summary.tracking.uri)
    return client, client.search_runs([summary.tracking.experiment_id()],
                                      f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}' and "
                                      "tags.`mike_ray.stage` = 'trial'")


def test_failed_trials_are_recorded_with_their_reason_and_the_sweep_goes_on(swept) -> None:
    _, first, stored, _, _ = swept
    # 4 trials: the pixel baseline, the control, 2 search trials (lr); one diverges, one is preempted
    assert len(stored["calls"]) == 4
    assert sorted(r["method"] for r in first.trials) == ["control", "pixel"]
    reasons = sorted(f["reason"] for f in first.failed)
    assert reasons == ["RuntimeError: the node was preempted",
                       f"transfer loss is nan at epoch 1: lower the lr (lr {BAD_LR})"]
    report = first.report()
    assert sum(line.strip().startswith("FAILED trial") for line in report.splitlines()) == 2
    # MLflow: one run per trial; the failed ones FAILED with the same one-line reason as a tag
    assert len(stored["runs"]) == 4
    assert sorted(why for status, why in stored["runs"].values() if status == "FAILED") == reasons
    assert sorted(status for status, _ in stored["runs"].values()) == ["FAILED"] * 2 + ["FINISHED"] * 2
    assert stored["parent"]["trials/failed"] == 2.0 and stored["parent"]["trials/finished"] == 2.0
    assert "control" in report and "pixel" in report


def test_baselines_and_controls_run_before_the_search(swept) -> None:
    _, _, stored, _, _ = swept
    order = [c["method"] for c in stored["calls"]]
    assert set(order[:2]) == {"pixel", "control"} and order[2:] == ["mike", "mike"]


def test_resume_reruns_only_unfinished_trials_in_their_own_mlflow_runs(swept) -> None:
    _, first, stored, second, calls_all = swept
    again = calls_all[len(stored["calls"]):]
    # the finished 2 are not called again; the 2 errored are, each in the MLflow run it already had
    failed_first = {f["trial_id"]: f["mlflow_run_id"] for f in first.failed}
    assert sorted(c["trial_id"] for c in again) == sorted(failed_first)
    assert all(c["run"] == failed_first[c["trial_id"]] for c in again)
    assert second.parent_run_id == first.parent_run_id
    # the preempted trial finished and its failed record is dropped; the diverging one fails again
    assert sorted(r["method"] for r in second.trials) == ["control", "mike", "pixel"]
    assert [f["params"]["lr"] for f in second.failed] == [BAD_LR]
    client, runs = _trial_runs(second)
    assert sorted(r.info.run_id for r in runs) == sorted(stored["runs"])  # no duplicate run
    assert sorted(r.info.status for r in runs) == ["FAILED"] + ["FINISHED"] * 3
    parent = client.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/failed"] == 1.0
    assert parent.data.metrics["trials/finished"] == 3.0
