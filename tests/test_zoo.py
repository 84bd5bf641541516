"""Teacher zoo: a tiny teacher learns; stored teachers reload safely; builds are re-used and resumed."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from conftest import TINY_SEGMENTER, TINY_TASKS
from mike_ray.errors import DataError, ModelError
from mike_ray.data.shards import read_manifest
from mike_ray.mike.zoo import (ZooConfig, build_zoo, load_teacher, read_teacher, read_zoo, train_teacher,
                                   zoo_key)
from mike_ray.utils import config_key


def test_a_tiny_teacher_learns(tiny_prepared: Path, tmp_path: Path) -> None:
    cfg = ZooConfig(tasks=["DCH"], model=TINY_SEGMENTER, train={"epochs": 8, "batch_size": 16, "lr": 0.01})
    rec = train_teacher("DCH", tiny_prepared, cfg, tmp_path)
    chance = sum(rec.chance_iou.values()) / 3
    # clearly above an untrained network and above the "every pixel is this class" predictor
    assert rec.val_miou > rec.untrained_miou + 0.05, rec
    assert rec.val_miou > chance, (rec.val_miou, chance)
    assert len(rec.history) == 8 and rec.history[-1]["loss/train"] < rec.history[0]["loss/train"]
    # the held-out test split is measured too (generated data has DCH test crops), with the same meter
    assert read_manifest(tiny_prepared).rows("test", "DCH") > 0
    assert math.isfinite(rec.test_miou) and 0.0 <= rec.test_miou <= 1.0, rec
    assert set(rec.test_iou) == set(rec.classes)
    stored = json.loads((tmp_path / "DCH" / "teacher.json").read_text())
    assert stored["test_miou"] == rec.test_miou and stored["val_miou"] == rec.val_miou


def test_zoo_stores_every_teacher_with_its_manifest(tiny_prepared: Path, tiny_zoo: Path) -> None:
    zoo = read_zoo(tiny_zoo)
    assert sorted(zoo) == sorted(TINY_TASKS)
    for name, rec in zoo.items():
        assert rec.task == name and len(rec.classes) == 3 and rec.taps[0] == "stem"
        assert set(rec.val_iou) == set(rec.classes) == set(rec.test_iou)
        # a task without test crops (tiny data) has a NaN test IoU, stored as null: strict JSON
        raw = (tiny_zoo / name / "teacher.json").read_text()
        json.loads(raw, parse_constant=lambda c: pytest.fail(f"{name}/teacher.json holds {c}"))
        if read_manifest(tiny_prepared).rows("test", name) == 0:
            assert math.isnan(rec.test_miou) and json.loads(raw)["test_miou"] is None
        else:
            assert math.isfinite(rec.test_miou)
        # weights alone load with weights_only=True (no pickled code)
        state = torch.load(tiny_zoo / name / "weights.pt", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        model, _ = load_teacher(tiny_zoo / name)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3, 64, 64)
    assert json.loads((tiny_zoo / "zoo.json").read_text())["teachers"].keys() == set(TINY_TASKS)


def test_a_complete_zoo_is_reused_and_a_partial_one_resumed(tiny_prepared, tiny_zoo, tmp_path, ray_local) -> None:
    cfg = ZooConfig(tasks=TINY_TASKS, model=TINY_SEGMENTER, cpus_per_teacher=0.5,
                    train={"epochs": 1, "max_train_samples": 64, "batch_size": 32})
    out = tiny_zoo.parent.parent
    stamps = {t: (tiny_zoo / t / "weights.pt").stat().st_mtime_ns for t in TINY_TASKS}
    assert build_zoo(cfg, tiny_prepared, out, progress=False) == tiny_zoo  # complete: nothing trained
    assert stamps == {t: (tiny_zoo / t / "weights.pt").stat().st_mtime_ns for t in TINY_TASKS}

    # a killed build: one teacher and the zoo manifest missing → only that teacher is trained again
    import shutil

    shutil.copytree(tiny_zoo, tmp_path / "zoo" / tiny_zoo.name)
    partial = tmp_path / "zoo" / tiny_zoo.name
    shutil.rmtree(partial / "CTB")
    (partial / "zoo.json").unlink()
    kept = {t: (partial / t / "weights.pt").stat().st_mtime_ns for t in ("DCH", "PHB")}
    assert build_zoo(cfg, tiny_prepared, tmp_path, progress=False) == partial
    assert kept == {t: (partial / t / "weights.pt").stat().st_mtime_ns for t in ("DCH", "PHB")}
    assert (partial / "CTB" / "weights.pt").is_file() and (partial / "zoo.json").is_file()


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_or_broken_weights_are_refused(tiny_zoo: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "DCH"
    shutil.copytree(tiny_zoo / "DCH", bad)
    with open(bad / "weights.pt", "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(ModelError, match="weights.pt: not a readable weights file"):
        load_teacher(bad)
    (bad / "teacher.json").write_text("{not json")
    with pytest.raises(DataError, match="teacher.json: malformed"):
        load_teacher(bad)
    with pytest.raises(DataError, match="zoo.json: teacher zoo manifest not found"):
        read_zoo(tmp_path)


def test_nan_ious_round_trip_and_old_records_are_refused(tiny_zoo: Path, tmp_path: Path) -> None:
    import shutil

    d = Path(shutil.copytree(tiny_zoo / "DCH", tmp_path / "DCH"))
    raw = json.loads((d / "teacher.json").read_text())
    raw.update(test_miou=None, test_iou={c: None for c in raw["classes"]})  # how a task without test rows is stored
    (d / "teacher.json").write_text(json.dumps(raw))
    rec = read_teacher(d)
    assert math.isnan(rec.test_miou) and all(math.isnan(v) for v in rec.test_iou.values())
    assert rec.val_miou == raw["val_miou"]
    # a teacher.json of the previous zoo format (no test IoU): one line naming the file and the fields
    for key in ("test_miou", "test_iou"):
        raw.pop(key)
    (d / "teacher.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"DCH/teacher\.json: test_iou, test_miou: missing \(a teacher of an older "
                                        r"zoo format"):
        read_teacher(d)


def test_zoo_key_changed_with_the_test_split() -> None:
    cfg = ZooConfig(tasks=["DCH"], model=TINY_SEGMENTER)
    relevant = cfg.model_dump(exclude={"cpus_per_teacher", "gpus_per_teacher", "threads", "device"})
    # a zoo built before teachers had a test IoU (format 1) is never re-used
    assert zoo_key(cfg, "h") != config_key({"zoo": relevant, "data": "h", "format": 1})


def test_teacher_run_logs_val_and_test_iou(tiny_zoo: Path, tiny_prepared: Path, tmp_path: Path) -> None:
    import mlflow

    from mike_ray.mike.zoo import _log_teacher
    from mike_ray.tracking import Tracking

    tracking = Tracking.resolve(tmp_path, "zoo-test", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    rec = read_teacher(tiny_zoo / "DCH")
    _log_teacher(tracking, rec, None, tiny_prepared)
    nan_rec = read_teacher(tiny_zoo / "DCH")
    nan_rec.name, nan_rec.test_miou = "nan", math.nan
    _log_teacher(tracking, nan_rec, None, tiny_prepared)  # a NaN test IoU is left out, not an error
    client = mlflow.MlflowClient(tracking.uri)
    runs = {r.info.run_name: r for r in client.search_runs([tracking.experiment_id()])}
    metrics = runs["teacher-DCH"].data.metrics
    assert metrics["iou/val/mean"] == pytest.approx(rec.val_miou)
    assert metrics["iou/test/mean"] == pytest.approx(rec.test_miou)
    assert "iou/test/mean" not in runs["teacher-nan"].data.metrics
    # the teacher's data: its task's train, val and test crops, as dataset inputs
    inputs = runs["teacher-DCH"].inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["crops:DCH/test", "crops:DCH/train", "crops:DCH/val"]
