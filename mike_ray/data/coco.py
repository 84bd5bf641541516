"""COCO reader (pycocotools): instance crops with task masks (one channel per class of the task), for
real COCO and the default.

For every selected task and every instance of its classes that is not a crowd and has
``area >= min_area``:

1. a square box around the instance's bounding box, ``max(w, h)·(1 + 2·margin)`` on a side,
   centred on the box (regions outside the image are padded with black);
2. the un-augmented crop, plus ``augment_copies`` copies whose box is shifted (up to ``shift``
   of its side in x and y), zoomed (side divided by a factor log-uniform in ``zoom``) and, with
   ``mirror``, flipped left-right with probability 1/2; the draws come from a generator seeded by
   ``(seed, annotation id)``, so a crop does not depend on the order of processing;
3. resized to ``image_size``² (bilinear, anti-aliased when shrinking);
4. its mask: channel k is the union of *every* annotation of the task's k-th class in the image
   (crowd and small ones included: they are pixels of that class), rasterised by pycocotools
   (``annToMask``), cropped and flipped with the same box, resized bilinearly and thresholded at ½.
   Classes of other tasks are not drawn.

Images go to ``train``, ``val`` or ``test`` by a hash of the image id (:func:`image_split`), so an
image and all its crops land in one split, for every task. Validation and test crops are not
augmented unless ``augment_val``. ``val`` is for selection (teachers, sweeps), ``test`` is held out
for the reports.

Errors in the input raise :class:`~mike_ray.errors.DataError` with one line that names the file
and the image id / field.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mike_ray.config_base import StrictModel
from mike_ray.data.tasks import TASKS, check_task_codes, resolve_table, resolve_task_categories, table_field
from mike_ray.data.coco_schema import validate_coco
from mike_ray.errors import ConfigError, DataError, one_line

SPLITS = ("train", "val", "test")


class PrepareConfig(StrictModel):
    """How COCO instances become 64×64 crops with task masks (everything that changes the data)."""

    image_size: int = Field(64, ge=8, le=1024, description="side of the square crops, pixels")
    margin: float = Field(0.15, ge=0.0, le=2.0,
                          description="context added on each side, as a fraction of the box's longer side")
    augment_copies: int = Field(3, ge=0, le=64,
                                description="augmented crops per instance, besides the un-augmented one")
    shift: float = Field(0.1, ge=0.0, le=0.5, description="max shift of the box centre, fraction of its side")
    zoom: tuple[float, float] = Field((0.8, 1.25), description="zoom factor range; side is divided by it")
    mirror: bool = Field(True, description="augmented copies are flipped left-right with probability 1/2")
    augment_val: bool = Field(False, description="also augment validation and test instances")
    min_area: float = Field(256.0, ge=0.0, description="instances with a smaller mask area (px²) are not cropped")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of image ids held out for val")
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0,
                                 description="fraction of image ids held out for test (reports only)")
    seed: int = Field(0, ge=0, description="augmentation seed")
    task_table: dict[str, list[str]] | None = Field(
        None, description="task code → COCO category names (a sweep's tasks: section); None: the paper's 11")
    tasks: list[str] | None = Field(None, description="task codes to prepare (default: every task of the table)")
    max_instances_per_class: int | None = Field(
        None, ge=1, description="cap on cropped instances per class (chosen by a hash of the annotation id)")

    @field_validator("zoom")
    @classmethod
    def _zoom_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise PydanticCustomError("zoom_range", "must be [low, high] with 0 < low <= high")
        return v

    @field_validator("task_table")
    @classmethod
    def _table(cls, v: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        return table_field(v, "task_table")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return v
        try:
            return check_task_codes(v, field="tasks", table=info.data.get("task_table") or TASKS)
        except ConfigError as err:  # re-raised as a pydantic error so the message names the field path
            raise PydanticCustomError("task_code", str(err).removeprefix("tasks: ")) from None

    @property
    def table(self) -> dict[str, tuple[str, ...]]:
        """The task table (code → class names, in id order): ``task_table``, or the paper's."""
        return resolve_table(self.task_table)

    def key_dump(self) -> dict[str, Any]:
        """What names the prepared data (its config key): the config, without ``task_table`` when it
        is the default (keys of datasets prepared before tables existed stay the same)."""
        return self.model_dump(mode="json", exclude={"task_table"} if self.task_table is None else None)

    @model_validator(mode="after")
    def _fractions(self) -> "PrepareConfig":
        # both held-out fractions come out of [0, 1): something must be left to train on
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction: must be < 1 (some images must stay in train), "
                             f"got {self.val_fraction} + {self.test_fraction}")
        return self

    @model_validator(mode="after")
    def _task_order(self) -> "PrepareConfig":
        # canonical order (task id order) so the same set of tasks gives the same config key
        codes = list(self.table)
        order = sorted(self.tasks, key=codes.index) if self.tasks is not None else codes
        if order != self.tasks:
            object.__setattr__(self, "tasks", order)
        return self


