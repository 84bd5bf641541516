"""The embedded default dataset: a small, generated COCO-format dataset with real image files.

``generate_coco(root, n_images=..., seed=...)`` writes the standard COCO 2017 layout::

    <root>/annotations/instances_synth.json
    <root>/synth/000000000001.jpg ...

so the very same reader (:mod:`mike_ray.data.coco`, on pycocotools) reads it and real COCO.
Categories carry COCO 2017's real ids, names and supercategories: the 33 task classes plus six
distractor classes that belong to no task.

How the images are drawn, and why:
- every class has a fixed *appearance*: a shape family, a texture and a hue. Inside one task the
  three classes have different shapes and textures but neighbouring hues, so colour alone does not
  separate them; jitter (aspect, rotation, vertex wobble, hue, brightness, texture frequency and
  phase) makes every instance different.
- a scene draws 3–7 objects mostly from two "scene" tasks (co-occurrence, as in COCO), sometimes a
  distractor; objects overlap, later ones occlude earlier ones. Backgrounds are gradients with
  low-frequency noise and unannotated clutter shapes; pixel noise and JPEG compression on top.
- segmentations are the *visible* region, as in COCO: an unoccluded object is a polygon; an
  occluded one is a compressed RLE of what remains visible; a few "crowd" groups (several small
  objects of one class) are uncompressed RLE with ``iscrowd=1``; ~10% of objects are tiny (below
  the default ``min_area``), so the reader's skipping logic is exercised.
- the pixels of an object are exactly its annotation's mask: masks are rasterised by pycocotools
  itself (``frPyObjects`` + ``decode``), the same call the reader uses.

Deterministic: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` only, and files
are written in a fixed order, so the same seed gives byte-identical JSON and images.

Default size (:data:`DEFAULT_IMAGES`): 1,000 images of 144–192 px with ~5,000 annotations. With the
default :class:`~mike_ray.data.coco.PrepareConfig` (min_area 256, 1 + 3 augmented crops per training
instance, 20% of images held out for val and 20% for test, held-out crops not augmented) that is
590–960 training crops, 39–94 validation crops and 53–85 test crops per task (~8,200 + ~680 + ~720
in all), so every task has a test split. A tiny dataset (the smoke profile's 60 images) may leave a
task without val or test crops. Generating takes ~5.5 s and preparing ~3 s on one core of this
machine (benchmarks/data_prep.py).
"""
from __future__ import annotations

import colorsys
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from pycocotools import mask as mask_utils

DEFAULT_SPLIT = "synth"
DEFAULT_IMAGES = 1000
DEFAULT_SEED = 0

# COCO 2017 (id, name, supercategory) of the 33 task classes, in task order, then 6 distractors.
COCO_CATEGORIES: list[tuple[int, str, str]] = [
    (1, "person", "person"), (31, "handbag", "accessory"), (27, "backpack", "accessory"),
    (15, "bench", "outdoor"), (10, "traffic light", "outdoor"), (13, "stop sign", "outdoor"),
    (37, "sports ball", "sports"), (42, "surfboard", "sports"), (41, "skateboard", "sports"),
    (81, "sink", "appliance"), (79, "oven", "appliance"), (82, "refrigerator", "appliance"),
    (59, "pizza", "food"), (61, "cake", "food"), (54, "sandwich", "food"),
    (18, "dog", "animal"), (17, "cat", "animal"), (19, "horse", "animal"),
    (47, "cup", "kitchen"), (44, "bottle", "kitchen"), (51, "bowl", "kitchen"),
    (62, "chair", "furniture"), (67, "dining table", "furniture"), (64, "potted plant", "furniture"),
    (77, "cell phone", "electronic"), (72, "tv", "electronic"), (73, "laptop", "electronic"),
    (3, "car", "vehicle"), (8, "truck", "vehicle"), (6, "bus", "vehicle"),
    (84, "book", "indoor"), (85, "clock", "indoor"), (86, "vase", "indoor"),
    # distractors: annotated, but in no task
    (2, "bicycle", "vehicle"), (11, "fire hydrant", "outdoor"), (16, "bird", "animal"),
    (28, "umbrella", "accessory"), (52, "banana", "food"), (88, "teddy bear", "indoor"),
]
N_TASK_CLASSES = 33


