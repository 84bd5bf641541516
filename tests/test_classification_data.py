"""Classification readers on tiny files in the published formats: crops (33 classes), CIFAR-100, Tiny-ImageNet."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mike_ray.data.classification import (CROP_CLASSES, ClassificationData, ClassificationDataset, cifar100,
                                          crops_classification, load_splits, make_classification_loader,
                                          tiny_imagenet)
from mike_ray.data.coco import PrepareConfig
from mike_ray.data.shards import binary_to_array, prepare_dataset, read_shard, shard_path
from mike_ray.data.synth import generate_coco
from mike_ray.data.tasks import TASKS
from mike_ray.errors import ConfigError, DataError

torch.set_num_threads(1)


# ------------------------------------------------------------------ fixtures: tiny files


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    synth = tmp_path_factory.mktemp("synth")
    generate_coco(synth, n_images=40)
    return prepare_dataset(PrepareConfig(augment_copies=0), synth, tmp_path_factory.mktemp("prep"))


def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch 1 of 1",
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)]}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    d = root / "cifar-100-python"
    d.mkdir()
    for name, n, seed in (("train", 6, 0), ("test", 4, 1)):
        with open(d / name, "wb") as fh:
            pickle.dump(_cifar_batch(n, seed), fh, protocol=2)
    with open(d / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, fh, protocol=2)
    return root


WNIDS = ["n01443537", "n01629819"]
COLORS = {"n01443537": (200, 30, 30), "n01629819": (30, 30, 200)}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    d = root / "tiny-imagenet-200"
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (d / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n")
    for w in WNIDS:
        (d / "train" / w / "images").mkdir(parents=True)
        (d / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(3):
            Image.new("RGB", (64, 64), COLORS[w]).save(d / "train" / w / "images" / f"{w}_{i}.JPEG")
    Image.new("L", (64, 64), 128).save(d / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_2.JPEG")  # grayscale
    lines = []
    for i, w in enumerate([WNIDS[1], WNIDS[0], WNIDS[1]]):
        Image.new("RGB", (64, 64), COLORS[w]).save(d / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------------ crops


def test_crops_are_labelled_by_their_33_class_index(prepared: Path) -> None:
    assert len(CROP_CLASSES) == 33 and CROP_CLASSES[:3] == list(TASKS["PHB"]) and CROP_CLASSES[-1] == "vase"
    ds = crops_classification(prepared, "train", tasks=["DCH", "CTB"])
    table = read_shard(shard_path(prepared, "train", "DCH"), 64, columns=["image", "class_name"])
    n = table.num_rows
    names = table.column("class_name").to_pylist()
    assert ds.num_classes == 33 and len(ds) == n + read_shard(shard_path(prepared, "train", "CTB"), 64).num_rows
    assert ds.labels[:n].tolist() == [CROP_CLASSES.index(c) for c in names]
    assert set(ds.labels[n:].tolist()) <= {CROP_CLASSES.index(c) for c in TASKS["CTB"]}
    raw = binary_to_array(table.column("image"), (64, 64, 3))[0]
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["label"].dtype == torch.int64
    assert torch.equal(item["image"], torch.from_numpy(raw.transpose(2, 0, 1).copy()).float() / 255)
    small = crops_classification(prepared, "val", image_size=32, limit=5)
    assert small.images.shape == (5, 3, 32, 32) and small.image_size == 32
    assert 0 <= small.labels.min() and small.labels.max() < 33


def test_crops_errors(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}: .*nothing is downloaded"):
        crops_classification(tmp_path / "nope", "train")
    with pytest.raises(ConfigError, match="split"):
        crops_classification(prepared, "test")
    with pytest.raises(ConfigError, match="unknown task code 'XYZ'"):
        crops_classification(prepared, "train", tasks=["XYZ"])


# ------------------------------------------------------------------ CIFAR-100


def test_cifar100_reads_the_python_pickles(cifar_root: Path) -> None:
    train = cifar100(cifar_root, "train")
    ref = _cifar_batch(6, 0)
    assert len(train) == 6 and train.num_classes == 100 and train.classes[5] == "fine5"
    assert train.labels.tolist() == ref[b"fine_labels"]
    # row layout: 1024 red values, then green, then blue, each row-major 32×32
    row = ref[b"data"][2]
    img = train.images[2]
    assert img[0, 0, 0] == row[0] and img[1, 0, 1] == row[1024 + 1] and img[2, 31, 31] == row[3071]
    test = cifar100(cifar_root / "cifar-100-python", "val")  # the folder itself; 'val' reads 'test'
    assert len(test) == 4 and test.labels.tolist() == _cifar_batch(4, 1)[b"fine_labels"]
    big = cifar100(cifar_root, "test", image_size=64, limit=2)
    assert big.images.shape == (2, 3, 64, 64)


def test_cifar100_errors(cifar_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'cifar-100-python'}: .*nothing is downloaded"):
        cifar100(tmp_path, "train")
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    with pytest.raises(DataError, match=f"{d / 'train'}: file not found .*nothing is downloaded"):
        cifar100(tmp_path, "train")
    with open(d / "train", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, fh, protocol=2)
    with pytest.raises(DataError, match="fine_labels"):
        cifar100(tmp_path, "train")

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    with open(d / "train", "wb") as fh:
        pickle.dump({b"data": Evil()}, fh, protocol=2)
    with pytest.raises(DataError, match="not a CIFAR python pickle.*not allowed"):
        cifar100(tmp_path, "train")


# ------------------------------------------------------------------ Tiny-ImageNet


def test_tiny_imagenet_reads_the_published_layout(tiny_root: Path) -> None:
    train = tiny_imagenet(tiny_root, "train")
    assert len(train) == 6 and train.num_classes == 2 and train.classes[0].startswith("goldfish")
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images.shape == (6, 3, 64, 64)
    assert np.abs(train.images[0].reshape(3, -1).mean(1) - COLORS[WNIDS[0]]).max() < 8    # RGB survives JPEG
    assert np.abs(train.images[5].astype(int) - 128).max() < 8                             # grayscale → 3 channels
    val = tiny_imagenet(tiny_root / "tiny-imagenet-200", "val", image_size=32)
    assert val.labels.tolist() == [1, 0, 1] and val.images.shape == (3, 3, 32, 32)
    assert np.abs(val.images[1].reshape(3, -1).mean(1) - COLORS[WNIDS[0]]).max() < 8
    assert len(tiny_imagenet(tiny_root, "train", limit=2)) == 2


def test_tiny_imagenet_errors(tiny_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"{tmp_path / 'tiny-imagenet-200'}: .*nothing is downloaded"):
        tiny_imagenet(tmp_path, "train")
    d = tmp_path / "tiny-imagenet-200"
    d.mkdir()
    with pytest.raises(DataError, match=f"{d / 'wnids.txt'}: file not found"):
        tiny_imagenet(tmp_path, "train")
    (d / "wnids.txt").write_text("n0\n")
    with pytest.raises(DataError, match=f"{d / 'train' / 'n0' / 'images'}: folder not found"):
        tiny_imagenet(tmp_path, "train")
    with pytest.raises(DataError, match="val_annotations.txt: file not found"):
        tiny_imagenet(tmp_path, "val")
    (d / "val").mkdir()
    (d / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn9\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="line 1: class 'n9' is not in"):
        tiny_imagenet(tmp_path, "val")


# ------------------------------------------------------------------ dataset, augmentation, loader, config


def _toy(n: int = 8, s: int = 16, **kw) -> ClassificationDataset:
    rng = np.random.default_rng(0)
    return ClassificationDataset(rng.integers(1, 256, (n, 3, s, s), dtype=np.uint8), np.arange(n) % 3,
                                 ["a", "b", "c"], **kw)


def test_augmentation_is_seeded_crop_and_flip() -> None:
    ds = _toy(augment=True, seed=5)
    idx = list(range(8))
    ds.set_epoch(1)
    a = ds.__getitems__(idx)["image"]
    ds.set_epoch(1)
    assert torch.equal(a, ds.__getitems__(idx)["image"])          # same seed and epoch: same draws
    ds.set_epoch(2)
    assert not torch.equal(a, ds.__getitems__(idx)["image"])
    plain = ds.with_augment(False).__getitems__(idx)["image"]
    assert not torch.equal(a, plain) and a.shape == plain.shape
    # without padding only the flip is left: every image is the original or its mirror
    flip_only = _toy(augment=True, pad=0, seed=1).__getitems__(idx)["image"]
    for x, y in zip(flip_only, plain):
        assert torch.equal(x, y) or torch.equal(x, y.flip(-1))
    # with padding, a crop is a shifted window: zeros come only from the padding (originals are >= 1)
    assert (a == 0).any() and not (plain == 0).any()


def test_loader_and_config_entry_point(cifar_root: Path, prepared: Path) -> None:
    batches = list(make_classification_loader(_toy(), batch_size=3, shuffle=True, seed=0, drop_last=True))
    assert len(batches) == 2 and batches[0]["image"].shape == (3, 3, 16, 16) and batches[0]["label"].shape == (3,)
    train, val = load_splits({"source": "cifar100", "root": str(cifar_root), "image_size": 32})
    assert train.augment and not val.augment and (len(train), len(val)) == (6, 4)
    train, val = load_splits(ClassificationData(root=str(prepared), limit_train=7, tasks=["PHB"]))
    assert len(train) == 7 and val.num_classes == 33 and set(val.labels.tolist()) <= {0, 1, 2}
    with pytest.raises(ConfigError, match="tasks"):
        load_splits({"source": "cifar100", "root": str(cifar_root), "tasks": ["PHB"]})