def mask_channels(cfg: PrepareConfig) -> int:
    """Channels of every mask in a dataset prepared with ``cfg``: its widest task's class count (3
    for the paper's tasks); a narrower task's extra channels are 0."""
    return max(len(cfg.table[t]) for t in cfg.tasks)


def image_split(image_id: int, val_fraction: float, test_fraction: float = 0.0) -> str:
    """``"val"``, ``"test"`` or ``"train"`` for an image id: a fixed hash, so every task and run agree.

    The hash gives u in [0, 1): u < val_fraction is val, then the next ``test_fraction`` is test,
    the rest train. Val comes first so that adding a test split leaves every val image where it was
    (test images are taken from train only).
    """
    digest = hashlib.blake2b(f"mike_ray-split:{int(image_id)}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    if u < val_fraction:
        return "val"
    return "test" if u < val_fraction + test_fraction else "train"


# --------------------------------------------------------------------------- annotation files

def load_coco(ann_path: str | Path) -> COCO:
    """Load and validate a COCO ``instances_*.json`` into a pycocotools :class:`COCO` (quietly).

    Missing file, invalid JSON or a malformed record → :class:`DataError` naming the file (and field).
    """
    path = Path(ann_path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}): {err.reason}") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON: nested too deeply") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    validate_coco(data, str(path))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def discover_splits(coco_root: str | Path) -> list[str]:
    """Split names ``S`` for which ``<coco_root>/annotations/instances_S.json`` exists, sorted."""
    ann_dir = Path(coco_root) / "annotations"
    if not ann_dir.is_dir():
        raise DataError(f"{ann_dir}: annotations directory not found")
    found = sorted(p.name[len("instances_"):-len(".json")] for p in ann_dir.glob("instances_*.json"))
    if not found:
        raise DataError(f"{ann_dir}: no instances_<split>.json annotation file")
    return found


def annotation_path(coco_root: str | Path, split: str) -> Path:
    """``<coco_root>/annotations/instances_<split>.json``."""
    return Path(coco_root) / "annotations" / f"instances_{split}.json"


@dataclass
class CocoSource:
    """One loaded source split: pycocotools index, its annotation file and its image folder."""

    split: str
    ann_path: Path
    image_dir: Path
    coco: COCO
    task_cats: dict[str, tuple[int, ...]]  # task code → category id per mask channel


def open_sources(coco_root: str | Path, splits: Sequence[str], tasks: Sequence[str],
                 table: Mapping[str, Sequence[str]] = TASKS) -> list[CocoSource]:
    """Load the annotation files of ``splits`` and resolve the tasks' class names in each.

    Image ids must be unique across the splits (they are in COCO 2017); a repeat is a DataError.
    """
    sources: list[CocoSource] = []
    seen: dict[int, Path] = {}
    for split in splits:
        ann_path = annotation_path(coco_root, split)
        coco = load_coco(ann_path)
        task_cats = {code: resolve_task_categories(coco, code, str(ann_path), table) for code in tasks}
        for img_id in coco.imgs:
            if img_id in seen:
                raise DataError(f"{ann_path}: images: image id {img_id} also appears in {seen[img_id]}")
            seen[img_id] = ann_path
        sources.append(CocoSource(split, ann_path, Path(coco_root) / split, coco, task_cats))
    return sources


