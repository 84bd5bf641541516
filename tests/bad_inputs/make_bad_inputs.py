"""The bad-input catalogue (everything except sweep files): what each entry is and what it must raise.

Text entries are committed next to this file (``coco/``, ``manifests/``, a few in the other folders).
Binary entries (truncated JPEG/PNG, Parquet shards, ``.pt`` files) and those that must agree with
a real prepared dataset (a manifest whose config key is right but whose counts are not) are written
by :func:`make` into a scratch directory — deterministically, from fixed seeds — by the test session
fixture. ``python tests/bad_inputs/make_bad_inputs.py OUT`` writes them by hand;
``python tests/bad_inputs/make_bad_inputs.py --readme`` regenerates ``README.md`` from the real
error messages.

Each :class:`Entry` names the format, the path (relative to this folder or to the scratch folder),
the typed exception the Python API raises, and a substring of the one-line message that names the
field or problem (the message must also contain the path itself).
"""
from __future__ import annotations

import argparse
import io
import json
import pickle
import shutil
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMATS = ("coco", "images", "shards", "manifests", "checkpoints")

# the small segmenter spec the teacher entries use (a real zoo stores the same kind of spec)
TEACHER_MODEL = {"arch": "segmenter", "width": 4, "depth": 5, "expand_ratio": 2.0, "stem_stride": 2,
                 "num_downsamples": 1, "num_classes": 3}


@dataclass(frozen=True)
class Entry:
    """One malformed input.

    Attributes:
        fmt: catalogue folder (one of :data:`FORMATS`).
        name: path under ``<root>/<fmt>/`` (a file, or a directory for coco-root/dataset/teacher).
        kind: what ``python -m mike_ray.check`` detects it as (``--kind`` value).
        api: the library function that rejects it (see tests/test_bad_inputs.py ``API``).
        error: the exception class name (``DataError``, ``ModelError``, ``ConfigError``).
        needle: substring of the one-line message naming the field / problem.
        what: what is wrong, for the README.
        generated: written by :func:`make` (else committed next to this file).
    """

    fmt: str
    name: str
    kind: str
    api: str
    error: str
    needle: str
    what: str
    generated: bool = False

    def path(self, generated_root: Path) -> Path:
        """Where the entry lies: under this folder if committed, under ``generated_root`` if generated."""
        return (generated_root if self.generated else HERE) / self.fmt / self.name


def _c(name: str, needle: str, what: str) -> Entry:
    return Entry("coco", name, "coco", "load_coco", "DataError", needle, what)


