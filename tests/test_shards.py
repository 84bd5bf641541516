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
from mike_ray.resources import PlacementConfig, WorkersConfig
from mike_ray.orchestrate.transfer import run_transfer, teacher_refs
from mike_ray.mike.train import TransferConfig
from mike_ray.mike.shard import MikeShardPool
from mike_ray.mike.zoo import load_teacher


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 3, 64, 64, generator=g, dtype=torch.float64)
    # two samples of each teacher's task: masking keeps only those per teacher
    task_ids = torch.tensor([TASK_CODES.index(t) for t in TINY_TASKS for _ in range(2)])
    return x, task_ids


def reference_loss(zoo: Path, x, xbar, task_ids, weights, masking: bool = True) -> torch.Tensor:
    """Eq. 1 averaged over the batch, written out plainly with ALL teachers in this process:
    (1/B) Σ_i Σ_n [task(i) = task(n)] Σ_l w_l^n · mean_e (tanh φ(x) − tanh φ(x̄))²."""
    total = torch.zeros((), dtype=xbar.dtype)
    for name in weights:
        model, rec = load_teacher(zoo / name)
        tapped = TappedModel(model.double(), rec.taps).eval()
        fx, fxb = tapped(x), tapped(xbar)
        own = (task_ids == TASK_CODES.index(rec.task)).to(xbar.dtype) if masking else torch.ones(len(x), dtype=xbar.dtype)
        for tap, w in weights[name].items():
            per_sample = (torch.tanh(fx[tap].detach()) - torch.tanh(fxb[tap])).pow(2).flatten(1).mean(1)
            total = total + w * (per_sample * own).sum() / len(x)
    return total


def _reference_grads(zoo: Path, ae: torch.nn.Module, x, task_ids, weights) -> list[torch.Tensor]:
    """Plain autograd through the autoencoder and ALL teachers held in this process."""
    ae.zero_grad()
    reference_loss(zoo, x, ae(x), task_ids, weights).backward()
    return [p.grad.clone() for p in ae.parameters()]


