"""What a COCO annotation file must hold before pycocotools or PIL see it — one validator for
``load_coco`` (and so for ``check``, ``prepare`` and the pipeline alike).

Structure (types, ids that resolve) and bounds: ids fit int64, polygon points and boxes lie within
one image size of their image, image records stay under PIL's pixel limit, file names fit a file
system, RLE masks cover their image exactly (compressed strings parsed here, in Python). Each
failure is a one-line :class:`DataError` naming the file, the record and the field.
"""
from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Any

from PIL import Image

from mike_ray.errors import DataError


def _err(source: str, where: str, msg: str) -> DataError:
    return DataError(f"{source}: {where}: {msg}")


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


#: ids are stored as int64 (Parquet); file names must fit a file system
MAX_ID = 2**63 - 1
MAX_NAME_BYTES = 255
#: PIL's own decompression-bomb limit (an image record this large is refused before any decode)
MAX_IMAGE_PIXELS = int(Image.MAX_IMAGE_PIXELS or 178956970)


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_ID


def _coord_bounds(hw: tuple[int, int]) -> tuple[float, float]:
    """Coordinates (polygon points, box corners) must lie within one image size of the image: COCO's
    lie on it; far-off values only make pycocotools overflow and PIL allocate huge crops."""
    side = float(max(hw))
    return -side, 2.0 * side