def check_drawn(table: dict[str, list[str]]) -> None:
    """Every category name of a task table is one the generated data draws (ValueError naming the
    task and the name otherwise: such a task would have no crops)."""
    drawn = [name for _, name, _ in COCO_CATEGORIES]
    for code, names in table.items():
        missing = [n for n in names if n not in drawn]
        if missing:
            raise ValueError(f"tasks.{code}: {missing[0]!r} is not a category of the generated data (it draws: "
                             f"{', '.join(drawn)}); or use data.source: coco")

SHAPES = ("ellipse", "rectangle", "triangle", "star", "hexagon", "cross", "lshape", "crescent", "arrow")
TEXTURES = ("stripes", "checker", "dots", "rings", "noise", "gradient")

# image sizes (width, height) drawn per image: varied, so width/height handling is exercised
_SIZES = ((192, 144), (176, 176), (144, 192), (160, 160))


def _appearance(cat_index: int) -> tuple[str, str, float]:
    """(shape, texture, base hue in [0,1)) of the category at ``cat_index`` in COCO_CATEGORIES.

    Task t, channel k: shape (t + 3k) mod 9 and texture (t + 2k) mod 6 differ inside a task;
    hues are close inside a task (t/11 + k·0.07) so colour alone is not enough.
    """
    if cat_index < N_TASK_CLASSES:
        t, k = divmod(cat_index, 3)
        return SHAPES[(t + 3 * k) % len(SHAPES)], TEXTURES[(t + 2 * k) % len(TEXTURES)], (t / 11 + 0.07 * k) % 1.0
    d = cat_index - N_TASK_CLASSES
    return SHAPES[(2 * d + 1) % len(SHAPES)], TEXTURES[(d + 3) % len(TEXTURES)], (d / 6 + 0.04) % 1.0


