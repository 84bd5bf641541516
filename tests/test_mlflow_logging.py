"""What a trial leaves in MLflow besides metrics: dataset inputs, a logged model, system metrics —
through MLflow's own APIs on a real sqlite store."""
from __future__ import annotations

import json
import time

import mlflow
import numpy as np
import pytest
import torch

from mike_ray.models import build_model
from mike_ray.orchestrate.records import log_data, log_trained_model, trial_name
from mike_ray.tracking import LazyParentRun, Tracking, fluent_uri, start_run, system_metrics

from conftest import TINY_AE


@pytest.fixture()
def tracking(tmp_path) -> Tracking:
    return Tracking.resolve(tmp_path, "logging")


def test_a_trained_encoder_is_a_logged_model_that_loads_by_uri_without_mike_ray_code(tracking) -> None:
    torch.manual_seed(0)
    model = build_model(TINY_AE).eval()
    with start_run(tracking, "trial") as run:
        model_id = log_trained_model(run, TINY_AE, model.state_dict(), 64, "encoder")
        run.metrics({"score/mean_norm_iou": 0.5}, model_id=model_id)
    client = mlflow.MlflowClient(tracking.uri)
    (logged,) = client.search_logged_models([tracking.experiment_id()],
                                            filter_string=f"source_run_id = '{run.run_id}'")
    assert logged.model_id == model_id and logged.name == "encoder"
    assert [m.key for m in logged.metrics] == ["score/mean_norm_iou"]  # the score, linked to the model
    assert client.get_run(run.run_id).info.status == "FINISHED"  # re-opening the run to log did not end it early
    with fluent_uri(tracking.uri):
        loaded = mlflow.pytorch.load_model(f"models:/{model_id}")
        local = mlflow.artifacts.download_artifacts(f"models:/{model_id}")
    x = torch.rand(5, 3, 64, 64)  # any batch size: the example had two rows
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-6)
    # a traced graph (torch.export) and weights, no pickled objects: loading runs no stored code
    files = sorted(p.name for p in __import__("pathlib").Path(local, "data").iterdir())
    assert files == ["model.pt2"], files


def test_data_is_a_dataset_input_with_the_manifest_digest(tiny_prepared, tracking) -> None:
    from mike_ray.data.shards import read_manifest

    man = read_manifest(tiny_prepared)
    with start_run(tracking, "trial") as run:
        log_data(run, tiny_prepared, "train", ["DCH", "CTB"], "query/train")
    (inp,) = mlflow.MlflowClient(tracking.uri).get_run(run.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "query crops:DCH+CTB/train" and inp.dataset.digest == man.content_hash[:32]
    profile = json.loads(inp.dataset.profile)
    assert profile["rows"] == man.rows("train", "DCH") + man.rows("train", "CTB") > 0
    assert profile["counts"]["DCH"] == man.counts["train"]["DCH"]
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "query/train")]


def test_system_metrics_are_logged_only_when_switched_on(tracking) -> None:
    client = mlflow.MlflowClient(tracking.uri)
    for enabled in (False, True):
        with start_run(tracking, "trial") as run:
            with system_metrics(run, enabled, interval_s=0.5):
                time.sleep(1.5)
        keys = set(client.get_run(run.run_id).data.metrics)
        assert ("system/cpu_utilization_percentage" in keys) == enabled, keys


def test_a_stage_parent_run_exists_only_once_used_and_is_no_child_of_the_sweep(tracking) -> None:
    client = mlflow.MlflowClient(tracking.uri)
    unused = LazyParentRun(tracking, "zoo-x", {"mike_ray.stage": "zoo"})
    unused.close()
    assert not client.search_runs([tracking.experiment_id()])
    used = LazyParentRun(tracking, "zoo-y", {"mike_ray.stage": "zoo", "mike_ray.sweep_run": "abc"})
    with start_run(tracking, "teacher-DCH", used.id()):
        pass
    used.close()
    parent = client.get_run(used.id())
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in parent.data.tags


def test_trial_names_say_what_the_trial_is() -> None:
    params = {"teacher_subset": "three", "schedule": "uniform", "embed_channels": 4, "__trial_index__": 1}
    assert trial_name("mike", "three", params, 1) == "mike three embed_channels=4 schedule=uniform seed 1"
    assert trial_name("control", "-", {"method": "control", "__trial_index__": 0}, 0) == "control seed 0"
