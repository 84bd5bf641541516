"""Downstream evaluation: the mask loss (golden values) and one decoder retraining on real prepared data."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_AE, TINY_TASKS
from mike_ray.metrics import segmentation_loss, soft_dice_loss
from mike_ray.mike.downstream import DownstreamConfig, train_downstream
from mike_ray.models import build_model


def test_soft_dice_golden_values() -> None:
    # logits 0 → p = 0.5 everywhere. Channel 0: one foreground pixel of 4 → (2·0.5 + 1) / (2 + 1 + 1) = 0.5;
    # channel 1: no foreground → (0 + 1) / (2 + 0 + 1) = 1/3; loss = 1 − (0.5 + 1/3) / 2 = 7/12
    logits = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    mask = torch.zeros_like(logits)
    mask[0, 0, 0, 0] = 1
    assert soft_dice_loss(logits, mask).item() == pytest.approx(7 / 12, abs=1e-15)
    bce = math.log(2)   # BCE at p = 0.5, whatever the mask
    assert segmentation_loss(logits, mask, "bce").item() == pytest.approx(bce, abs=1e-15)
    assert segmentation_loss(logits, mask, "bce_dice").item() == pytest.approx(bce + 7 / 12, abs=1e-15)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_soft_dice_is_in_0_1_and_near_0_for_a_confident_right_answer(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(2, 3, 4, 4, generator=g) > 0.7).double()
    logits = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 5
    assert 0.0 <= soft_dice_loss(logits, mask).item() <= 1.0
    right = (mask * 2 - 1) * 40   # sigmoid(±40) is 1 or 0 to 1e-17
    assert soft_dice_loss(right, mask).item() < 1e-12
    assert soft_dice_loss(-right, mask).item() > soft_dice_loss(logits, mask).item()


def test_train_downstream_scores_both_held_out_splits(tiny_prepared) -> None:
    from mike_ray.data.loaders import ShardDataset

    torch.manual_seed(0)
    ae = build_model(TINY_AE)
    cfg = DownstreamConfig(tasks=[TINY_TASKS[0]], epochs=2, batch_size=16, max_train_samples=48, device="cpu")
    res = train_downstream(TINY_TASKS[0], TINY_AE, ae.state_dict(), tiny_prepared, cfg)
    assert res["task"] == TINY_TASKS[0]
    assert res["test_rows"] == len(ShardDataset(tiny_prepared, "test", [TINY_TASKS[0]]))
    for key in ("iou", "test_iou"):
        assert math.isnan(res[key]) if key == "test_iou" and res["test_rows"] == 0 else 0.0 <= res[key] <= 1.0
    assert len(res["iou_per_class"]) == 3
    # same seed, same data → the same decoder and the same scores
    again = train_downstream(TINY_TASKS[0], TINY_AE, ae.state_dict(), tiny_prepared, cfg)
    assert again["iou"] == res["iou"] or (math.isnan(again["iou"]) and math.isnan(res["iou"]))


def test_a_teacher_not_above_chance_does_not_normalise_its_task() -> None:
    from mike_ray.mike.zoo import TeacherRecord

    def rec(val: float, test: float) -> TeacherRecord:
        return TeacherRecord(name="CTB", task="CTB", classes=["car", "truck", "bus"], model={}, taps=[],
                             val_iou={}, val_miou=val, test_iou={}, test_miou=test, untrained_miou=0.04,
                             chance_iou={"car": 0.1, "truck": 0.2, "bus": math.nan}, data_hash="x")

    assert rec(0.30, 0.25).chance_miou == pytest.approx(0.15)
    assert rec(0.30, 0.25).reference_iou() == {"val": 0.30, "test": 0.25}
    below = rec(0.05, 0.30).reference_iou()   # the demo's CTB teacher once scored 0.034 val, chance 0.118
    assert math.isnan(below["val"]) and below["test"] == 0.30
    assert all(math.isnan(v) for v in rec(0.15, math.nan).reference_iou().values())  # equal to chance: not above


def test_the_config_offers_exactly_the_losses_the_metric_computes() -> None:
    """``SegLoss`` is written twice (the torch-free config and the metric); they must not drift."""
    from typing import get_args

    from mike_ray import metrics
    from mike_ray.mike import config

    assert get_args(config.SegLoss) == get_args(metrics.SegLoss)
