"""The query set: the images a MIKE student reconstructs and its teachers score.

Three sources (``query.source`` of a sweep file):

- ``tasks`` (default): the prepared crops of chosen tasks (:mod:`mike_ray.data.shards`), each row
  labelled with its task, so a teacher can be masked to its own task's rows;
- ``folder``: every image under a folder (recursively), e.g. unlabelled images of the target domain;
- ``coco``: the images of a COCO-format source (all of them, or those showing chosen categories),
  whole images, no masks needed.

A folder or COCO query set is prepared once into ``<output>/query/<key>/`` (``train.parquet``,
``val.parquet``, ``manifest.json`` written last, the folder renamed into place when complete), keyed by
the query config, the crop size and the source's files, so an unchanged source is re-used. Each image
is decoded in full (a broken file is a one-line error naming it), centre-cropped to a square and
resized to the crop size. Its rows carry no task label (``task_id`` −1): only teachers without a task,
or ``transfer.masking: false``, score them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from mike_ray.config_base import StrictModel
from mike_ray.data.tasks import table_of
from mike_ray.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "NO_TASK", "QueryConfig", "count_query_rows", "describe_data", "is_query_dataset", "load_query",
           "open_query", "prepare_query", "query_rows"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
NO_TASK = -1  # the task id of a query row without a task label
FORMAT = 1
MANIFEST = "manifest.json"


class QueryConfig(StrictModel):
    """Where the query images come from (see the module docstring).

    ``tasks`` (source ``tasks``): prepared tasks whose train crops form the query set (their val crops
    validate); none: the trial's teachers' own tasks (the paper's §4.1 setting). ``root``: the
    folder (source ``folder``) or the COCO root with ``annotations/instances_<split>.json`` and
    ``<split>/`` image folders (source ``coco``); ``splits``: which of its annotation files (default:
    all); ``categories``: COCO category names — only images showing one of them (default: every
    image). ``max_images``: a seeded random subset; ``val_fraction``: held out to validate.
    """

    source: Literal["tasks", "folder", "coco"] = "tasks"
    tasks: list[str] | None = None
    root: str | None = None
    splits: list[str] | None = None
    categories: list[str] | None = None
    max_images: int | None = Field(None, ge=2)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    seed: int = Field(0, ge=0)

    @field_validator("tasks")
    @classmethod
    def _known(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is None:
            return v
        table = table_of(info)
        bad = [t for t in v if t not in table]
        if bad or not v:
            raise ValueError(f"unknown task {bad[0]!r} (known: {', '.join(table)})" if bad
                             else "at least one task is required (or leave it out)")
        if len(set(v)) != len(v):
            raise ValueError("tasks repeat")
        return v

    @model_validator(mode="after")
    def _source(self) -> "QueryConfig":
        if self.source == "tasks":
            for name in ("root", "splits", "categories", "max_images"):
                if getattr(self, name) is not None:
                    raise ValueError(f"query.{name}: only for source 'folder' or 'coco' (source is 'tasks')")
            return self
        if self.tasks is not None:
            raise ValueError(f"query.tasks: only for source 'tasks' (a {self.source} query set has no task labels)")
        if not self.root:
            raise ValueError(f"query.root is required for source '{self.source}'")
        root = Path(self.root).expanduser()
        if self.source == "folder":
            if not root.is_dir():
                raise ValueError(f"query.root: {root} is not a folder")
            for name in ("splits", "categories"):
                if getattr(self, name) is not None:
                    raise ValueError(f"query.{name}: only for source 'coco'")
        elif not (root / "annotations").is_dir():
            raise ValueError(f"query.root: {root / 'annotations'} not found (expected annotations/instances_<split>.json)")
        return self

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        # relative to where the sweep is launched, like data.coco_root
        return None if v is None else str(Path(v).expanduser().absolute())

    def labelled(self) -> bool:
        """Whether the query rows carry task labels (only the ``tasks`` source's do)."""
        return self.source == "tasks"


# --- listing the source ---------------------------------------------------------------------------------
Listed = tuple[str, Path, "tuple[int, int] | None", "str | None"]  # label, file, expected (w, h), annotation file


def _list_folder(root: Path) -> list[Listed]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p.relative_to(root).as_posix(), p, None, None) for p in files]


