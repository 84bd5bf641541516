"""Image-classification datasets for MHGD: the embedded crops (33 classes), CIFAR-100, Tiny-ImageNet.

Every reader returns a :class:`ClassificationDataset`: uint8 images held in memory, int64 labels, the
class names, and optional seeded augmentation (random crop with zero padding + horizontal flip).
Batches follow the loaders' style::

    {"image": float32 B×3×S×S in [0, 1], "label": int64 B}

served whole by ``__getitems__`` (one numpy gather per batch; :func:`make_classification_loader`).

Sources (nothing is ever downloaded; a missing folder or file is a one-line :class:`DataError`):

* ``"crops"`` (default): the prepared Parquet crops of the 11 tasks (``python -m mike_ray.data
  prepare``); label = index of the crop's ``class_name`` in :data:`CROP_CLASSES`, the 33 task classes
  in ``TASKS`` order (PHB person = 0, handbag = 1, …, BCV vase = 32). Splits ``train``/``val``. Crops are
  64×64; ``image_size=32`` resizes them once at load (area averaging).
* ``"cifar100"``: the published python version: ``<root>/cifar-100-python/{train,test,meta}``, pickles
  with ``b"data"`` (N×3072 uint8, R then G then B planes of 32×32) and ``b"fine_labels"``. ``root`` may
  also be the ``cifar-100-python`` folder itself. Splits ``train``/``test`` (``val`` means ``test``).
  The pickles are read with an unpickler that only admits numpy arrays and plain containers.
* ``"tiny_imagenet"``: the published layout: ``<root>/tiny-imagenet-200/wnids.txt``,
  ``train/<wnid>/images/*.JPEG``, ``val/val_annotations.txt`` (``file<TAB>wnid<TAB>box…``) and
  ``val/images/``; label = line index of the wnid in ``wnids.txt``; ``words.txt``, when present, gives
  readable class names. ``root`` may also be the ``tiny-imagenet-200`` folder. Splits ``train``/``val``.
  Decoding the 100k training JPEGs takes a few minutes and ~1.2 GB; ``limit`` keeps a seeded subset.
"""
from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mike_ray.config_base import validate
from mike_ray.data.loaders import identity_collate
from mike_ray.data.shards import binary_to_array, read_shard, shard_path, validate_dataset
from mike_ray.data.sources import ClassificationData
from mike_ray.data.tasks import TASK_CODES, TASKS, check_task_codes, task_classes
from mike_ray.errors import ConfigError, DataError

__all__ = [
    "CROP_CLASSES",
    "ClassificationData",
    "ClassificationDataset",
    "cifar100",
    "crops_classification",
    "load_classification",
    "load_splits",
    "make_classification_loader",
    "tiny_imagenet",
]

CROP_CLASSES: list[str] = task_classes(TASK_CODES)
"""The 33 task classes in ``TASKS`` order: the label of a crop is its class's index here."""
_CROP_INDEX = {name: i for i, name in enumerate(CROP_CLASSES)}
_NO_DOWNLOAD = "nothing is downloaded"

Batch = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# The dataset


