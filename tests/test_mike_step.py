"""The training loop's MIKE step, end to end in one process: what it does to the autoencoder's
parameters equals plain autograd through the same teachers (float64), with the pixel term on and off;
and the adaptive weights are the same on every DDP worker."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_AE, TINY_TASKS
from mike_ray.data.tasks import TASK_CODES
from mike_ray.mike.loss import pixel_loss
from mike_ray.mike.schedules import ScheduleConfig, make_schedule
from mike_ray.mike.train import transfer_step
from mike_ray.models import build_model
from mike_ray.orchestrate.transfer import teacher_refs
from mike_ray.resources import PlacementConfig
from mike_ray.mike.shard import MikeShardPool
from test_shards import reference_loss


@pytest.mark.parametrize("pixel_weight", [0.0, 0.5])
@pytest.mark.parametrize("tasks", [["DCH", "CTB", "PHB", "DCH", "CTB", "BCV"],   # every teacher present
                                   ["DCH", "DCH", "CTB", "BCV", "CTB", "DCH"]])  # PHB absent
def test_one_loop_step_moves_the_parameters_exactly_as_in_process_autograd(tiny_zoo, pixel_weight, tasks) -> None:
    group = MikeShardPool(teacher_refs(tiny_zoo, TINY_TASKS), PlacementConfig(mode="local", device="cpu"),
                       dtype=torch.float64)
    torch.manual_seed(0)
    ae = build_model(TINY_AE).double().eval()  # BN in eval: both paths see the same statistics
    ref = copy.deepcopy(ae)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(len(tasks), 3, 64, 64, generator=g, dtype=torch.float64)
    task_ids = torch.tensor([TASK_CODES.index(t) for t in tasks])
    w = make_schedule(ScheduleConfig(name="uniform", pixel_weight=pixel_weight), group.taps()).weights(0.5)
    lr = 0.1

    # the loop's step (plain SGD, so a parameter's change is exactly −lr × its gradient)
    stats = transfer_step(ae, torch.optim.SGD(ae.parameters(), lr=lr), x, task_ids, w, group, masking=True)

    # the reference: eq. 1 over the batch + w_pix·MSE, every teacher in this process, one backward
    xbar = ref(x)
    loss = reference_loss(tiny_zoo, x, xbar, task_ids, w.teachers) + pixel_weight * pixel_loss(x, xbar)
    before = [p.detach().clone() for p in ref.parameters()]
    loss.backward()
    worst, scale = 0.0, 0.0
    for p0, p_ref, p_loop in zip(before, ref.parameters(), ae.parameters()):
        want = p0 - lr * p_ref.grad
        worst = max(worst, float((p_loop.detach() - want).abs().max()))
        scale = max(scale, float((lr * p_ref.grad).abs().max()))
    assert scale > 0 and worst <= 1e-10 * scale, (worst, scale)
    assert abs(stats.total - float(loss.detach())) <= 1e-12 * float(loss.detach())


# --- adaptive weights under DDP: the same on every worker ---------------------------------------------
def _adaptive_rank(rank: int, world: int, init: str, sync: bool, out) -> None:
    import torch.distributed as dist

    from mike_ray.mike.train import global_terms
    from mike_ray.mike.shard import StepResult

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    taps = {"A": ["l1", "l2"], "B": ["l1", "l2"]}
    sched = make_schedule(ScheduleConfig(name="adaptive"), taps)
    g = torch.Generator().manual_seed(100 + rank)  # each worker's batches measure different terms
    for _ in range(5):
        t = torch.rand(4, generator=g).tolist()
        n_a, n_b = int(torch.randint(0, 5, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        res = StepResult(loss=0.0, terms={"A/l1": t[0], "A/l2": t[1], "B/l1": t[2], "B/l2": t[3]},
                         grad=torch.zeros(1), counts={"A": n_a, "B": n_b})
        sched.update(global_terms(res, taps, world if sync else 1))
    out.put((rank, sched.weights(1.0).flat()))
    dist.destroy_process_group()


def _weights_on_two_ranks(tmp_path, sync: bool) -> list[dict[str, float]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{tmp_path}/pg-{int(sync)}"
    procs = [ctx.Process(target=_adaptive_rank, args=(r, 2, init, sync, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return [got[0], got[1]]


def test_adaptive_weights_are_identical_on_two_ddp_workers(tmp_path) -> None:
    synced = _weights_on_two_ranks(tmp_path, sync=True)
    assert synced[0] == synced[1]
    assert len(set(synced[0].values())) > 2  # adaptive moved the weights off uniform
    # without the all-reduce, the workers' own terms would give different weights (the test can fail)
    local = _weights_on_two_ranks(tmp_path, sync=False)
    assert local[0] != local[1]
