"""The main job end to end on a real local Ray, real MLflow store, real generated COCO data.

One smoke sweep (tiny, from sweeps/demo.yaml's `smoke` profile, 2 transfer epochs) is run once per
module, with three real faults: its driver process is SIGKILLed after the first trial finished and the
sweep is resumed; in the resumed MIKE trial its trainer worker is SIGKILLed after the first registered
checkpoint, then one of its teacher shards in the middle of a step. The tests read what it left
through the MLflow client and an `mlflow server` REST API.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import check_score_metrics, free_port, kill_processes, registered_checkpoints, session_processes
from mike_ray.config import load_sweep
from mike_ray.orchestrate.driver import run_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "sweeps" / "demo.yaml"
pytestmark = pytest.mark.slow


OVERRIDES = ["study.trials=1", "search.teacher_subset=[three]", "transfer.epochs=2"]


@pytest.fixture(scope="module")
def smoke(ray_local, tmp_path_factory):
    """One smoke sweep, hit by three faults: its driver process is SIGKILLed once the pixel baseline
    has finished, the sweep is resumed (here, in process), and in the resumed MIKE trial a trainer
    worker and then a teacher shard are SIGKILLed."""
    import threading

    out = tmp_path_factory.mktemp("sweep-out")
    cfg = load_sweep(SWEEP, [f"output={out}", *OVERRIDES], profile="smoke")
    before = _run_and_kill_the_driver(cfg, ray_local)
    faults: dict = {"keep": out / "checkpoint-at-worker-kill.pt", "stop": threading.Event(), "before_kill": before}
    injector = threading.Thread(target=_inject_faults, args=(cfg.output_dir() / "sweeps" / cfg.name / "runs", faults),
                                daemon=True)
    injector.start()
    try:
        summary = run_sweep(cfg, SWEEP, resume=True)
    finally:
        faults["stop"].set()  # never touch a later test's processes
        injector.join(5)
    return cfg, summary, faults


def _run_and_kill_the_driver(cfg, ray_local) -> dict[str, int]:
    """``python -m mike_ray.sweep`` in its own process group, SIGKILLed 1 s after the first trial record
    (the pixel baseline's) appears; returns the records present then (name → mtime)."""
    args = [sys.executable, "-m", "mike_ray.sweep", str(SWEEP), "--profile", "smoke", "--set", f"output={cfg.output}"]
    for o in OVERRIDES:
        args += ["--set", o]
    trials_dir = cfg.output_dir() / "sweeps" / cfg.name / "trials"
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(ray_local), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and len(list(trials_dir.glob("*.json"))) < 1:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.5)
    time.sleep(1)  # the driver is into its next trial (its Tuner), not between stages
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return {p.name: p.stat().st_mtime_ns for p in trials_dir.glob("*.json")}


def _inject_faults(runs_dir: Path, seen: dict) -> None:
    """Thread body, during the sweep's MIKE trial (the one with shards; the pixel baseline runs before it):
    1. once Train has registered the trial's first checkpoint, keep a copy of it and SIGKILL the trainer
       worker (Train's FailureConfig restarts the group from that checkpoint);
    2. once the restarted worker is training again, SIGKILL a teacher shard while it runs a step (Ray
       restarts the actor; the step is sent again)."""
    import shutil

    from mike_ray.mike.train import CKPT_FILE

    deadline = time.time() + 400
    go = lambda: time.time() < deadline and not seen["stop"].is_set()  # noqa: E731
    while go() and not session_processes("ray::MikeShard"):
        time.sleep(0.05)
    baseline_runs = {p.name for p in runs_dir.glob("*")}
    while go() and not seen.get("workers"):
        for run in (p for p in runs_dir.glob("*") if p.name not in baseline_runs):
            listed = registered_checkpoints(run)
            if listed:
                shutil.copy(run / listed[-1] / CKPT_FILE, seen["keep"])
                seen["run"] = run.name
                kill_processes("ray::RayTrainWorker", seen, "workers")
        time.sleep(0.05)
    while go():
        restarted = [p for p in session_processes("ray::RayTrainWorker") if p not in seen.get("workers", [])]
        if restarted and kill_processes("ray::MikeShard.step", seen, "shards", first_only=True):
            return
        time.sleep(0.02)


def _client(summary):
    import mlflow

    return mlflow.MlflowClient(summary.tracking.uri)


