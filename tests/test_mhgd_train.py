"""MHGD training and its baselines, end to end on a few dozen tiny images (CPU, seconds)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mike_ray.data.classification import ClassificationDataset
from mike_ray.errors import ConfigError, ModelError
from mike_ray.mhgd.functional import stable_sigmoid
from mike_ray.mhgd.config import METHODS, MHGDConfig
from mike_ray.mhgd.loss import clipped_multitask_grads, mhgd_transfer_loss
from mike_ray.mhgd.teachers import FrozenTeacher, LocalTeachers, teacher_outputs, teacher_targets
from mike_ray.mhgd.train import evaluate, run_method, train_teacher_classifier, train_teacher_heads
from mike_ray.models import TappedModel, build_model

torch.set_num_threads(1)


def train_heads(cfg: MHGDConfig, frozen: FrozenTeacher, train_ds):
    """Phase 1 for one teacher: (its heads, the phase-1 history)."""
    history: list[dict[str, float]] = []
    heads = train_teacher_heads(cfg, LocalTeachers([frozen]), train_ds, torch.device("cpu"), None, history)
    return heads[0], history

POINTS = ["stage1", "stage2", "stage3"]
# teacher: ResNet-8 (8, 16, 32); student: WRN-10 with the same widths — a different architecture
TINY = dict(teacher={"arch": "resnet_cifar", "depth": 8, "width": 8},
            student={"arch": "wrn", "depth": 10, "width": 1, "kwargs": {"widths": [8, 16, 32]}},
            sensing_points=POINTS, num_heads=2, batch_size=16, eval_batch_size=32, lr=0.05,
            epochs=2, teacher_epochs=2, phase1_epochs=1, device="cpu", seed=0)


def _data(n: int, seed: int, augment: bool) -> ClassificationDataset:
    """Four classes told apart by brightness: learnable in a couple of epochs."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    imgs = (rng.random((n, 3, 16, 16)) * 80 + labels[:, None, None, None] * 50).astype(np.uint8)
    return ClassificationDataset(imgs, labels, ["a", "b", "c", "d"], augment=augment, seed=seed)


@pytest.fixture(scope="module")
def data() -> tuple[ClassificationDataset, ClassificationDataset]:
    return _data(48, 0, True), _data(24, 1, False)


@pytest.fixture(scope="module")
def teacher(data) -> torch.nn.Module:
    model, metrics = train_teacher_classifier(MHGDConfig(**TINY), *data)
    assert 0 <= metrics["last_acc"] <= 1 and len(metrics["history"]) == 2
    assert not model.training
    return model


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_end_to_end(method: str, data, teacher) -> None:
    seen: list[tuple[int, dict[str, float]]] = []
    res = run_method(MHGDConfig(**TINY, method=method), teacher, *data, on_epoch=lambda e, m: seen.append((e, m)))
    assert res["method"] == method and 0 <= res["best_acc"] <= 1 and 0 <= res["last_acc"] <= res["best_acc"]
    first = 1 if method in ("mhgd", "fsp", "ab") else 0          # phase 1 / initialisation epochs come first
    assert [e for e, _ in seen] == list(range(first + 2))
    assert [h["epoch"] for h in res["history"]] == [float(e) for e, _ in seen]
    for _, m in seen:
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
    student_epochs = [m for _, m in seen[first:]]
    for m in student_epochs:
        assert {"acc/val", "acc/train", "loss/train/ce", "loss/val/ce", "lr"} <= set(m)
        assert 0 <= m["acc/val"] <= 1
    if method in ("mhgd", "kdsvd", "soft_logits"):
        assert all("loss/train/transfer" in m for m in student_epochs)
    if method == "mhgd":
        assert "loss/phase1/train" in seen[0][1]
    if method in ("fsp", "ab"):
        assert "loss/init/train" in seen[0][1]
    if method in ("mhgd", "kdsvd"):  # the clipping bound held at every step of every epoch
        assert all(m["grad/clip_ratio_max"] <= 1 + 1e-4 for m in student_epochs)
        assert any(m["grad/transfer_clipped_norm"] < m["grad/transfer_norm"] for m in student_epochs)


