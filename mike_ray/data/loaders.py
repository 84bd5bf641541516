"""Loaders over prepared Parquet shards: an in-memory torch Dataset and a streaming Ray Dataset.

Both give the contract's batches (docs/contracts.md)::

    {"image": float32 B×3×S×S in [0,1], "mask": float32 B×3×S×S in {0,1}, "task_id": int64 B}

:class:`ShardDataset` keeps the uint8 arrays in memory (a 10k-crop default dataset is ~250 MB) and
serves a whole batch per ``__getitems__`` call — one numpy gather and one conversion instead of
B Python calls (72k vs ~20k samples/s measured here). :func:`make_loader` wraps it in a
DataLoader with an identity collate, since the batch is already stacked.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mike_ray.data.coco import SPLITS
from mike_ray.data.shards import (Manifest, binary_to_array, check_shard_schema, read_shard, shard_path,
                                  validate_dataset)
from mike_ray.data.tasks import check_task_codes
from mike_ray.errors import ConfigError

if TYPE_CHECKING:
    import ray.data

Batch = dict[str, torch.Tensor]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split: {split!r} is not one of {', '.join(SPLITS)}")


def _select_tasks(man: Manifest, tasks: Sequence[str] | None, root: Path) -> list[str]:
    if tasks is None:
        return list(man.tasks)
    codes = check_task_codes(tasks, table=man.table)
    missing = [t for t in codes if t not in man.tasks]
    if missing:
        raise ConfigError(f"tasks: {', '.join(missing)} not prepared in {root} (has {', '.join(man.tasks)})")
    return codes


class MappedRows:
    """Rows of several memory-mapped ``N_i×…`` uint8 arrays read as one ``N×…`` array.

    ``rows[idx]`` gathers only the requested rows (sorted per file, so reads follow the page cache);
    nothing else is loaded. ``keep`` (optional) maps the dataset's row i to global row ``keep[i]``.
    """

    def __init__(self, parts: Sequence[np.ndarray], row_shape: tuple[int, ...], keep: np.ndarray | None = None):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.keep = keep
        self.shape = (len(keep) if keep is not None else int(self.offsets[-1]), *row_shape)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        rows = self.keep[idx] if self.keep is not None else idx
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for j in np.unique(part):
            where = np.flatnonzero(part == j)
            local = rows[where] - self.offsets[j]
            order = np.argsort(local, kind="stable")
            out[where[order]] = self.parts[j][local[order]]
        return out


def _mapped_task(root: Path, man: Manifest, split: str, task: str) -> tuple[np.ndarray, ...]:
    """``(images, masks, task_ids, image_ids)`` of one shard: images/masks memory-mapped from a decoded
    uint8 cache ``<root>/cache/<split>/<task>/`` written on first use (the Parquet shard is read and
    checked once, the result renamed into place atomically, so concurrent workers on a node agree and
    a crash leaves no partial cache); ids in memory (16 bytes a row)."""
    import os
    import shutil
    import tempfile

    from mike_ray.errors import DataError

    s, c = man.image_size, man.mask_channels
    final = root / "cache" / split / task
    names = ("images", "masks", "task_ids", "image_ids")
    if not (final / "image_ids.npy").is_file():
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=final.parent))
        except OSError as err:
            raise DataError(f"{final.parent}: cannot write the query cache ({err.strerror}); "
                            f"use memory 'ram' (transfer.query_memory: ram)") from None
        try:
            table = read_shard(shard_path(root, split, task), s, columns=["image", "mask", "task_id", "image_id"],
                               table=man.table, channels=c)
            arrays = (binary_to_array(table.column("image"), (s, s, 3)).transpose(0, 3, 1, 2),
                      binary_to_array(table.column("mask"), (c, s, s)),
                      table.column("task_id").to_numpy().astype(np.int64),
                      table.column("image_id").to_numpy().astype(np.int64))
            for name, arr in zip(names, arrays):
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr))
            try:
                os.rename(tmp, final)
            except OSError:  # another worker got there first: its cache is the same data
                if not (final / "image_ids.npy").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    n = man.rows(split, task)
    out = []
    for name in names:
        path = final / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r" if name in ("images", "masks") else None)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: unreadable query cache ({type(err).__name__}); delete {final} to rebuild it") \
                from None
        want = (n, 3, s, s) if name == "images" else (n, c, s, s) if name == "masks" else (n,)
        if arr.shape != want or (arr.dtype != np.uint8 and name in ("images", "masks")):
            raise DataError(f"{path}: shape {arr.shape} {arr.dtype}, the manifest says {want} uint8; "
                            f"delete {final} to rebuild it")
        out.append(arr)
    return tuple(out)


class ShardDataset(Dataset):
    """The crops of one split and some tasks of a prepared dataset, as uint8.

    ``memory="ram"`` (default) loads them; ``memory="mmap"`` memory-maps a decoded cache of each
    shard instead (written once, next to the shards), so a process holds only the rows it is
    gathering and the trainer workers of one node share one copy in the page cache — the query set
    of a COCO-sized study (~500k crops, ~12 GB decoded) never sits in a worker's own memory.

    Attributes:
        images: N×3×S×S uint8 (CHW, converted once at load); a :class:`MappedRows` under mmap.
        masks: N×C×S×S uint8, 0/1 (the same; C: the manifest's mask_channels, a task uses its first k).
        task_ids: N int64.
        image_ids: N int64 (source COCO image id; crops of one image share it).
        manifest: the dataset's validated manifest.
    """

    def __init__(self, root: str | Path, split: str, tasks: Sequence[str] | None = None,
                 limit: int | None = None, seed: int = 0, memory: str = "ram"):
        """Load ``<root>/<split>/<task>.parquet`` for each task (default: all prepared tasks).

        ``limit`` keeps a seeded random subset of at most that many crops (small runs, tests).
        ``memory``: "ram" or "mmap" (see the class docstring); both give identical batches.

        Raises DataError for a bad manifest, shard or cache, ConfigError for an unknown split/task.
        """
        _check_split(split)
        if memory not in ("ram", "mmap"):
            raise ConfigError(f"memory: {memory!r} is not one of ram, mmap")
        self.root = Path(root)
        self.manifest = validate_dataset(self.root)
        self.split = split
        self.tasks = _select_tasks(self.manifest, tasks, self.root)
        s, c = self.manifest.image_size, self.manifest.mask_channels
        if memory == "mmap":
            parts = [_mapped_task(self.root, self.manifest, split, t) for t in self.tasks]
            self.task_ids = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
            self.image_ids = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.int64)
            keep = None
            if limit is not None and limit < len(self.task_ids):
                keep = np.sort(np.random.default_rng(seed).permutation(len(self.task_ids))[:limit])
                self.task_ids, self.image_ids = self.task_ids[keep], self.image_ids[keep]
            self.images = MappedRows([p[0] for p in parts], (3, s, s), keep)
            self.masks = MappedRows([p[1] for p in parts], (c, s, s), keep)
            return
        imgs, msks, tids, iids = [], [], [], []
        for task in self.tasks:
            table = read_shard(shard_path(self.root, split, task), s, columns=["image", "mask", "task_id", "image_id"],
                               table=self.manifest.table, channels=c)
            # HWC → CHW once here, so a batch is a plain gather later
            imgs.append(binary_to_array(table.column("image"), (s, s, 3)).transpose(0, 3, 1, 2))
            msks.append(binary_to_array(table.column("mask"), (c, s, s)))
            tids.append(table.column("task_id").to_numpy().astype(np.int64))
            iids.append(table.column("image_id").to_numpy().astype(np.int64))
        self.images = np.ascontiguousarray(np.concatenate(imgs)) if imgs else np.zeros((0, 3, s, s), np.uint8)
        self.masks = np.ascontiguousarray(np.concatenate(msks)) if msks else np.zeros((0, c, s, s), np.uint8)
        self.task_ids = np.concatenate(tids) if tids else np.zeros(0, np.int64)
        self.image_ids = np.concatenate(iids) if iids else np.zeros(0, np.int64)
        if limit is not None and limit < len(self.task_ids):
            keep = np.sort(np.random.default_rng(seed).permutation(len(self.task_ids))[:limit])
            self.images, self.masks = self.images[keep], self.masks[keep]
            self.task_ids, self.image_ids = self.task_ids[keep], self.image_ids[keep]

    @classmethod
    def from_arrays(cls, images: np.ndarray, masks: np.ndarray, task_ids: np.ndarray,
                    image_ids: np.ndarray | None = None, tasks: Sequence[str] = (), split: str = "train"
                    ) -> "ShardDataset":
        """A dataset over arrays already in memory (``images``/``masks`` N×3×S×S uint8, ``task_ids`` N)."""
        ds = cls.__new__(cls)
        ds.root, ds.manifest, ds.split, ds.tasks = Path("<memory>"), None, split, list(tasks)
        ds.images, ds.masks = np.ascontiguousarray(images), np.ascontiguousarray(masks)
        ds.task_ids = np.asarray(task_ids, dtype=np.int64)
        ds.image_ids = np.asarray(image_ids if image_ids is not None else np.arange(len(ds.task_ids)), np.int64)
        return ds

    def __len__(self) -> int:
        return len(self.task_ids)

    def _batch(self, idx: np.ndarray) -> Batch:
        img = torch.from_numpy(self.images[idx]).float().div_(255.0)
        msk = torch.from_numpy(self.masks[idx]).float()
        return {"image": img, "mask": msk, "task_id": torch.from_numpy(self.task_ids[idx])}

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """A whole batch: ``image``/``mask`` float32 B×3×S×S, ``task_id`` int64 B."""
        return self._batch(np.asarray(indices, dtype=np.int64))

    def __getitem__(self, index: int) -> Batch:
        """One sample: ``image``/``mask`` float32 3×S×S, ``task_id`` int64 scalar tensor."""
        b = self._batch(np.asarray([index], dtype=np.int64))
        return {k: v[0] for k, v in b.items()}


def identity_collate(batch: Batch) -> Batch:
    """The batch from ``__getitems__`` is already stacked: pass it through."""
    return batch


def make_loader(dataset: ShardDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A single-process DataLoader that fetches whole batches via ``__getitems__``.

    Worker processes were slower on this 2-core machine (shared/notes/integration.md); the seeded
    generator makes the shuffle order reproducible.
    """
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      collate_fn=identity_collate, num_workers=0, generator=gen)


