"""MHGD on Ray: the classifier zoo (stored, logged, re-used), teachers on shards (same targets, same
training as in-process teachers), and the one-worker TorchTrainer run (re-run = re-report)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mike_ray.data.classification import ClassificationData, load_splits
from mike_ray.mhgd.shard import MHGDShardPool
from mike_ray.mhgd.config import MHGDConfig
from mike_ray.mhgd.teachers import LocalTeachers, frozen_teacher
from mike_ray.mhgd.train import run_method
from mike_ray.mhgd.zoo import ClassifierZooConfig, build_classifier_zoo, load_classifier, read_classifier_zoo
from mike_ray.orchestrate.classify import classifier_refs, run_mhgd
from mike_ray.resources import PlacementConfig, WorkersConfig
from mike_ray.tracking import Tracking

pytestmark = pytest.mark.slow

POINTS = ["stage1", "stage2", "stage3"]
WIDTHS = {"arch": "wrn", "depth": 10, "width": 1, "kwargs": {"widths": [8, 16, 32]}}
RUN = dict(student=WIDTHS, sensing_points=POINTS, num_heads=2, batch_size=16, eval_batch_size=32, lr=0.05,
           epochs=1, phase1_epochs=1, device="cpu", threads=1, seed=0)


@pytest.fixture(scope="module")
def data(tiny_prepared) -> ClassificationData:
    return ClassificationData(source="crops", root=str(tiny_prepared), image_size=16, limit_train=64, limit_val=32)


@pytest.fixture(scope="module")
def zoo(data, ray_local, tmp_path_factory) -> tuple[Path, Tracking, Path]:
    out = tmp_path_factory.mktemp("czoo")
    tracking = Tracking.resolve(out, "test-czoo")
    cfg = ClassifierZooConfig(teachers={"resnet8": {"arch": "resnet_cifar", "depth": 8, "width": 8}, "wrn10": WIDTHS},
                              train={"epochs": 1, "batch_size": 16, "lr": 0.05}, cpus_per_teacher=0.5, device="cpu")
    return build_classifier_zoo(cfg, data, out, tracking, progress=False), tracking, out


def test_classifier_zoo_is_stored_logged_and_reused(zoo, data) -> None:
    zoo_dir, tracking, out = zoo
    recs = read_classifier_zoo(zoo_dir)
    assert set(recs) == {"resnet8", "wrn10"}
    for name, rec in recs.items():
        assert rec["num_classes"] == 33 and 0.0 <= rec["best_acc"] <= 1.0 and len(rec["history"]) == 1
        model, _ = load_classifier(zoo_dir / name)  # weights_only=True inside, strict keys and shapes
        assert not model.training and model(torch.zeros(2, 3, 16, 16)).shape == (2, 33)
    # a second build with the same config and data trains nothing: same directory, files untouched
    stamp = (zoo_dir / "resnet8" / "weights.pt").stat().st_mtime_ns
    cfg = ClassifierZooConfig.model_validate(json.loads((zoo_dir / "zoo.json").read_text())["config"])
    assert build_classifier_zoo(cfg, data, out, progress=False) == zoo_dir
    assert (zoo_dir / "resnet8" / "weights.pt").stat().st_mtime_ns == stamp
    # one MLflow run per teacher, with its accuracy and its stored record
    import mlflow

    client = mlflow.MlflowClient(tracking.uri)
    runs = client.search_runs([tracking.experiment_id()], "tags.`mike_ray.stage` = 'teacher'")
    assert sorted(r.data.tags["mike_ray.teacher"] for r in runs) == ["resnet8", "wrn10"]
    for r in runs:
        assert r.info.status == "FINISHED" and "acc/best" in r.data.metrics
        assert {"teacher.json", "weights.pt"} <= {a.path for a in client.list_artifacts(r.info.run_id)}


@pytest.mark.parametrize("method", ["mhgd", "kdsvd", "soft_logits", "fsp", "ab"])
def test_shards_return_the_same_targets_as_local_teachers(zoo, method) -> None:
    zoo_dir = zoo[0]
    cfg = MHGDConfig(**RUN, method=method)
    refs = classifier_refs(zoo_dir, ["resnet8", "wrn10"])
    local = LocalTeachers([frozen_teacher(cfg, load_classifier(Path(r.path))[0]) for r in refs])
    shards = MHGDShardPool(refs, cfg, PlacementConfig(mode="ray", teachers_per_shard=1, cpus_per_shard=0.25,
                                                      device="cpu"))
    try:
        x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        got, want = shards.outputs(x, method), local.outputs(x, method)
    finally:
        shards.shutdown()
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        pairs = list(zip(g.vectors + g.sigmas + g.fsp + g.on, w.vectors + w.sigmas + w.fsp + w.on))
        if method == "soft_logits":
            pairs.append((g.logits, w.logits))
        assert pairs, "no targets compared"
        for a, b in pairs:
            assert not a.requires_grad and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_two_teachers_on_shards_train_like_two_teachers_in_process(zoo, data) -> None:
    """The shard path changes where teachers run, not what the student learns (same seed → same run)."""
    zoo_dir = zoo[0]
    cfg = MHGDConfig(**RUN, method="mhgd")
    train, val = load_splits(data)
    refs = classifier_refs(zoo_dir, ["resnet8", "wrn10"])
    models = [load_classifier(Path(r.path))[0] for r in refs]
    local = run_method(cfg, models, train, val)
    shards = MHGDShardPool(refs, cfg, PlacementConfig(mode="ray", teachers_per_shard="all", cpus_per_shard=0.25,
                                                      device="cpu"))
    try:
        remote = run_method(cfg, shards, train, val)
    finally:
        shards.shutdown()
    # phase 1 trains one set of heads per teacher; both teachers' losses are reported
    assert {"loss/phase1/train/teacher0/m0", "loss/phase1/train/teacher1/m1"} <= set(local["history"][0])
    assert {"loss/phase1/train/resnet8/m0", "loss/phase1/train/wrn10/m1"} <= set(remote["history"][0])
    for a, b in zip(local["history"], remote["history"]):
        for k in ("loss/phase1/train", "loss/train/transfer", "loss/train/ce", "acc/val"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    assert remote["best_acc"] == pytest.approx(local["best_acc"])


def test_a_killed_mhgd_worker_resumes_exactly_and_a_rerun_reports_the_stored_result(zoo, data, tmp_path) -> None:
    """SIGKILL the Train worker after its first registered checkpoint: FailureConfig restarts it, it resumes
    from that epoch's state and ends exactly like an uninterrupted run (same seed → same history); a
    second fit of the finished run re-reports the stored result instead of training again."""
    import threading

    from conftest import kill_train_worker_after_first_checkpoint
    from mike_ray.mhgd.worker import STATE_FILE
    from mike_ray.models.registry import load_torch_file

    zoo_dir = zoo[0]
    cfg = MHGDConfig(**{**RUN, "epochs": 2, "phase1_epochs": 1}, method="mhgd")
    refs = classifier_refs(zoo_dir, ["resnet8"])
    placement = PlacementConfig(mode="ray", cpus_per_shard=0.25, device="cpu")
    workers = WorkersConfig(cpus_per_worker=0.5, max_failures=1)
    seen: dict = {}
    killer = threading.Thread(target=kill_train_worker_after_first_checkpoint,
                              args=(tmp_path / "kill", STATE_FILE, tmp_path / "before-kill.pt", seen), daemon=True)
    killer.start()
    res = run_mhgd(cfg, data, refs, placement, workers, tmp_path, "kill")
    killer.join(5)
    assert seen.get("killed"), "the worker was not killed"
    saved = load_torch_file(seen["checkpoint"])
    assert len(saved["history"]) < len(res.history), "the run had finished before the kill"
    # every epoch once (1 phase-1 + 2 student: the resumed run crosses the phase boundary); the epochs
    # before the kill are the stored ones
    assert [h["epoch"] for h in res.history] == [float(e) for e in range(3)]
    assert res.history[:len(saved["history"])] == saved["history"]
    # … and the whole run is the one an uninterrupted, in-process run gives
    train, val = load_splits(data)
    local = run_method(cfg, [load_classifier(Path(refs[0].path))[0]], train, val)
    for a, b in zip(res.history, local["history"]):
        assert {k: v for k, v in a.items() if k != "time/epoch_s"} == \
            pytest.approx({k: v for k, v in b.items() if k != "time/epoch_s"}, rel=1e-5, abs=1e-6)
    again = run_mhgd(cfg, data, refs, placement, workers, tmp_path, "kill")
    # re-reported, not re-trained: even the measured epoch times are the stored ones
    assert again.history == res.history and again.best_acc == res.best_acc


def test_run_mhgd_refuses_data_parallel_workers(zoo, data, tmp_path) -> None:
    from mike_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="num_workers: MHGD trains on one worker"):
        run_mhgd(MHGDConfig(**RUN), data, [], PlacementConfig(), WorkersConfig(num_workers=2), tmp_path, "x")