class ClassificationDataset(Dataset):
    """Images and labels in memory, with optional seeded augmentation.

    Args:
        images: N×3×S×S uint8.
        labels: N integer labels in ``[0, len(classes))``.
        classes: class names (``num_classes = len(classes)``).
        augment: random crop (zero padding ``pad`` on each side, then an S×S window) and a horizontal
            flip with probability ½, drawn per sample.
        pad: padding of the random crop; default S // 8 (4 for 32×32, 8 for 64×64).
        seed: augmentation seed. The draws of epoch e come from ``default_rng([seed, e])``; call
            :meth:`set_epoch` at the start of each epoch (the training loops do), so an epoch's
            augmentation does not depend on what ran before.
        name: for messages.

    Attributes:
        images, labels, classes, num_classes, image_size, augment, name.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, augment: bool = False,
                 pad: int | None = None, seed: int = 0, name: str = "dataset") -> None:
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise DataError(f"{name}: images must be N×3×S×S uint8, got {images.shape} {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{name}: {images.shape[0]} images but labels of shape {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"{name}: labels must lie in [0, {len(classes)}), got {labels.min()}..{labels.max()}")
        self.images = np.ascontiguousarray(images)
        self.labels = labels
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.image_size = int(images.shape[-1])
        self.augment = bool(augment)
        self.pad = self.image_size // 8 if pad is None else int(pad)
        self.seed = int(seed)
        self.name = name
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"ClassificationDataset({self.name!r}, n={len(self)}, classes={self.num_classes}, "
                f"size={self.image_size}, augment={self.augment})")

    def set_epoch(self, epoch: int) -> None:
        """Restart the augmentation stream at ``default_rng([seed, epoch])``."""
        self._rng = np.random.default_rng([self.seed, int(epoch)])

    def with_augment(self, augment: bool = True, *, seed: int | None = None) -> "ClassificationDataset":
        """A view sharing the arrays, with augmentation switched on or off (and optionally re-seeded)."""
        new = copy.copy(self)
        new.augment = bool(augment)
        new.seed = self.seed if seed is None else int(seed)
        new.set_epoch(0)
        return new

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ClassificationDataset":
        """The samples at ``indices`` (copied), same classes and augmentation settings."""
        idx = np.asarray(indices, dtype=np.int64)
        return ClassificationDataset(self.images[idx], self.labels[idx], self.classes, augment=self.augment,
                                     pad=self.pad, seed=self.seed, name=self.name)

    def _augment(self, imgs: np.ndarray) -> np.ndarray:
        b, _, s, _ = imgs.shape
        p = self.pad
        offs = self._rng.integers(0, 2 * p + 1, size=(b, 2)) if p > 0 else np.zeros((b, 2), np.int64)
        flips = self._rng.random(b) < 0.5
        padded = np.pad(imgs, ((0, 0), (0, 0), (p, p), (p, p))) if p > 0 else imgs
        out = np.empty_like(imgs)
        for i in range(b):
            dy, dx = offs[i]
            crop = padded[i, :, dy:dy + s, dx:dx + s]
            out[i] = crop[:, :, ::-1] if flips[i] else crop
        return out

    def _batch(self, idx: np.ndarray) -> Batch:
        imgs = self.images[idx]
        if self.augment:
            imgs = self._augment(imgs)
        return {"image": torch.from_numpy(np.ascontiguousarray(imgs)).float().div_(255.0),
                "label": torch.from_numpy(self.labels[idx])}

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """A whole batch: ``image`` float32 B×3×S×S in [0, 1], ``label`` int64 B."""
        return self._batch(np.asarray(indices, dtype=np.int64))

    def __getitem__(self, index: int) -> Batch:
        """One sample: ``image`` float32 3×S×S, ``label`` int64 scalar tensor."""
        b = self._batch(np.asarray([index], dtype=np.int64))
        return {k: v[0] for k, v in b.items()}


def make_classification_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                               drop_last: bool = False) -> DataLoader:
    """Single-process DataLoader fetching whole batches through ``__getitems__`` (seeded shuffle)."""
    gen = torch.Generator().manual_seed(seed)
    collate = identity_collate if hasattr(dataset, "__getitems__") else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      collate_fn=collate, num_workers=0, generator=gen)


# --------------------------------------------------------------------------------------------
# Helpers


def _resize(images: np.ndarray, size: int | None) -> np.ndarray:
    """N×3×S×S uint8 → N×3×size×size (area averaging down, bilinear up); chunked to bound memory."""
    if size is None or images.shape[-1] == size:
        return images
    mode = "area" if size < images.shape[-1] else "bilinear"
    out = np.empty((images.shape[0], 3, size, size), np.uint8)
    for i in range(0, images.shape[0], 4096):
        x = torch.from_numpy(images[i:i + 4096]).float()
        kw = {"align_corners": False} if mode == "bilinear" else {}
        y = F.interpolate(x, size=(size, size), mode=mode, **kw)
        out[i:i + 4096] = y.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _limit(images: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if limit is None or limit >= len(labels):
        return images, labels
    keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:limit])
    return images[keep], labels[keep]


def _check_size(image_size: int | None) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8):
        raise ConfigError(f"image_size: must be an integer >= 8, got {image_size!r}")


def _find_root(root: str | Path, folder: str, what: str) -> Path:
    """``root/folder`` if it exists, else ``root`` itself when it *is* that folder; else DataError."""
    root = Path(root)
    if (root / folder).is_dir():
        return root / folder
    if root.name == folder and root.is_dir():
        return root
    raise DataError(f"{root / folder}: {what} folder not found ({_NO_DOWNLOAD}: place the published "
                    f"'{folder}' folder there)")


# --------------------------------------------------------------------------------------------
# Crops (the default)


def crops_classification(root: str | Path, split: str = "train", *, image_size: int | None = None,
                         tasks: Sequence[str] | None = None, limit: int | None = None, augment: bool = False,
                         seed: int = 0) -> ClassificationDataset:
    """33-class classification of the prepared crops (see the module docstring).

    Args:
        root: a prepared dataset directory (``<out_root>/<config_key>`` with ``manifest.json``).
        split: ``"train"`` or ``"val"``.
        image_size: resize the crops (e.g. 32); None keeps the prepared size (64).
        tasks: task codes to read (default: every prepared task). Labels stay indices into the 33
            classes of :data:`CROP_CLASSES` whatever the subset, so ``num_classes`` is always 33.
        limit: keep a seeded random subset of at most this many crops.
        augment, seed: see :class:`ClassificationDataset`.
    """
    _check_size(image_size)
    root = Path(root)
    if split not in ("train", "val"):
        raise ConfigError(f"split: crops have splits 'train' and 'val', got {split!r}")
    if not root.is_dir():
        raise DataError(f"{root}: prepared crops folder not found ({_NO_DOWNLOAD}: prepare it with "
                        f"'python -m mike_ray.data prepare')")
    man = validate_dataset(root)
    codes = list(man.tasks) if tasks is None else check_task_codes(tasks)
    missing = [t for t in codes if t not in man.tasks]
    if missing:
        raise ConfigError(f"tasks: {', '.join(missing)} not prepared in {root} (has {', '.join(man.tasks)})")
    s = man.image_size
    imgs, labels = [], []
    for task in codes:
        path = shard_path(root, split, task)
        table = read_shard(path, s, columns=["image", "class_name"])
        names = table.column("class_name").to_pylist()
        bad = sorted({n for n in names if n not in TASKS[task]})
        if bad:
            raise DataError(f"{path}: column 'class_name': {bad[0]!r} is not a class of task {task}")
        imgs.append(binary_to_array(table.column("image"), (s, s, 3)).transpose(0, 3, 1, 2))
        labels.append(np.array([_CROP_INDEX[n] for n in names], dtype=np.int64))
    images = np.concatenate(imgs) if imgs else np.zeros((0, 3, s, s), np.uint8)
    lab = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    images, lab = _limit(images, lab, limit, seed)
    return ClassificationDataset(_resize(np.ascontiguousarray(images), image_size), lab, CROP_CLASSES,
                                 augment=augment, seed=seed, name=f"crops:{split}")


# --------------------------------------------------------------------------------------------
# CIFAR-100


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what the CIFAR pickles contain: numpy arrays, dtypes and plain Python containers."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
        if (module, name) in allowed:
            return super().find_class(module, name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return getattr(_np_multiarray(), name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _np_multiarray() -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


def _read_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file not found ({_NO_DOWNLOAD}: CIFAR-100 must be the published python "
                        f"version, 'cifar-100-python/{{train,test,meta}}')")
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a foreign or damaged file
        raise DataError(f"{path}: not a CIFAR python pickle: {type(err).__name__}: {err}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR python pickle (top level is a {type(obj).__name__}, not a dict)")
    return obj


def cifar100(root: str | Path, split: str = "train", *, image_size: int | None = None, limit: int | None = None,
             augment: bool = False, seed: int = 0) -> ClassificationDataset:
    """CIFAR-100 (100 fine classes) from the published python pickles (see the module docstring).

    Args:
        root: folder containing ``cifar-100-python/`` (or that folder).
        split: ``"train"``, ``"test"`` (``"val"`` is read as ``"test"``).
        image_size: resize from 32 (e.g. to 64); None keeps 32.
        limit, augment, seed: as for :func:`crops_classification`.
    """
    _check_size(image_size)
    if split not in ("train", "test", "val"):
        raise ConfigError(f"split: CIFAR-100 has splits 'train' and 'test', got {split!r}")
    folder = _find_root(root, "cifar-100-python", "CIFAR-100")
    path = folder / ("train" if split == "train" else "test")
    obj = _read_pickle(path)
    for key in (b"data", b"fine_labels"):
        if key not in obj:
            raise DataError(f"{path}: key {key!r} missing (not a CIFAR-100 python pickle)")
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[b"fine_labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' must be N×3072 uint8, got {data.shape} {data.dtype}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {labels.size} fine labels")
    classes = [f"class_{i:02d}" for i in range(100)]
    meta = folder / "meta"
    if meta.is_file():
        names = _read_pickle(meta).get(b"fine_label_names")
        if isinstance(names, list) and len(names) == 100:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if len(labels) and (labels.min() < 0 or labels.max() >= 100):
        raise DataError(f"{path}: b'fine_labels' must lie in [0, 100), got {labels.min()}..{labels.max()}")
    images, labels = _limit(data.reshape(-1, 3, 32, 32), labels, limit, seed)
    return ClassificationDataset(_resize(np.ascontiguousarray(images), image_size), labels, classes,
                                 augment=augment, seed=seed, name=f"cifar100:{split}")


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet


def _decode(path: Path, size: int = 64) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: not a readable image: {err}") from None


def tiny_imagenet(root: str | Path, split: str = "train", *, image_size: int | None = None,
                  limit: int | None = None, augment: bool = False, seed: int = 0) -> ClassificationDataset:
    """Tiny-ImageNet (200 classes, 64×64) from the published folder layout (see the module docstring).

    Args:
        root: folder containing ``tiny-imagenet-200/`` (or that folder).
        split: ``"train"`` or ``"val"`` (the published test split has no labels).
        image_size: resize from 64 (e.g. to 32); None keeps 64.
        limit: decode only a seeded random subset of at most this many images.
        augment, seed: see :class:`ClassificationDataset`.
    """
    _check_size(image_size)
    if split not in ("train", "val"):
        raise ConfigError(f"split: Tiny-ImageNet has labelled splits 'train' and 'val', got {split!r}")
    folder = _find_root(root, "tiny-imagenet-200", "Tiny-ImageNet")
    wnids_path = folder / "wnids.txt"
    if not wnids_path.is_file():
        raise DataError(f"{wnids_path}: file not found ({_NO_DOWNLOAD})")
    wnids = [w.strip() for w in wnids_path.read_text().splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataError(f"{wnids_path}: must list distinct class ids, one a line")
    index = {w: i for i, w in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            d = folder / "train" / w / "images"
            if not d.is_dir():
                raise DataError(f"{d}: folder not found ({_NO_DOWNLOAD}; class {w} of {wnids_path})")
            imgs = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
            files += imgs
            labels += [index[w]] * len(imgs)
    else:
        ann = folder / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DataError(f"{ann}: file not found ({_NO_DOWNLOAD})")
        for n, line in enumerate(ann.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise DataError(f"{ann}: line {n}: expected 'file<TAB>wnid<TAB>box...', got {line[:60]!r}")
            if parts[1] not in index:
                raise DataError(f"{ann}: line {n}: class {parts[1]!r} is not in {wnids_path}")
            files.append(folder / "val" / "images" / parts[0])
            labels.append(index[parts[1]])
    lab = np.asarray(labels, dtype=np.int64)
    order = np.arange(len(files))
    if limit is not None and limit < len(files):
        order = np.sort(np.random.default_rng(seed).permutation(len(files))[:limit])
    images = np.zeros((len(order), 3, 64, 64), np.uint8)
    for k, i in enumerate(order):
        if not files[i].is_file():
            raise DataError(f"{files[i]}: image not found ({_NO_DOWNLOAD})")
        images[k] = _decode(files[i])
    classes = list(wnids)
    words = folder / "words.txt"
    if words.is_file():
        names = dict(line.split("\t", 1) for line in words.read_text().splitlines() if "\t" in line)
        classes = [names.get(w, w).strip() for w in wnids]
    return ClassificationDataset(_resize(images, image_size), lab[order], classes, augment=augment, seed=seed,
                                 name=f"tiny_imagenet:{split}")


# --------------------------------------------------------------------------------------------
# Config-driven entry point


_READERS = {"crops": crops_classification, "cifar100": cifar100, "tiny_imagenet": tiny_imagenet}
_VAL_SPLIT = {"crops": "val", "cifar100": "test", "tiny_imagenet": "val"}


def load_classification(source: str, root: str | Path, split: str, **kwargs: Any) -> ClassificationDataset:
    """Dispatch to :func:`crops_classification`, :func:`cifar100` or :func:`tiny_imagenet` by ``source``."""
    if source not in _READERS:
        raise ConfigError(f"source: unknown classification source {source!r} (known: {', '.join(_READERS)})")
    if source != "crops" and kwargs.get("tasks") is not None:
        raise ConfigError(f"tasks: only the 'crops' source has tasks, not {source!r}")
    if source != "crops":
        kwargs.pop("tasks", None)
    return _READERS[source](root, split, **kwargs)


def load_splits(cfg: ClassificationData | dict[str, Any]) -> tuple[ClassificationDataset, ClassificationDataset]:
    """``(train, val)`` for a :class:`ClassificationData` (train augmented if ``cfg.augment``)."""
    if not isinstance(cfg, ClassificationData):
        cfg = validate(ClassificationData, cfg, source="data")
    extra = {"tasks": cfg.tasks} if cfg.source == "crops" else {}
    train = load_classification(cfg.source, cfg.root, "train", image_size=cfg.image_size, limit=cfg.limit_train,
                                augment=cfg.augment, seed=cfg.seed, **extra)
    val = load_classification(cfg.source, cfg.root, _VAL_SPLIT[cfg.source], image_size=cfg.image_size,
                              limit=cfg.limit_val, augment=False, seed=cfg.seed, **extra)
    return train, val