@pytest.mark.parametrize("mode", ["ray", "local"])
def test_gradients_through_shards_equal_in_process_autograd(tiny_zoo, ray_local, mode) -> None:
    refs = teacher_refs(tiny_zoo, TINY_TASKS)
    placement = PlacementConfig(mode=mode, teachers_per_shard=2, cpus_per_shard=0.5, device="cpu")
    group = MikeShardPool(refs, placement, dtype=torch.float64)
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
    group = MikeShardPool(teacher_refs(tiny_zoo, TINY_TASKS), PlacementConfig(mode="local", device="cpu"),
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
    group = MikeShardPool(teacher_refs(tiny_zoo, ["DCH", "CTB"]), placement)
    cfg = TransferConfig(model=TINY_AE, epochs=3, batch_size=8, val_batches=1, device="cpu")
    storage, name = tmp_path / "runs", "kill-shard"
    seen: dict = {}
    stop = threading.Event()

    def killer() -> None:
        # after the first checkpoint, SIGKILL the shard while it computes a step (its process title is
        # "ray::MikeShard.step" only then): between two calls a restart would go unnoticed
        deadline = time.time() + 120
        while time.time() < deadline and not stop.is_set() and not registered_checkpoints(storage / name):
            time.sleep(0.05)
        while time.time() < deadline and not stop.is_set():
            if kill_processes("ray::MikeShard.step", seen, "killed", first_only=True):
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
    group = MikeShardPool(teacher_refs(tiny_zoo, ["DCH", "CTB"]), placement)
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


# --- a step's exactness under masking: gathered rows, NaN off the mask, bf16 ---------------------------
def _mixed_batch(seed: int = 1):
    """10 rows: 3 DCH, 4 CTB, 0 PHB (that teacher is absent), 3 BCV (no teacher: off every mask)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(10, 3, 64, 64, generator=g, dtype=torch.float64)
    xbar = torch.rand(10, 3, 64, 64, generator=g, dtype=torch.float64)
    tasks = ["DCH", "CTB", "BCV", "CTB", "DCH", "BCV", "CTB", "DCH", "CTB", "BCV"]
    return x, xbar, torch.tensor([TASK_CODES.index(t) for t in tasks])


def _xbar_grad(zoo: Path, x, xbar, task_ids, weights, masking=True):
    xb = xbar.clone().requires_grad_(True)
    loss = reference_loss(zoo, x, xb, task_ids, weights, masking)
    loss.backward()
    return float(loss.detach()), xb.grad


@pytest.mark.parametrize("masking", [True, False])
def test_a_step_on_gathered_rows_equals_the_full_batch_step(tiny_zoo, masking) -> None:
    """Each teacher runs on its own rows only (and not at all when absent): loss and ∂/∂x̄ equal the
    full-batch computation of eq. 1 in float64 to 1e-12; unmasked, every teacher sees every row."""
    group = MikeShardPool(teacher_refs(tiny_zoo, TINY_TASKS), PlacementConfig(mode="local", device="cpu"),
                       dtype=torch.float64)
    x, xbar, task_ids = _mixed_batch()
    weights = make_schedule(ScheduleConfig(name="uniform"), group.taps()).weights(0.5).teachers
    want_loss, want_grad = _xbar_grad(tiny_zoo, x, xbar, task_ids, weights, masking)
    res = group.step(x, xbar, task_ids, weights, masking=masking)
    assert abs(res.loss - want_loss) <= 1e-12 * max(1.0, abs(want_loss))
    assert float((res.grad - want_grad).abs().max()) <= 1e-12 * float(want_grad.abs().max())
    assert float(want_grad.abs().max()) > 0
    if masking:
        assert res.counts == {"DCH": 3, "CTB": 4, "PHB": 0}
        assert not any(k.startswith("PHB") for k in res.terms)  # an absent teacher reports nothing
        off = task_ids == TASK_CODES.index("BCV")
        assert float(res.grad[off].abs().max()) == 0.0
    else:
        assert res.counts == {"DCH": 10, "CTB": 10, "PHB": 10}


def test_a_teacher_stops_at_its_deepest_weighted_tap_exactly(tiny_zoo) -> None:
    """Layerwise progressive early on puts each teacher's weight on its first taps: the shard's
    forwards stop there (the last block never runs), and loss and ∂/∂x̄ equal the full forward's."""
    group = MikeShardPool(teacher_refs(tiny_zoo, TINY_TASKS), PlacementConfig(mode="local", device="cpu"),
                       dtype=torch.float64)
    x, xbar, task_ids = _mixed_batch()
    schedule = make_schedule(ScheduleConfig(name="layerwise_progressive"), group.taps())
    weights = schedule.weights(0.0).teachers  # phase 0: the first tap of each teacher
    runs = {"n": 0}
    for _, tapped in (t for shard in group.shards for t in shard.teachers.values()):
        last = tapped.model.get_submodule(tapped.paths[-1])
        leaf = next(m for m in last.modules() if isinstance(m, torch.nn.Conv2d))
        leaf.register_forward_hook(lambda m, a, y: runs.__setitem__("n", runs["n"] + 1))
    assert all(sum(1 for v in w.values() if v) == 1 and w[next(iter(w))] > 0 for w in weights.values())
    want_loss, want_grad = _xbar_grad(tiny_zoo, x, xbar, task_ids, weights)
    res = group.step(x, xbar, task_ids, weights)
    assert runs["n"] == 0  # no teacher ran its last block
    assert abs(res.loss - want_loss) <= 1e-12 * max(1.0, abs(want_loss))
    assert float((res.grad - want_grad).abs().max()) <= 1e-12 * float(want_grad.abs().max())
    last_phase = schedule.weights(1.0).teachers  # the last tap: the whole teacher runs
    group.step(x, xbar, task_ids, last_phase)
    assert runs["n"] == 4  # DCH and CTB have rows (PHB none), each runs x and x̄


def test_nan_and_inf_in_off_mask_rows_never_reach_the_gradient(tiny_zoo) -> None:
    group = MikeShardPool(teacher_refs(tiny_zoo, TINY_TASKS), PlacementConfig(mode="local", device="cpu"),
                       dtype=torch.float64)
    x, xbar, task_ids = _mixed_batch()
    weights = make_schedule(ScheduleConfig(name="uniform"), group.taps()).weights(0.5).teachers
    clean = group.step(x, xbar, task_ids, weights)
    off = (task_ids == TASK_CODES.index("BCV")).nonzero().flatten()
    x2, xbar2 = x.clone(), xbar.clone()
    x2[off[0]] = float("nan")
    xbar2[off[1]] = float("inf")
    xbar2[off[2], 0, 0, 0] = float("nan")
    dirty = group.step(x2, xbar2, task_ids, weights)
    assert bool(torch.isfinite(dirty.grad).all())
    assert torch.equal(dirty.grad, clean.grad) and dirty.loss == clean.loss


def test_a_non_finite_gradient_on_a_teachers_own_row_is_a_one_line_error(tiny_zoo) -> None:
    from mike_ray.errors import TrainingError

    group = MikeShardPool(teacher_refs(tiny_zoo, TINY_TASKS), PlacementConfig(mode="local", device="cpu"),
                       dtype=torch.float64)
    x, xbar, task_ids = _mixed_batch()
    weights = make_schedule(ScheduleConfig(name="uniform"), group.taps()).weights(0.5).teachers
    xbar[0] = float("nan")  # a DCH row
    with pytest.raises(TrainingError, match=r"non-finite") as err:
        group.step(x, xbar, task_ids, weights)
    assert "\n" not in str(err.value)


def test_bf16_teacher_forwards_keep_the_gradient_close_to_float32(tiny_zoo) -> None:
    """bf16 autocast covers the teacher forwards only; the tap terms and their gradient are float32.
    Measured on CPU autocast with the tiny zoo: see the bound below (printed for the closing note)."""
    refs = teacher_refs(tiny_zoo, TINY_TASKS)
    fp32 = MikeShardPool(refs, PlacementConfig(mode="local", device="cpu"))
    bf16 = MikeShardPool(refs, PlacementConfig(mode="local", device="cpu", bf16=True))
    torch.manual_seed(0)
    ae = build_model(TINY_AE).eval()
    x, _, task_ids = _mixed_batch()
    x = x.float()
    with torch.no_grad():
        xbar = ae(x)
    weights = make_schedule(ScheduleConfig(name="uniform"), fp32.taps()).weights(0.5).teachers
    a = fp32.step(x, xbar, task_ids, weights)
    b = bf16.step(x, xbar, task_ids, weights)
    assert b.grad.dtype == torch.float32 and bool(torch.isfinite(b.grad).all())
    cos = float(torch.nn.functional.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0))
    rel = float((a.grad - b.grad).norm() / a.grad.norm())
    loss_rel = abs(a.loss - b.loss) / a.loss
    print(f"bf16 vs fp32: gradient cosine {cos:.4f}, relative L2 error {rel:.4f}, loss rel. error {loss_rel:.4f}")
    assert cos > 0.995 and rel < 0.05 and loss_rel < 0.01