# --------------------------------------------------------------------------- crop geometry

@dataclass(frozen=True)
class CropSpec:
    """Integer square box (x0, y0, x1, y1) in image pixels (may leave the image) and a mirror flag."""

    box: tuple[int, int, int, int]
    mirror: bool


def _round(v: float) -> int:
    return int(math.floor(v + 0.5))


def crop_specs(bbox: Sequence[float], ann_id: int, cfg: PrepareConfig, augment: bool) -> list[CropSpec]:
    """The crops of one instance: the un-augmented one first, then ``cfg.augment_copies`` augmented.

    Args:
        bbox: COCO ``[x, y, w, h]`` of the instance.
        ann_id: annotation id; with ``cfg.seed`` it seeds the augmentation draws.
        augment: False gives only the un-augmented crop (validation and test).
    """
    x, y, w, h = (float(c) for c in bbox)
    cx, cy = x + w / 2, y + h / 2
    side = max(w, h, 1.0) * (1 + 2 * cfg.margin)
    params = [(0.0, 0.0, 1.0, False)]
    if augment and cfg.augment_copies:
        rng = np.random.default_rng([cfg.seed, int(ann_id)])
        n = cfg.augment_copies
        d = rng.uniform(-cfg.shift, cfg.shift, size=(n, 2))
        z = np.exp(rng.uniform(math.log(cfg.zoom[0]), math.log(cfg.zoom[1]), size=n))
        m = rng.random(n) < 0.5
        params += [(float(d[i, 0]), float(d[i, 1]), float(z[i]), bool(m[i]) and cfg.mirror) for i in range(n)]
    specs = []
    for dx, dy, zf, mir in params:
        s = max(1, _round(side / zf))
        x0 = _round(cx + dx * side - s / 2)
        y0 = _round(cy + dy * side - s / 2)
        specs.append(CropSpec((x0, y0, x0 + s, y0 + s), mir))
    return specs