def _artifacts(client, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def _check_logged_encoder(client, run) -> None:
    """The trial's encoder is an MLflow model of its run that loads by URI and runs on 3×64×64, with
    the trial's final score linked to it."""
    import mlflow
    import mlflow.pytorch
    import torch


    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run.info.run_id}'")
    assert len(models) == 1 and models[0].name == "encoder", models
    from mike_ray.tracking import fluent_uri

    with fluent_uri(client._tracking_client.tracking_uri):
        encoder = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    with torch.no_grad():
        out = encoder(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    linked = {m.key for m in models[0].metrics or []}
    assert "score/mean_norm_iou" in linked, linked


def test_mlflow_holds_the_parent_run_and_its_trials(smoke) -> None:
    cfg, summary, _ = smoke
    client = _client(summary)
    parent = client.get_run(summary.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["method"] == "mike" and parent.data.tags["mike_ray.sweep"] == cfg.name
    assert {"trials.txt", "trials.json", "resolved_config.json", "plots/radar_best_per_subset.png"} <= \
        _artifacts(client, parent.info.run_id)

    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'")
    trials = [r for r in children if r.data.tags.get("mike_ray.stage") == "trial"]
    assert len(trials) == len(children)  # "select all and Compare" under the sweep: trials only
    # the zoo's teachers: children of their own zoo run, which points back at the sweep
    (zoo,) = client.search_runs([exp], f"tags.`mike_ray.stage` = 'zoo' and "
                                       f"tags.`mike_ray.sweep_run` = '{summary.parent_run_id}'")
    assert "mlflow.parentRunId" not in zoo.data.tags and zoo.info.status == "FINISHED"
    teachers = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{zoo.info.run_id}'")
    assert len(teachers) == 3 and all("iou/val/mean" in r.data.metrics for r in teachers)
    assert all(r.data.tags["mike_ray.stage"] == "teacher" for r in teachers)
    assert sorted(r.data.tags["mike_ray.method"] for r in trials) == ["control", "mike", "pixel"]
    from mike_ray.data.shards import read_manifest

    digest = read_manifest(summary.data_root).content_hash[:32]
    for run in teachers:  # each teacher's training data is a dataset input of its run
        assert {i.dataset.digest for i in run.inputs.dataset_inputs} == {digest}
    for run in trials:
        assert run.info.status == "FINISHED"
        # a name that says what the trial is; its data as dataset inputs with the manifest digest
        method = run.data.tags["mike_ray.method"]
        assert run.info.run_name.startswith(method) and "seed " in run.info.run_name, run.info.run_name
        contexts = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
                    for i in run.inputs.dataset_inputs}
        expect = {"downstream/train", "downstream/test"} | ({"query/train", "query/validation"}
                                                            if method != "control" else set())
        assert set(contexts) == expect and all(d.digest == digest for d in contexts.values()), contexts
        assert json.loads(contexts["downstream/train"].profile)["rows"] > 0
        _check_logged_encoder(client, run)
        check_score_metrics(run.data.metrics, Path(summary.zoo_dir), cfg.downstream.tasks)
        if run.data.tags["mike_ray.method"] == "control":  # no transfer: downstream on the untrained encoder
            assert run.data.params["teacher_subset"] == "-" and "loss/train/total" not in run.data.metrics
            continue
        assert run.data.params["teacher_subset"] == "three" and "transfer/lr" in run.data.params
        assert {"loss/train/total", "loss/val/pixel_mse"} <= set(run.data.metrics)
        history = client.get_metric_history(run.info.run_id, "loss/train/total")
        assert len(history) == cfg.transfer.epochs
        arts = _artifacts(client, run.info.run_id)
        assert {"plots/radar.png", "plots/reconstructions.png", "trial.json"} <= arts
        assert Path(run.data.tags["mike_ray.checkpoint"]).is_dir()
        if run.data.tags["mike_ray.method"] == "mike":
            assert "plots/layerwise_loss.png" in arts
            assert "loss/teacher/DCH/stem" in run.data.metrics  # metric names are paths
            # teachers_per_shard: auto — two shards, every teacher on exactly one, balanced by work
            plan = run.data.params["shards"].split(" | ")
            assert len(plan) == 2 and all("of the work" in p for p in plan)
            assert sorted(t for p in plan for t in p.split(": ", 1)[1].split("  ")[0].split(", ")) == \
                ["CTB", "DCH", "PHB"]
            # every teacher of the subset is validated every epoch, and none is a constant 0.0
            for teacher in ("DCH", "CTB", "PHB"):
                keys = [k for k in run.data.metrics if k.startswith(f"loss/val/teacher/{teacher}/")]
                assert keys, f"{teacher} was never validated"
                for k in keys:
                    values = [m.value for m in client.get_metric_history(run.info.run_id, k)]
                    assert len(values) == cfg.transfer.epochs and any(v != 0.0 for v in values), (k, values)
    # the summary printed at the end names the store and the UI command
    report = summary.report()
    assert summary.tracking.uri in report and "mlflow ui" in report and "three" in report


def test_the_trial_survives_a_killed_trainer_worker_and_a_killed_shard_and_loses_nothing(smoke) -> None:
    from mike_ray.mike.train import CKPT_FILE, load_checkpoint

    cfg, summary, faults = smoke
    assert faults.get("workers"), "no trainer worker was killed"
    assert faults.get("shards"), "no teacher shard was killed mid-step"
    client = _client(summary)
    exp = client.get_run(summary.parent_run_id).info.experiment_id
    trial_runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}' and "
                                           "tags.`mike_ray.stage` = 'trial'")
    mike = [r for r in trial_runs if r.data.tags["mike_ray.trial_id"] == faults["run"]]
    assert len(mike) == 1 and mike[0].info.status == "FINISHED"  # one MLflow run, not one per restart
    run = mike[0]
    # every epoch once, and the final metrics are there
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/train/total")]
    assert steps == list(range(cfg.transfer.epochs))
    assert "shard/retries_total" in run.data.metrics
    check_score_metrics(run.data.metrics, Path(summary.zoo_dir), cfg.downstream.tasks)
    assert run.data.metrics["shard/retries_total"] >= 1  # the step that hit the dead shard was sent again
    # lost: at most the epoch in flight at the worker kill — the epochs checkpointed before it are the
    # stored ones (their measured times included), not re-runs
    saved = load_checkpoint(faults["keep"]).history
    record = next(t for t in summary.trials if t["trial_id"] == faults["run"])
    final = load_checkpoint(Path(record["checkpoint"]) / CKPT_FILE).history
    assert saved and len(saved) < cfg.transfer.epochs, "the transfer had finished before the kill"
    assert final[:len(saved)] == saved
    assert [h["epoch"] for h in final] == list(range(cfg.transfer.epochs))
    print(f"killed trainer worker(s) {faults['workers']} after epoch {len(saved) - 1}, shard {faults['shards']} "
          f"mid-step; {int(run.data.metrics['shard/retries_total'])} step(s) re-sent; "
          f"{len(steps)}/{cfg.transfer.epochs} epochs, 1 MLflow run")