def _list_coco(cfg: QueryConfig) -> tuple[list[Listed], dict[str, str]]:
    """(label, image path, expected (w, h), annotation file) of every chosen image, and each
    annotation file's sha256."""
    from mike_ray.data.coco import annotation_path, discover_splits, file_sha256, load_coco

    root = Path(cfg.root)
    available = discover_splits(root)
    splits = cfg.splits or available
    for s in splits:
        if s not in available:
            raise DataError(f"query.splits: {annotation_path(root, s)} not found (has: {', '.join(available)})")
    out, hashes = [], {}
    for split in splits:
        ann = annotation_path(root, split)
        hashes[split] = file_sha256(ann)
        coco = load_coco(ann)
        if cfg.categories:
            ids: set[int] = set()
            for name in cfg.categories:
                found = coco.getCatIds(catNms=[name])
                if not found:
                    raise DataError(f"query.categories: {ann} has no category named {name!r}")
                for c in found:
                    ids.update(coco.getImgIds(catIds=[c]))
        else:
            ids = set(coco.imgs)
        for i in sorted(ids):
            img = coco.imgs[i]
            out.append((f"{split}/{img['file_name']}", root / split / img["file_name"],
                        (int(img["width"]), int(img["height"])), str(ann)))
    return out, hashes


def _square(path: Path, size: int, expected: tuple[int, int] | None, source: str | None) -> np.ndarray:
    """The image decoded in full, centre-cropped to a square, resized to ``size``²: H×W×3 uint8."""
    from PIL import Image

    from mike_ray.data.coco import read_image

    img = read_image(path, size=expected, source=source)
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0), np.uint8)


# --- preparing, reading ---------------------------------------------------------------------------------
def prepare_query(cfg: QueryConfig, image_size: int, out_root: str | Path) -> Path:
    """Prepare (or re-use) the folder or COCO query set of ``cfg`` under ``out_root/query/<key>``.

    Raises:
        DataError: a source without images, fewer than two (one to train, one to validate), or an
            image that cannot be decoded (named).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mike_ray.utils import atomic_dir, write_json_atomic

    if cfg.source == "tasks":
        raise ValueError("prepare_query: the 'tasks' source is the prepared dataset itself")
    root = Path(cfg.root)
    if cfg.source == "folder":
        listing = _list_folder(root)
        files: dict[str, Any] = {label: [p.stat().st_size, p.stat().st_mtime_ns] for label, p, _, _ in listing}
    else:
        listing, files = _list_coco(cfg)
    if not listing:
        what = "no image files (" + ", ".join(IMAGE_SUFFIXES) + ")" if cfg.source == "folder" else "no images"
        raise DataError(f"query.root: {root}: {what}" + (f" showing {', '.join(cfg.categories)}" if cfg.categories else ""))
    key = hashlib.sha256(json.dumps({"config": cfg.model_dump(mode="json"), "image_size": image_size,
                                     "files": files, "format": FORMAT}, sort_keys=True).encode()).hexdigest()[:12]
    final = Path(out_root) / "query" / key
    if (final / MANIFEST).is_file():
        return final
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(listing))
    if cfg.max_images is not None:
        order = order[:cfg.max_images]
    if len(order) < 2:
        raise DataError(f"query.root: {root}: {len(order)} image(s); a query set needs two or more (train and val)")
    n_val = min(len(order) - 1, max(1, round(len(order) * cfg.val_fraction)))
    splits = {"val": sorted(order[:n_val]), "train": sorted(order[n_val:])}
    with atomic_dir(final) as tmp:
        counts = {}
        for split, rows in splits.items():
            images = [_square(listing[i][1], image_size, listing[i][2], listing[i][3]).tobytes() for i in rows]
            table = pa.table({"image": pa.array(images, pa.binary()),
                              "source": pa.array([listing[i][0] for i in rows], pa.string())})
            pq.write_table(table, tmp / f"{split}.parquet", compression="zstd")
            counts[split] = len(rows)
        write_json_atomic(tmp / MANIFEST, {"kind": "query", "format": FORMAT, "image_size": image_size,
                                           "counts": counts, "config": cfg.model_dump(mode="json"), "key": key})
    return final


def _manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable query manifest: {err}") from None
    if not isinstance(man, dict) or man.get("kind") != "query" or man.get("format") != FORMAT:
        raise DataError(f"{path}: kind/format: not a query set of format {FORMAT}")
    return man


def is_query_dataset(root: str | Path) -> bool:
    """Whether ``root`` is a prepared folder/COCO query set (not a prepared task dataset)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("kind") == "query"
    except (OSError, ValueError, AttributeError):
        return False


