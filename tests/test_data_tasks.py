"""The 11 tasks: order, COCO spelling and ids (checked against torchvision's COCO list), resolution."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from torchvision.models._meta import _COCO_CATEGORIES  # index = COCO 2017 category id

from mike_ray.data.coco import load_coco
from mike_ray.data.synth import COCO_CATEGORIES, N_TASK_CLASSES
from mike_ray.data.tasks import (CLASS_TO_TASK, TASK_CODES, TASKS, check_task_codes, resolve_task_categories,
                                 task_id)
from mike_ray.errors import ConfigError, DataError


def test_tasks_are_the_papers_eleven_in_design_order() -> None:
    assert TASK_CODES == ["PHB", "BTS", "SSS", "SOR", "PCS", "DCH", "CBB", "CDP", "CTL", "CTB", "BCV"]
    assert TASKS["BTS"] == ("bench", "traffic light", "stop sign")
    assert TASKS["CTL"] == ("cell phone", "tv", "laptop")
    assert task_id("PHB") == 0 and task_id("BCV") == 10
    names = [n for v in TASKS.values() for n in v]
    assert len(names) == len(set(names)) == 33 and CLASS_TO_TASK["horse"] == ("DCH", 2)


def test_every_task_class_is_spelled_as_in_coco() -> None:
    coco_names = set(_COCO_CATEGORIES) - {"N/A", "__background__"}
    assert not [n for v in TASKS.values() for n in v if n not in coco_names]


def test_generated_categories_carry_real_coco_ids() -> None:
    for cid, name, _ in COCO_CATEGORIES:
        assert _COCO_CATEGORIES[cid] == name, (cid, name)
    # the first 33 are the task classes, in task order
    assert [n for _, n, _ in COCO_CATEGORIES[:N_TASK_CLASSES]] == [n for v in TASKS.values() for n in v]


def test_resolution_through_a_loaded_file(tmp_path: Path) -> None:
    path = tmp_path / "instances_x.json"
    cats = [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}, {"id": 19, "name": "horse"}]
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": cats}))
    coco = load_coco(path)
    assert resolve_task_categories(coco, "DCH", str(path)) == (18, 17, 19)
    with pytest.raises(DataError, match=r"^.*instances_x\.json: categories: no category named 'car' \(task CTB\)$"):
        resolve_task_categories(coco, "CTB", str(path))


def test_task_code_checks() -> None:
    assert check_task_codes(["DCH", "PHB"]) == ["DCH", "PHB"]
    with pytest.raises(ConfigError, match="tasks: unknown task code 'DOG'"):
        check_task_codes(["DOG"])
    with pytest.raises(ConfigError, match="listed twice"):
        check_task_codes(["DCH", "DCH"])
    with pytest.raises(ConfigError, match="at least one"):
        check_task_codes([])
