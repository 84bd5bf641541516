"""The COCO reader: crop/mask geometry against pycocotools' own masks, channel semantics, skipping,
augmentation alignment, split assignment, config validation.

A hand-made COCO file (PNG image, known boxes) makes the geometry exact: with margin 0.5 and a
32-px box the crop side is exactly 64, so no resampling happens and the crop must equal a slice of
``annToMask`` (and of the image) pixel for pixel.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from mike_ray.data.coco import PrepareConfig, crop_specs, image_split, iter_crops, load_coco, open_sources
from mike_ray.data.synth import generate_coco
from mike_ray.errors import ConfigError, DataError
from mike_ray.config_base import validate

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

W, H = 200, 160
DOG, CAT, HORSE, CAR = 18, 17, 19, 3  # COCO 2017 ids
COLOURS = {DOG: (255, 0, 0), CAT: (0, 255, 0), HORSE: (0, 0, 255), CAR: (255, 255, 0)}


def _rect(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _crowd_rle(x0: int, y0: int, x1: int, y1: int) -> dict:
    m = np.zeros((H, W), np.uint8, order="F")
    m[y0:y1, x0:x1] = 1
    m[y0 + 2:y1 - 2:3, x0 + 2:x1 - 2:3] = 0  # a sparse crowd-like pattern
    flat = m.reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": [H, W]}


def make_handmade(root: Path) -> dict[str, int]:
    """Write a one-image COCO dataset; returns the annotation ids by role."""
    anns = [
        # id 1: dog, 32×32 box → with margin 0.5 the crop is exactly 64×64 at (34, 24)
        {"id": 1, "category_id": DOG, "segmentation": [[50, 40, 82, 44, 78, 72, 52, 70]], "bbox": [50, 40, 32, 32]},
        # id 2: cat overlapping the right edge of the dog crop (partly inside)
        {"id": 2, "category_id": CAT, "segmentation": [[88, 30, 120, 50, 90, 80]], "bbox": [88, 30, 32, 50]},
        # id 3: car inside the dog crop: another task's class, never drawn in DCH masks
        {"id": 3, "category_id": CAR, "segmentation": [_rect(36, 74, 14, 10)], "bbox": [36, 74, 14, 10]},
        # id 4: horse crowd (RLE) overlapping the dog crop: drawn in channel 2, never cropped
        {"id": 4, "category_id": HORSE, "segmentation": _crowd_rle(40, 26, 60, 38), "bbox": [40, 26, 20, 12],
         "iscrowd": 1},
        # id 5: tiny dog inside the dog crop: drawn in channel 0, not cropped (area < min_area)
        {"id": 5, "category_id": DOG, "segmentation": [_rect(86, 80, 5, 5)], "bbox": [86, 80, 5, 5]},
        # id 6: cat at the left border: its crop leaves the image and is padded
        {"id": 6, "category_id": CAT, "segmentation": [[0, 100, 32, 104, 20, 132, 2, 128]], "bbox": [0, 100, 32, 32]},
        # id 7: large horse: a 96-px crop, resized to 64
        {"id": 7, "category_id": HORSE, "segmentation": [[120, 90, 168, 96, 160, 138, 126, 130]],
         "bbox": [120, 90, 48, 48]},
    ]
    data = {"images": [{"id": 7, "file_name": "img.png", "width": W, "height": H}],
            "annotations": [], "categories": [
                {"id": DOG, "name": "dog", "supercategory": "animal"},
                {"id": CAT, "name": "cat", "supercategory": "animal"},
                {"id": HORSE, "name": "horse", "supercategory": "animal"},
                {"id": CAR, "name": "car", "supercategory": "vehicle"}]}
    # pixels: a gradient background, each object painted in its class colour from its own mask
    gy, gx = np.mgrid[0:H, 0:W]
    img = np.stack([gx * 255 // W, gy * 255 // H, (gx + gy) % 64], -1).astype(np.uint8) // 3
    for ann in anns:
        rle = mask_utils.frPyObjects(ann["segmentation"], H, W)
        rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
        m = mask_utils.decode(rle).astype(bool)
        img[m] = COLOURS[ann["category_id"]]
        data["annotations"].append({"image_id": 7, "iscrowd": 0, **ann, "area": float(m.sum())})
    (root / "annotations").mkdir(parents=True)
    (root / "hand").mkdir()
    (root / "annotations" / "instances_hand.json").write_text(json.dumps(data))
    Image.fromarray(img).save(root / "hand" / "img.png")
    return {"dog": 1, "cat_partial": 2, "car": 3, "crowd": 4, "tiny": 5, "border": 6, "big": 7}


def _class_mask(coco, img_id: int, cat: int) -> np.ndarray:
    out = np.zeros((H, W), np.uint8)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id], catIds=[cat])):
        out |= coco.annToMask(ann)
    return out


def _crops(root: Path, **cfg_kw):
    cfg = PrepareConfig(**{"tasks": ["DCH"], "margin": 0.5, "augment_copies": 0, "min_area": 50,
                           "val_fraction": 0.0, **cfg_kw})
    sources = open_sources(root, ["hand"], cfg.tasks)
    return sources[0].coco, list(iter_crops(sources, cfg))


@pytest.fixture(scope="module")
def hand(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hand")
    make_handmade(root)
    return root


def test_unaugmented_crop_equals_pycocotools_mask_and_image_slice(hand: Path) -> None:
    coco, crops = _crops(hand)
    rec = next(r for r in crops if r.ann_id == 1)
    assert (rec.task, rec.task_id, rec.class_name, rec.category_id, rec.split) == ("DCH", 5, "dog", DOG, "train")
    full = np.stack([_class_mask(coco, 7, c) for c in (DOG, CAT, HORSE)])  # channel order = task order
    mask = np.frombuffer(rec.mask, np.uint8).reshape(3, 64, 64)
    np.testing.assert_array_equal(mask, full[:, 24:88, 34:98])
    pixels = np.asarray(Image.open(hand / "hand" / "img.png").convert("RGB"))
    np.testing.assert_array_equal(np.frombuffer(rec.image, np.uint8).reshape(64, 64, 3), pixels[24:88, 34:98])


def test_mask_channels_hold_every_task_instance_in_the_crop_and_nothing_else(hand: Path) -> None:
    coco, crops = _crops(hand)
    mask = np.frombuffer(next(r for r in crops if r.ann_id == 1).mask, np.uint8).reshape(3, 64, 64)
    crop = (slice(24, 88), slice(34, 98))
    ann_mask = {a["id"]: coco.annToMask(a)[crop] for a in coco.loadAnns(coco.getAnnIds())}
    # the partly visible cat, the crowd horse and the tiny dog are all drawn in their channels
    assert ann_mask[2].sum() > 20 and np.all(mask[1][ann_mask[2] == 1] == 1)
    assert ann_mask[4].sum() > 20 and np.all(mask[2][ann_mask[4] == 1] == 1)
    assert ann_mask[5].sum() > 10 and np.all(mask[0][ann_mask[5] == 1] == 1)
    # the car (task CTB) is inside the crop but in no channel
    car = ann_mask[3] == 1
    assert car.sum() > 50 and not mask[:, car].any()


def test_crowd_and_small_instances_are_not_cropped(hand: Path) -> None:
    _, crops = _crops(hand)
    assert sorted({r.ann_id for r in crops}) == [1, 2, 6, 7]
    _, crops = _crops(hand, min_area=0.0)  # the tiny one comes back; the crowd never does
    assert sorted({r.ann_id for r in crops}) == [1, 2, 5, 6, 7]


def test_crop_leaving_the_image_is_zero_padded_like_the_full_mask(hand: Path) -> None:
    coco, crops = _crops(hand)
    rec = next(r for r in crops if r.ann_id == 6)  # box (-16, 84, 48, 148)
    full = np.stack([_class_mask(coco, 7, c) for c in (DOG, CAT, HORSE)])
    padded = np.pad(full, ((0, 0), (0, 0), (16, 0)))
    np.testing.assert_array_equal(np.frombuffer(rec.mask, np.uint8).reshape(3, 64, 64), padded[:, 84:148, 0:64])
    img = np.frombuffer(rec.image, np.uint8).reshape(64, 64, 3)
    assert not img[:, :16].any() and img[:, 16:].any()


def test_resized_crop_matches_independent_antialiased_resize(hand: Path) -> None:
    coco, crops = _crops(hand)
    rec = next(r for r in crops if r.ann_id == 7)  # 48-px box ×2 margin → 96-px box (96, 66, 192, 162)
    x0, y0, s = 96, 66, 96
    pixels = np.asarray(Image.open(hand / "hand" / "img.png").convert("RGB"))
    region = np.zeros((s, s, 3), np.uint8)
    region[: H - y0, :] = pixels[y0:H, x0:x0 + s]  # bottom rows lie outside the 160-px image
    ref = torch.nn.functional.interpolate(torch.from_numpy(region).permute(2, 0, 1)[None].float(), size=(64, 64),
                                          mode="bilinear", antialias=True, align_corners=False)[0]
    got = torch.from_numpy(np.frombuffer(rec.image, np.uint8).reshape(64, 64, 3).copy()).permute(2, 0, 1).float()
    assert (got - ref).abs().max() <= 3.0
    full = np.zeros((s, s), np.uint8)
    full[: H - y0] = _class_mask(coco, 7, HORSE)[y0:H, x0:x0 + s]
    nearest = full[(np.arange(64) * 1.5 + 0.75).astype(int)][:, (np.arange(64) * 1.5 + 0.75).astype(int)]
    got_m = np.frombuffer(rec.mask, np.uint8).reshape(3, 64, 64)[2]
    iou = (got_m & nearest).sum() / (got_m | nearest).sum()
    assert iou > 0.95


def test_augmented_crops_keep_image_and_mask_aligned(hand: Path) -> None:
    cfg_kw = {"augment_copies": 12, "shift": 0.3, "zoom": (0.6, 1.6)}
    coco, crops = _crops(hand, **cfg_kw)
    specs = crop_specs(coco.anns[1]["bbox"], 1, PrepareConfig(margin=0.5, **cfg_kw), augment=True)
    assert len(specs) == 13 and any(s.mirror for s in specs) and len({s.box for s in specs}) == 13
    for rec in (r for r in crops if r.ann_id in (1, 6, 7)):
        img = np.frombuffer(rec.image, np.uint8).reshape(64, 64, 3).astype(int)
        mask = np.frombuffer(rec.mask, np.uint8).reshape(3, 64, 64)
        for k, cat in enumerate((DOG, CAT, HORSE)):
            painted = (np.abs(img - COLOURS[cat]).sum(-1) < 60)
            if k == 2:  # the crowd horse's holes are finer than the resampling: compare solid horses only
                continue
            union = (painted | (mask[k] == 1)).sum()
            if union > 40:
                assert (painted & (mask[k] == 1)).sum() / union > 0.8, (rec.ann_id, k)


def test_a_crop_does_not_depend_on_which_other_tasks_are_processed(tmp_path: Path) -> None:
    generate_coco(tmp_path, n_images=12, seed=3)
    common = {"augment_copies": 2, "val_fraction": 0.3}
    dch = [r for r in iter_crops(open_sources(tmp_path, ["synth"], ["DCH"]), PrepareConfig(tasks=["DCH"], **common))]
    both = iter_crops(open_sources(tmp_path, ["synth"], ["PHB", "DCH", "BCV"]),
                      PrepareConfig(tasks=["BCV", "PHB", "DCH"], **common))
    assert dch and [(r.ann_id, r.image, r.mask) for r in dch] == \
        [(r.ann_id, r.image, r.mask) for r in both if r.task == "DCH"]


def test_split_is_a_fixed_function_of_the_image_id() -> None:
    ids = np.arange(1, 20001)
    val = np.array([image_split(int(i), 0.2) == "val" for i in ids])
    assert 0.18 < val.mean() < 0.22
    assert all(image_split(int(i), 0.0) == "train" for i in ids[:100])
    # a larger fraction only moves images from train to val, never back
    val3 = np.array([image_split(int(i), 0.3) == "val" for i in ids])
    assert np.all(val3[val])


def test_test_split_honours_the_fractions_and_leaves_val_alone() -> None:
    ids = np.arange(1, 20001)
    split = np.array([image_split(int(i), 0.2, 0.15) for i in ids])
    assert set(split) == {"train", "val", "test"}
    assert 0.18 < (split == "val").mean() < 0.22 and 0.13 < (split == "test").mean() < 0.17
    # the test split is taken from train only: every val image stays val, whatever test_fraction
    val_only = np.array([image_split(int(i), 0.2) for i in ids])
    assert np.array_equal(split == "val", val_only == "val")
    assert np.all(val_only[split == "test"] == "train")
    assert all(image_split(int(i), 0.0, 0.0) == "train" for i in ids[:100])
    assert all(image_split(int(i), 0.0, 0.9999) == "test" for i in ids[:100])
    # a larger test fraction only moves images from train to test
    more = np.array([image_split(int(i), 0.2, 0.3) for i in ids])
    assert np.all(more[split == "test"] == "test") and np.array_equal(more == "val", split == "val")


def test_crops_carry_the_split_of_their_image(tmp_path: Path) -> None:
    generate_coco(tmp_path, n_images=30, seed=3)
    cfg = PrepareConfig(tasks=["PHB", "DCH", "CTB"], augment_copies=1, val_fraction=0.25, test_fraction=0.25)
    recs = list(iter_crops(open_sources(tmp_path, ["synth"], cfg.tasks), cfg))
    by_split: dict[str, set[int]] = {"train": set(), "val": set(), "test": set()}
    for r in recs:
        assert r.split == image_split(r.image_id, 0.25, 0.25)
        by_split[r.split].add(r.image_id)
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    # held-out splits are not augmented: one crop per instance
    for split in ("val", "test"):
        anns = [r.ann_id for r in recs if r.split == split]
        assert len(anns) == len(set(anns)) > 0


def test_unknown_category_name_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "c"
    make_handmade(root)
    with pytest.raises(DataError, match=r"instances_hand\.json: categories: no category named 'person' \(task PHB\)"):
        open_sources(root, ["hand"], ["PHB"])


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] \(id 1\)\.bbox"),
    (lambda d: d["annotations"][1].update(category_id=999), r"annotations\[1\] \(id 2\)\.category_id"),
    (lambda d: d["annotations"][2].update(image_id=8), r"annotations\[2\] \(id 3\)\.image_id"),
    (lambda d: d["images"][0].update(width="200"), r"images\[0\]\.width"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]), r"annotations\[0\] \(id 1\)\.segmentation"),
    (lambda d: d.pop("categories"), r"categories: missing"),
])
def test_malformed_records_name_file_and_field(tmp_path: Path, mutate, field: str) -> None:
    make_handmade(tmp_path)
    path = tmp_path / "annotations" / "instances_hand.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances_hand\.json: " + field):
        load_coco(path)


def test_image_of_wrong_size_is_a_data_error(tmp_path: Path) -> None:
    make_handmade(tmp_path)
    Image.new("RGB", (100, 100)).save(tmp_path / "hand" / "img.png")
    with pytest.raises(DataError, match=r"img\.png: image is 100x100 but .*instances_hand\.json says 200x160"):
        _crops(tmp_path)


@pytest.mark.parametrize("data, field", [
    ({"tasks": ["DCH", "XYZ"]}, "tasks"), ({"zoom": [1.2, 0.8]}, "zoom"), ({"val_fraction": 1.0}, "val_fraction"),
    ({"augment_copy": 2}, "augment_copy"), ({"image_size": "big"}, "image_size"),
    ({"test_fraction": -0.1}, "test_fraction"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val_fraction \+ test_fraction"),
])
def test_prepare_config_errors_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^prep\.yaml: {field}: "):
        validate(PrepareConfig, data, source="prep.yaml")


def test_prepare_config_orders_tasks_canonically() -> None:
    assert PrepareConfig(tasks=["BCV", "PHB"]).tasks == ["PHB", "BCV"]