CATALOGUE: list[Entry] = [
    # --- COCO annotation files (committed JSON) --------------------------------------------------
    _c("invalid_json.json", "invalid JSON at line 1", "a trailing comma: not JSON"),
    _c("not_utf8.json", "not UTF-8 text", "a category name in Latin-1 bytes"),
    _c("top_level_list.json", "top level must be a JSON object", "the dataset wrapped in a list"),
    _c("missing_images.json", "images: missing or not a list", "no `images` key"),
    _c("image_without_file_name.json", "images[0].file_name: missing", "an image record without `file_name`"),
    _c("file_name_leaves_folder.json", "images[0].file_name: '../../../etc/passwd' must be a relative path",
       "`file_name` climbs out of the image folder"),
    _c("image_width_zero.json", "width and height must be positive", "an image 0 pixels wide"),
    _c("duplicate_image_id.json", "images[1].id: duplicate image id 1", "two images with id 1"),
    _c("duplicate_category_id.json", "categories[1].id: duplicate category id 18",
       "two categories with id 18 (pycocotools would keep the last silently)"),
    _c("duplicate_annotation_id.json", "annotations[1] (id 1).id: duplicate annotation id",
       "two annotations with id 1"),
    _c("unknown_image_id.json", "annotations[0] (id 1).image_id: no image with id 7",
       "an annotation of an image that is not listed"),
    _c("unknown_category_id.json", "annotations[0] (id 1).category_id: unknown category id 99",
       "an annotation of a category that is not listed"),
    _c("bbox_negative_size.json", "annotations[0] (id 1).bbox: must be 4 numbers", "bbox width -20"),
    _c("area_nan.json", "annotations[0] (id 1).area: missing or not a number",
       "`area: NaN` (Python's json accepts it)"),
    _c("iscrowd_not_0_or_1.json", "annotations[0] (id 1).iscrowd: must be 0 or 1", "`iscrowd: 2`"),
    _c("polygon_odd_coordinate_count.json", "segmentation[0]: polygons must be lists of >= 3 x,y pairs",
       "a polygon with 7 coordinates"),
    _c("polygon_not_numbers.json", "segmentation[0]: polygon coordinates must be finite numbers",
       "a polygon coordinate given as a string"),
    _c("rle_size_mismatch.json", "segmentation.size: RLE size [64, 64] differs from the image's",
       "an RLE mask 64x64 on a 40x32 image"),
    _c("rle_counts_wrong_sum.json", "segmentation.counts: run lengths add up to 160",
       "uncompressed RLE runs that do not cover the image"),
    # values bounded by the image and by their column types; what check passes, prepare can read
    _c("polygon_huge_coordinates.json", "segmentation[0]: coordinates lie far outside the 40x32 image",
       "polygon coordinates of 1e18 (pycocotools overflowed and crashed on them)"),
    _c("bbox_huge.json", "bbox: [4, 4, 1000000000000.0, 16] lies far outside",
       "a box 1e12 pixels wide (PIL would be asked for a giant crop)"),
    _c("segmentation_empty_list.json", "segmentation: an empty polygon list", "`segmentation: []`"),
    _c("rle_string_garbage.json", "segmentation.counts: not a well-formed compressed RLE string",
       "compressed RLE counts that are not RLE"),
    _c("rle_string_wrong_sum.json", "segmentation.counts: run lengths add up to 16",
       "a compressed RLE string that does not cover the image"),
    _c("image_id_beyond_int64.json", "images[0].id: must be in 0..2^63-1", "image id 2^63 (no int64)"),
    _c("annotation_id_negative.json", "annotations[0].id: must be in 0..2^63-1, got -5", "annotation id -5"),
    _c("category_id_beyond_int64.json", "categories[0].id: must be in 0..2^63-1", "category id 2^64"),
    _c("file_name_too_long.json", "images[0].file_name: not a usable file name",
       "a 304-character file name (the file system refuses it)"),
    _c("image_claims_bomb_size.json", "60000x60000 exceeds", "an image record of 60000x60000 pixels"),
    # --- images ------------------------------------------------------------------------------------
    Entry("images", "zero_bytes.jpg", "image", "read_image", "DataError", "file is empty (0 bytes)", "an empty file"),
    Entry("images", "not_an_image.jpg", "image", "read_image", "DataError", "cannot identify image file",
          "a text file named .jpg"),
    Entry("images", "truncated.jpg", "image", "read_image", "DataError", "image file is truncated",
          "a JPEG cut after half its bytes", generated=True),
    Entry("images", "truncated.png", "image", "read_image", "DataError", "image file is truncated",
          "a PNG cut after half its bytes", generated=True),
    Entry("images", "corrupt_data.png", "image", "read_image", "DataError", "broken data stream",
          "a PNG whose compressed pixel data has a flipped byte", generated=True),
    Entry("images", "decompression_bomb.png", "image", "read_image", "DataError",
          "refused as a possible decompression bomb", "a 69-byte PNG that claims 60000x60000 pixels", generated=True),
    Entry("images", "missing_image", "coco-root", "check_coco_root", "DataError",
          "1.jpg: image file not found (image id 1",
          "a COCO root whose annotation file names an image that is not there"),
    Entry("images", "size_mismatch", "coco-root", "check_coco_root", "DataError", "image is 32x32 but",
          "a 32x32 image that the annotation file says is 40x32", generated=True),
    # --- Parquet shards (64 px crops; the first two committed, the rest generated) ---------------------
    Entry("shards", "not_parquet.parquet", "shard", "read_shard", "DataError", "not a readable Parquet file",
          "a CSV file"),
    Entry("shards", "empty.parquet", "shard", "read_shard", "DataError", "not a readable Parquet file: file is empty",
          "an empty file"),
    Entry("shards", "truncated.parquet", "shard", "read_shard", "DataError", "not a readable Parquet file",
          "a shard cut after half its bytes (no footer)", generated=True),
    Entry("shards", "missing_image_column.parquet", "shard", "read_shard", "DataError", "column 'image': missing",
          "no `image` column", generated=True),
    Entry("shards", "wrong_column_type.parquet", "shard", "read_shard", "DataError",
          "column 'task_id': type int64, expected int8", "`task_id` stored as int64", generated=True),
    Entry("shards", "image_wrong_length.parquet", "shard", "read_shard", "DataError",
          "column 'image': values of 12287..12288 bytes", "one image blob a byte short", generated=True),
    Entry("shards", "null_mask.parquet", "shard", "read_shard", "DataError", "column 'mask': 1 null values",
          "a row without a mask", generated=True),
    Entry("shards", "mask_not_binary.parquet", "shard", "read_shard", "DataError",
          "column 'mask': row 2 has value 255, masks hold 0/1", "a 0/255 mask where 0/1 is the contract",
          generated=True),
    Entry("shards", "task_id_out_of_range.parquet", "shard", "read_shard", "DataError",
          "column 'task_id': row 1 has 42, task ids are 0..10", "task id 42 (there are 11 tasks)", generated=True),
    Entry("shards", "task_disagrees_with_id.parquet", "shard", "read_shard", "DataError",
          "column 'task': row 0 has 'CTB' but task_id 5 is 'DCH'", "`task` and `task_id` name different tasks",
          generated=True),
    Entry("shards", "class_not_in_task.parquet", "shard", "read_shard", "DataError",
          "column 'class_name': row 3 has 'bus', not a class of task DCH", "a bus in the dog/cat/horse task",
          generated=True),
    Entry("shards", "split_unknown.parquet", "shard", "read_shard", "DataError",
          "column 'split': row 0 has 'holdout'", "a row of split 'holdout'", generated=True),
    Entry("shards", "DCH.parquet", "shard", "read_shard", "DataError",
          "column 'task_id': row 0 has 9, the file of task DCH holds task id 5",
          "a file named after task DCH holding CTB rows", generated=True),
    # --- manifests (committed ones fail before the config key matters; generated ones are coherent) ---
    Entry("manifests", "invalid_json.manifest.json", "manifest", "read_manifest", "DataError", "invalid JSON at line",
          "cut off mid-file"),
    Entry("manifests", "top_level_list.manifest.json", "manifest", "read_manifest", "DataError",
          "Input should be a valid dictionary", "the manifest wrapped in a list"),
    Entry("manifests", "missing_field.manifest.json", "manifest", "read_manifest", "DataError",
          "content_hash: Field required", "no `content_hash`"),
    Entry("manifests", "wrong_type.manifest.json", "manifest", "read_manifest", "DataError",
          "image_size: Input should be a valid integer", "`image_size: \"sixty-four\"`"),
    Entry("manifests", "unknown_field.manifest.json", "manifest", "read_manifest", "DataError",
          "content_hashes: unknown key (did you mean 'content_hash'?)", "a misspelt extra key"),
    Entry("manifests", "format_version_unknown.manifest.json", "manifest", "read_manifest", "DataError",
          "format_version: 99, this mike_ray reads 2", "a future format version"),
    Entry("manifests", "config_invalid.manifest.json", "manifest", "read_manifest", "DataError",
          "config: image_size: Input should be greater than or equal to 8", "`config.image_size: 3`"),
    Entry("manifests", "config_key_mismatch.manifest.json", "manifest", "read_manifest", "DataError",
          "config_key: '000000000000' does not match its config and source", "a config key from another config"),
    Entry("manifests", "count_not_integer.manifest.json", "manifest", "read_manifest", "DataError",
          "counts.train.DCH.cat: Input should be a valid integer", "`counts.train.DCH.cat: \"one\"`"),
    Entry("manifests", "count_negative.manifest.json", "manifest", "read_manifest", "DataError",
          "counts.train.DCH.dog: -1, a count cannot be negative", "a negative crop count", generated=True),
    Entry("manifests", "class_missing.manifest.json", "manifest", "read_manifest", "DataError",
          "counts.val.DCH: missing or wrong classes", "no `horse` count", generated=True),
    Entry("manifests", "instances_exceed_crops.manifest.json", "manifest", "read_manifest", "DataError",
          "instances.train.DCH.dog: 1000 instances but only", "more instances than crops", generated=True),
    Entry("manifests", "content_hash_not_hex.manifest.json", "manifest", "read_manifest", "DataError",
          "content_hash: 'not-a-hash' is not a sha256 hex digest", "a content hash that is not a digest",
          generated=True),
    Entry("manifests", "counts_disagree_with_shards", "dataset", "check_dataset", "DataError",
          "rows, manifest counts", "a dataset whose manifest counts one more dog than its shard holds",
          generated=True),
    Entry("manifests", "content_hash_mismatch", "dataset", "check_dataset", "DataError",
          "content_hash: shard files do not match", "a shard rewritten after the manifest was made", generated=True),
    Entry("manifests", "shard_missing", "dataset", "check_dataset", "DataError", "DCH.parquet: shard missing",
          "a dataset without its val shard", generated=True),
    Entry("manifests", "manifest_missing", "dataset", "check_dataset", "DataError", "manifest not found",
          "shards but no manifest (an unfinished build)", generated=True),
    # --- checkpoints and weights ------------------------------------------------------------------------
    Entry("checkpoints", "zero_bytes.pt", "weights", "load_torch_file", "ModelError", "file is empty (0 bytes)",
          "an empty file"),
    Entry("checkpoints", "not_a_torch_file.pt", "weights", "load_torch_file", "ModelError",
          "neither a torch.save zip archive nor a pickle", "a YAML text named .pt"),
    Entry("checkpoints", "truncated.pt", "weights", "load_torch_file", "ModelError",
          "truncated or damaged zip archive", "a state dict cut after half its bytes", generated=True),
    Entry("checkpoints", "arbitrary_object.pt", "weights", "load_torch_file", "ModelError",
          "refused by torch.load(weights_only=True): Unsupported global: GLOBAL argparse.Namespace",
          "a pickled Python object (never unpickled: weights_only refuses it)", generated=True),
    Entry("checkpoints", "plain_pickle.pt", "weights", "load_torch_file", "ModelError",
          "refused by torch.load(weights_only=True)", "a plain pickle, not torch.save's format", generated=True),
    Entry("checkpoints", "list_of_tensors.pt", "weights", "load_weights", "ModelError",
          "not a state dict (a mapping of parameter names to tensors)", "tensors in a list, not a state dict",
          generated=True),
    Entry("checkpoints", "missing_optimizer/state.pt", "checkpoint", "load_checkpoint", "ModelError",
          "optimizer: Field required", "a transfer checkpoint without its optimizer state", generated=True),
    Entry("checkpoints", "epoch_not_int/state.pt", "checkpoint", "load_checkpoint", "ModelError",
          "epoch: Input should be a valid integer", "`epoch: \"3\"`", generated=True),
    Entry("checkpoints", "model_not_tensors/state.pt", "checkpoint", "load_checkpoint", "ModelError",
          "model.head.weight: Input should be an instance of Tensor", "a model entry holding a list",
          generated=True),
    Entry("checkpoints", "optimizer_not_state_dict/state.pt", "checkpoint", "load_checkpoint", "ModelError",
          "optimizer: must be an optimizer state_dict", "an optimizer entry without `param_groups`", generated=True),
    Entry("checkpoints", "teacher_wrong_shape", "teacher", "load_teacher", "ModelError",
          "weights.pt: does not fit model 'DCH': 'head.weight' has shape (2,", "a 2-class head for a 3-class teacher",
          generated=True),
    Entry("checkpoints", "teacher_wrong_keys", "teacher", "load_teacher", "ModelError",
          "weights.pt: does not fit model 'DCH': missing", "autoencoder weights under a segmenter's teacher.json",
          generated=True),
    Entry("checkpoints", "teacher_json_missing_field", "teacher", "load_teacher", "DataError",
          "teacher.json: malformed teacher manifest", "a teacher.json without `val_iou`", generated=True),
    # a stored record names code to import: refused, never imported or called
    Entry("checkpoints", "teacher_arch_subprocess", "teacher", "load_teacher", "ModelError",
          "arch 'subprocess:run' is an import path", "a teacher.json whose arch runs a command", generated=True),
    Entry("checkpoints", "teacher_arch_os_system", "teacher", "load_teacher", "ModelError",
          "arch 'os:system' is an import path", "a teacher.json whose arch is `os:system`", generated=True),
    Entry("checkpoints", "teacher_arch_builtins_eval", "teacher", "load_teacher", "ModelError",
          "arch 'builtins:eval' is an import path", "a teacher.json whose arch evaluates a string", generated=True),
]


