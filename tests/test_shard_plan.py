"""Shard plans (teachers over shards by expected work) and shards serving several callers at once."""
from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_SEGMENTER, TINY_TASKS
from mike_ray.data.tasks import TASK_CODES
from mike_ray.orchestrate.transfer import query_shares, teacher_refs
from mike_ray.pool import forward_flops, partition, shard_count, start_shard_actors
from mike_ray.resources import PlacementConfig
from mike_ray.mike.shard import MikeShardPool, MikeShard, expected_work


@settings(max_examples=200, deadline=None)
@given(work=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=40), shards=st.integers(1, 8))
def test_auto_plan_places_every_teacher_once_and_balances_work(work, shards) -> None:
    names = [f"T{i:02d}" for i in range(len(work))]
    groups = partition(names, "auto", work, shards)
    assert len(groups) == shard_count(len(names), "auto", shards) == min(len(names), shards)
    assert sorted(n for g in groups for n in g) == names  # each exactly once
    assert all(g == sorted(g) for g in groups)  # given order kept inside a shard
    w = dict(zip(names, work))
    loads = [sum(w[n] for n in g) for g in groups]
    # LPT's guarantee: no shard exceeds the mean load by more than the heaviest single teacher
    assert max(loads) <= sum(work) / len(groups) + max(work) + 1e-9
    assert groups == partition(names, "auto", work, shards)  # deterministic


def test_auto_plan_puts_a_teacher_of_a_rare_task_with_others() -> None:
    # one task holds 60 % of the query rows, three share the rest: the heavy one gets a shard alone
    groups = partition(["A", "B", "C", "D"], "auto", [0.6, 0.15, 0.15, 0.1], 2)
    assert groups == [["A"], ["B", "C", "D"]]
    # by count (teachers_per_shard: 2) the same teachers split 0.75 / 0.25
    assert partition(["A", "B", "C", "D"], 2) == [["A", "B"], ["C", "D"]]


def test_counted_plans_are_unchanged() -> None:
    names = list("ABCDE")
    assert partition(names, 2) == [["A", "B"], ["C", "D"], ["E"]]
    assert partition(names, "all") == [names]
    assert shard_count(5, 2) == 3 and shard_count(5, "all") == 1 and shard_count(1, "auto", 4) == 1


def test_teachers_per_shard_is_validated_as_the_config_loads() -> None:
    from pydantic import ValidationError

    for bad in (0, -1, "some"):
        with pytest.raises(ValidationError):
            PlacementConfig(teachers_per_shard=bad)
    with pytest.raises(ValidationError):
        PlacementConfig(teachers_per_shard="auto", num_shards=0)


def test_expected_work_is_task_share_times_forward_flops(tiny_zoo, tiny_prepared) -> None:
    refs = teacher_refs(tiny_zoo, TINY_TASKS)
    shares = query_shares(tiny_prepared, TINY_TASKS)
    assert math.isclose(sum(shares.values()), 1.0) and set(shares) == {TASK_CODES.index(t) for t in TINY_TASKS}
    flops = forward_flops({**TINY_SEGMENTER, "num_classes": 3})
    assert flops > 0
    work = expected_work(refs, shares)
    for ref, w in zip(refs, work):
        assert math.isclose(w, shares[ref.task_id] * flops, rel_tol=1e-9)
    group = MikeShardPool(refs, PlacementConfig(mode="local", teachers_per_shard="auto", num_shards=2, device="cpu"),
                       shares=shares)
    assert len(group.groups) == 2 and group.work == work
    assert group.plan.count("of the work") == 2


def test_a_shard_serves_several_callers_at_once(tiny_zoo, ray_local) -> None:
    """Two DDP workers calling one shard: with ``concurrency=2`` both calls run at the same time (each
    waits at a barrier for the other, so the test cannot pass if the actor serialised them); with
    concurrency 1 the second call cannot start while the first waits, and the barrier breaks."""
    refs = teacher_refs(tiny_zoo, TINY_TASKS)

    class Rendezvous(MikeShard):
        def __init__(self, teachers, device: str, threads: int, wait_s: float):
            super().__init__(teachers, device, threads)
            self.barrier = threading.Barrier(2, timeout=wait_s)

        def step(self, *args, **kwargs):
            self.barrier.wait()  # returns only once a second call is inside step too
            return super().step(*args, **kwargs)

    placement = PlacementConfig(mode="ray", cpus_per_shard=0.25, device="cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, generator=g)
    task_ids = torch.tensor([TASK_CODES.index(t) for t in ("DCH", "CTB", "DCH", "PHB")])
    weights = {r.name: {"stem": 1.0} for r in refs}
    import ray

    for concurrency, wait_s in ((2, 30.0), (1, 2.0)):
        (shard,) = start_shard_actors(Rendezvous, [(refs, "cpu", 1, wait_s)], placement, concurrency=concurrency)
        ray.get(shard.ping.remote())
        calls = [shard.step.remote(x, x.flip(0), task_ids, weights) for _ in range(2)]
        if concurrency == 2:
            a, b = ray.get(calls)
            assert a.loss == b.loss and a.loss > 0 and torch.equal(a.grad, b.grad)
        else:
            with pytest.raises(ray.exceptions.RayTaskError, match="BrokenBarrierError"):
                ray.get(calls)
        ray.kill(shard, no_restart=True)
