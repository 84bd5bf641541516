"""Golden-value tests for the MIKE loss (eq. 1 with query masking). Expected numbers are by hand."""
from __future__ import annotations

import math

import pytest
import torch

from mike_ray.mike.loss import (
    TapTerm,
    masked_sample_mean,
    pixel_loss,
    tap_term,
    task_mask,
    teacher_loss,
)

torch.set_num_threads(1)
D = torch.float64


def _pre_tanh(values: list) -> torch.Tensor:
    """Activations whose tanh is exactly (to float64) the given values."""
    return torch.atanh(torch.tensor(values, dtype=D))


# Tap "a": B=2, each sample 1×2.
#   sample 0: tanh a_x = [0.5, 0.0], tanh a_x̄ = [0.0, 0.25] → sq diffs [0.25, 0.0625] → mean 0.15625
#   sample 1: tanh a_x = [0.8, -0.2], tanh a_x̄ = [0.2, 0.2] → sq diffs [0.36, 0.16]  → mean 0.26
A_X = [[[0.5, 0.0]], [[0.8, -0.2]]]
A_XBAR = [[[0.0, 0.25]], [[0.2, 0.2]]]
A_S0, A_S1 = 0.15625, 0.26


def test_masked_sample_mean_golden():
    v = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=D)
    assert masked_sample_mean(v, torch.tensor([True, False, True, False])).item() == pytest.approx(2.5, abs=1e-15)
    assert masked_sample_mean(v, torch.ones(4, dtype=torch.bool)).item() == pytest.approx(3.75, abs=1e-15)