def decode_numpy_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch (``image``/``mask`` uint8 tensors, ``task_id``) → the contract's float arrays."""
    img = np.asarray(batch["image"])
    if img.ndim == 4 and img.shape[-1] == 3:  # HWC → CHW
        img = img.transpose(0, 3, 1, 2)
    return {"image": np.ascontiguousarray(img, dtype=np.float32) / np.float32(255.0),
            "mask": np.asarray(batch["mask"], dtype=np.float32),
            "task_id": np.asarray(batch["task_id"], dtype=np.int64)}


def count_rows(root: str | Path, split: str, tasks: Sequence[str] | None = None) -> int:
    """Rows of ``split`` over ``tasks`` according to the manifest (no shard is read)."""
    root = Path(root)
    man = validate_dataset(root)
    return sum(man.rows(split, t) for t in _select_tasks(man, tasks, root))


def ray_dataset(root: str | Path, split: str, tasks: Sequence[str] | None = None,
                num_cpus: float = 0.25) -> "ray.data.Dataset":
    """A streaming Ray Dataset of the same samples (rows in shard order; shuffle downstream).

    ``num_cpus`` per read/decode task is fractional on purpose: with shards and trainer workers
    holding most logical CPUs, whole-CPU data tasks would never schedule (a deadlock seen on 2 CPUs,
    shared/notes/integration.md).

    ``read_parquet`` turns the raw ``binary`` columns into uint8 tensor columns itself
    (``tensor_column_schema``); a ``map_batches`` converts them to the contract's float arrays.
    """
    import ray.data

    _check_split(split)
    root = Path(root)
    man = validate_dataset(root)
    codes = _select_tasks(man, tasks, root)
    s, c = man.image_size, man.mask_channels
    paths = [str(shard_path(root, split, t)) for t in codes if man.rows(split, t) > 0]
    if not paths:
        raise ConfigError(f"tasks: no {split} rows for {', '.join(codes)} in {root}")
    for p in paths:  # fail fast with a DataError naming the file, before any Ray task runs
        check_shard_schema(p)
    ds = ray.data.read_parquet(paths, tensor_column_schema={"image": (np.uint8, (s, s, 3)),
                                                            "mask": (np.uint8, (c, s, s))},
                               ray_remote_args={"num_cpus": num_cpus})
    # select_columns is pushed down into the Parquet read (``columns=`` is deprecated in 2.60)
    return ds.select_columns(["image", "mask", "task_id"]).map_batches(decode_numpy_batch, batch_format="numpy",
                                                                        num_cpus=num_cpus)