# --- many teachers of one architecture: one grouped forward (models/stacked.py) -----------------------
def _spy_groups(group: MikeShardPool) -> list[tuple[int, int]]:
    """Record the (teachers, rows each) of every grouped forward the pool's local shards run."""
    seen: list[tuple[int, int]] = []
    for shard in group.shards:
        for stack in {id(s): s for s, _ in shard._stacks.values()}.values():
            def spy(members, x, _run=stack.forward, **kw):
                seen.append((int(x.shape[0]), int(x.shape[1])))
                return _run(members, x, **kw)
            stack.forward = spy
    return seen


@pytest.mark.parametrize("phase", [0.0, 0.5])
def test_teachers_of_one_architecture_run_as_one_grouped_forward_exactly(tiny_zoo, phase) -> None:
    """Three same-architecture teachers with 3 rows each (and 3 rows of no teacher's task) run as one
    vmapped forward for x and one for x̄: loss and ∂/∂x̄ equal eq. 1 over the full batch, and every
    term equals the one-teacher-at-a-time step's, to 1e-12 in float64 — at phase 0 of layerwise
    progressive (early exit at the first tap) and with every tap weighted."""
    refs = teacher_refs(tiny_zoo, TINY_TASKS)
    grouped = MikeShardPool(refs, PlacementConfig(mode="local", device="cpu", teachers_per_shard="all"), dtype=torch.float64)
    single = MikeShardPool(refs, PlacementConfig(mode="local", device="cpu", teachers_per_shard="all"), dtype=torch.float64)
    for shard in single.shards:
        shard._stacks = {}  # the per-teacher path
    assert {len(s._stacks) for s in grouped.shards} == {3}  # the tiny zoo: one architecture
    seen = _spy_groups(grouped)
    g = torch.Generator().manual_seed(3)
    x, xbar = (torch.rand(12, 3, 64, 64, generator=g, dtype=torch.float64) for _ in range(2))
    tasks = ["DCH", "CTB", "PHB", "BCV"] * 3
    task_ids = torch.tensor([TASK_CODES.index(t) for t in tasks])
    name = "layerwise_progressive" if phase == 0.0 else "uniform"
    weights = make_schedule(ScheduleConfig(name=name), grouped.taps()).weights(phase).teachers
    want_loss, want_grad = _xbar_grad(tiny_zoo, x, xbar, task_ids, weights)
    res = grouped.step(x, xbar, task_ids, weights)
    one = single.step(x, xbar, task_ids, weights)
    assert seen == [(3, 3), (3, 3)]  # x and x̄: three teachers × three rows, once each
    assert abs(res.loss - want_loss) <= 1e-12 * max(1.0, abs(want_loss))
    assert float((res.grad - want_grad).abs().max()) <= 1e-12 * float(want_grad.abs().max())
    assert float(want_grad.abs().max()) > 0
    assert res.counts == one.counts == {"DCH": 3, "CTB": 3, "PHB": 3}
    assert res.terms.keys() == one.terms.keys() and len(res.terms) > 3
    for k, v in one.terms.items():
        assert abs(res.terms[k] - v) <= 1e-12 * max(1.0, abs(v)), k
    assert float(res.grad[task_ids == TASK_CODES.index("BCV")].abs().max()) == 0.0


