"""Prepared datasets on disk: Parquet shards + manifest, built atomically and re-used by key.

Layout of a prepared dataset (docs/contracts.md)::

    <out_root>/<config_key>/
        manifest.json            written last; its presence means "complete"
        train/<TASK>.parquet     one file per (split, task), also when empty
        val/<TASK>.parquet
        test/<TASK>.parquet

``config_key`` is a short hash of the :class:`PrepareConfig`, the source (split names and the
sha256 of each annotation file) and the format version, so a different config or different
annotations give a different directory, and the same ones re-use it (stage re-use).

Atomicity: the whole directory is built under a hidden temporary sibling
(``.<key>.tmp-<host>-<pid>-<rand>``) and ``os.rename``d into place at the end. An exception removes
the temporary directory; a killed process leaves only a hidden temporary directory, which the next
``prepare_dataset`` on the same host removes once its process is gone.

Images and masks are raw ``binary`` columns (uint8 bytes, zstd): the fastest layout measured on
this machine (shared/notes/integration.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError

from mike_ray.config_base import format_validation_error
from mike_ray.data.coco import (SPLITS, CropRecord, PrepareConfig, annotation_path, count_work, discover_splits,
                                file_sha256, iter_crops, open_sources)
from mike_ray.data.tasks import TASKS, resolve_table
from mike_ray.errors import ConfigError, DataError, one_line

FORMAT_VERSION = 2  # 2: a test split (test/<TASK>.parquet, counts.test); 1 had train/val only
MANIFEST = "manifest.json"
ROW_GROUP = 1024  # rows buffered per (split, task) before a row group is written

SCHEMA = pa.schema([
    ("image", pa.binary()),        # image_size·image_size·3 uint8, HWC RGB
    ("mask", pa.binary()),         # C·image_size·image_size uint8, CHW, 0/1; channel k = task's k-th class
                                   # (C: the widest task's class count, 3 for the paper's tasks)
    ("task", pa.string()),
    ("task_id", pa.int8()),
    ("class_name", pa.string()),
    ("category_id", pa.int32()),
    ("image_id", pa.int64()),
    ("ann_id", pa.int64()),
    ("split", pa.string()),
])
_STAT_COLUMNS = ["task_id", "category_id", "image_id", "ann_id"]  # no min/max stats of 12 kB blobs


class Manifest(BaseModel):
    """The validated content of ``manifest.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int
    config: dict[str, Any]
    config_key: str
    source: dict[str, Any]
    content_hash: str
    counts: dict[str, dict[str, dict[str, int]]]     # split → task → class → crops
    instances: dict[str, dict[str, dict[str, int]]]  # split → task → class → distinct instances
    image_size: int
    tasks: list[str]

    def rows(self, split: str, task: str) -> int:
        """Number of rows (crops) in ``<split>/<task>.parquet``."""
        return sum(self.counts[split][task].values())

    @property
    def table(self) -> dict[str, tuple[str, ...]]:
        """The data's task table, code → class names in id order (``config.task_table``, or the paper's)."""
        return resolve_table(self.config.get("task_table"))

    def task_id(self, code: str) -> int:
        """A task's id in this data (its index in :attr:`table`): the ``task_id`` of its rows."""
        return list(self.table).index(code)

    def classes(self, code: str) -> tuple[str, ...]:
        """A task's class names: channel k of its masks is class k."""
        return self.table[code]

    @property
    def mask_channels(self) -> int:
        """Channels of every mask row: the widest prepared task's class count."""
        return max(len(self.table[t]) for t in self.tasks)


def shard_path(root: str | Path, split: str, task: str) -> Path:
    """``<root>/<split>/<task>.parquet``."""
    return Path(root) / split / f"{task}.parquet"