def query_rows(root: str | Path, split: str) -> int:
    """Rows of a query set's split (0 for "test": a query set has none)."""
    return int(_manifest(Path(root))["counts"].get(split, 0))


def load_query(root: str | Path, split: str):
    """A query set's split as a :class:`~mike_ray.data.loaders.ShardDataset` (images N×3×S×S uint8,
    no masks, every ``task_id`` :data:`NO_TASK`), the dataset type the training loop reads."""
    import pyarrow.parquet as pq

    from mike_ray.data.loaders import ShardDataset

    man = _manifest(Path(root))
    s = int(man["image_size"])
    path = Path(root) / f"{split}.parquet"
    if split not in man["counts"] or not path.is_file():
        raise DataError(f"{path}: the query set has no '{split}' split")
    blobs = pq.read_table(path, columns=["image"]).column("image").to_pylist()
    if any(len(b) != s * s * 3 for b in blobs):
        raise DataError(f"{path}: image: a row is not {s}×{s}×3 bytes")
    images = np.frombuffer(b"".join(blobs), np.uint8).reshape(len(blobs), s, s, 3).transpose(0, 3, 1, 2)
    n = len(blobs)
    masks = np.broadcast_to(np.zeros((1, 3, s, s), np.uint8), (n, 3, s, s))  # no masks: a view, no memory
    ds = ShardDataset.from_arrays(images, np.zeros((0, 3, s, s), np.uint8), np.full(n, NO_TASK), split=split)
    ds.masks = masks
    return ds


def open_query(root: str | Path, split: str, tasks: list[str] | None = None, memory: str = "ram", limit: int | None = None):
    """The query rows of ``split``: a folder/COCO query set at ``root`` (all its rows), or the
    prepared crops of ``tasks`` in the dataset at ``root`` (``memory``: "ram" or "mmap")."""
    from mike_ray.data.loaders import ShardDataset

    if is_query_dataset(root):
        ds = load_query(root, split)
        if limit is not None and limit < len(ds):
            keep = np.arange(limit)
            return ShardDataset.from_arrays(ds.images[keep], ds.masks[keep], ds.task_ids[keep], split=split)
        return ds
    return ShardDataset(root, split, tasks, memory=memory, limit=limit)


def count_query_rows(root: str | Path, split: str, tasks: list[str] | None = None) -> int:
    """Rows :func:`open_query` would give, from the manifest alone."""
    from mike_ray.data.loaders import count_rows

    return query_rows(root, split) if is_query_dataset(root) else count_rows(root, split, tasks)


def describe_data(root: str | Path, split: str, tasks: list[str] | None = None) -> tuple[str, str, dict[str, Any]]:
    """How an MLflow dataset input names what :func:`open_query` reads: ``(name, digest, profile)``.

    A prepared task dataset: ``"crops:DCH+CTB/train"``, the manifest's content hash, rows per task and
    class. A folder/COCO query set: ``"query:<source>/train"``, its key, its row count."""
    from mike_ray.data.shards import read_manifest

    if is_query_dataset(root):
        man = _manifest(Path(root))
        src = man["config"]["source"]
        return (f"query:{src}/{split}", str(man["key"]),
                {"rows": int(man["counts"].get(split, 0)), "image_size": man["image_size"], "source": man["config"]["root"]})
    man = read_manifest(root)
    chosen = list(tasks) if tasks else list(man.tasks)
    counts = {t: dict(man.counts[split][t]) for t in chosen}
    return (f"crops:{'+'.join(chosen)}/{split}", man.content_hash,
            {"rows": sum(sum(c.values()) for c in counts.values()), "image_size": man.image_size, "counts": counts})