def rle_string_counts(counts: str) -> list[int] | None:
    """Run lengths of COCO's compressed RLE string (pycocotools' ``rleFrString``, in Python: 5 bits
    per character offset by 48, bit 0x20 continues, bit 0x10 signs the last chunk, counts from the
    third on are deltas to the one two back). None when the string is not well formed."""
    out: list[int] = []
    i, n = 0, len(counts)
    while i < n:
        x, k, more = 0, 0, True
        while more:
            if i >= n:
                return None
            c = ord(counts[i]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
            if k > 13:  # more than 64 bits: not a count
                return None
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def validate_coco(data: Any, source: str) -> None:
    """Check the structure the reader relies on; raise DataError naming file, record and field."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: top level must be a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{source}: {key}: missing or not a list")
    cat_ids: set[int] = set()
    for i, cat in enumerate(data["categories"]):
        where = f"categories[{i}]"
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or not isinstance(cat.get("name"), str):
            raise _err(source, where, "needs integer 'id' and string 'name'")
        if not _is_id(cat["id"]):
            raise _err(source, f"{where}.id", f"must be in 0..2^63-1, got {cat['id']}")
        if cat["id"] in cat_ids:  # pycocotools would silently keep the last one
            raise _err(source, f"{where}.id", f"duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])
    img_ids: set[int] = set()
    img_hw: dict[int, tuple[int, int]] = {}
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(img, dict):
            raise _err(source, where, "not an object")
        for field in ("id", "width", "height"):
            if not isinstance(img.get(field), int) or isinstance(img.get(field), bool):
                raise _err(source, f"{where}.{field}", "missing or not an integer")
        if img["width"] < 1 or img["height"] < 1:
            raise _err(source, f"{where} (id {img['id']})", "width and height must be positive")
        if not _is_id(img["id"]):
            raise _err(source, f"{where}.id", f"must be in 0..2^63-1, got {img['id']}")
        if img["width"] * img["height"] > MAX_IMAGE_PIXELS:
            raise _err(source, f"{where} (id {img['id']})", f"{img['width']}x{img['height']} exceeds "
                                                           f"{MAX_IMAGE_PIXELS:,} pixels")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise _err(source, f"{where}.file_name", "missing or not a string")
        if "\0" in img["file_name"] or any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
                                           for part in img["file_name"].split("/")):
            raise _err(source, f"{where}.file_name", f"not a usable file name (a NUL byte or a part over "
                                                     f"{MAX_NAME_BYTES} bytes)")
        # images are read from <root>/<split>/<file_name>: a name must not leave that folder
        name = PurePosixPath(img["file_name"].replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts:
            raise _err(source, f"{where}.file_name", f"{img['file_name']!r} must be a relative path inside "
                                                     "the split's image folder")
        if img["id"] in img_ids:
            raise _err(source, f"{where}.id", f"duplicate image id {img['id']}")
        img_ids.add(img["id"])
        img_hw[img["id"]] = (img["height"], img["width"])
    ann_ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), int):
            raise _err(source, f"{where}.id", "missing or not an integer")
        if not _is_id(ann["id"]):
            raise _err(source, f"{where}.id", f"must be in 0..2^63-1, got {ann['id']}")
        where = f"annotations[{i}] (id {ann['id']})"
        if ann["id"] in ann_ids:
            raise _err(source, f"{where}.id", "duplicate annotation id")
        ann_ids.add(ann["id"])
        # isinstance first: a list or object id is unhashable and would make the set lookup raise
        if not isinstance(ann.get("image_id"), int) or ann["image_id"] not in img_ids:
            raise _err(source, f"{where}.image_id", f"no image with id {ann.get('image_id')!r}")
        if not isinstance(ann.get("category_id"), int) or ann["category_id"] not in cat_ids:
            raise _err(source, f"{where}.category_id", f"unknown category id {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(c) for c in bbox)) or bbox[2] < 0 \
                or bbox[3] < 0:
            raise _err(source, f"{where}.bbox", "must be 4 numbers [x, y, w, h] with w, h >= 0")
        lo, hi = _coord_bounds(img_hw[ann["image_id"]])
        if not (lo <= bbox[0] <= hi and lo <= bbox[1] <= hi and bbox[0] + bbox[2] <= hi and bbox[1] + bbox[3] <= hi):
            raise _err(source, f"{where}.bbox", f"{bbox} lies far outside its {img_hw[ann['image_id']][1]}x"
                                                f"{img_hw[ann['image_id']][0]} image")
        if not _is_num(ann.get("area")):
            raise _err(source, f"{where}.area", "missing or not a number")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise _err(source, f"{where}.iscrowd", "must be 0 or 1")
        _validate_segmentation(ann.get("segmentation"), img_hw[ann["image_id"]], source, f"{where}.segmentation")


def _validate_segmentation(seg: Any, hw: tuple[int, int], source: str, where: str) -> None:
    """Polygons: lists of >= 3 finite x,y pairs. RLE: ``size`` equal to the image's [height, width],
    ``counts`` a compressed string or non-negative run lengths that add up to height·width.

    pycocotools does not check these: a wrong RLE size or run sum decodes to a mask of the wrong
    shape or garbage, and a non-numeric coordinate fails deep inside its C code.
    """
    if isinstance(seg, list):
        if not seg:
            raise _err(source, where, "an empty polygon list (no pixels)")
        lo, hi = _coord_bounds(hw)
        for k, poly in enumerate(seg):
            if not (isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0):
                raise _err(source, f"{where}[{k}]", "polygons must be lists of >= 3 x,y pairs")
            # sum() runs in C: a non-number raises TypeError, a NaN/inf makes the sum non-finite
            try:
                total = sum(poly)
            except TypeError:
                total = None
            if not _is_num(total):
                raise _err(source, f"{where}[{k}]", "polygon coordinates must be finite numbers")
            if not (lo <= min(poly) and max(poly) <= hi):
                raise _err(source, f"{where}[{k}]", f"coordinates lie far outside the {hw[1]}x{hw[0]} image")
    elif isinstance(seg, dict):
        counts, size = seg.get("counts"), seg.get("size")
        if not isinstance(counts, (list, str)) or not isinstance(size, list):
            raise _err(source, where, "RLE needs 'counts' and 'size'")
        if size != list(hw):
            raise _err(source, f"{where}.size", f"RLE size {size} differs from the image's [height, width] "
                                                f"{list(hw)}")
        if isinstance(counts, str):
            runs = rle_string_counts(counts)
            if runs is None or any(c < 0 for c in runs):
                raise _err(source, f"{where}.counts", "not a well-formed compressed RLE string")
            if sum(runs) != hw[0] * hw[1]:
                raise _err(source, f"{where}.counts", f"run lengths add up to {sum(runs)}, the image has "
                                                      f"{hw[0]}x{hw[1]} = {hw[0] * hw[1]} pixels")
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise _err(source, f"{where}.counts", "uncompressed RLE counts must be non-negative integers")
            if sum(counts) != hw[0] * hw[1]:
                raise _err(source, f"{where}.counts", f"run lengths add up to {sum(counts)}, the image has "
                                                      f"{hw[0]}x{hw[1]} = {hw[0] * hw[1]} pixels")
    else:
        raise _err(source, where, "missing (polygon list or RLE object)")
