"""Loaders: the torch Dataset's batched __getitems__ and DataLoader, and the Ray Data pipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mike_ray.data.coco import PrepareConfig
from mike_ray.data.loaders import ShardDataset, count_rows, make_loader, ray_dataset
from mike_ray.data.shards import binary_to_array, prepare_dataset, read_shard, shard_path
from mike_ray.data.synth import generate_coco
from mike_ray.errors import ConfigError

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    synth = tmp_path_factory.mktemp("synth")
    generate_coco(synth, n_images=30, seed=2)
    cfg = PrepareConfig(tasks=["PHB", "DCH", "CTB", "BCV"], augment_copies=1)
    return prepare_dataset(cfg, synth, tmp_path_factory.mktemp("prep"))


def test_dataset_batches_follow_the_contract(prepared: Path) -> None:
    ds = ShardDataset(prepared, "train", tasks=["DCH", "CTB"])
    n_dch = read_shard(shard_path(prepared, "train", "DCH"), 64).num_rows
    assert len(ds) == n_dch + read_shard(shard_path(prepared, "train", "CTB"), 64).num_rows
    idx = [len(ds) - 1, 0, n_dch]
    b = ds.__getitems__(idx)
    assert b["image"].shape == b["mask"].shape == (3, 3, 64, 64)
    assert b["image"].dtype == b["mask"].dtype == torch.float32 and b["task_id"].dtype == torch.int64
    assert b["task_id"].tolist() == [9, 5, 9]
    assert 0 <= b["image"].min() and b["image"].max() <= 1 and set(b["mask"].unique().tolist()) <= {0.0, 1.0}
    # sample 0 is the first DCH row: HWC bytes → CHW floats
    table = read_shard(shard_path(prepared, "train", "DCH"), 64)
    raw = binary_to_array(table.column("image"), (64, 64, 3))[0]
    assert torch.equal(b["image"][1], torch.from_numpy(raw.copy()).permute(2, 0, 1).float() / 255)
    assert torch.equal(b["mask"][1], torch.from_numpy(binary_to_array(table.column("mask"), (3, 64, 64))[0].copy()).float())
    one = ds[0]
    assert torch.equal(one["image"], b["image"][1]) and one["task_id"].item() == 5


def test_loader_yields_seeded_shuffled_whole_batches(prepared: Path) -> None:
    ds = ShardDataset(prepared, "train")
    order = [b["task_id"] for b in make_loader(ds, batch_size=16, seed=3)]
    again = [b["task_id"] for b in make_loader(ds, batch_size=16, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(order, again))
    assert sum(len(t) for t in order) == len(ds) and len(order[0]) == 16
    assert sorted(torch.cat(order).tolist()) == sorted(ds.task_ids.tolist())
    first = next(iter(make_loader(ds, batch_size=8, shuffle=False)))
    assert first["image"].shape == (8, 3, 64, 64) and torch.equal(first["image"], ds.__getitems__(range(8))["image"])


def test_bad_split_or_task(prepared: Path) -> None:
    with pytest.raises(ConfigError, match="split: 'holdout' is not one of train, val, test"):
        ShardDataset(prepared, "holdout")
    with pytest.raises(ConfigError, match="tasks: SSS not prepared"):
        ShardDataset(prepared, "train", tasks=["SSS"])


def test_the_test_split_loads_like_the_others(prepared: Path) -> None:
    test = ShardDataset(prepared, "test")
    assert len(test) == count_rows(prepared, "test") > 0
    others = set(ShardDataset(prepared, "train").image_ids) | set(ShardDataset(prepared, "val").image_ids)
    assert not set(test.image_ids) & others  # held out by image id
    batch = next(iter(make_loader(test, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].dtype == torch.float32


@pytest.fixture(scope="module")
def ray_session(ray_local):
    """The one Ray instance of the test session (tests/conftest.py)."""
    return ray_local


def test_ray_dataset_gives_the_same_samples(prepared: Path, ray_session) -> None:
    ds = ShardDataset(prepared, "val", tasks=["PHB", "BCV"])
    batches = list(ray_dataset(prepared, "val", tasks=["PHB", "BCV"]).iter_batches(batch_size=None,
                                                                                     batch_format="numpy"))
    img = np.concatenate([b["image"] for b in batches])
    msk = np.concatenate([b["mask"] for b in batches])
    tid = np.concatenate([b["task_id"] for b in batches])
    assert img.dtype == msk.dtype == np.float32 and tid.dtype == np.int64 and img.shape[1:] == (3, 64, 64)
    # Ray may return blocks in any order: compare as multisets keyed by the image bytes
    got = sorted((t, (i * 255).round().astype(np.uint8).tobytes(), m.astype(np.uint8).tobytes())
                 for t, i, m in zip(tid, img, msk))
    want = sorted((t, i.tobytes(), m.tobytes()) for t, i, m in zip(ds.task_ids, ds.images, ds.masks))
    assert len(got) == len(ds) > 0 and got == want


@pytest.mark.parametrize("limit", [None, 7])
def test_memory_mapped_query_set_gives_the_same_batches(prepared: Path, limit) -> None:
    """``memory="mmap"`` reads a decoded cache of each shard: every batch equals the in-RAM one."""
    tasks = ["PHB", "DCH", "CTB"]
    ram = ShardDataset(prepared, "train", tasks, limit=limit, seed=4)
    mm = ShardDataset(prepared, "train", tasks, limit=limit, seed=4, memory="mmap")
    assert len(mm) == len(ram) > 0 and np.array_equal(mm.task_ids, ram.task_ids)
    assert np.array_equal(mm.image_ids, ram.image_ids)
    rows = np.random.default_rng(0).permutation(len(ram))  # rows of all tasks, unsorted
    for i in range(0, len(rows), 5):
        a, b = ram.__getitems__(rows[i:i + 5]), mm.__getitems__(rows[i:i + 5])
        assert all(torch.equal(a[k], b[k]) for k in ("image", "mask", "task_id"))
    cache = prepared / "cache" / "train" / "DCH"
    assert sorted(p.name for p in cache.iterdir()) == ["image_ids.npy", "images.npy", "masks.npy", "task_ids.npy"]
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    assert count_rows(prepared, "train", tasks) == len(ShardDataset(prepared, "train", tasks, memory="mmap"))


def test_a_damaged_query_cache_is_a_one_line_error(prepared: Path, tmp_path: Path) -> None:
    import shutil

    from mike_ray.errors import DataError

    copy = tmp_path / "prep"
    shutil.copytree(prepared, copy)
    shutil.rmtree(copy / "cache", ignore_errors=True)
    ShardDataset(copy, "val", ["PHB"], memory="mmap")
    bad = copy / "cache" / "val" / "PHB" / "images.npy"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # truncated
    with pytest.raises(DataError) as err:
        ShardDataset(copy, "val", ["PHB"], memory="mmap")
    assert str(err.value).startswith(f"{bad}:") and "delete" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="memory: 'disk' is not one of ram, mmap"):
        ShardDataset(copy, "val", ["PHB"], memory="disk")
