"""Query sets of your own: a folder of images or a COCO-format source, prepared once, read by the
training loop like the task crops (rows without a task label)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mike_ray.data.query import NO_TASK, QueryConfig, load_query, open_query, prepare_query
from mike_ray.errors import DataError


def _folder(root: Path) -> Path:
    """Six images: RGB, grayscale, RGBA, different sizes, nested; plus a file that is not an image."""
    (root / "sub" / "deeper").mkdir(parents=True)
    wide = np.zeros((40, 120, 3), np.uint8)
    wide[:, :40] = (255, 0, 0)    # left third red
    wide[:, 40:80] = (0, 255, 0)  # middle third green: what the centre crop keeps
    wide[:, 80:] = (0, 0, 255)
    Image.fromarray(wide).save(root / "wide.png")
    Image.fromarray(np.full((64, 64), 128, np.uint8), "L").save(root / "sub" / "gray.png")
    Image.fromarray(np.full((30, 30, 4), 200, np.uint8), "RGBA").save(root / "sub" / "rgba.png")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (50 + i, 70, 3), np.uint8)).save(root / "sub" / "deeper" / f"n{i}.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_folder_becomes_a_query_set_once(tmp_path) -> None:
    src = _folder(tmp_path / "imgs")
    cfg = QueryConfig(source="folder", root=str(src), val_fraction=0.34)
    out = prepare_query(cfg, 32, tmp_path / "out")
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"] == {"train": 4, "val": 2} and man["image_size"] == 32  # the .txt is not listed
    train, val = load_query(out, "train"), load_query(out, "val")
    assert len(train) == 4 and len(val) == 2
    assert train.images.shape == (4, 3, 32, 32) and set(train.task_ids.tolist()) == {NO_TASK}
    batch = train.__getitems__([0, 1])
    assert batch["image"].dtype == torch.float32 and float(batch["image"].max()) <= 1.0
    assert float(batch["mask"].abs().sum()) == 0.0  # no masks
    # the wide image was centre-cropped: only its green middle third is left
    import pyarrow.parquet as pq

    sources = {s: i for split in ("train", "val") for i, s in enumerate(pq.read_table(out / f"{split}.parquet")
                                                                          .column("source").to_pylist())}
    assert set(sources) == {"wide.png", "sub/gray.png", "sub/rgba.png", "sub/deeper/n0.jpg", "sub/deeper/n1.jpg",
                            "sub/deeper/n2.jpg"}
    ds = train if "wide.png" in pq.read_table(out / "train.parquet").column("source").to_pylist() else val
    split_sources = pq.read_table(out / f"{ds.split}.parquet").column("source").to_pylist()
    wide = ds.images[split_sources.index("wide.png")]
    inner = wide[:, :, 2:-2]  # the resampling filter blends the box's edge columns with their neighbours
    assert (inner[1] == 255).all() and (inner[0] == 0).all() and (inner[2] == 0).all()
    # unchanged source, same config: re-used, not rewritten
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_query(cfg, 32, tmp_path / "out") == out and (out / "manifest.json").stat().st_mtime_ns == mtime
    # a changed source is a new query set
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "new.png")
    assert prepare_query(cfg, 32, tmp_path / "out") != out


def test_a_coco_query_set_takes_the_images_showing_chosen_categories(small_coco, tmp_path) -> None:
    from pycocotools.coco import COCO

    (ann,) = (small_coco / "annotations").glob("instances_*.json")
    coco = COCO(str(ann))
    names = ["person", "dog", "car"]
    expected = set()
    for name in names:
        expected |= set(coco.getImgIds(catIds=coco.getCatIds(catNms=[name])))
    out = prepare_query(QueryConfig(source="coco", root=str(small_coco), categories=names), 32, tmp_path)
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["train"] + man["counts"]["val"] == len(expected) >= 2
    every = prepare_query(QueryConfig(source="coco", root=str(small_coco)), 32, tmp_path)
    counts = json.loads((every / "manifest.json").read_text())["counts"]
    assert counts["train"] + counts["val"] == len(coco.imgs)
    assert len(open_query(every, "val", limit=1)) == 1
    with pytest.raises(DataError, match=r"query.categories: .*instances_.*no category named 'unicorn'"):
        prepare_query(QueryConfig(source="coco", root=str(small_coco), categories=["unicorn"]), 32, tmp_path)


@pytest.mark.parametrize("case, says", [
    ("empty", "no image files"),
    ("one", "1 image(s); a query set needs two or more"),
    ("broken", "b.png: cannot read image"),
])
def test_a_bad_folder_is_one_line_and_leaves_no_query_set(tmp_path, case, says) -> None:
    src = tmp_path / "imgs"
    src.mkdir()
    if case != "empty":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "a.png")
    if case == "broken":
        (src / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(DataError) as err:
        prepare_query(QueryConfig(source="folder", root=str(src)), 16, tmp_path / "out")
    assert says in str(err.value) and "\n" not in str(err.value)
    assert not list((tmp_path / "out").glob("query/*/manifest.json"))


def test_query_config_is_checked_as_it_loads(tmp_path) -> None:
    from mike_ray.config import load_sweep
    from mike_ray.errors import ConfigError

    sweep = Path(__file__).resolve().parents[1] / "sweeps" / "bring_your_own.yaml"
    imgs = tmp_path / "imgs"
    imgs.mkdir()

    def error(*sets: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_sweep(sweep, [f"output={tmp_path}", *sets], profile="smoke")
        return str(err.value)

    folder = f"query={{source: folder, root: {imgs}}}"
    # rows without task labels: a teacher masked to a task would never score one
    assert "teachers.seg_lraspp.task: teacher 'seg_lraspp' is masked to task 'PHB', but a folder query set" in \
        error(folder)
    cfg = load_sweep(sweep, [f"output={tmp_path}", folder, "transfer.masking=false"], profile="smoke")
    assert cfg.query_tasks(cfg.subset("all_three")) == [] and cfg.query.root == str(imgs)
    assert "query.root: " in error(f"query={{source: folder, root: {tmp_path / 'nope'}}}", "transfer.masking=false")
    assert "query.tasks: only for source 'tasks'" in error(f"query={{source: folder, root: {imgs}, tasks: [PHB]}}")
    assert "query.root is required" in error("query={source: coco}")
    assert "query.categories: only for source 'coco'" in \
        error(f"query={{source: folder, root: {imgs}, categories: [dog]}}", "transfer.masking=false")


def test_a_transfer_reads_a_coco_query_set(small_coco, tmp_path, ray_local) -> None:
    """The training loop on a COCO query set (whole images, no task labels) with one teacher of your
    own that has no task: it scores every row, in training and validation."""
    from mike_ray.mike.config import TeacherEntry
    from mike_ray.mike.train import TransferConfig
    from mike_ray.models import build_model
    from mike_ray.orchestrate.transfer import run_transfer, teacher_refs
    from mike_ray.resources import PlacementConfig, WorkersConfig

    from conftest import TINY_AE

    query = prepare_query(QueryConfig(source="coco", root=str(small_coco), val_fraction=0.25), 64, tmp_path)
    torch.save(build_model({"arch": "resnet18", "num_classes": 5, "seed": 0}).state_dict(), tmp_path / "r.pt")
    entry = TeacherEntry(model={"arch": "resnet18", "num_classes": 5}, weights=str(tmp_path / "r.pt"),
                         taps=["layer1", "layer2"], input="imagenet")
    refs = teacher_refs(tmp_path, ["r18"], entries={"r18": entry})
    cfg = TransferConfig(model=TINY_AE, epochs=1, batch_size=4, val_batches=1, device="cpu")
    res = run_transfer(cfg, refs, query, [], PlacementConfig(mode="ray", cpus_per_shard=0.5, device="cpu"),
                       WorkersConfig(num_workers=1, cpus_per_worker=0.5), tmp_path / "runs", "coco-query")
    (epoch,) = res.history
    for prefix in ("loss/teacher/r18/", "loss/val/teacher/r18/"):
        terms = {k: v for k, v in epoch.items() if k.startswith(prefix)}
        assert set(terms) == {prefix + "layer1", prefix + "layer2"} and all(v > 0 for v in terms.values()), epoch


def test_a_sweep_prepares_its_folder_query_set_once_and_hands_it_to_its_trials(tmp_path) -> None:
    """What the sweep driver does with ``query.source: folder`` before any trial: the stage prepares
    the query set, and the trials' settings carry its folder (read by the transfer in place of the
    task crops), with no query tasks."""
    from mike_ray.config import load_sweep
    from mike_ray.orchestrate.mike_trial import MikeFamily

    src = _folder(tmp_path / "imgs")
    sweep = Path(__file__).resolve().parents[1] / "sweeps" / "bring_your_own.yaml"
    cfg = load_sweep(sweep, [f"output={tmp_path / 'out'}", f"query={{source: folder, root: {src}}}",
                             "transfer.masking=false"], profile="smoke")
    settings = MikeFamily().settings(cfg, None)
    root = Path(settings.query_root)
    assert root.parent == tmp_path / "out" / "query" and (root / "manifest.json").is_file()
    assert settings.query_tasks(["seg_lraspp", "cls_resnet18"]) == []
    assert len(open_query(root, "train")) + len(open_query(root, "val")) == 6
    assert MikeFamily().settings(cfg, None).query_root == settings.query_root  # prepared once
