"""The MHGD sweeps end to end: sweeps/mhgd_methods.yaml (three methods, see SWEPT) and sweeps/mhgd_heads.yaml with one
trial made to diverge, smoke profiles, on a real local Ray, real generated COCO-format crops and a real
MLflow store (one output dir: the second sweep re-uses the data and the classifier teacher of the first).

The heads grid itself (5 head counts → 5 trials, each with its ``num_heads``) is the Tuner's grid over
``search``, checked in process by ``test_heads_grid_gives_every_head_count_its_trial`` with Tune's own
variant generator: running five more real trials to show it cost ~1 min and proved nothing more."""
from __future__ import annotations

from pathlib import Path

import pytest

from mike_ray.config import load_sweep
from mike_ray.orchestrate.driver import run_sweep

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# Three of the six methods through the whole sweep (Tune trial → shards → TorchTrainer → accuracy):
# the teacherless baseline, an initialisation-stage method and MHGD (phase 1, clipping). Every
# method's run is tested in process (tests/test_mhgd_train.py: runs, resumes from every stage) and
# every method's teacher targets through real shards (tests/test_mhgd_ray.py); the other three as
# sweep trials add ~50 s and no code path the first three do not take.
SWEPT = ["student", "fsp", "mhgd"]


@pytest.fixture(scope="module")
def sweeps(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("mhgd-sweeps")
    done = {}
    path = ROOT / "sweeps" / "mhgd_methods.yaml"
    cfg = load_sweep(path, [f"output={out}", f"search.method=[{', '.join(SWEPT)}]"], profile="smoke")
    done["mhgd_methods"] = (cfg, run_sweep(cfg, path))
    # fault: the heads sweep, its one trial at an lr that makes the student diverge (trials that finish
    # beside a failed one: the methods sweep's; here the sweep must finish with the failure recorded).
    # Batch 8: several steps per epoch on the smoke train split, so the huge step is followed by a
    # forward pass that sees it (with a single step per epoch nothing can diverge)
    path = ROOT / "sweeps" / "mhgd_heads.yaml"
    cfg = load_sweep(path, [f"output={out}", "name=mhgd_nan", "search.num_heads=[2]", "search.lr=[1.0e12]",
                            "mhgd.batch_size=8"], profile="smoke")
    done["nan"] = (cfg, run_sweep(cfg, path))
    return done


def _children(summary):
    import mlflow

    client = mlflow.MlflowClient(summary.tracking.uri)
    kids = client.search_runs([summary.tracking.experiment_id()],
                              f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}' and "
                              f"tags.`mike_ray.stage` = 'trial'")
    return client, kids


def test_heads_grid_gives_every_head_count_its_trial(tmp_path) -> None:
    """In process: the heads sweep's search space, expanded by Tune's variant generator, is one
    trial per head count, and each trial's MHGDConfig carries that head count."""
    from ray.tune.search.variant_generator import generate_variants

    from mike_ray.orchestrate.mhgd_trial import mhgd_settings
    from mike_ray.orchestrate.tuning import search_space, trial_context

    path = ROOT / "sweeps" / "mhgd_heads.yaml"
    cfg = load_sweep(path, [f"output={tmp_path}"], profile="smoke")
    import ray.tune

    space = search_space(cfg, ray.tune.grid_search(list(range(cfg.study.repeats))))
    trials = [spec for _, spec in generate_variants(space)]
    assert sorted(t["num_heads"] for t in trials) == sorted([1, 2, 4, 8, 16] * cfg.study.repeats)
    ctx = trial_context(cfg, tmp_path / "prepared", tmp_path / "zoo", None, "parent", tmp_path)
    for t in trials:
        run, subset, teachers = mhgd_settings(ctx, t)
        assert run.num_heads == t["num_heads"] and run.method == "mhgd" and teachers == ["teacher"]
        assert run.seed == cfg.mhgd.seed + t["__trial_index__"]