def test_same_seed_same_run_and_same_start_for_every_method(data, teacher) -> None:
    a = run_method(MHGDConfig(**{**TINY, "epochs": 1}, method="student"), None, *data)
    b = run_method(MHGDConfig(**{**TINY, "epochs": 1}, method="student"), None, *data)
    drop = lambda h: {k: v for k, v in h.items() if not k.startswith("time/")}  # noqa: E731
    assert [drop(h) for h in a["history"]] == [drop(h) for h in b["history"]]


@pytest.mark.parametrize("method", ["student", "mhgd"])
def test_a_diverging_run_stops_at_its_epoch_with_a_one_line_training_error(method: str, data, teacher) -> None:
    """An lr that blows the student up: the run stops with the loss, its value and the epoch, on one
    line (what a sweep records as the trial's failure reason; the Tune/MLflow side of a failed trial is
    tests/test_tune_bookkeeping.py)."""
    from mike_ray.errors import TrainingError

    with pytest.raises(TrainingError) as err:
        run_method(MHGDConfig(**{**TINY, "batch_size": 8, "lr": 1.0e12}, method=method), teacher, *data)
    msg = str(err.value)
    first = 0 if method == "student" else 1  # MHGD's epoch 0 is phase 1 (the heads, not the student)
    assert "\n" not in msg and f"at epoch {first}" in msg and ("nan" in msg or "inf" in msg), msg


def test_phase1_loss_decreases_and_heads_end_frozen(data, teacher) -> None:
    cfg = MHGDConfig(**{**TINY, "phase1_epochs": 4})
    frozen = FrozenTeacher(teacher, POINTS)
    heads, history = train_heads(cfg, frozen, data[0])
    losses = [h["loss/phase1/train"] for h in history]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    assert len(heads) == 2 and all(h.frozen and not h.training for h in heads)
    assert not any(p.requires_grad for p in heads.parameters())
    heads.train()  # a parent switching to train mode does not unfreeze batch norm
    assert not any(m.training for m in heads.modules() if isinstance(m, torch.nn.BatchNorm1d))


def test_teacher_targets_are_sign_fixed_unit_vectors_without_grad(data, teacher) -> None:
    frozen = FrozenTeacher(teacher, POINTS)
    x = data[1].__getitems__(list(range(8)))["image"]
    vt = teacher_targets(frozen, x)
    assert [tuple(v.shape) for v in vt] == [(8, 8), (8, 16), (8, 32)]
    for v in vt:
        assert not v.requires_grad
        assert torch.allclose(v.norm(dim=1), torch.ones(8), atol=1e-5)
        idx = v.abs().argmax(dim=1)
        assert (v.gather(1, idx[:, None]) > 0).all()
    assert not any(p.requires_grad for p in teacher.parameters())
    tt = teacher_outputs(frozen, x, "kdsvd")
    assert all(torch.equal(a, b) for a, b in zip(tt.vectors, vt)) and [s.shape for s in tt.sigmas] == [(8, 1)] * 3


def test_transfer_loss_vanishes_when_the_student_is_the_teacher(data, teacher) -> None:
    frozen = FrozenTeacher(teacher, POINTS)
    cfg = MHGDConfig(**TINY)
    heads, _ = train_heads(cfg, frozen, data[0])
    x = data[1].__getitems__(list(range(16)))["image"]
    feats, _ = frozen(x)
    loss = mhgd_transfer_loss(list(heads), feats, teacher_targets(frozen, x))
    assert loss.abs() < 1e-4


def test_clipping_bounds_every_parameters_transfer_gradient(data, teacher) -> None:
    cfg = MHGDConfig(**TINY)
    frozen = FrozenTeacher(teacher, POINTS)
    heads, _ = train_heads(cfg, frozen, data[0])
    student = build_model({**TINY["student"], "num_classes": 4, "seed": 0})
    tapped = TappedModel(student, POINTS + ["fc"]).train()
    batch = data[0].__getitems__(list(range(16)))
    out = tapped(batch["image"])
    ce = F.cross_entropy(out["fc"], batch["label"])
    tr = mhgd_transfer_loss(list(heads), [out[p] for p in POINTS], teacher_targets(frozen, batch["image"]))
    params = [p for p in student.parameters() if p.requires_grad]
    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    g_tr = torch.autograd.grad(tr, params, retain_graph=True, allow_unused=True)
    epoch, p1 = 3, 2  # second student epoch: bound = ‖∇CE‖·sigmoid(1)
    grads, stats = clipped_multitask_grads(ce, tr, params, epoch, p1)
    ramp = stable_sigmoid(epoch - p1)
    clipped_any = False
    for p, g, gc, gt in zip(params, grads, g_ce, g_tr):
        if gt is None:   # fc: after the last sensing point, no transfer gradient
            assert g is None or torch.allclose(g, gc)
            continue
        gk = g - gc      # what the transfer loss added
        bound = float(gc.norm()) * ramp
        assert float(gk.norm()) <= bound * (1 + 1e-4) + 1e-12
        clipped_any |= float(gt.norm()) > bound * (1 + 1e-3)
        if float(gt.norm()) <= bound:
            assert torch.allclose(gk, gt, atol=1e-7)  # under the bound: unchanged
    assert clipped_any and stats["clip_ratio_max"] <= 1 + 1e-4
    assert stats["transfer_clipped_norm"] < stats["transfer_norm"]