def test_masked_sample_mean_empty_is_zero_with_zero_grad():
    v = torch.tensor([1.0, float("nan"), 3.0], dtype=D, requires_grad=True)
    out = masked_sample_mean(v, torch.zeros(3, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(v.grad, torch.zeros(3, dtype=D))


def test_masked_sample_mean_ignores_nan_off_mask():
    v = torch.tensor([2.0, float("nan"), float("inf")], dtype=D, requires_grad=True)
    out = masked_sample_mean(v, torch.tensor([True, False, False]))
    assert out.item() == 2.0
    out.backward()
    assert torch.equal(v.grad, torch.tensor([1.0, 0.0, 0.0], dtype=D))


def test_masked_sample_mean_rejects_bad_mask():
    v = torch.zeros(3, dtype=D)
    with pytest.raises(ValueError, match="bool"):
        masked_sample_mean(v, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="shape"):
        masked_sample_mean(v, torch.tensor([True, False]))


@pytest.mark.parametrize(
    "mask, expected",
    [
        ([True, True], (A_S0 + A_S1) / 2),  # 0.208125
        ([True, False], A_S0),
        ([False, True], A_S1),
        ([False, False], 0.0),
    ],
)
def test_tap_term_golden(mask, expected):
    out = tap_term(_pre_tanh(A_X), _pre_tanh(A_XBAR), torch.tensor(mask))
    assert out.item() == pytest.approx(expected, abs=1e-14)


def test_tap_term_gradient_golden():
    # d/d a_x̄[i,e] = (1/count)(1/E) · 2 (t_x − t_x̄) · (−1) · (1 − t_x̄²), with count = 1, E = 2:
    #   sample 0, e=0: 2·0.5·(−1)·(1 − 0)/2          = −0.5
    #   sample 0, e=1: 2·(−0.25)·(−1)·(1 − 0.0625)/2 = 0.234375
    #   sample 1 is masked out: 0
    a_xbar = _pre_tanh(A_XBAR).requires_grad_(True)
    tap_term(_pre_tanh(A_X), a_xbar, torch.tensor([True, False])).backward()
    expected = torch.tensor([[[-0.5, 0.234375]], [[0.0, 0.0]]], dtype=D)
    torch.testing.assert_close(a_xbar.grad, expected, atol=1e-13, rtol=0)


def test_tap_term_empty_mask_exact_zero_and_zero_finite_grad():
    a_xbar = _pre_tanh(A_XBAR).requires_grad_(True)
    out = tap_term(_pre_tanh(A_X), a_xbar, torch.zeros(2, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(a_xbar.grad).all()
    assert torch.equal(a_xbar.grad, torch.zeros_like(a_xbar))


def test_tap_term_is_a_per_element_mean_so_tap_size_does_not_matter():
    # A constant tanh difference of 0.5 gives 0.25 for a 1-element and a 4×8×8 tap alike.
    for shape in [(3, 1), (3, 4, 8, 8)]:
        a_x = torch.full(shape, math.atanh(0.5), dtype=D)
        a_xbar = torch.zeros(shape, dtype=D)
        assert tap_term(a_x, a_xbar, torch.ones(3, dtype=torch.bool)).item() == pytest.approx(0.25, abs=1e-15)


def test_tap_term_no_gradient_to_x_and_shape_check():
    a_x = _pre_tanh(A_X).requires_grad_(True)
    a_xbar = _pre_tanh(A_XBAR).requires_grad_(True)
    tap_term(a_x, a_xbar, torch.ones(2, dtype=torch.bool)).backward()
    assert a_x.grad is None
    with pytest.raises(ValueError, match="shape"):
        tap_term(torch.zeros(2, 3, dtype=D), torch.zeros(2, 4, dtype=D), torch.ones(2, dtype=torch.bool))


def _feats():
    """Two taps: "a" (term 0.208125 with both samples) and "b" (constant diff 0.5 → term 0.25)."""
    fx = {"a": _pre_tanh(A_X), "b": torch.full((2, 3), math.atanh(0.5), dtype=D)}
    fxb = {"a": _pre_tanh(A_XBAR).requires_grad_(True), "b": torch.zeros(2, 3, dtype=D, requires_grad=True)}
    return fx, fxb


def test_teacher_loss_weighted_total_and_terms():
    fx, fxb = _feats()
    total, terms = teacher_loss(fx, fxb, {"a": 0.25, "b": 0.75}, torch.ones(2, dtype=torch.bool))
    # 0.25 · 0.208125 + 0.75 · 0.25 = 0.05203125 + 0.1875
    assert total.item() == pytest.approx(0.23953125, abs=1e-14)
    assert list(terms) == ["a", "b"]
    assert isinstance(terms["a"], TapTerm)
    assert terms["a"].weight == 0.25
    assert terms["a"].unweighted.item() == pytest.approx(0.208125, abs=1e-14)
    assert terms["a"].weighted.item() == pytest.approx(0.05203125, abs=1e-14)
    assert terms["b"].unweighted.item() == pytest.approx(0.25, abs=1e-14)
    assert terms["b"].weighted.item() == pytest.approx(0.1875, abs=1e-14)
    # logged terms must not hold the graph
    assert not terms["a"].unweighted.requires_grad and not terms["a"].weighted.requires_grad
    total.backward()
    # tap b: d/d a_x̄ = 0.75 · (1/2)(1/3) · 2·0.5·(−1)·(1 − 0) = −0.125 per element
    torch.testing.assert_close(fxb["b"].grad, torch.full((2, 3), -0.125, dtype=D), atol=1e-14, rtol=0)


def test_teacher_loss_masking_selects_samples():
    fx, fxb = _feats()
    total, _ = teacher_loss(fx, fxb, {"a": 0.5, "b": 0.5}, torch.tensor([False, True]))
    assert total.item() == pytest.approx(0.5 * A_S1 + 0.5 * 0.25, abs=1e-14)


def test_teacher_loss_no_sample_of_the_task_gives_zero_and_zero_grad():
    fx, fxb = _feats()
    total, terms = teacher_loss(fx, fxb, {"a": 0.5, "b": 0.5}, torch.zeros(2, dtype=torch.bool))
    assert total.item() == 0.0
    total.backward()
    for t in fxb.values():
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert terms["a"].unweighted.item() == 0.0


def test_share_rule_golden_every_sample_weighs_the_same():
    """The weight rule under masking (mike/loss.py): a teacher's total is its masked mean times its
    share of the batch. Teacher 1 owns sample 1 of a batch of 4 (share 1/4), teacher 2 none: the step
    loss is (1/B)·Σ_i own-teacher loss = 0.25·(0.5·A_S1 + 0.5·0.25), teacher 2 contributes 0."""
    fx, fxb = _feats()
    total, terms = teacher_loss(fx, fxb, {"a": 0.5, "b": 0.5}, torch.tensor([False, True]), share=1 / 4)
    assert total.item() == pytest.approx(0.25 * (0.5 * A_S1 + 0.5 * 0.25), abs=1e-14)
    # the logged measurements are the teacher's own (masked means, no share)
    assert terms["a"].unweighted.item() == pytest.approx(A_S1, abs=1e-14)
    assert terms["a"].weighted.item() == pytest.approx(0.5 * A_S1, abs=1e-14)
    total.backward()
    # only sample 1 gets a gradient, scaled by the share: tap b, d/d a_x̄ = 0.25·0.5·(1/3)·2·0.5·(−1)
    torch.testing.assert_close(fxb["b"].grad[1], torch.full((3,), -0.25 * 0.5 / 3, dtype=D), atol=1e-14, rtol=0)
    assert torch.equal(fxb["b"].grad[0], torch.zeros(3, dtype=D))
    absent, _ = teacher_loss(fx, fxb, {"a": 0.5, "b": 0.5}, torch.zeros(2, dtype=torch.bool), share=0.0)
    assert absent.item() == 0.0


def test_share_rule_step_loss_with_the_pixel_term_golden():
    """Two teachers, batch of 4: teacher A owns samples 0–2 (share 3/4), B owns sample 3 (1/4),
    weights 0.5/0.5 on one tap each, pixel weight 0.5. Per-sample tap terms (tanh targets 0.5 vs 0):
    0.25 each. Step loss = 3/4·0.5·0.25 + 1/4·0.5·0.25 + 0.5·MSE = 0.125 + 0.5·MSE."""
    fx = {"t": torch.full((4, 2), math.atanh(0.5), dtype=D)}
    fxb = {"t": torch.zeros(4, 2, dtype=D)}
    a, _ = teacher_loss({"t": fx["t"][:3]}, {"t": fxb["t"][:3]}, {"t": 0.5}, torch.ones(3, dtype=torch.bool), share=3 / 4)
    b, _ = teacher_loss({"t": fx["t"][3:]}, {"t": fxb["t"][3:]}, {"t": 0.5}, torch.ones(1, dtype=torch.bool), share=1 / 4)
    x, xbar = torch.zeros(4, 3, 2, 2, dtype=D), torch.full((4, 3, 2, 2), 0.2, dtype=D)
    step = a + b + 0.5 * pixel_loss(x, xbar)
    assert step.item() == pytest.approx(0.125 + 0.5 * 0.04, abs=1e-14)
    with pytest.raises(ValueError, match="share"):
        teacher_loss(fx, fxb, {"t": 0.5}, torch.ones(4, dtype=torch.bool), share=1.5)


def test_teacher_loss_skips_zero_weight_taps():
    fx, fxb = _feats()
    del fx["b"], fxb["b"]  # a shard may not even extract zero-weight taps
    total, terms = teacher_loss(fx, fxb, {"a": 1.0, "b": 0.0}, torch.ones(2, dtype=torch.bool))
    assert list(terms) == ["a"]
    assert total.item() == pytest.approx(0.208125, abs=1e-14)


def test_teacher_loss_all_zero_weights_is_constant_zero():
    fx, fxb = _feats()
    total, terms = teacher_loss(fx, fxb, {"a": 0.0, "b": 0.0}, torch.ones(2, dtype=torch.bool))
    assert total.item() == 0.0 and total.dtype == D and not total.requires_grad
    assert terms == {}


def test_teacher_loss_input_errors():
    fx, fxb = _feats()
    mask = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="'b' has weight"):
        teacher_loss({"a": fx["a"]}, {"a": fxb["a"]}, {"a": 0.5, "b": 0.5}, mask)
    with pytest.raises(ValueError, match="without a weight"):
        teacher_loss(fx, fxb, {"a": 1.0}, mask)
    with pytest.raises(ValueError, match=">= 0"):
        teacher_loss(fx, fxb, {"a": 1.0, "b": -0.1}, mask)
    with pytest.raises(ValueError, match="no taps"):
        teacher_loss({}, {}, {}, mask)


def test_task_mask():
    ids = torch.tensor([0, 3, 3, 10], dtype=torch.int64)
    assert task_mask(ids, 3).tolist() == [False, True, True, False]
    assert task_mask(ids, 5).tolist() == [False, False, False, False]
    assert task_mask(ids, None).tolist() == [True] * 4
    assert task_mask(ids, None).dtype == torch.bool
    with pytest.raises(ValueError, match="integer"):
        task_mask(ids.to(D), 3)


def test_query_masking_two_teachers_one_batch():
    # The same image appears twice with different tasks (0 and 1); each teacher only sees its own.
    ids = torch.tensor([0, 1], dtype=torch.int64)
    a_x, a_xbar = _pre_tanh(A_X), _pre_tanh(A_XBAR)
    t0 = tap_term(a_x, a_xbar, task_mask(ids, 0))
    t1 = tap_term(a_x, a_xbar, task_mask(ids, 1))
    assert (t0.item(), t1.item()) == (pytest.approx(A_S0, abs=1e-14), pytest.approx(A_S1, abs=1e-14))


def test_pixel_loss_golden():
    x = torch.zeros(1, 1, 2, 2, dtype=D)
    xbar = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=D, requires_grad=True)
    out = pixel_loss(x, xbar)
    assert out.item() == pytest.approx(7.5, abs=1e-15)  # (1 + 4 + 9 + 16) / 4
    out.backward()
    torch.testing.assert_close(xbar.grad, torch.tensor([[[[0.5, 1.0], [1.5, 2.0]]]], dtype=D))  # 2·x̄/4
    with pytest.raises(ValueError, match="shape"):
        pixel_loss(x, torch.zeros(1, 1, 2, 3, dtype=D))


def test_teacher_loss_matches_plain_recomputation():
    # Random 4-D and 2-D taps, checked against an independent per-sample loop in plain Python.
    g = torch.Generator().manual_seed(0)
    fx = {"c": torch.randn(3, 2, 2, 2, generator=g, dtype=D), "d": torch.randn(3, 5, generator=g, dtype=D)}
    fxb = {k: torch.randn(v.shape, generator=g, dtype=D) for k, v in fx.items()}
    mask = torch.tensor([True, False, True])
    w = {"c": 0.3, "d": 0.7}
    total, _ = teacher_loss(fx, fxb, w, mask)
    expected = 0.0
    for tap, wt in w.items():
        per_sample = []
        for i in range(3):
            a, b = fx[tap][i].flatten().tolist(), fxb[tap][i].flatten().tolist()
            per_sample.append(sum((math.tanh(p) - math.tanh(q)) ** 2 for p, q in zip(a, b)) / len(a))
        expected += wt * (per_sample[0] + per_sample[2]) / 2
    assert total.item() == pytest.approx(expected, rel=1e-12)