def test_methods_grid_gives_every_method_its_trial(tmp_path) -> None:
    """In process: the shipped methods sweep searches all six methods, one trial config each."""
    import ray.tune
    from ray.tune.search.variant_generator import generate_variants

    from mike_ray.mhgd.config import METHODS
    from mike_ray.orchestrate.mhgd_trial import mhgd_settings
    from mike_ray.orchestrate.tuning import search_space, trial_context

    cfg = load_sweep(ROOT / "sweeps" / "mhgd_methods.yaml", [f"output={tmp_path}"], profile="smoke")
    trials = [spec for _, spec in generate_variants(search_space(cfg, ray.tune.grid_search([0])))]
    ctx = trial_context(cfg, tmp_path / "prepared", tmp_path / "zoo", None, "parent", tmp_path)
    assert sorted(mhgd_settings(ctx, t)[0].method for t in trials) == sorted(METHODS)


def test_methods_sweep_runs_its_methods_and_logs_the_accuracy_table(sweeps) -> None:
    cfg, summary = sweeps["mhgd_methods"]
    assert sorted(r["method"] for r in summary.trials) == sorted(m for m in SWEPT for _ in range(cfg.study.repeats))
    assert not summary.failed
    client, kids = _children(summary)
    assert len(kids) == len(SWEPT) * cfg.study.repeats
    for k in kids:
        assert k.info.status == "FINISHED"
        assert {"acc/best", "acc/last", "acc/val"} <= set(k.data.metrics)
        assert {"trial.json", "plots/accuracy.png"} <= {a.path for a in client.list_artifacts(k.info.run_id)} | \
            {a.path for a in client.list_artifacts(k.info.run_id, "plots")}
    # the parent run: the resolved config, the accuracy table (Markdown + JSON); every method is a row
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["method"] == "mhgd"
    assert {"accuracy_table.md", "accuracy_table.json", "resolved_config.json"} <= \
        {a.path for a in client.list_artifacts(summary.parent_run_id)}
    table = Path(client.download_artifacts(summary.parent_run_id, "accuracy_table.md")).read_text()
    for m in SWEPT:
        assert f"| {m}" in table
    assert "| teacher teacher |" in table and table == summary.accuracy_table() + "\n"
    # the printed summary holds the same table
    assert "val accuracy, mean ± std over seeds" in summary.report()


def test_second_sweep_reused_the_first_ones_teacher(sweeps) -> None:
    (_, heads), (_, methods) = sweeps["nan"], sweeps["mhgd_methods"]
    assert heads.zoo_dir == methods.zoo_dir and heads.data_root == methods.data_root
    import mlflow

    client = mlflow.MlflowClient(methods.tracking.uri)
    teachers = client.search_runs([methods.tracking.experiment_id()], "tags.`mike_ray.stage` = 'teacher'")
    assert len(teachers) == 1  # trained once, by the first sweep


def test_a_diverging_trial_fails_with_its_reason_in_tune_and_mlflow_and_the_sweep_goes_on(sweeps) -> None:
    import ray.tune

    from mike_ray.orchestrate.mhgd_trial import mhgd_trial_fn

    cfg, summary = sweeps["nan"]
    # the sweep finished: the sane trial has its result, the diverging one is listed with its reason
    assert summary.trials == []
    assert len(summary.failed) == 1 and summary.failed[0]["params"]["lr"] == 1.0e12
    reason = summary.failed[0]["reason"]
    assert "\n" not in reason and "at epoch 1" in reason and ("nan" in reason or "inf" in reason), reason
    assert f"FAILED trial {summary.failed[0]['trial_id']}" in summary.report()
    # Tune: the trial is ERROR with that reason; the other TERMINATED
    grid = ray.tune.Tuner.restore(str(cfg.output_dir() / "sweeps" / cfg.name / "tune" / "search"),
                                  trainable=mhgd_trial_fn).get_results()
    errors = [r.error for r in grid if r.error is not None]
    assert len(grid) == 1 and len(errors) == 1 and reason in str(errors[0])
    # MLflow: the trial's run FAILED with the reason as a tag; the parent FINISHED, with 1 failed trial
    client, kids = _children(summary)
    assert [k.info.status for k in kids] == ["FAILED"]
    assert kids[0].data.tags["mike_ray.failure_reason"] == reason
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials/failed"] == 1.0
    table = Path(client.download_artifacts(summary.parent_run_id, "accuracy_table.md")).read_text()
    assert "| failed |" in table