def epoch_rows(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """Row indices one data-parallel rank visits in one epoch, in visiting order.

    A seeded global permutation of all ``n`` rows (numpy ``default_rng([seed, epoch])``: a new order
    every epoch, the same order for the same seed and epoch — so a resumed run replays it exactly),
    cut to a multiple of ``world`` and dealt out ``rank::world`` (every rank gets ``n // world`` rows,
    so DDP workers take the same number of steps; at most ``world − 1`` rows are left out, different
    ones each epoch). Because the permutation is over rows, not blocks or tasks, every batch is a
    sample of the task mix (docs/contracts.md, "Query batches").
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"epoch_rows: rank {rank} of world {world}")
    perm = np.random.default_rng([int(seed) % 2**32, int(epoch) % 2**32]).permutation(n)
    return perm[: (n // world) * world][rank::world]


class QueryBatches:
    """The query set one trainer worker iterates: mixed-task batches from a :class:`ShardDataset`.

    ``epoch(e)`` yields the contract's float batches over :func:`epoch_rows` (a fresh global shuffle
    per epoch). ``validation()`` yields batches over one fixed seeded permutation of the rows (so a
    cap of ``max_batches`` still covers every task in proportion, and every epoch validates the same
    samples), split over ranks the same way.
    """

    #: the validation order's "epoch" (fixed, far from any training epoch)
    VAL_EPOCH = 2**31 - 1

    def __init__(self, dataset: ShardDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if len(dataset) < world:
            raise ConfigError(f"query data: {len(dataset)} {dataset.split} rows for {world} trainer workers "
                              f"(tasks {', '.join(dataset.tasks)} in {dataset.root})")
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        """Batches per epoch on this rank (the last one may be smaller)."""
        return -(-(len(self.dataset) // self.world) // self.batch_size)

    def _batches(self, rows: np.ndarray, max_batches: int | None = None) -> Iterator[Batch]:
        for k, i in enumerate(range(0, len(rows), self.batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            yield self.dataset.__getitems__(rows[i:i + self.batch_size])

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches of training epoch ``epoch``."""
        return self._batches(epoch_rows(len(self.dataset), self.seed, epoch, self.rank, self.world))

    def validation(self, max_batches: int | None = None) -> Iterator[Batch]:
        """This rank's validation batches (a fixed mixed order; at most ``max_batches``)."""
        rows = epoch_rows(len(self.dataset), self.seed, self.VAL_EPOCH, self.rank, self.world)
        return self._batches(rows, max_batches)


def to_float_batch(batch: dict[str, torch.Tensor]) -> Batch:
    """uint8 ``image``/``mask`` tensors → the contract's float32 batch (``image`` in [0,1])."""
    out = dict(batch)
    if out["image"].dtype == torch.uint8:
        out["image"] = out["image"].float().div_(255.0)
    if out["mask"].dtype == torch.uint8:
        out["mask"] = out["mask"].float()
    return out