def test_a_group_holds_at_most_one_batch_of_rows_and_mixed_counts_split(tiny_zoo) -> None:
    """Teachers group only with teachers of as many rows, and a group's G × rows never exceeds the
    batch (its graph is no larger than one full-batch teacher's); the result is still exact."""
    refs = teacher_refs(tiny_zoo, TINY_TASKS)
    grouped = MikeShardPool(refs, PlacementConfig(mode="local", device="cpu", teachers_per_shard="all"), dtype=torch.float64)
    seen = _spy_groups(grouped)
    x, xbar, task_ids = _mixed_batch()  # DCH 3 rows, CTB 4, PHB 0: nothing to group
    weights = make_schedule(ScheduleConfig(name="uniform"), grouped.taps()).weights(0.5).teachers
    want_loss, want_grad = _xbar_grad(tiny_zoo, x, xbar, task_ids, weights)
    res = grouped.step(x, xbar, task_ids, weights)
    assert seen == []
    assert float((res.grad - want_grad).abs().max()) <= 1e-12 * float(want_grad.abs().max())
    # 6 rows, 2 per teacher: B // n = 3 teachers fit in one group
    ids = torch.tensor([TASK_CODES.index(t) for t in ["DCH", "CTB", "PHB", "DCH", "CTB", "PHB"]])
    want_loss, want_grad = _xbar_grad(tiny_zoo, x[:6], xbar[:6], ids, weights)
    res = grouped.step(x[:6], xbar[:6], ids, weights)
    assert seen == [(3, 2), (3, 2)] and all(g * n <= 6 for g, n in seen)
    assert abs(res.loss - want_loss) <= 1e-12 * max(1.0, abs(want_loss))
    assert float((res.grad - want_grad).abs().max()) <= 1e-12 * float(want_grad.abs().max())
    seen.clear()
    ids = torch.tensor([TASK_CODES.index(t) for t in ["DCH", "CTB", "PHB", "DCH", "CTB", "PHB", "DCH", "CTB"]])
    grouped.step(x[:8], xbar[:8], ids, weights)  # 3 + 3 + 2 rows: B // 3 = 2 teachers per group
    assert seen == [(2, 3), (2, 3)]


def test_teachers_vmap_cannot_run_fall_back_to_one_at_a_time_with_the_same_values(tiny_zoo) -> None:
    """A model vmap cannot run (data-dependent control flow raises RuntimeError inside vmap): the
    shard warns once, runs those teachers one at a time from then on, and the step is unchanged."""
    refs = teacher_refs(tiny_zoo, TINY_TASKS)
    placement = PlacementConfig(mode="local", device="cpu", teachers_per_shard="all")
    grouped = MikeShardPool(refs, placement, dtype=torch.float64)
    x, xbar = _batch()[0], torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    task_ids = _batch()[1]
    weights = make_schedule(ScheduleConfig(name="uniform"), grouped.taps()).weights(0.5).teachers
    want = grouped.step(x, xbar, task_ids, weights)
    (shard,) = grouped.shards
    stack = next(iter(shard._stacks.values()))[0]

    def no_vmap(*args, **kwargs):
        raise RuntimeError("vmap: It looks like you're attempting to use a Tensor in some data-dependent control flow")

    stack.forward = no_vmap
    with pytest.warns(UserWarning, match="cannot run as one grouped forward"):
        got = grouped.step(x, xbar, task_ids, weights)
    assert shard._stacks == {}
    assert got.terms.keys() == want.terms.keys()
    assert abs(got.loss - want.loss) <= 1e-12 * max(1.0, abs(want.loss))
    assert float((got.grad - want.grad).abs().max()) <= 1e-12 * float(want.grad.abs().max())