def test_an_mlflow_server_serves_the_runs_over_rest(smoke) -> None:
    _, summary, _ = smoke
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", summary.tracking.uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        exp_id = _client(summary).get_run(summary.parent_run_id).info.experiment_id
        req = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp_id],
                                                      "filter": f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}'"}).encode(),
                                     headers={"Content-Type": "application/json"})
        runs = json.loads(urllib.request.urlopen(req, timeout=10).read())["runs"]
        stages = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "mike_ray.stage") for r in runs)
        assert stages == ["trial"] * 3   # mike, pixel, control; the zoo's teachers have a parent of their own
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)


def _env(ray_local) -> dict[str, str]:
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, RAY_AUTH_MODE="token",
               PYTHONUNBUFFERED="1")
    return env


def test_a_killed_sweep_driver_resumes_without_rerunning_finished_trials(smoke) -> None:
    """The fixture's first fault: the driver was killed after the baseline finished; the resumed
    sweep kept that trial's record untouched, ran the rest, and logged every trial exactly once."""
    cfg, summary, faults = smoke
    before = faults["before_kill"]
    assert before, "no trial had finished before the kill"
    trials_dir = cfg.output_dir() / "sweeps" / cfg.name / "trials"
    after = {p.name: p.stat().st_mtime_ns for p in trials_dir.glob("*.json")}
    assert len(after) == 3 and len(before) < 3  # pixel, control, mike: three Tuners, resumed in turn
    assert all(after[name] == stamp for name, stamp in before.items())  # finished trials not re-run

    client = _client(summary)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    parents = client.search_runs([exp], f"tags.`mike_ray.sweep` = '{cfg.name}' and tags.`mike_ray.stage` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.run_id == summary.parent_run_id
    assert parents[0].info.status == "FINISHED"
    trial_runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{summary.parent_run_id}' and "
                                           "tags.`mike_ray.stage` = 'trial'")
    ids = [r.data.tags["mike_ray.trial_id"] for r in trial_runs]
    assert len(ids) == len(set(ids)) == 3  # no trial logged twice
    assert all(r.info.status == "FINISHED" for r in trial_runs)
