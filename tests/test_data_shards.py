"""Parquet shards and manifest: round trip, determinism, stage re-use, atomic build, validation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mike_ray.data.coco import SPLITS, PrepareConfig, image_split, iter_crops, open_sources
from mike_ray.data.shards import (MANIFEST, SCHEMA, binary_to_array, check_dataset, content_hash, dataset_summary,
                                  prepare_dataset, read_manifest, read_shard, shard_path, validate_dataset)
from mike_ray.data.synth import generate_coco
from mike_ray.data.tasks import TASKS
from mike_ray.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CFG = PrepareConfig(tasks=["PHB", "DCH", "CTB"], augment_copies=1, val_fraction=0.3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_coco(root, n_images=40, seed=5)
    return root


@pytest.fixture(scope="module")
def prepared(synth: Path, tmp_path_factory) -> Path:
    return prepare_dataset(CFG, synth, tmp_path_factory.mktemp("prep"))


def test_parquet_round_trip_equals_the_crop_stream(synth: Path, prepared: Path) -> None:
    recs = list(iter_crops(open_sources(synth, ["synth"], CFG.tasks), CFG))
    man = read_manifest(prepared)
    assert SPLITS == ("train", "val", "test") and set(man.counts) == set(man.instances) == set(SPLITS)
    for split in SPLITS:
        for task in CFG.tasks:
            table = read_shard(shard_path(prepared, split, task), 64)
            assert table.schema.equals(SCHEMA)
            want = [r for r in recs if r.split == split and r.task == task]
            assert table.num_rows == len(want) == man.rows(split, task)
            for col in ("image", "mask", "class_name", "category_id", "image_id", "ann_id", "task_id"):
                assert table.column(col).to_pylist() == [getattr(r, col) for r in want], col
            for cls in TASKS[task]:
                assert man.counts[split][task][cls] == sum(r.class_name == cls for r in want)
    assert sum(man.rows("train", t) for t in CFG.tasks) > 30


def test_binary_columns_decode_to_arrays(prepared: Path) -> None:
    table = read_shard(shard_path(prepared, "train", "DCH"), 64)
    masks = binary_to_array(table.column("mask"), (3, 64, 64))
    images = binary_to_array(table.slice(3).column("image"), (64, 64, 3))  # sliced: offsets not at 0
    assert masks.shape == (table.num_rows, 3, 64, 64) and set(np.unique(masks)) <= {0, 1}
    assert masks.sum(axis=(1, 2, 3)).min() > 0  # each crop shows its own instance
    assert images.tobytes() == b"".join(table.column("image").to_pylist()[3:])


def test_splits_are_disjoint_by_image_id(prepared: Path) -> None:
    ids = {s: set() for s in SPLITS}
    for split in ids:
        for task in CFG.tasks:
            got = read_shard(shard_path(prepared, split, task), 64, columns=["image_id", "split"])
            assert set(got.column("split").to_pylist()) <= {split}
            ids[split] |= set(got.column("image_id").to_pylist())
    # across all tasks, an image (and so every crop of it) lies in exactly one split
    assert ids["train"] and ids["val"] and ids["test"]
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert all(image_split(i, CFG.val_fraction, CFG.test_fraction) == s for s, v in ids.items() for i in v)


def test_every_split_has_a_shard_per_task_even_when_empty(synth: Path, tmp_path: Path) -> None:
    # nothing held out for test: the test shards still exist (empty), the manifest counts them as 0
    root = prepare_dataset(CFG.model_copy(update={"test_fraction": 0.0}), synth, tmp_path)
    man = check_dataset(root)
    for task in CFG.tasks:
        assert shard_path(root, "test", task).is_file() and man.rows("test", task) == 0
        assert read_shard(shard_path(root, "test", task), 64).num_rows == 0
    summary = dataset_summary(root).splitlines()
    assert summary[1].split() == ["task", "class", *SPLITS, *(f"inst.{s}" for s in SPLITS)]
    assert summary[-1].split()[0] == "all" and summary[-1].split()[3] == "0"


def test_test_fraction_leaves_val_unchanged(synth: Path, prepared: Path, tmp_path: Path) -> None:
    without = prepare_dataset(CFG.model_copy(update={"test_fraction": 0.0}), synth, tmp_path)
    for task in CFG.tasks:
        a = read_shard(shard_path(prepared, "val", task), 64)
        b = read_shard(shard_path(without, "val", task), 64)
        assert a.equals(b)  # the same val crops, byte for byte
        # test crops come out of train: train + test (un-augmented copies aside) are the old train images
        train_ids = set(read_shard(shard_path(without, "train", task), 64, columns=["image_id"])
                        .column("image_id").to_pylist())
        moved = set(read_shard(shard_path(prepared, "test", task), 64, columns=["image_id"])
                    .column("image_id").to_pylist())
        assert moved <= train_ids


def test_same_config_gives_same_content_and_is_reused(synth: Path, prepared: Path, tmp_path: Path) -> None:
    again = prepare_dataset(CFG, synth, tmp_path)
    assert again.name == prepared.name and content_hash(again) == content_hash(prepared) == \
        read_manifest(prepared).content_hash
    stamp = (again / MANIFEST).stat().st_mtime_ns
    assert prepare_dataset(CFG, synth, tmp_path) == again and (again / MANIFEST).stat().st_mtime_ns == stamp
    other = prepare_dataset(CFG.model_copy(update={"seed": 1}), synth, tmp_path)
    assert other != again and read_manifest(other).content_hash != read_manifest(again).content_hash


def test_interrupted_build_leaves_nothing(synth: Path, tmp_path: Path) -> None:
    calls = []

    def interrupt(done: int, total: int) -> None:
        calls.append(done)
        if done == 5:  # shards are open and partly written by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(CFG.model_copy(update={"seed": 7}), synth, tmp_path, progress=interrupt)
    assert calls == [1, 2, 3, 4, 5]
    assert list(tmp_path.iterdir()) == [] and not list(tmp_path.rglob(MANIFEST))


def test_stale_build_of_a_dead_process_is_removed(synth: Path, tmp_path: Path) -> None:
    import socket
    first = prepare_dataset(CFG, synth, tmp_path)
    stale = tmp_path / f".{first.name}.tmp-{socket.gethostname()}-999999999-abcd1234"
    stale.mkdir()
    (first / MANIFEST).unlink()  # damaged dataset: rebuilt and swapped in
    assert prepare_dataset(CFG, synth, tmp_path) == first and (first / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("counts"), r"manifest\.json: counts: Field required"),
    (lambda m: m.update(format_version=99), r"manifest\.json: format_version: 99"),
    (lambda m: m["config"].update(seed=3), r"manifest\.json: config_key: .* does not match"),
    (lambda m: m["counts"]["val"].pop("DCH"), r"manifest\.json: counts\.val\.DCH: missing"),
    (lambda m: m["counts"].pop("test"), r"manifest\.json: counts\.test\.PHB: missing"),
    (lambda m: m.update(format_version=1), r"manifest\.json: format_version: 1, this mike_ray reads 2"),
    (lambda m: m["counts"]["train"]["DCH"].update(dog=10**6), r"DCH\.parquet: \d+ rows, manifest counts"),
    (lambda m: m.update(extra=1), r"manifest\.json: extra: unknown key"),
])
def test_manifest_validation_names_file_and_field(prepared: Path, tmp_path: Path, edit, message: str) -> None:
    root = _copy(prepared, tmp_path / "d")
    data = json.loads((root / MANIFEST).read_text())
    edit(data)
    (root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        validate_dataset(root)


def test_missing_or_malformed_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"manifest\.json: manifest not found"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: invalid JSON"):
        read_manifest(tmp_path)


def test_bad_shards_name_the_file(prepared: Path, tmp_path: Path) -> None:
    root = _copy(prepared, tmp_path / "d")
    path = shard_path(root, "train", "DCH")
    table = pq.read_table(path)
    pq.write_table(table.set_column(0, "image", pa.array([b"x" * 10] * table.num_rows, pa.binary())), path)
    with pytest.raises(DataError, match=r"train/DCH\.parquet: column 'image': values of 10\.\.10 bytes"):
        read_shard(path, 64)
    pq.write_table(table.drop_columns(["mask"]), path)
    with pytest.raises(DataError, match=r"train/DCH\.parquet: column 'mask': missing"):
        read_shard(path, 64)
    path.write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError, match=r"train/DCH\.parquet: not a readable Parquet file"):
        validate_dataset(root)
    path.unlink()
    with pytest.raises(DataError, match=r"train/DCH\.parquet: shard missing"):
        validate_dataset(root)


def test_test_shards_are_checked_like_the_others(prepared: Path, tmp_path: Path) -> None:
    root = _copy(prepared, tmp_path / "d")
    path = shard_path(root, "test", "DCH")
    table = pq.read_table(path)
    assert table.num_rows and set(table.column("split").to_pylist()) == {"test"}
    # a file lying in test/ holds split 'test' rows only; elsewhere any known split is accepted
    val_rows = table.set_column(SCHEMA.get_field_index("split"), "split", pa.array(["val"] * table.num_rows))
    pq.write_table(val_rows, path)
    with pytest.raises(DataError, match=r"test/DCH\.parquet: column 'split': row 0 has 'val', expected 'test'"):
        read_shard(path, 64)
    pq.write_table(table, tmp_path / "loose.parquet")
    assert read_shard(tmp_path / "loose.parquet", 64).num_rows == table.num_rows
    path.unlink()
    with pytest.raises(DataError, match=r"test/DCH\.parquet: shard missing"):
        validate_dataset(root)
