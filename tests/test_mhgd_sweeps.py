"""The MHGD sweeps end to end: sweeps/mhgd_heads.yaml and sweeps/mhgd_methods.yaml, smoke profiles, on a
real local Ray, real generated COCO-format crops and a real MLflow store (one output dir: the second
sweep re-uses the data and the classifier teacher of the first)."""
from __future__ import annotations

from pathlib import Path

import pytest

from mike_ray.config import load_sweep
from mike_ray.mhgd.train import METHODS
from mike_ray.orchestrate.driver import run_sweep

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweeps(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("mhgd-sweeps")
    done = {}
    for name in ("mhgd_heads", "mhgd_methods"):
        path = ROOT / "sweeps" / f"{name}.yaml"
        cfg = load_sweep(path, [f"output={out}"], profile="smoke")
        done[name] = (cfg, run_sweep(cfg, path))
    return done


def _children(summary):
    import mlflow

    client = mlflow.MlflowClient(summary.tracking.uri)
    kids = client.search_runs([summary.tracking.experiment_id()],
                              f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}' and "
                              f"tags.`mike_ray.stage` = 'trial'")
    return client, kids


def test_heads_sweep_runs_every_head_count(sweeps) -> None:
    cfg, summary = sweeps["mhgd_heads"]
    heads = sorted(r["params"]["num_heads"] for r in summary.trials)
    assert heads == [1, 2, 4, 8, 16] and not summary.failed
    assert all(r["method"] == "mhgd" and 0.0 <= r["last_acc"] <= r["best_acc"] <= 1.0 for r in summary.trials)
    client, kids = _children(summary)
    assert len(kids) == 5 and all(k.info.status == "FINISHED" for k in kids)
    assert sorted(int(k.data.params["mhgd.num_heads"]) for k in kids) == [1, 2, 4, 8, 16]


def test_methods_sweep_runs_every_method_and_logs_the_accuracy_table(sweeps) -> None:
    cfg, summary = sweeps["mhgd_methods"]
    assert sorted(r["method"] for r in summary.trials) == sorted(m for m in METHODS for _ in range(cfg.study.repeats))
    assert not summary.failed
    client, kids = _children(summary)
    assert len(kids) == len(METHODS) * cfg.study.repeats
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
    for m in METHODS:
        assert f"| {m}" in table
    assert "| teacher teacher |" in table and table == summary.accuracy_table() + "\n"
    # the printed summary holds the same table
    assert "val accuracy, mean ± std over seeds" in summary.report()


def test_second_sweep_reused_the_first_ones_teacher(sweeps) -> None:
    (_, heads), (_, methods) = sweeps["mhgd_heads"], sweeps["mhgd_methods"]
    assert heads.zoo_dir == methods.zoo_dir and heads.data_root == methods.data_root
    import mlflow

    client = mlflow.MlflowClient(methods.tracking.uri)
    teachers = client.search_runs([methods.tracking.experiment_id()], "tags.`mike_ray.stage` = 'teacher'")
    assert len(teachers) == 1  # trained once, by the first sweep
