"""A sweep's own task table (``tasks:``): task code → COCO category names, any number of classes ≥ 1.

The prepared data carries the table (ids in its order) and masks as wide as its widest task; zoo
teachers and downstream decoders take their channel count from their task; shards mask by the
table's ids. Golden check: a table that restates a paper task gives byte-identical crops and masks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mike_ray.config import load_sweep
from mike_ray.data.coco import PrepareConfig
from mike_ray.data.loaders import ShardDataset
from mike_ray.data.shards import check_dataset, prepare_dataset, read_shard, shard_path
from mike_ray.errors import ConfigError, DataError

from conftest import TINY_AE, TINY_SEGMENTER

ROOT = Path(__file__).resolve().parents[1]
TABLE = {"VEH": ["car", "truck", "bus", "bicycle"], "PET": ["dog"]}


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    from mike_ray.data.synth import generate_coco

    root = tmp_path_factory.mktemp("coco")
    generate_coco(root, n_images=60, seed=0)
    return root


@pytest.fixture(scope="module")
def table_data(coco, tmp_path_factory) -> Path:
    return prepare_dataset(PrepareConfig(task_table=TABLE, augment_copies=1), coco, tmp_path_factory.mktemp("prep"))


def test_the_prepared_data_carries_its_table_and_masks_as_wide_as_its_widest_task(table_data) -> None:
    man = check_dataset(table_data)  # every shard re-read with the table's ids and 4-channel masks
    assert man.table == {"VEH": ("car", "truck", "bus", "bicycle"), "PET": ("dog",)}
    assert man.tasks == ["VEH", "PET"] and man.mask_channels == 4
    assert (man.task_id("VEH"), man.task_id("PET")) == (0, 1)
    for task, k in (("VEH", 4), ("PET", 1)):
        rows = read_shard(shard_path(table_data, "train", task), 64, table=man.table, channels=4).to_pylist()
        assert rows and {r["task_id"] for r in rows} == {man.task_id(task)}
        for r in rows:
            m = np.frombuffer(r["mask"], np.uint8).reshape(4, 64, 64)
            assert m[man.classes(task).index(r["class_name"])].any()  # the instance's own class is drawn
            assert not m[k:].any()  # channels past the task's classes stay empty
    batch = ShardDataset(table_data, "train").__getitems__([0, 1])
    assert tuple(batch["mask"].shape) == (2, 4, 64, 64)


def test_a_table_restating_a_paper_task_gives_the_same_bytes_and_one_class_its_channel(coco, tmp_path) -> None:
    """Golden: {DCH: [dog, cat, horse]} as a table crops exactly what the paper's DCH does; a
    one-class task {DOG: [dog]} has the dog rows, and their masks are DCH's channel 0."""
    paper = prepare_dataset(PrepareConfig(tasks=["DCH"], augment_copies=1), coco, tmp_path / "a")
    own = prepare_dataset(PrepareConfig(task_table={"DCH": ["dog", "cat", "horse"]}, augment_copies=1), coco,
                          tmp_path / "b")
    dog = prepare_dataset(PrepareConfig(task_table={"DOG": ["dog"]}, augment_copies=1), coco, tmp_path / "c")
    assert paper.name != own.name  # a table is part of the data's key
    for split in ("train", "val"):
        a = read_shard(shard_path(paper, split, "DCH"), 64)
        b = read_shard(shard_path(own, split, "DCH"), 64, table={"DCH": ("dog", "cat", "horse")})
        for col in ("image", "mask", "class_name", "ann_id"):
            assert a.column(col).to_pylist() == b.column(col).to_pylist()
        d = read_shard(shard_path(dog, split, "DOG"), 64, table={"DOG": ("dog",)}, channels=1)
        dogs = [i for i, c in enumerate(a.column("class_name").to_pylist()) if c == "dog"]
        assert d.column("ann_id").to_pylist() == [a.column("ann_id")[i].as_py() for i in dogs]
        for i, row in zip(dogs, d.column("mask").to_pylist()):
            assert row == np.frombuffer(a.column("mask")[i].as_py(), np.uint8).reshape(3, 64, 64)[0].tobytes()


def test_teachers_and_decoders_take_their_channels_from_the_task(table_data, tmp_path) -> None:
    """A zoo teacher of a 1-class task has one output map; a downstream decoder of a 4-class task
    four, scored per class; no Ray (both run in this process)."""
    from mike_ray.mike.config import DownstreamConfig
    from mike_ray.mike.downstream import train_downstream
    from mike_ray.mike.zoo import ZooConfig, train_teacher
    from mike_ray.models import build_model

    ctx = {"tasks": TABLE}  # what a sweep's tasks: section passes to the sections' validators
    zoo_cfg = ZooConfig.model_validate({"tasks": ["PET"], "model": TINY_SEGMENTER,
                                        "train": {"epochs": 1, "max_train_samples": 32}}, context=ctx)
    torch.manual_seed(0)
    rec = train_teacher("PET", table_data, zoo_cfg, tmp_path)
    assert rec.classes == ["dog"] and rec.model["num_classes"] == 1 and list(rec.val_iou) == ["dog"]
    assert 0.0 <= rec.val_miou <= 1.0
    state = build_model(TINY_AE).state_dict()
    out = train_downstream("VEH", TINY_AE, state, table_data,
                           DownstreamConfig.model_validate({"tasks": ["VEH"], "epochs": 1, "max_train_samples": 32},
                                                           context=ctx))
    assert len(out["iou_per_class"]) == 4 and 0.0 <= out["iou"] <= 1.0