def config_key(cfg: PrepareConfig, source: dict[str, Any]) -> str:
    """12-hex-digit key of (config, source, format version): the dataset's directory name."""
    blob = json.dumps({"config": cfg.key_dump(), "source": source, "format_version": FORMAT_VERSION},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def content_hash(root: str | Path) -> str:
    """sha256 over every shard file (relative path and bytes, in sorted order)."""
    root = Path(root)
    h = hashlib.sha256()
    for path in sorted(root.glob("*/*.parquet")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- manifest

def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest (``path`` is the dataset directory or the manifest file).

    Missing file, bad JSON, a missing/ill-typed field, a wrong format version, counts that do not
    cover every split × task × class, or a ``config_key`` that does not match its config → DataError
    naming the file and the field.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise DataError(f"{p}: manifest not found (dataset incomplete or not prepared)")
    try:
        raw = json.loads(p.read_bytes())
    except json.JSONDecodeError as err:
        raise DataError(f"{p}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{p}: invalid JSON: not UTF-8 text (byte {err.start})") from None
    except RecursionError:
        raise DataError(f"{p}: invalid JSON: nested too deeply") from None
    try:
        man = Manifest.model_validate(raw)
    except ValidationError as err:
        raise DataError(format_validation_error(err, Manifest, str(p))) from None
    if man.format_version != FORMAT_VERSION:
        raise DataError(f"{p}: format_version: {man.format_version}, this mike_ray reads {FORMAT_VERSION}")
    try:
        cfg = PrepareConfig.model_validate(man.config)
    except ValidationError as err:
        raise DataError(format_validation_error(err, PrepareConfig, f"{p}: config")) from None
    if config_key(cfg, man.source) != man.config_key:
        raise DataError(f"{p}: config_key: {man.config_key!r} does not match its config and source")
    if man.tasks != cfg.tasks or man.image_size != cfg.image_size:
        raise DataError(f"{p}: tasks/image_size: differ from config")
    for field, table in (("counts", man.counts), ("instances", man.instances)):
        for split in SPLITS:
            for task in man.tasks:
                classes = table.get(split, {}).get(task)
                if classes is None or set(classes) != set(man.table.get(task, ())):
                    raise DataError(f"{p}: {field}.{split}.{task}: missing or wrong classes")
                for cls, n in classes.items():
                    if n < 0:
                        raise DataError(f"{p}: {field}.{split}.{task}.{cls}: {n}, a count cannot be negative")
                    # every instance gives at least one crop
                    if field == "instances" and n > man.counts[split][task][cls]:
                        raise DataError(f"{p}: instances.{split}.{task}.{cls}: {n} instances but only "
                                        f"{man.counts[split][task][cls]} crops")
    if not (len(man.content_hash) == 64 and all(c in "0123456789abcdef" for c in man.content_hash)):
        raise DataError(f"{p}: content_hash: {man.content_hash[:80]!r} is not a sha256 hex digest")
    return man


def validate_dataset(root: str | Path, verify_content: bool = False) -> Manifest:
    """Validate a prepared dataset: its manifest, and every shard's presence and row count.

    ``verify_content`` also recomputes the content hash (reads every byte).
    """
    root = Path(root)
    man = read_manifest(root)
    for split in SPLITS:
        for task in man.tasks:
            path = shard_path(root, split, task)
            if not path.is_file():
                raise DataError(f"{path}: shard missing (listed in {root / MANIFEST})")
            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"{path}: not a readable Parquet file: {_arrow_detail(err, path)}") from None
            if rows != man.rows(split, task):
                raise DataError(f"{path}: {rows} rows, manifest counts {man.rows(split, task)}")
    if verify_content:
        got = content_hash(root)
        if got != man.content_hash:
            raise DataError(f"{root / MANIFEST}: content_hash: shard files do not match (manifest "
                            f"{man.content_hash[:12]}..., files {got[:12]}...)")
    return man


def check_dataset(root: str | Path) -> Manifest:
    """The thorough check of a prepared dataset (``python -m mike_ray.check``): everything
    :func:`validate_dataset` checks with ``verify_content``, then every shard read in full with
    :func:`read_shard` (schema, sizes, mask and label values). Reads every byte once or twice."""
    root = Path(root)
    man = validate_dataset(root, verify_content=True)
    for split in SPLITS:
        for task in man.tasks:
            read_shard(shard_path(root, split, task), man.image_size, table=man.table, channels=man.mask_channels)
    return man


# --------------------------------------------------------------------------- shards

def _arrow_detail(err: BaseException, path: Path) -> str:
    """Arrow's error text on one line, without the path it repeats (the message starts with it)."""
    text = one_line(str(err)).replace(f"Could not open Parquet input source '{path}': ", "")
    return text.replace(f"'{path}'", "").replace(str(path), "").strip() or type(err).__name__


def _check_schema(path: Path, schema: pa.Schema, columns: Sequence[str] | None = None) -> None:
    for field in SCHEMA:
        if columns is not None and field.name not in columns:
            continue
        if field.name not in schema.names:
            raise DataError(f"{path}: column {field.name!r}: missing")
        got = schema.field(field.name).type
        if got != field.type:
            raise DataError(f"{path}: column {field.name!r}: type {got}, expected {field.type}")


def check_shard_schema(path: str | Path) -> None:
    """Check a shard's columns and types from its footer only (cheap); DataError naming the file."""
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {_arrow_detail(err, path)}") from None
    _check_schema(path, schema)


def read_shard(path: str | Path, image_size: int, columns: Sequence[str] | None = None,
               table: Mapping[str, Sequence[str]] = TASKS, channels: int = 3) -> pa.Table:
    """Read one shard and check its schema, the byte size of every image and mask value, and the values.

    ``table``/``channels``: the dataset's task table and mask channels (:class:`Manifest`; default:
    the paper's tasks, 3).

    A missing/unreadable file, a missing or ill-typed column, a null, a value of the wrong size, a
    mask value other than 0/1, or a label that contradicts the task (see :func:`_check_values`) →
    DataError naming the file and the column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: not a readable Parquet file: file is empty (0 bytes)")
    try:
        data = pq.read_table(path, columns=list(columns) if columns else None)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file: {_arrow_detail(err, path)}") from None
    _check_schema(path, data.schema, columns)
    for name in data.column_names:
        if name in SCHEMA.names and data.column(name).null_count:
            raise DataError(f"{path}: column {name!r}: {data.column(name).null_count} null values")
    expect = {"image": image_size * image_size * 3, "mask": channels * image_size * image_size}
    for name, nbytes in expect.items():
        if name not in data.column_names or data.num_rows == 0:
            continue
        lengths = pc.binary_length(data.column(name))
        lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
        if lo != nbytes or hi != nbytes:
            raise DataError(f"{path}: column {name!r}: values of {lo}..{hi} bytes, expected {nbytes} "
                            f"(image_size {image_size}" + (f", {channels} mask channels)" if name == "mask" else ")"))
    if data.num_rows:
        _check_values(path, data, image_size, table, channels)
    return data


def _first_bad(mask: pa.ChunkedArray | pa.Array) -> int:
    """Row index of the first True in a boolean array."""
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False)))[0])


def _check_values(path: Path, table: pa.Table, image_size: int, tasks: Mapping[str, Sequence[str]] = TASKS,
                  channels: int = 3) -> None:
    """Check the values a trainer relies on without looking (cheap: vectorised, ~10 ms per 10k rows).

    - ``mask``: every byte 0 or 1 (a 0/255 mask would be a 255× loss);
    - ``task_id``: a known task id (index in ``tasks``, the data's task table); with ``task``,
      ``task == codes[task_id]``; the file named
      ``<TASK>.parquet`` holds only that task;
    - ``class_name``: one of the row's task classes; ``split``: the folder it lies in.
    """
    cols = table.column_names
    if "mask" in cols:
        row_max = binary_to_array(table.column("mask"), (channels * image_size * image_size,)).max(axis=1)
        if row_max.max() > 1:
            row = int(np.argmax(row_max > 1))
            raise DataError(f"{path}: column 'mask': row {row} has value {int(row_max[row])}, masks hold 0/1")
    codes = list(tasks)
    stem = path.stem if path.stem in tasks else None
    if "task_id" in cols:
        tid = table.column("task_id")
        bad = pc.or_(pc.less(tid, 0), pc.greater_equal(tid, len(codes)))
        if pc.any(bad).as_py():
            row = _first_bad(bad)
            raise DataError(f"{path}: column 'task_id': row {row} has {tid[row].as_py()}, task ids are "
                            f"0..{len(codes) - 1}")
        if stem is not None:
            bad = pc.not_equal(tid, codes.index(stem))
            if pc.any(bad).as_py():
                row = _first_bad(bad)
                raise DataError(f"{path}: column 'task_id': row {row} has {tid[row].as_py()}, the file of task "
                                f"{stem} holds task id {codes.index(stem)}")
        if "task" in cols:
            bad = pc.not_equal(table.column("task"), pc.take(pa.array(codes, pa.string()), tid))
            if pc.any(bad).as_py():
                row = _first_bad(bad)
                raise DataError(f"{path}: column 'task': row {row} has {table.column('task')[row].as_py()!r} but "
                                f"task_id {tid[row].as_py()} is {codes[tid[row].as_py()]!r}")
    if "class_name" in cols and ("task" in cols or stem is not None):
        rows = table.column("task").to_pylist() if "task" in cols else [stem] * table.num_rows
        for row, (task, cls) in enumerate(zip(rows, table.column("class_name").to_pylist())):
            if task not in tasks:
                raise DataError(f"{path}: column 'task': row {row} has unknown task {task!r}")
            if cls not in tasks[task]:
                raise DataError(f"{path}: column 'class_name': row {row} has {cls!r}, not a class of task {task} "
                                f"({', '.join(tasks[task])})")
    if "split" in cols:
        want = path.parent.name if path.parent.name in SPLITS else None
        allowed = pa.array([want] if want else list(SPLITS), pa.string())
        bad = pc.invert(pc.is_in(table.column("split"), value_set=allowed))
        if pc.any(bad).as_py():
            row = _first_bad(bad)
            raise DataError(f"{path}: column 'split': row {row} has {table.column('split')[row].as_py()!r}, "
                            f"expected {' or '.join(repr(a) for a in allowed.to_pylist())}")


def binary_to_array(col: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """Fixed-size ``binary`` values → one uint8 array ``N×shape`` without a Python loop over rows.

    The caller guarantees every value has ``prod(shape)`` bytes (see :func:`read_shard`). Chunks are
    converted one by one (a combined binary array would overflow its 2 GB offsets on big shards).
    """
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts = []
    for arr in chunks:
        n = len(arr)
        if n == 0:
            continue
        offsets = np.frombuffer(arr.buffers()[1], np.int32, count=arr.offset + n + 1)[arr.offset:]
        parts.append(np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(n, *shape))
    if not parts:
        return np.zeros((0, *shape), np.uint8)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _Writers:
    """One ParquetWriter per (split, task), fed in row groups of :data:`ROW_GROUP` rows."""

    def __init__(self, root: Path, tasks: Sequence[str]):
        self.root = root
        self.buf: dict[tuple[str, str], list[CropRecord]] = {(s, t): [] for s in SPLITS for t in tasks}
        self.writers: dict[tuple[str, str], pq.ParquetWriter] = {}
        for split in SPLITS:
            (root / split).mkdir(parents=True, exist_ok=True)

    def _writer(self, key: tuple[str, str]) -> pq.ParquetWriter:
        if key not in self.writers:
            self.writers[key] = pq.ParquetWriter(shard_path(self.root, *key), SCHEMA, compression="zstd",
                                                 write_statistics=_STAT_COLUMNS)
        return self.writers[key]

    def _flush(self, key: tuple[str, str]) -> None:
        rows = self.buf[key]
        if not rows:
            return
        cols = {f.name: [getattr(r, f.name) for r in rows] for f in SCHEMA}
        self._writer(key).write_table(pa.Table.from_pydict(cols, schema=SCHEMA))
        rows.clear()

    def add(self, rec: CropRecord) -> None:
        key = (rec.split, rec.task)
        self.buf[key].append(rec)
        if len(self.buf[key]) >= ROW_GROUP:
            self._flush(key)

    def close(self) -> None:
        for key in self.buf:
            self._flush(key)
            self._writer(key).close()  # also creates empty shards: every (split, task) file exists

    def abort(self) -> None:
        for w in self.writers.values():
            try:
                w.close()
            except Exception:  # best effort: the directory is deleted next
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out_root: Path, key: str) -> None:
    """Remove temporary build directories of ``key`` left by dead processes on this host."""
    host = socket.gethostname()
    for tmp in out_root.glob(f".{key}.tmp-*"):
        parts = tmp.name.split(".tmp-", 1)[1].rsplit("-", 2)
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            shutil.rmtree(tmp, ignore_errors=True)


def source_info(coco_root: str | Path, splits: Sequence[str]) -> dict[str, Any]:
    """What identifies the source in the config key: split names and each annotation file's sha256.

    Image files are not hashed (COCO's are 19 GB); annotations name every image that is used.
    """
    hashes = {}
    for split in splits:
        path = annotation_path(coco_root, split)
        if not path.is_file():
            raise DataError(f"{path}: annotation file not found")
        hashes[split] = file_sha256(path)
    return {"splits": list(splits), "annotations_sha256": hashes}


def prepare_dataset(cfg: PrepareConfig, coco_root: str | Path, out_root: str | Path, *,
                    splits: Sequence[str] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Prepare (or re-use) the Parquet dataset for ``cfg`` from a COCO-layout directory.

    Args:
        cfg: what to crop and how (its hash, with the source's, names the output directory).
        coco_root: directory with ``annotations/instances_<split>.json`` and ``<split>/<file_name>``.
        out_root: parent of prepared datasets; the result is ``out_root/<config_key>``.
        splits: source split names; default: every ``instances_*.json`` found.
        progress: called as ``progress(images_done, images_total)`` while images are processed; an
            exception it raises aborts the build like any other (nothing is left behind).
    Returns:
        The dataset directory, complete with its manifest.
    """
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise ConfigError(f"out: {out_root} is a file, not a folder")
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out: {out_root}: cannot create it ({err.strerror or type(err).__name__})") from None
    splits = list(splits) if splits else discover_splits(coco_root)
    source = source_info(coco_root, splits)
    key = config_key(cfg, source)
    final = out_root / key
    if (final / MANIFEST).is_file():
        try:
            validate_dataset(final)
            return final  # stage re-use
        except DataError:
            pass  # damaged: rebuilt below and swapped in
    out_root.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_root, key)
    tmp = out_root / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    writers = _Writers(tmp, cfg.tasks)
    try:
        sources = open_sources(coco_root, splits, cfg.tasks, cfg.table)
        total = count_work(sources, cfg)
        done = 0

        def step(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        table = cfg.table
        counts = {s: {t: {c: 0 for c in table[t]} for t in cfg.tasks} for s in SPLITS}
        inst: dict[str, dict[str, set[int]]] = {s: {c: set() for t in cfg.tasks for c in table[t]} for s in SPLITS}
        for rec in iter_crops(sources, cfg, progress=step):
            writers.add(rec)
            counts[rec.split][rec.task][rec.class_name] += 1
            inst[rec.split][rec.class_name].add(rec.ann_id)
        writers.close()
        manifest = Manifest(
            format_version=FORMAT_VERSION, config=cfg.model_dump(mode="json"), config_key=key, source=source,
            content_hash=content_hash(tmp), counts=counts,
            instances={s: {t: {c: len(inst[s][c]) for c in table[t]} for t in cfg.tasks} for s in SPLITS},
            image_size=cfg.image_size, tasks=list(cfg.tasks))
        (tmp / MANIFEST).write_text(json.dumps(manifest.model_dump(mode="json"), indent=1))
        _publish(tmp, final)
    except BaseException:
        writers.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; a damaged ``final`` is moved aside first.

    If another process published the same key in the meantime, its (valid) copy wins and ours is
    dropped.
    """
    if final.exists():
        try:
            validate_dataset(final)
            shutil.rmtree(tmp)  # a concurrent build finished first: identical content
            return
        except DataError:
            trash = final.with_name(f".{final.name}.trash-{uuid.uuid4().hex[:8]}")
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / MANIFEST).is_file():  # lost a race with another builder
            validate_dataset(final)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise


def dataset_summary(root: str | Path) -> str:
    """A human-readable table of a prepared dataset's crops per split, task and class."""
    man = validate_dataset(root)
    inst = [f"inst.{s}" for s in SPLITS]
    lines = [f"{Path(root)}  (config_key {man.config_key}, {man.image_size}px, format {man.format_version})",
             f"{'task':<5} {'class':<14} " + " ".join(f"{s:>7}" for s in SPLITS) + " "
             + " ".join(f"{h:>10}" for h in inst)]
    for task in man.tasks:
        for cls in man.classes(task):
            lines.append(f"{task:<5} {cls:<14} " + " ".join(f"{man.counts[s][task][cls]:>7}" for s in SPLITS) + " "
                         + " ".join(f"{man.instances[s][task][cls]:>10}" for s in SPLITS))
        lines.append(f"{task:<5} {'(total)':<14} " + " ".join(f"{man.rows(s, task):>7}" for s in SPLITS))
    lines.append(f"all   {'':<14} " + " ".join(f"{sum(man.rows(s, t) for t in man.tasks):>7}" for s in SPLITS))
    return "\n".join(lines)


__all__ = ["FORMAT_VERSION", "MANIFEST", "SCHEMA", "Manifest", "binary_to_array", "check_dataset", "check_shard_schema",
           "config_key", "content_hash",
           "dataset_summary", "prepare_dataset", "read_manifest", "read_shard", "shard_path", "source_info",
           "validate_dataset"]