# --------------------------------------------------------------------------- generators

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _image_bytes(fmt: str, w: int = 40, h: int = 32) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _images(out: Path) -> None:
    jpg, png = _image_bytes("JPEG"), _image_bytes("PNG")
    (out / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (out / "truncated.png").write_bytes(png[: len(png) // 2])
    bad = bytearray(png)
    i = bytes(png).find(b"IDAT") + 4 + 20  # inside the zlib stream (the chunk's CRC is left stale)
    bad[i] ^= 0xFF
    (out / "corrupt_data.png").write_bytes(bytes(bad))
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    (out / "decompression_bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) +
                                                 _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) +
                                                 _png_chunk(b"IEND", b""))
    root = out / "size_mismatch"
    (root / "annotations").mkdir(parents=True)
    (root / "x").mkdir()
    shutil.copy(HERE / "images" / "missing_image" / "annotations" / "instances_x.json",
                root / "annotations" / "instances_x.json")  # says image 1 is 40x32
    (root / "x" / "1.jpg").write_bytes(_image_bytes("JPEG", 32, 32))


def _shard_table(n: int = 4, size: int = 64):
    """A valid DCH shard of ``n`` rows (random pixels, block masks), deterministic."""
    import numpy as np
    import pyarrow as pa

    from mike_ray.data.shards import SCHEMA

    rng = np.random.default_rng(1)
    classes = ["dog", "cat", "horse", "dog"]
    mask = np.zeros((3, size, size), np.uint8)
    mask[0, 8:40, 8:40] = 1
    rows = {
        "image": [rng.integers(0, 256, size * size * 3, dtype=np.uint8).tobytes() for _ in range(n)],
        "mask": [mask.tobytes()] * n,
        "task": ["DCH"] * n, "task_id": [5] * n,
        "class_name": [classes[i % 4] for i in range(n)],
        "category_id": [{"dog": 18, "cat": 17, "horse": 19}[classes[i % 4]] for i in range(n)],
        "image_id": list(range(1, n + 1)), "ann_id": list(range(101, 101 + n)), "split": ["train"] * n,
    }
    return pa.Table.from_pydict(rows, schema=SCHEMA)


def _shards(out: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mike_ray.data.shards import SCHEMA

    good = _shard_table()
    n = good.num_rows

    def write(name: str, table: pa.Table) -> None:
        pq.write_table(table, out / name, compression="zstd")

    def replace(column: str, values: list, typ: pa.DataType | None = None, table: pa.Table = good) -> pa.Table:
        typ = typ or SCHEMA.field(column).type
        return table.set_column(SCHEMA.get_field_index(column), pa.field(column, typ), pa.array(values, typ))

    buf = io.BytesIO()
    pq.write_table(good, buf, compression="zstd")
    data = buf.getvalue()
    (out / "truncated.parquet").write_bytes(data[: len(data) // 2])
    write("missing_image_column.parquet", good.drop_columns(["image"]))
    write("wrong_column_type.parquet", replace("task_id", [5] * n, pa.int64()))
    images = good.column("image").to_pylist()
    write("image_wrong_length.parquet", replace("image", images[:1] + [images[1][:-1]] + images[2:]))
    masks = good.column("mask").to_pylist()
    write("null_mask.parquet", replace("mask", masks[:2] + [None] + masks[3:]))
    m255 = (np.frombuffer(masks[2], np.uint8) * 255).astype(np.uint8).tobytes()
    write("mask_not_binary.parquet", replace("mask", masks[:2] + [m255] + masks[3:]))
    write("task_id_out_of_range.parquet", replace("task_id", [5, 42] + [5] * (n - 2)))
    write("task_disagrees_with_id.parquet", replace("task", ["CTB"] + ["DCH"] * (n - 1)))
    write("class_not_in_task.parquet", replace("class_name", ["dog", "cat", "horse", "bus"]))
    write("split_unknown.parquet", replace("split", ["holdout"] * n))
    ctb = replace("task_id", [9] * n, table=replace("task", ["CTB"] * n))
    ctb = replace("class_name", ["car", "truck", "bus", "car"], table=ctb)
    write("DCH.parquet", ctb)  # a valid CTB shard under the DCH name


def _prepared(scratch: Path) -> Path:
    """A real prepared dataset (12 generated images, task DCH) to derive coherent bad manifests from."""
    from mike_ray.data.coco import PrepareConfig
    from mike_ray.data.shards import prepare_dataset
    from mike_ray.data.synth import generate_coco

    generate_coco(scratch / "coco", n_images=12, seed=0)
    return prepare_dataset(PrepareConfig(tasks=["DCH"], augment_copies=0), scratch / "coco", scratch / "prepared")


def _manifests(out: Path, scratch: Path) -> None:
    import pyarrow.parquet as pq

    from mike_ray.data.shards import MANIFEST, shard_path

    ds = _prepared(scratch)
    man = json.loads((ds / MANIFEST).read_text())

    def variant(name: str, edit) -> None:
        d = json.loads(json.dumps(man))
        edit(d)
        (out / name).write_text(json.dumps(d, indent=1) + "\n")

    variant("count_negative.manifest.json", lambda d: d["counts"]["train"]["DCH"].update(dog=-1))
    variant("class_missing.manifest.json", lambda d: d["counts"]["val"]["DCH"].pop("horse"))
    variant("instances_exceed_crops.manifest.json", lambda d: d["instances"]["train"]["DCH"].update(dog=1000))
    variant("content_hash_not_hex.manifest.json", lambda d: d.update(content_hash="not-a-hash"))

    def dataset(name: str) -> Path:
        return Path(shutil.copytree(ds, out / name))

    d = dataset("counts_disagree_with_shards")
    m = json.loads((d / MANIFEST).read_text())
    m["counts"]["train"]["DCH"]["dog"] += 1
    (d / MANIFEST).write_text(json.dumps(m, indent=1))
    d = dataset("content_hash_mismatch")
    path = shard_path(d, "train", "DCH")
    pq.write_table(pq.read_table(path), path, compression="snappy")  # same rows, other bytes
    d = dataset("shard_missing")
    shard_path(d, "val", "DCH").unlink()
    d = dataset("manifest_missing")
    (d / MANIFEST).unlink()


def _teacher_record() -> dict:
    return {"name": "DCH", "task": "DCH", "classes": ["dog", "cat", "horse"], "model": TEACHER_MODEL,
            "taps": ["blocks.0"], "val_iou": {"dog": 0.5, "cat": 0.4, "horse": 0.3}, "val_miou": 0.4,
            "test_iou": {"dog": 0.5, "cat": 0.4, "horse": 0.3}, "test_miou": 0.4,
            "untrained_miou": 0.1, "chance_iou": {"dog": 0.1, "cat": 0.1, "horse": 0.1}, "data_hash": "0" * 64}


def _checkpoints(out: Path) -> None:
    import torch

    from mike_ray.models import build_model, save_weights

    torch.manual_seed(0)
    seg = build_model({**TEACHER_MODEL, "seed": 0})
    buf = io.BytesIO()
    torch.save(seg.state_dict(), buf)
    data = buf.getvalue()
    (out / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save(argparse.Namespace(lr=0.1, epochs=3), out / "arbitrary_object.pt")
    (out / "plain_pickle.pt").write_bytes(pickle.dumps({"weight": [1.0, 2.0]}, protocol=4))
    torch.save(list(seg.state_dict().values()), out / "list_of_tensors.pt")

    opt = torch.optim.Adam(seg.parameters(), lr=1e-3)
    good = {"model": seg.state_dict(), "optimizer": opt.state_dict(), "schedule": {}, "epoch": 2, "step": 30,
            "history": [{"epoch": 0, "loss/train/total": 0.5}]}

    def ckpt(name: str, **change) -> None:
        state = {**good, **change}
        for k, v in change.items():
            if v is None:
                state.pop(k)
        (out / name).mkdir()
        torch.save(state, out / name / "state.pt")

    ckpt("missing_optimizer", optimizer=None)
    ckpt("epoch_not_int", epoch="3")
    ckpt("model_not_tensors", model={**seg.state_dict(), "head.weight": [[0.0]]})
    ckpt("optimizer_not_state_dict", optimizer={"state": {}})

    def teacher(name: str, model_spec: dict, record: dict | None = None) -> None:
        d = out / name
        d.mkdir()
        (d / "teacher.json").write_text(json.dumps(record or _teacher_record(), indent=1))
        save_weights(build_model({**model_spec, "seed": 0}), d / "weights.pt")

    teacher("teacher_wrong_shape", {**TEACHER_MODEL, "num_classes": 2})
    teacher("teacher_wrong_keys", {"arch": "autoencoder", "width": 4, "depth": 2, "num_downsamples": 1,
                                   "embed_channels": 2})
    rec = _teacher_record()
    rec.pop("val_iou")
    teacher("teacher_json_missing_field", TEACHER_MODEL, rec)
    for name, arch, kwargs in (("teacher_arch_subprocess", "subprocess:run", {"args": ["touch", "/tmp/pwned"]}),
                               ("teacher_arch_os_system", "os:system", {"command": "touch /tmp/pwned"}),
                               ("teacher_arch_builtins_eval", "builtins:eval", {"source": "print('pwned')"})):
        teacher(name, TEACHER_MODEL, {**_teacher_record(), "model": {"arch": arch, "kwargs": kwargs}})


def make(out: str | Path) -> Path:
    """Write every generated entry under ``out/<fmt>/`` (``out`` must not hold them yet); returns ``out``."""
    out = Path(out)
    dirs = {fmt: out / fmt for fmt in FORMATS}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    scratch = out / "_scratch"
    _images(dirs["images"])
    _shards(dirs["shards"])
    _manifests(dirs["manifests"], scratch)
    _checkpoints(dirs["checkpoints"])
    shutil.rmtree(scratch)
    missing = [e.name for e in CATALOGUE if e.generated and not e.path(out).exists()]
    assert not missing, f"generator forgot {missing}"
    return out


# --------------------------------------------------------------------------- README

def readme(generated_root: Path) -> str:
    """README.md for this folder, with the real one-line messages (paths shown relative)."""
    from mike_ray.check import check_path
    from mike_ray.errors import MikeRayError

    lines = [
        "# Bad-input catalogue",
        "",
        "Malformed inputs that every reader must reject with a typed exception (`DataError`,",
        "`ModelError`, `ConfigError`) whose one-line message names the file and the field, and that",
        "`python -m mike_ray.check PATH` (and the pipeline commands that read them) turn into exit",
        "status 2 and that one line on stderr. `sweeps/` holds the sweep-file catalogue",
        "(tests/test_sweep_config.py; each file's first line says what it expects). The rest is",
        "listed below and tested by tests/test_bad_inputs.py; the last three sections are command\nlines and damaged outputs (`commands.yaml`) and broken cluster-config copies (`cluster/`).",
        "",
        "Entries marked *generated* are binary or must agree with a real prepared dataset: the",
        "test session writes them with `make_bad_inputs.py` (deterministic; `python",
        "tests/bad_inputs/make_bad_inputs.py OUT` writes them by hand). This table is regenerated",
        "with `python tests/bad_inputs/make_bad_inputs.py --readme`; `<gen>` stands for the",
        "folder they were written to.",
        "",
    ]
    for fmt in FORMATS:
        entries = [e for e in CATALOGUE if e.fmt == fmt]
        lines += [f"## {fmt} ({len(entries)})", "",
                  "| entry | what is wrong | API raises | `python -m mike_ray.check` prints (stderr, exit 2) |",
                  "|---|---|---|---|"]
        for e in entries:
            path = e.path(generated_root)
            try:
                check_path(path)
                msg = "(no error!)"
            except MikeRayError as err:
                msg = f"error: {err}"
            msg = msg.replace(str(generated_root), "<gen>").replace(str(HERE) + "/", "")
            msg = msg.replace("|", "\\|")
            gen = " *(generated)*" if e.generated else ""
            lines.append(f"| `{e.fmt}/{e.name}`{gen} | {e.what} | `{e.api}` → `{e.error}` | `{msg}` |")
        lines.append("")
    return "\n".join(lines + _command_and_cluster_sections())


def _command_and_cluster_sections() -> list[str]:
    """The two catalogues that are not files for ``check``: data-CLI command lines and damaged
    outputs (``commands.yaml``, tests/test_bad_commands.py) and broken cluster-config copies
    (``cluster/``, tests/test_cluster_configs.py)."""
    import yaml

    commands = yaml.safe_load((HERE / "commands.yaml").read_text())
    lines = []
    for cls, title in (("cli", "data CLI arguments (issue 12 class 6)"),
                       ("reuse", "damaged outputs re-used (issue 12 class 7)")):
        entries = commands[cls]
        lines += [f"## commands.yaml: {title} ({len(entries)})", "",
                  "| entry | what is wrong | `python -m mike_ray.data …` | expected |", "|---|---|---|---|"]
        for e in entries:
            want = f"exit 2, one line containing `{e['error']}`" if "error" in e else \
                "exit 0, the dataset rebuilt to its original content hash"
            damage = "; ".join(f"{k} {v}" for k, v in e.get("damage", {}).items())
            what = e["what"] + (f" ({damage})" if damage else "")
            lines.append(f"| `{e['name']}` | {what} | `{' '.join(e['argv'])}` | {want} |".replace("|", "|"))
        lines.append("")
    patches = sorted((HERE / "cluster").glob("*.yaml"))
    lines += [f"## cluster: broken copies of the shipped cluster configs (issue 12 class 8) ({len(patches)})", "",
              "Each file patches `cluster/<base>` textually; the checks in tests/test_cluster_configs.py must",
              "report a problem containing `expect`.", "",
              "| entry | what is wrong | base | the check reports |", "|---|---|---|---|"]
    for p in patches:
        spec = yaml.safe_load(p.read_text())
        what = p.read_text().splitlines()[0].lstrip("# ")
        lines.append(f"| `cluster/{p.name}` | {what} | `{spec['base']}` | `{spec['expect']}` |")
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", help="write the generated entries here")
    ap.add_argument("--readme", action="store_true", help="regenerate README.md (generates into a temp dir)")
    args = ap.parse_args(argv)
    if args.readme:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            (HERE / "README.md").write_text(readme(make(Path(tmp) / "gen")))
        print(HERE / "README.md")
        return 0
    if not args.out:
        ap.error("give OUT or --readme")
    print(make(args.out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing
    sys.exit(main())