def _unit_polygon(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (V×2, roughly within [-1,1]²) of a shape family, with a little vertex wobble."""
    if shape == "ellipse":
        a = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    elif shape == "rectangle":
        pts = np.array([[-1, -0.65], [1, -0.65], [1, 0.65], [-1, 0.65]], float)
    elif shape == "triangle":
        pts = np.array([[0, -1], [0.95, 0.8], [-0.95, 0.8]], float)
    elif shape == "star":
        a = np.linspace(0, 2 * np.pi, 10, endpoint=False) - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([r * np.cos(a), r * np.sin(a)], 1)
    elif shape == "hexagon":
        a = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        pts = np.stack([np.cos(a), np.sin(a)], 1)
    elif shape == "cross":
        w = 0.33
        pts = np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                        [-w, w], [-1, w], [-1, -w], [-w, -w]], float)
    elif shape == "lshape":
        pts = np.array([[-1, -1], [-0.2, -1], [-0.2, 0.3], [1, 0.3], [1, 1], [-1, 1]], float)
    elif shape == "crescent":
        a = np.linspace(-0.8 * np.pi, 0.8 * np.pi, 14)
        outer = np.stack([np.cos(a), np.sin(a)], 1)
        inner = np.stack([0.45 + 0.55 * np.cos(a[::-1]) - 0.35, 0.7 * np.sin(a[::-1])], 1)
        pts = np.concatenate([outer, inner])
    elif shape == "arrow":
        pts = np.array([[-1, -0.3], [0.2, -0.3], [0.2, -0.8], [1, 0], [0.2, 0.8], [0.2, 0.3], [-1, 0.3]], float)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)
    return pts * rng.uniform(0.9, 1.1, size=(len(pts), 1))


def _texture(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Texture value in [0,1] over object-local coordinates ``u, v`` (pixels, rotated with the object)."""
    freq = rng.uniform(0.28, 0.45)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(freq * u + phase)
    if kind == "checker":
        return ((np.floor(freq * u / 2.2 + phase) + np.floor(freq * v / 2.2)) % 2).astype(np.float32)
    if kind == "dots":
        d = np.sin(freq * 0.8 * u + phase) * np.sin(freq * 0.8 * v)
        return (d > 0.45).astype(np.float32)
    if kind == "rings":
        return 0.5 + 0.5 * np.sin(freq * 0.9 * np.hypot(u, v) + phase)
    if kind == "noise":
        h, w = u.shape
        small = rng.random((max(2, h // 5), max(2, w // 5))).astype(np.float32)
        return np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                          np.float32) / 255.0
    if kind == "gradient":
        span = max(1.0, float(np.abs(u).max()))
        return np.clip(0.5 + 0.5 * u / span, 0, 1)
    raise ValueError(kind)  # pragma: no cover - TEXTURES is closed


def _colour(hue: float, sat: float, val: float) -> np.ndarray:
    """RGB float in [0,255] of an HSV colour."""
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, min(max(sat, 0), 1), min(max(val, 0), 1)), np.float32) * 255


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (``counts`` list, column-major runs starting with zeros) of a 0/1 mask."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:  # runs must start with a (possibly empty) run of zeros
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _poly_mask(poly: list[float], h: int, w: int) -> np.ndarray:
    """H×W uint8 0/1 mask of one polygon, rasterised by pycocotools (exactly as the reader will)."""
    with warnings.catch_warnings():  # pycocotools' numpy-2 DeprecationWarning on every decode
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(mask_utils.frPyObjects([poly], h, w))[:, :, 0]


class _Obj:
    """One drawn object: its category index, full mask, and (for non-crowd) polygon."""

    __slots__ = ("cat", "mask", "poly", "crowd")

    def __init__(self, cat: int, mask: np.ndarray, poly: list[float] | None, crowd: bool):
        self.cat, self.mask, self.poly, self.crowd = cat, mask, poly, crowd


def _place_polygon(shape: str, cx: float, cy: float, size: float, w: int, h: int,
                   rng: np.random.Generator) -> tuple[list[float], float, float, float]:
    """A jittered shape polygon centred at (cx, cy) with diameter ~``size``, clamped to the image.

    Returns (flat COCO polygon [x0,y0,x1,y1,...], rotation angle, x scale, y scale).
    """
    pts = _unit_polygon(shape, rng)
    sx, sy = size / 2 * rng.uniform(0.8, 1.2), size / 2 * rng.uniform(0.8, 1.2)
    ang = rng.uniform(-0.6, 0.6) if shape in ("rectangle", "lshape") else rng.uniform(-np.pi, np.pi)
    ca, sa = math.cos(ang), math.sin(ang)
    x = pts[:, 0] * sx * ca - pts[:, 1] * sy * sa + cx
    y = pts[:, 0] * sx * sa + pts[:, 1] * sy * ca + cy
    # clamp to the image like COCO's annotations; the drawn pixels are this same clamped polygon
    x = np.clip(x, 0, w)
    y = np.clip(y, 0, h)
    poly = np.round(np.stack([x, y], 1).reshape(-1), 2)
    return [float(c) for c in poly], ang, sx, sy


def _paint(img: np.ndarray, mask: np.ndarray, cat: int, cx: float, cy: float, ang: float,
           rng: np.random.Generator) -> None:
    """Paint the textured, coloured appearance of category ``cat`` into ``img`` where ``mask`` is 1."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    ca, sa = math.cos(ang), math.sin(ang)
    u = (gx - cx) * ca + (gy - cy) * sa  # object-local coordinates: texture turns with the object
    v = -(gx - cx) * sa + (gy - cy) * ca
    _, texture, hue = _appearance(cat)
    t = _texture(texture, u, v, rng)[..., None]
    hue_j = hue + rng.normal(0, 0.025)
    c1 = _colour(hue_j, rng.uniform(0.55, 0.9), rng.uniform(0.55, 0.95))
    c2 = _colour(hue_j + 0.5 + rng.normal(0, 0.05), rng.uniform(0.2, 0.6), rng.uniform(0.15, 0.5))
    shade = 1 + 0.18 * np.clip(v / max(1.0, float(np.abs(v).max())), -1, 1)[..., None]
    patch = np.clip((c1 * (1 - t) + c2 * t) * shade, 0, 255)
    region = img[y0:y1, x0:x1]
    m = mask[y0:y1, x0:x1].astype(bool)
    region[m] = patch[m]


def _background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """H×W×3 float32 background: gradient + low-frequency noise + unannotated clutter shapes."""
    a, b = _colour(rng.random(), rng.uniform(0.05, 0.4), rng.uniform(0.3, 0.85)), \
        _colour(rng.random(), rng.uniform(0.05, 0.4), rng.uniform(0.3, 0.85))
    theta = rng.uniform(0, 2 * np.pi)
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    g = (gx * math.cos(theta) + gy * math.sin(theta))
    g = (g - g.min()) / max(1.0, float(g.max() - g.min()))
    img = a * (1 - g[..., None]) + b * g[..., None]
    low = rng.normal(0, 18, size=(max(2, h // 24), max(2, w // 24), 3)).astype(np.float32)
    low_img = Image.fromarray(np.clip(low + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    img += np.asarray(low_img, np.float32) - 128
    clutter = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(3, 9))):
        col = tuple(int(c) for c in _colour(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.2, 0.9)))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        s = rng.uniform(6, 40)
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.line([(x, y), (x + rng.uniform(-60, 60), y + rng.uniform(-60, 60))], fill=col,
                      width=int(rng.integers(1, 5)))
        elif kind == 1:
            draw.rectangle([x, y, x + s, y + s * rng.uniform(0.3, 1.5)], fill=col)
        else:
            shape = SHAPES[int(rng.integers(0, len(SHAPES)))]
            pts = _unit_polygon(shape, rng) * s / 2 + [x, y]
            draw.polygon([tuple(p) for p in pts], fill=col)
    clutter = clutter.filter(ImageFilter.GaussianBlur(0.7))  # clutter is softer than objects
    return np.asarray(clutter, np.float32).copy()


def _draw_image(index: int, seed: int) -> tuple[np.ndarray, list[dict]]:
    """Draw image ``index``: (H×W×3 uint8 pixels, annotations without ids).

    Each annotation dict has category_id, segmentation, area, bbox, iscrowd.
    """
    rng = np.random.default_rng([seed, index])
    w, h = _SIZES[int(rng.integers(0, len(_SIZES)))]
    img = _background(w, h, rng)
    # two scene tasks per image (co-occurrence), plus an occasional distractor / stray class
    scene = rng.choice(11, size=2, replace=False)
    n_obj = int(rng.integers(3, 8))
    objs: list[_Obj] = []
    for _ in range(n_obj):
        r = rng.random()
        if r < 0.1:
            cat = N_TASK_CLASSES + int(rng.integers(0, len(COCO_CATEGORIES) - N_TASK_CLASSES))
        elif r < 0.18:
            cat = int(rng.integers(0, N_TASK_CLASSES))
        else:
            cat = int(scene[int(rng.integers(0, 2))]) * 3 + int(rng.integers(0, 3))
        shape = _appearance(cat)[0]
        crowd = rng.random() < 0.02
        if crowd:  # a group of small same-class objects, annotated as one crowd RLE
            gx, gy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
            full = np.zeros((h, w), np.uint8)
            for _ in range(int(rng.integers(4, 8))):
                cx, cy = gx + rng.normal(0, 12), gy + rng.normal(0, 9)
                poly, ang, _, _ = _place_polygon(shape, cx, cy, rng.uniform(8, 14), w, h, rng)
                part = _poly_mask(poly, h, w)
                _paint(img, part, cat, cx, cy, ang, rng)
                full |= part
            objs.append(_Obj(cat, full, None, True))
            continue
        size = rng.uniform(5, 12) if rng.random() < 0.1 else math.exp(rng.uniform(math.log(22), math.log(80)))
        cx = rng.uniform(0.1 * w, 0.9 * w)
        cy = rng.uniform(0.1 * h, 0.9 * h)
        poly, ang, _, _ = _place_polygon(shape, cx, cy, size, w, h, rng)
        full = _poly_mask(poly, h, w)
        if full.sum() == 0:
            continue
        _paint(img, full, cat, cx, cy, ang, rng)
        objs.append(_Obj(cat, full, poly, False))
    # pixel noise over everything (sensor-like), then quantise
    img += rng.normal(0, 5, size=img.shape).astype(np.float32)
    pixels = np.clip(img, 0, 255).astype(np.uint8)

    # visible region of each object = its mask minus everything drawn after it
    anns: list[dict] = []
    covered = np.zeros((h, w), bool)
    for obj in reversed(objs):
        visible = obj.mask.astype(bool) & ~covered
        covered |= obj.mask.astype(bool)
        area = int(visible.sum())
        if area == 0:
            continue  # fully hidden: COCO does not annotate what cannot be seen
        vis_u8 = np.asfortranarray(visible.astype(np.uint8))
        if obj.crowd:
            seg: object = _rle_uncompressed(vis_u8)
        elif area == int(obj.mask.sum()):
            seg = [obj.poly]
        else:  # occluded: compressed RLE (string counts) of the visible part
            enc = mask_utils.encode(vis_u8)
            seg = {"counts": enc["counts"].decode("ascii"), "size": [h, w]}
        bbox = [float(c) for c in mask_utils.toBbox(mask_utils.encode(vis_u8))]
        anns.append({"category_id": COCO_CATEGORIES[obj.cat][0], "segmentation": seg, "area": float(area),
                     "bbox": bbox, "iscrowd": int(obj.crowd)})
    anns.reverse()  # drawing order
    return pixels, anns


def generate_coco(root: str | Path, n_images: int = DEFAULT_IMAGES, seed: int = DEFAULT_SEED,
                  split: str = DEFAULT_SPLIT,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a generated COCO-format dataset under ``root`` and return the annotation file's path.

    Args:
        root: dataset root; ``annotations/instances_<split>.json`` and ``<split>/*.jpg`` go under it.
        n_images: number of images (ids 1..n_images).
        seed: the same seed gives byte-identical files.
        split: split name used for the annotation file and the image folder.
        progress: called as ``progress(done, total)`` after each image.

    The split is written under temporary names and swapped in at the end (the old annotation file is
    removed first, then the image folder replaced, then the new annotation file renamed into place),
    so an interrupted run — or a re-generation with another seed — never leaves annotations beside
    images they do not describe. Raises a one-line ConfigError for a bad argument or an output that
    cannot be written.
    """
    import os
    import re
    import shutil
    import tempfile

    from mike_ray.errors import ConfigError

    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ConfigError(f"images: must be an integer >= 1, got {n_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigError(f"seed: must be an integer in 0..2^63-1, got {seed!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", split) or set(split) <= {"."}:
        raise ConfigError(f"split: {split!r} must be a folder name (letters, digits, '_', '-', '.'; not only dots)")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"out: {root} is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-generate-{split}-", dir=root))
    except OSError as err:
        raise ConfigError(f"out: {root}: not writable ({err.strerror or type(err).__name__})") from None
    try:
        ann_path = _generate_into(work, n_images, seed, split, progress)
        final_ann = root / "annotations" / ann_path.name
        final_ann.parent.mkdir(exist_ok=True)
        final_ann.unlink(missing_ok=True)  # from here until the end the split has no annotation file
        if (root / split).exists():
            os.replace(root / split, work / "old")
        os.replace(work / split, root / split)
        os.replace(ann_path, final_ann)
        return final_ann
    except OSError as err:
        raise ConfigError(f"out: {root}: cannot write the dataset ({err.strerror or type(err).__name__})") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _generate_into(root: Path, n_images: int, seed: int, split: str,
                   progress: Callable[[int, int], None] | None) -> Path:
    img_dir = root / split
    ann_dir = root / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(n_images):
        image_id = i + 1
        pixels, anns = _draw_image(i, seed)
        h, w = pixels.shape[:2]
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(img_dir / file_name, format="JPEG", quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": int(w), "height": int(h)})
        for ann in anns:
            annotations.append({"id": ann_id, "image_id": image_id, **ann})
            ann_id += 1
        if progress is not None:
            progress(i + 1, n_images)
    data = {
        "info": {"description": f"mike_ray generated COCO-format dataset (seed {seed})", "version": "1.0",
                 "year": 2017},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in COCO_CATEGORIES],
    }
    ann_path = ann_dir / f"instances_{split}.json"
    ann_path.write_text(json.dumps(data, separators=(",", ":")))
    return ann_path
