"""The MHGD sweep end to end: sweeps/mhgd_methods.yaml (two methods, see SWEPT), smoke profile, on a real
local Ray, real generated COCO-format crops and a real MLflow store.

A diverging trial is no longer a second real sweep here: the divergence itself is
tests/test_mhgd_train.py::test_a_diverging_run_stops_at_its_epoch_with_a_one_line_training_error, and
what the Tuner, MLflow and the report make of a failed trial is tests/test_tune_bookkeeping.py (the
same records module every family's trial uses); zoo re-use is tests/test_mhgd_ray.py.

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
# Two of the six methods through the whole sweep (Tune trial → shards → TorchTrainer → accuracy): the
# teacherless baseline and MHGD (phase 1, clipping, the shards). Every method's run is tested in process
# (tests/test_mhgd_train.py: runs, resumes from every stage) and every method's teacher targets through
# real shards (tests/test_mhgd_ray.py); the others as sweep trials add ~25 s each and no code path
# these two do not take (the methods differ only inside the worker loop that those tests cover).
SWEPT = ["student", "mhgd"]


@pytest.fixture(scope="module")
def sweeps(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("mhgd-sweeps")
    done = {}
    path = ROOT / "sweeps" / "mhgd_methods.yaml"
    cfg = load_sweep(path, [f"output={out}", f"search.method=[{', '.join(SWEPT)}]"], profile="smoke")
    done["mhgd_methods"] = (cfg, run_sweep(cfg, path))
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
        # the student, as a logged model of the trial that loads by URI and classifies a batch
        (student,) = client.search_logged_models([k.info.experiment_id],
                                                 filter_string=f"source_run_id = '{k.info.run_id}'")
        assert student.name == "student" and "acc/best" in {m.key for m in student.metrics or []}
        assert {i.dataset.name.split(" ")[0] for i in k.inputs.dataset_inputs} == {"classification"}
    import mlflow.pytorch
    import torch

    from mike_ray.tracking import fluent_uri

    with fluent_uri(summary.tracking.uri):
        net = mlflow.pytorch.load_model(f"models:/{student.model_id}")
    with torch.no_grad():
        out = net(torch.rand(3, 3, cfg.classification.image_size, cfg.classification.image_size))
    assert out.shape == (3, 33)  # the crops' class space: 11 tasks × 3 classes, whichever are prepared
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
