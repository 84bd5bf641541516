"""Teacher zoo: a tiny teacher learns; stored teachers reload safely; builds are re-used and resumed."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from conftest import TINY_SEGMENTER, TINY_TASKS
from mike_ray.errors import DataError, ModelError
from mike_ray.teachers.zoo import ZooConfig, build_zoo, load_teacher, read_zoo, train_teacher


def test_a_tiny_teacher_learns(tiny_prepared: Path, tmp_path: Path) -> None:
    cfg = ZooConfig(tasks=["DCH"], model=TINY_SEGMENTER, train={"epochs": 8, "batch_size": 16, "lr": 0.01})
    rec = train_teacher("DCH", tiny_prepared, cfg, tmp_path)
    chance = sum(rec.chance_iou.values()) / 3
    # clearly above an untrained network and above the "every pixel is this class" predictor
    assert rec.val_miou > rec.untrained_miou + 0.05, rec
    assert rec.val_miou > chance, (rec.val_miou, chance)
    assert len(rec.history) == 8 and rec.history[-1]["loss/train"] < rec.history[0]["loss/train"]


def test_zoo_stores_every_teacher_with_its_manifest(tiny_zoo: Path) -> None:
    zoo = read_zoo(tiny_zoo)
    assert sorted(zoo) == sorted(TINY_TASKS)
    for name, rec in zoo.items():
        assert rec.task == name and len(rec.classes) == 3 and rec.taps[0] == "stem"
        assert set(rec.val_iou) == set(rec.classes)
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