def test_shards_mask_by_the_tables_ids(table_data, tmp_path) -> None:
    """Two zoo teachers of the table's tasks in one local shard: each scores exactly the rows of its
    own task in a mixed batch (ids from the data's table, not the paper's)."""
    from mike_ray.mike.schedules import ScheduleConfig, make_schedule
    from mike_ray.mike.shard import MikeShardPool
    from mike_ray.mike.zoo import ZooConfig, train_teacher
    from mike_ray.orchestrate.transfer import teacher_refs
    from mike_ray.resources import PlacementConfig
    from mike_ray.data.shards import read_manifest

    cfg = ZooConfig.model_validate({"tasks": ["VEH", "PET"], "model": TINY_SEGMENTER,
                                    "train": {"epochs": 1, "max_train_samples": 16}}, context={"tasks": TABLE})
    for t in ("VEH", "PET"):
        train_teacher(t, table_data, cfg, tmp_path)
    refs = teacher_refs(tmp_path, ["VEH", "PET"], table=read_manifest(table_data).table)
    assert [r.task_id for r in refs] == [0, 1]
    pool = MikeShardPool(refs, PlacementConfig(mode="local", device="cpu"))
    ds = ShardDataset(table_data, "train")
    batch = ds.__getitems__(list(range(len(ds)))[::3])
    w = make_schedule(ScheduleConfig(name="uniform"), pool.taps()).weights(0.5).teachers
    res = pool.step(batch["image"], batch["image"].flip(-1), batch["task_id"], w)
    ids = batch["task_id"].tolist()
    assert res.counts == {"VEH": ids.count(0), "PET": ids.count(1)} and min(res.counts.values()) > 0


# --- the sweep file's tasks: section ------------------------------------------------------------------
def _sweep(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "s.yaml"
    p.write_text("name: t\noutput: " + str(tmp_path) + "\n" + body)
    return p


def test_a_tasks_section_is_the_default_of_every_task_list(tmp_path) -> None:
    cfg = load_sweep(_sweep(tmp_path, "tasks: {VEH: [car, truck, bus, bicycle], PET: [dog]}\n"
                                      "teacher_subsets: {both: [VEH, PET], pet: [PET]}\n"))
    assert cfg.task_table == {"VEH": ("car", "truck", "bus", "bicycle"), "PET": ("dog",)}
    assert cfg.zoo.tasks == cfg.downstream.tasks == cfg.data.prepare.tasks == ["VEH", "PET"]
    assert cfg.data.prepare.task_table == TABLE
    assert load_sweep(ROOT / "sweeps" / "demo.yaml").data.prepare.task_table is None  # the paper's, by default


@pytest.mark.parametrize("body, message", [
    ("tasks: {VEH: [car, car]}\n", "t.yaml: tasks.VEH: category 'car' listed twice"),
    ("tasks: {VEH: [car], CAR: [car]}\n", "tasks.CAR: category 'car' also in task VEH"),
    ("tasks: {VEH: []}\n", "tasks.VEH: a list of COCO category names, at least one"),
    ("tasks: {1VEH: [car]}\n", "task code '1VEH'"),
    ("tasks: {VEH: [car]}\nzoo: {tasks: [DCH]}\n", "zoo.tasks: unknown task 'DCH' (known: VEH)"),
    ("tasks: {VEH: [car]}\ndownstream: {tasks: [VEH, PHB]}\n", "downstream.tasks: unknown task 'PHB' (known: VEH)"),
    ("tasks: {ZEB: [zebra]}\n", "tasks.ZEB: 'zebra' is not a category of the generated data"),
    ("tasks: {VEH: [car]}\nteachers: {r: {model: resnet18, weights: w.pt, taps: [layer1], task: DCH}}\n",
     "teachers.r.task: unknown task 'DCH'"),
    ("tasks: {VEH: [car]}\nmethod: mhgd\n", "tasks: a task table is for MIKE sweeps"),
])
def test_a_bad_tasks_section_is_one_line_naming_the_field(tmp_path, body, message) -> None:
    with pytest.raises(ConfigError) as err:
        load_sweep(_sweep(tmp_path, body).rename(tmp_path / "t.yaml"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_category_the_annotation_file_lacks_is_a_data_error_naming_the_file(coco, tmp_path) -> None:
    with pytest.raises(DataError, match=r"instances_synth\.json: categories: no category named 'zebra' \(task ZEB\)"):
        prepare_dataset(PrepareConfig(task_table={"ZEB": ["zebra"]}), coco, tmp_path)
