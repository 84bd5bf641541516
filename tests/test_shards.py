"""Teacher shards: gradients through shards equal in-process autograd; a killed shard is survived."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_AE, TINY_TASKS, kill_processes, registered_checkpoints
from mike_ray.data.tasks import TASK_CODES
from mike_ray.mike.loss import task_mask, teacher_loss
from mike_ray.mike.schedules import ScheduleConfig, make_schedule
from mike_ray.models import build_model
from mike_ray.models.taps import TappedModel
from mike_ray.orchestrate.transfer import WorkersConfig, run_transfer, teacher_refs
from mike_ray.mike.train import TransferConfig
from mike_ray.teachers.shard import PlacementConfig, ShardGroup
from mike_ray.teachers.zoo import load_teacher


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 3, 64, 64, generator=g, dtype=torch.float64)
    # two samples of each teacher's task: masking keeps only those per teacher
    task_ids = torch.tensor([TASK_CODES.index(t) for t in TINY_TASKS for _ in range(2)])
    return x, task_ids


def _reference_grads(zoo: Path, ae: torch.nn.Module, x, task_ids, weights) -> list[torch.Tensor]:
    """Plain autograd through the autoencoder and ALL teachers held in this process."""
    ae.zero_grad()
    xbar = ae(x)
    total = 0.0
    for name in TINY_TASKS:
        model, rec = load_teacher(zoo / name)
        tapped = TappedModel(model.double(), rec.taps).eval()
        loss, _ = teacher_loss(tapped(x), tapped(xbar), weights[name], task_mask(task_ids, TASK_CODES.index(rec.task)))
        total = total + loss
    total.backward()
    return [p.grad.clone() for p in ae.parameters()]


@pytest.mark.parametrize("mode", ["ray", "local"])
def test_gradients_through_shards_equal_in_process_autograd(tiny_zoo, ray_local, mode) -> None:
    refs = teacher_refs(tiny_zoo, TINY_TASKS)
    placement = PlacementConfig(mode=mode, teachers_per_shard=2, cpus_per_shard=0.5, device="cpu")
    group = ShardGroup(refs, placement, dtype=torch.float64)
    try:
        torch.manual_seed(0)
        ae = build_model(TINY_AE).double()
        ae.eval()  # BN in eval: the two passes below see identical statistics
        x, task_ids = _batch()
        weights = make_schedule(ScheduleConfig(name="uniform"), group.taps()).weights(0.5).teachers

        expected = _reference_grads(tiny_zoo, ae, x, task_ids, weights)

        ae.zero_grad()
        xbar = ae(x)
        res = group.step(x, xbar, task_ids, weights, masking=True)
        xbar.backward(res.grad)
        got = [p.grad for p in ae.parameters()]

        worst = max(float(((g - e).abs().max() / e.abs().max().clamp_min(1e-30))) for g, e in zip(got, expected))
        assert worst < 1e-5, worst
        assert any(float(e.abs().max()) > 0 for e in expected)  # the comparison is not vacuous
        assert res.counts == {t: 2 for t in TINY_TASKS}
    finally:
        group.shutdown()


def test_masking_changes_the_gradient(tiny_zoo, ray_local) -> None:
    group = ShardGroup(teacher_refs(tiny_zoo, TINY_TASKS), PlacementConfig(mode="local", device="cpu"),
                       dtype=torch.float64)
    torch.manual_seed(0)
    ae = build_model(TINY_AE).double().eval()
    x, task_ids = _batch()
    w = make_schedule(ScheduleConfig(name="uniform"), group.taps()).weights(0.0).teachers
    with torch.no_grad():
        xbar = ae(x)
    on = group.step(x, xbar, task_ids, w, masking=True)
    off = group.step(x, xbar, task_ids, w, masking=False)
    assert not torch.allclose(on.grad, off.grad)
    # a batch without any sample of a teacher's task: that teacher contributes exactly 0
    none = group.step(x, xbar, torch.full_like(task_ids, TASK_CODES.index("BCV")), w, masking=True)
    assert none.loss == 0.0 and float(none.grad.abs().max()) == 0.0


@pytest.mark.slow
def test_a_killed_shard_is_restarted_and_its_step_retried(tiny_zoo, tiny_prepared, ray_local, tmp_path) -> None:
    placement = PlacementConfig(mode="ray", teachers_per_shard=2, cpus_per_shard=0.5, device="cpu")
    group = ShardGroup(teacher_refs(tiny_zoo, ["DCH", "CTB"]), placement)
    cfg = TransferConfig(model=TINY_AE, epochs=3, batch_size=8, val_batches=1, device="cpu")
    storage, name = tmp_path / "runs", "kill-shard"
    seen: dict = {}
    stop = threading.Event()

    def killer() -> None:
        # after the first checkpoint, SIGKILL the shard while it computes a step (its process title is
        # "ray::TeacherShard.step" only then): between two calls a restart would go unnoticed
        deadline = time.time() + 120
        while time.time() < deadline and not stop.is_set() and not registered_checkpoints(storage / name):
            time.sleep(0.05)
        while time.time() < deadline and not stop.is_set():
            if kill_processes("ray::TeacherShard.step", seen, "killed", first_only=True):
                return
            time.sleep(0.01)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        res = run_transfer(cfg, [], tiny_prepared, ["DCH", "CTB"], placement,
                           WorkersConfig(num_workers=1, cpus_per_worker=0.5), storage, name, shards=group)
    finally:
        stop.set()
        group.shutdown()
    t.join(5)
    assert seen.get("killed"), "the shard was not killed mid-step"
    assert [h["epoch"] for h in res.history] == [0, 1, 2]  # training finished
    assert res.retries >= 1  # the step that hit the dead shard was sent again
    print(f"steps retried after SIGKILL of the shard: {res.retries}")


@pytest.mark.slow
def test_a_shard_that_cannot_come_back_fails_the_step_with_one_line(tiny_zoo, ray_local) -> None:
    import ray

    from mike_ray.errors import TrainingError

    placement = PlacementConfig(mode="ray", teachers_per_shard=2, cpus_per_shard=0.5, device="cpu", max_restarts=0)
    group = ShardGroup(teacher_refs(tiny_zoo, ["DCH", "CTB"]), placement)
    x, task_ids = _batch()
    w = {"DCH": {"head": 1.0}, "CTB": {"head": 1.0}}
    try:
        ray.kill(group.shards[0], no_restart=True)
        t0 = time.monotonic()
        with pytest.raises(TrainingError, match=r"teacher shard 0 \(DCH, CTB\): died and will not be restarted") as err:
            group.step(x.float(), x.float(), task_ids[:6], w)
        assert "\n" not in str(err.value)
        assert time.monotonic() - t0 < 30  # fails fast, does not wait out restart_timeout_s
    finally:
        group.shutdown()