def extract_crop(image: Image.Image, mask: Image.Image | Sequence[Image.Image], spec: CropSpec,
                 size: int, channels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut one crop out of an image and its task mask with the same box and flip.

    Args:
        image: RGB image, H×W.
        mask: the task mask as RGB images, H×W, three mask channels each (:func:`mask_images`):
            channel k = 255 where the task's k-th class is (0 elsewhere).
        spec: box (outside the image is padded with 0) and mirror flag.
        size: output side. channels: mask channels kept (default: all, 3 per mask image).
    Returns:
        (image ``size×size×3`` uint8 HWC, mask ``channels×size×size`` uint8 CHW with values 0/1).
    """
    def cut(im: Image.Image) -> np.ndarray:
        im = im.crop(spec.box)
        if spec.mirror:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)

    img_a = cut(image)
    planes = [cut(m) for m in ([mask] if isinstance(mask, Image.Image) else mask)]
    msk_a = (np.concatenate(planes, axis=2)[:, :, :channels] >= 128).astype(np.uint8).transpose(2, 0, 1)
    return img_a, np.ascontiguousarray(msk_a)


def mask_images(mask: np.ndarray) -> list[Image.Image]:
    """H×W×C uint8 mask → ceil(C/3) RGB images (PIL crops and resizes three channels at a time; the
    last is padded with zero channels)."""
    pad = (-mask.shape[2]) % 3
    if pad:
        mask = np.concatenate([mask, np.zeros((*mask.shape[:2], pad), np.uint8)], axis=2)
    return [Image.fromarray(np.ascontiguousarray(mask[:, :, i:i + 3]), "RGB") for i in range(0, mask.shape[2], 3)]


def task_mask(coco: COCO, anns: Sequence[dict], cats: Sequence[int], source: str,
              channels: int | None = None) -> np.ndarray:
    """H×W×C uint8 mask (0/255) of one image for one task: channel k = union of all class-k
    annotations (``cats[k]``); C = ``channels`` (default ``len(cats)``; channels past the task's
    classes stay 0: a dataset's masks are as wide as its widest task)."""
    img = coco.imgs[anns[0]["image_id"]]
    out = np.zeros((img["height"], img["width"], channels or len(cats)), np.uint8)
    for ann in anns:
        if ann["category_id"] not in cats:
            continue
        k = cats.index(ann["category_id"])
        try:
            with warnings.catch_warnings():  # pycocotools' numpy-2 DeprecationWarning on every decode
                warnings.simplefilter("ignore", DeprecationWarning)
                m = coco.annToMask(ann)
        except Exception as err:  # pycocotools raises bare TypeError/ValueError on bad segmentations
            raise DataError(f"{source}: annotation id {ann['id']}: segmentation: cannot decode ({err})") from None
        if m.shape != out.shape[:2]:
            raise DataError(f"{source}: annotation id {ann['id']}: segmentation: size {list(m.shape)} "
                            f"differs from the image's {[img['height'], img['width']]}")
        out[:, :, k] |= m * np.uint8(255)
    return out


# --------------------------------------------------------------------------- the crop stream

@dataclass
class CropRecord:
    """One output row (see docs/contracts.md): image HWC uint8 bytes, mask CHW 0/1 bytes, metadata."""

    split: str
    task: str
    task_id: int
    class_name: str
    category_id: int
    image_id: int
    ann_id: int
    image: bytes
    mask: bytes


def read_image(path: str | Path, *, size: tuple[int, int] | None = None, source: str | None = None,
               image_id: int | None = None) -> Image.Image:
    """Decode an image file completely into RGB (grayscale, palette, CMYK, 16-bit are converted).

    Args:
        path: the image file.
        size: expected ``(width, height)`` (from the annotation file); None skips the check.
        source: the annotation file that lists the image, for messages.
        image_id: the image's id in ``source``, for messages.
    Raises:
        DataError: ``<path>: ...`` for a missing, empty, truncated or undecodable file, one that claims
            a decompression-bomb size, or one whose size differs from ``size``.
    """
    path = Path(path)
    where = [f"image id {image_id}"] if image_id is not None else []
    ctx = f" ({' in '.join(where + ([source] if source else []))})" if where or source else ""
    if not path.is_file():
        raise DataError(f"{path}: image file not found{ctx}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: cannot read image{ctx}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (on stderr) between its limit and twice it: refuse those too, in one line
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                rgb = im.convert("RGB")  # forces a full decode: a truncated file fails here, not mid-batch
    except Exception as err:  # noqa: BLE001 - PIL's decoders raise OSError, SyntaxError, ValueError,
        # struct.error, DecompressionBombError...: each means "not a usable image"
        detail = one_line(str(err)).replace(f"'{path}'", "").replace(str(path), "").strip() or type(err).__name__
        if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
            detail = f"refused as a possible decompression bomb: {detail}"
        raise DataError(f"{path}: cannot read image{ctx}: {detail}") from None
    if size is not None and rgb.size != tuple(size):
        said = f"{source} says" if source else "expected"
        tail = f" (image id {image_id})" if image_id is not None else ""
        raise DataError(f"{path}: image is {rgb.size[0]}x{rgb.size[1]} but {said} {size[0]}x{size[1]}{tail}")
    return rgb


def _load_image(path: Path, img: dict, source: str) -> Image.Image:
    """Read the image of COCO record ``img``, checked against the record's width and height."""
    return read_image(path, size=(img["width"], img["height"]), source=source, image_id=img["id"])


def check_coco_root(coco_root: str | Path, splits: Sequence[str] | None = None) -> dict[str, int]:
    """Validate a COCO-layout directory the way ``prepare`` reads it, without writing anything.

    Every split's annotation file is loaded (:func:`load_coco`) and every image it lists is decoded
    and checked against its width/height (:func:`read_image`), so a bad file is reported before an
    hour-long preparation rather than in the middle of it.

    Returns:
        split → number of images checked.
    Raises:
        DataError: the first bad annotation file or image, named with its field/image id.
    """
    done: dict[str, int] = {}
    seen: dict[int, Path] = {}
    for split in (list(splits) if splits else discover_splits(coco_root)):
        ann_path = annotation_path(coco_root, split)
        coco = load_coco(ann_path)
        for img_id in sorted(coco.imgs):
            if img_id in seen:
                raise DataError(f"{ann_path}: images: image id {img_id} also appears in {seen[img_id]}")
            seen[img_id] = ann_path
            img = coco.imgs[img_id]
            _load_image(Path(coco_root) / split / img["file_name"], img, str(ann_path))
        done[split] = len(coco.imgs)
    return done


def _eligible(ann: dict, cfg: PrepareConfig) -> bool:
    """An instance becomes crops if it is not a crowd, is large enough and has a non-empty box."""
    return not ann.get("iscrowd", 0) and ann["area"] >= cfg.min_area and ann["bbox"][2] > 0 and ann["bbox"][3] > 0


def _capped_ann_ids(sources: Sequence[CocoSource], cfg: PrepareConfig) -> set[int] | None:
    """With ``max_instances_per_class``: the (source, ann) ids kept, per class the first N by a hash."""
    if cfg.max_instances_per_class is None:
        return None
    keep: set[int] = set()
    per_class: dict[str, list[tuple[bytes, int]]] = {}
    for src in sources:
        for code, cats in src.task_cats.items():
            for k, cat in enumerate(cats):
                for ann in src.coco.loadAnns(src.coco.getAnnIds(catIds=[cat])):
                    if _eligible(ann, cfg):
                        h = hashlib.blake2b(f"{cfg.seed}:{ann['id']}".encode(), digest_size=8).digest()
                        per_class.setdefault(cfg.table[code][k], []).append((h, ann["id"]))
    for items in per_class.values():
        keep.update(aid for _, aid in sorted(items)[: cfg.max_instances_per_class])
    return keep


def count_work(sources: Sequence[CocoSource], cfg: PrepareConfig) -> int:
    """Number of images that have at least one eligible instance of a selected task (for progress)."""
    n = 0
    for src in sources:
        cats = {c for cs in src.task_cats.values() for c in cs}
        for img_id, anns in src.coco.imgToAnns.items():
            if any(a["category_id"] in cats and _eligible(a, cfg) for a in anns):
                n += 1
    return n


def iter_crops(sources: Sequence[CocoSource], cfg: PrepareConfig,
               progress: Callable[[int], None] | None = None) -> Iterator[CropRecord]:
    """Yield every crop of the selected tasks, image by image (ascending id), instances by ann id.

    Each image is decoded once, whatever the number of tasks it serves. ``progress(1)`` is called
    after each image that produced crops.
    """
    keep = _capped_ann_ids(sources, cfg)
    size = cfg.image_size
    table, channels = cfg.table, mask_channels(cfg)
    ids = {code: i for i, code in enumerate(table)}
    for src in sources:
        cat_to_task = {c: code for code, cs in src.task_cats.items() for c in cs}
        source = str(src.ann_path)
        for img_id in sorted(src.coco.imgs):
            anns = [a for a in src.coco.imgToAnns.get(img_id, []) if a["category_id"] in cat_to_task]
            chosen = [a for a in anns if _eligible(a, cfg) and (keep is None or a["id"] in keep)]
            if not chosen:
                continue
            img = src.coco.imgs[img_id]
            split = image_split(img_id, cfg.val_fraction, cfg.test_fraction)
            augment = split == "train" or cfg.augment_val
            image = _load_image(src.image_dir / img["file_name"], img, source)
            for code in cfg.tasks:  # task id order: deterministic row order
                mine = sorted((a for a in chosen if cat_to_task[a["category_id"]] == code), key=lambda a: a["id"])
                if not mine:
                    continue
                cats = src.task_cats[code]
                mask = mask_images(task_mask(src.coco, anns, cats, source, channels))
                tid = ids[code]
                for ann in mine:
                    k = cats.index(ann["category_id"])
                    for spec in crop_specs(ann["bbox"], ann["id"], cfg, augment):
                        im_a, m_a = extract_crop(image, mask, spec, size, channels)
                        yield CropRecord(split, code, tid, table[code][k], int(ann["category_id"]), int(img_id),
                                         int(ann["id"]), im_a.tobytes(), m_a.tobytes())
            if progress is not None:
                progress(1)
