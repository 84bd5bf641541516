"""What a whole epoch feeds the model: mixed-task batches, every row once, the same order on resume."""
from __future__ import annotations

import numpy as np
import pytest

from mike_ray.data.loaders import QueryBatches, ShardDataset, epoch_rows


def _equal_shares(n_per_task: int = 1000, tasks: int = 3) -> ShardDataset:
    """Rows in task order (as the Parquet shards are): task 0's rows, then task 1's, ..."""
    n = n_per_task * tasks
    img = np.zeros((n, 3, 2, 2), np.uint8)
    return ShardDataset.from_arrays(img, img, np.repeat(np.arange(tasks), n_per_task))


def test_at_least_95_percent_of_batches_hold_every_task() -> None:
    q = QueryBatches(_equal_shares(), batch_size=32, seed=0)
    for epoch in range(3):
        batches = [b["task_id"].numpy() for b in q.epoch(epoch)]
        full = [b for b in batches if len(b) == 32]
        every = sum(len(np.unique(b)) == 3 for b in full) / len(full)
        assert every >= 0.95, every
    # the task-ordered stream this replaces would have held a single task in almost every batch
    ordered = _equal_shares().task_ids.reshape(-1, 30)[:, :]  # contiguous chunks
    assert np.mean([len(np.unique(c)) == 1 for c in ordered]) > 0.9


def test_an_epoch_visits_every_row_once_and_ranks_are_disjoint() -> None:
    ds = _equal_shares(n_per_task=101)
    n = len(ds)
    per_rank = [epoch_rows(n, seed=7, epoch=2, rank=r, world=2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == n // 2  # equal step counts for DDP
    both = np.concatenate(per_rank)
    assert len(np.unique(both)) == len(both) == n - n % 2
    assert len(np.unique(epoch_rows(n, 7, 2))) == n  # one worker: every row exactly once
    q = QueryBatches(ds, batch_size=16, seed=7)
    seen = np.concatenate([b["task_id"].numpy() for b in q.epoch(0)])
    assert len(seen) == n and len(list(q.epoch(0))) == len(q)
    assert np.bincount(seen).tolist() == [101, 101, 101]


def test_the_order_is_seeded_new_each_epoch_and_replayed_on_resume() -> None:
    n = 500
    assert np.array_equal(epoch_rows(n, 3, 4), epoch_rows(n, 3, 4))  # a resumed epoch 4 replays it
    assert not np.array_equal(epoch_rows(n, 3, 4), epoch_rows(n, 3, 5))
    assert not np.array_equal(epoch_rows(n, 3, 4), epoch_rows(n, 4, 4))


def test_capped_validation_still_covers_every_task() -> None:
    q = QueryBatches(_equal_shares(n_per_task=200), batch_size=32, seed=0)
    first = np.concatenate([b["task_id"].numpy() for b in q.validation(max_batches=1)])
    assert len(first) == 32 and set(first.tolist()) == {0, 1, 2}
    again = np.concatenate([b["task_id"].numpy() for b in q.validation(max_batches=1)])
    assert np.array_equal(first, again)  # every epoch validates the same samples


def test_the_prepared_demo_like_data_mixes_its_tasks(tiny_prepared) -> None:
    """Through the real Parquet path: the three tiny tasks each appear in most batches of 32."""
    ds = ShardDataset(tiny_prepared, "train", ["DCH", "CTB", "PHB"])
    shares = np.bincount(ds.task_ids) / len(ds)
    q = QueryBatches(ds, batch_size=32, seed=0)
    batches = [b["task_id"].numpy() for b in q.epoch(0)]
    tasks_per_batch = np.mean([len(np.unique(b)) for b in batches if len(b) == 32])
    print(f"task shares {np.round(shares[shares > 0], 2).tolist()}, tasks per batch {tasks_per_batch:.2f}")
    assert tasks_per_batch > 2.5


def test_too_few_rows_for_the_workers_is_a_config_error() -> None:
    from mike_ray.errors import ConfigError

    img = np.zeros((1, 3, 2, 2), np.uint8)
    with pytest.raises(ConfigError, match="1 train rows for 2 trainer workers"):
        QueryBatches(ShardDataset.from_arrays(img, img, np.zeros(1)), 4, 0, rank=0, world=2)