def test_bad_configs_fail_before_training(data, teacher) -> None:
    with pytest.raises(ConfigError, match="sensing_points: .*needs >= 2"):
        run_method({**TINY, "sensing_points": ["stage3"]}, teacher, *data)
    with pytest.raises(ConfigError, match="unknown key.*did you mean 'num_heads'"):
        run_method({**TINY, "num_head": 4}, teacher, *data)
    wide = {**TINY, "student": {"arch": "wrn", "depth": 10, "width": 1}}  # 16, 32, 64 vs the teacher's 8, 16, 32
    with pytest.raises(ModelError, match="teacher 'stage1' has 8, student 'stage1' has 16"):
        run_method({**wide, "method": "mhgd"}, teacher, *data)
    with pytest.raises(ConfigError, match="batch_size: 64 is larger than the training set"):
        run_method({**TINY, "batch_size": 64, "method": "student"}, None, *data)
    with pytest.raises(ConfigError, match="num_classes: 10, but the dataset has 4"):
        run_method({**TINY, "method": "student", "student": {**TINY["student"], "num_classes": 10}}, None, *data)
    # AB has connectors: unequal channels are fine
    res = run_method({**wide, "method": "ab", "epochs": 1}, teacher, *data)
    assert 0 <= res["last_acc"] <= 1


def test_evaluate_counts_correct_predictions(data, teacher) -> None:
    ev = evaluate(teacher, data[1], batch_size=7)
    with torch.no_grad():
        b = data[1].__getitems__(list(range(len(data[1]))))
        acc = float((teacher(b["image"]).argmax(1) == b["label"]).float().mean())
    assert ev["acc"] == pytest.approx(acc) and ev["ce"] > 0 and not teacher.training


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "time/epoch_s"} == {k: v for k, v in y.items() if k != "time/epoch_s"}


@pytest.mark.parametrize("method,cut", [("mhgd", 0), ("mhgd", 2), ("fsp", 0), ("student", 0)])
def test_a_run_resumed_from_any_epochs_state_ends_exactly_like_an_uninterrupted_one(method, cut, data,
                                                                                      teacher) -> None:
    """The state given to on_checkpoint after epoch ``cut`` (phase 1, initialisation or student epoch)
    is enough to finish the run bit-for-bit like the run that was never stopped."""
    import io

    cfg = MHGDConfig(**{**TINY, "epochs": 2, "phase1_epochs": 2, "init_epochs": 2}, method=method)
    states: list[dict] = []

    def keep(epoch, metrics, state):
        buf = io.BytesIO()
        torch.save(state, buf)  # what the Train worker writes
        states.append(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))

    full = run_method(cfg, teacher, *data, on_checkpoint=keep, return_model=True)
    assert [s["history"][-1]["epoch"] for s in states] == [h["epoch"] for h in full["history"]]
    state = states[cut]
    assert state["stage"] == {("mhgd", 0): "phase1", ("mhgd", 2): "fit", ("fsp", 0): "init",
                              ("student", 0): "fit"}[(method, cut)]
    resumed = run_method(cfg, teacher, *data, resume=state, return_model=True)
    _same(resumed["history"], full["history"])
    assert resumed["best_acc"] == full["best_acc"] and resumed["last_acc"] == full["last_acc"]
    for (k, a), b in zip(full["student"].state_dict().items(), resumed["student"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
