"""The generated default dataset: determinism, COCO validity, and annotations that match the pixels."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mike_ray.data.coco import SPLITS, PrepareConfig, image_split, load_coco, open_sources
from mike_ray.data.synth import COCO_CATEGORIES, DEFAULT_IMAGES, generate_coco

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_coco(root, n_images=40, seed=1)
    return root


def test_same_seed_gives_identical_bytes(synth: Path, tmp_path: Path) -> None:
    generate_coco(tmp_path / "a", n_images=40, seed=1)
    assert _digest(tmp_path / "a") == _digest(synth)
    generate_coco(tmp_path / "b", n_images=40, seed=2)
    assert _digest(tmp_path / "b") != _digest(synth)


def test_standard_layout_and_categories(synth: Path) -> None:
    coco = load_coco(synth / "annotations" / "instances_synth.json")
    assert len(coco.imgs) == 40
    assert {(c["id"], c["name"], c["supercategory"]) for c in coco.loadCats(coco.getCatIds())} == set(COCO_CATEGORIES)
    for img in coco.imgs.values():
        with Image.open(synth / "synth" / img["file_name"]) as im:
            assert im.format == "JPEG" and im.size == (img["width"], img["height"])


def test_annotations_exercise_polygons_rle_crowds_and_tiny_objects(synth: Path) -> None:
    anns = load_coco(synth / "annotations" / "instances_synth.json").dataset["annotations"]
    kinds = {"polygon": 0, "rle": 0, "crowd": 0, "tiny": 0}
    for a in anns:
        if a["iscrowd"]:
            kinds["crowd"] += 1
            assert isinstance(a["segmentation"]["counts"], list)  # uncompressed, as in COCO
        elif isinstance(a["segmentation"], list):
            kinds["polygon"] += 1
        else:
            kinds["rle"] += 1
        kinds["tiny"] += a["area"] < 100
    assert kinds["polygon"] > kinds["rle"] > 0 and kinds["crowd"] > 0 and kinds["tiny"] > 0


def test_area_bbox_and_visibility_agree_with_pycocotools_masks(synth: Path) -> None:
    coco = load_coco(synth / "annotations" / "instances_synth.json")
    for img_id in list(coco.imgs)[:15]:
        img = coco.imgs[img_id]
        seen = np.zeros((img["height"], img["width"]), bool)
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
            m = coco.annToMask(a).astype(bool)
            assert m.sum() == a["area"]
            ys, xs = np.nonzero(m)
            x, y, w, h = a["bbox"]
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            # visible regions: no pixel belongs to two annotations (occluded parts are not annotated)
            assert not (seen & m).any()
            seen |= m


def test_objects_are_painted_where_annotated(synth: Path) -> None:
    """Object pixels differ from the background around them: annotations sit on drawn things."""
    coco = load_coco(synth / "annotations" / "instances_synth.json")
    contrast = []
    for a in coco.dataset["annotations"]:
        if a["iscrowd"] or a["area"] < 400:
            continue
        img = np.asarray(Image.open(synth / "synth" / coco.imgs[a["image_id"]]["file_name"]), np.float32)
        m = coco.annToMask(a).astype(bool)
        ring = np.zeros_like(m)
        x, y, w, h = (int(v) for v in a["bbox"])
        ring[max(0, y - 4):y + h + 4, max(0, x - 4):x + w + 4] = True
        ring &= ~m
        contrast.append(np.abs(img[m].mean(0) - img[ring].mean(0)).sum())
    assert len(contrast) > 30 and np.median(contrast) > 30


def test_default_size_gives_every_task_val_and_test_instances(tmp_path: Path) -> None:
    """The demo's dataset (the default size): with the default split fractions every task has
    instances in train, val and test (counted from the annotations, as ``prepare`` selects them)."""
    generate_coco(tmp_path, n_images=DEFAULT_IMAGES, seed=0)
    cfg = PrepareConfig()
    src = open_sources(tmp_path, ["synth"], cfg.tasks)[0]
    per_split = {s: {t: 0 for t in cfg.tasks} for s in SPLITS}
    for ann in src.coco.dataset["annotations"]:
        if ann["iscrowd"] or ann["area"] < cfg.min_area:
            continue
        for task, cats in src.task_cats.items():
            if ann["category_id"] in cats:
                per_split[image_split(ann["image_id"], cfg.val_fraction, cfg.test_fraction)][task] += 1
    # every held-out instance is one crop: >= 30 keeps a test IoU meaningful on every task
    for split in ("val", "test"):
        assert min(per_split[split].values()) >= 30, (split, per_split[split])
    # 60/20/20 by image: about three training instances per test instance overall
    assert sum(per_split["train"].values()) > 2 * sum(per_split["test"].values())
