"""A file the project reads never names code to import: a planted teacher record runs nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from mike_ray.data.tasks import TASKS
from mike_ray.errors import ModelError
from mike_ray.models import build_model, tap_names
from mike_ray.resources import PlacementConfig
from mike_ray.mike.shard import MikeShardPool, TeacherRef
from mike_ray.mike.zoo import TeacherRecord, load_teacher

PROBE = '''
import pathlib, torch
pathlib.Path({marker!r}).write_text("imported")          # runs at import time
def make(**kw):
    pathlib.Path({marker!r}).write_text("called")
    return torch.nn.Conv2d(3, 3, 1)
'''


@pytest.fixture()
def planted(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A teacher folder whose record names ``probe_mod:make``; importing it writes ``marker``."""
    marker = tmp_path / "marker"
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "probe_mod.py").write_text(PROBE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")]))
    spec = {"arch": "segmenter", "width": 4, "depth": 9, "num_classes": 3}
    model = build_model(spec)
    classes = list(TASKS["DCH"])
    zeros = {c: 0.0 for c in classes}
    rec = TeacherRecord(name="DCH", task="DCH", classes=classes, model={"arch": "probe_mod:make"},
                        taps=tap_names(model, "blocks"), val_iou=zeros, val_miou=0.0, test_iou=zeros,
                        test_miou=0.0, untrained_miou=0.0, chance_iou=zeros, data_hash="x")
    d = tmp_path / "zoo" / "DCH"
    d.mkdir(parents=True)
    torch.save(model.state_dict(), d / "weights.pt")
    (d / "teacher.json").write_text(json.dumps(asdict(rec)))
    return d, marker


def test_a_record_naming_an_import_path_is_refused_and_nothing_runs(planted) -> None:
    teacher, marker = planted
    with pytest.raises(ModelError) as err:
        load_teacher(teacher)
    msg = str(err.value)
    assert "'probe_mod:make' is an import path" in msg and "not imported" in msg and "\n" not in msg
    with pytest.raises(ModelError, match="is an import path"):  # a shard loading a copied zoo
        MikeShardPool([TeacherRef("DCH", str(teacher), 0)], PlacementConfig(mode="local", device="cpu"))
    assert not marker.exists()
    # `python -m mike_ray.check TEACHER_DIR`: one line, exit 2, nothing imported
    p = subprocess.run([sys.executable, "-m", "mike_ray.check", str(teacher)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "is an import path" in p.stderr
    assert not marker.exists()


def test_the_running_sweep_may_name_it(planted) -> None:
    """Positive control (the probe works): listed in ``imports`` — as when the sweep file being run
    names that arch itself — the record's arch is imported and called."""
    teacher, marker = planted
    with pytest.raises(ModelError):  # a Conv2d does not fit the stored segmenter weights
        load_teacher(teacher, imports={"probe_mod:make"})
    assert marker.read_text() == "called"
