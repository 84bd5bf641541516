"""Tests of mike_ray.mhgd.attention.MultiHeadGraph (shapes, a numpy re-computation, training, freezing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mike_ray.errors import ModelError
from mike_ray.mhgd import MultiHeadGraph
from mike_ray.mhgd import functional as mf

torch.set_num_threads(1)
DT = torch.float64


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def make(c_front=6, c_back=10, heads=3, seed=0, **kw) -> MultiHeadGraph:
    torch.manual_seed(seed)
    return MultiHeadGraph(c_front, c_back, heads, **kw).to(DT)


def vectors(b=5, c_front=6, c_back=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return unit(torch.randn(b, c_front, dtype=DT, generator=g)), unit(torch.randn(b, c_back, dtype=DT, generator=g))


def test_shapes():
    m = make()
    vf, vb = vectors()
    assert m.head_dim == 8 and m.theta[0].in_features == 10 and m.phi[0].in_features == 6
    assert m.theta[0].bias is None and m.phi[0].bias is None and m.f1[0].bias is None and m.f2.bias is not None
    th, ph = m.embed(vf, vb)
    assert th.shape == ph.shape == (5, 3, 8)
    for smooth in (False, True):
        g = m.graphs(vf, vb, smooth)
        assert g.shape == (3, 5, 5)
        torch.testing.assert_close(g.sum(-1), torch.ones(3, 5, dtype=DT))
    pred = m(vf, vb)
    assert pred.shape == (5, 10)
    torch.testing.assert_close(pred.norm(dim=-1), torch.ones(5, dtype=DT))
    assert m.phase1_loss(vf, vb).shape == ()


def test_eval_forward_matches_numpy_recomputation():
    m = make()
    # non-trivial batch-norm statistics and affine parameters
    g = torch.Generator().manual_seed(5)
    for bn in (m.theta[1], m.phi[1], m.f1[1]):
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, dtype=DT, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(n, dtype=DT, generator=g) + 0.5)
        with torch.no_grad():
            bn.weight.copy_(torch.rand(n, dtype=DT, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(n, dtype=DT, generator=g) * 0.1)
    with torch.no_grad():
        m.f2.bias.copy_(torch.randn(10, dtype=DT, generator=g) * 0.1)
    m.eval()
    vf, vb = vectors()

    def lin_bn(lin: nn.Linear, bn: nn.BatchNorm1d, x: np.ndarray) -> np.ndarray:
        y = x @ lin.weight.detach().numpy().T
        return ((y - bn.running_mean.numpy()) / np.sqrt(bn.running_var.numpy() + bn.eps)
                * bn.weight.detach().numpy() + bn.bias.detach().numpy())

    a, d, b = 3, 8, 5
    th = lin_bn(m.theta[0], m.theta[1], vb.numpy())  # [B, A*D], head-major blocks
    ph = lin_bn(m.phi[0], m.phi[1], vf.numpy())
    s = np.zeros((a, b, b))
    for h in range(a):
        for i in range(b):
            for j in range(b):
                s[h, i, j] = th[i, h * d:(h + 1) * d] @ ph[j, h * d:(h + 1) * d]
    gr = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    gs = np.exp(np.tanh(s)) / np.exp(np.tanh(s)).sum(-1, keepdims=True)
    h1 = np.maximum(lin_bn(m.f1[0], m.f1[1], vf.numpy()), 0.0)  # [B, D]
    agg = np.concatenate([gr[h] @ h1 for h in range(a)], axis=1)  # [B, A*D]
    out = agg @ m.f2.weight.detach().numpy().T + m.f2.bias.detach().numpy()
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    with torch.no_grad():
        np.testing.assert_allclose(m.logits(vf, vb).numpy(), s, atol=1e-12)
        np.testing.assert_allclose(m.graphs(vf, vb, False).numpy(), gr, atol=1e-12)
        np.testing.assert_allclose(m.graphs(vf, vb, True).numpy(), gs, atol=1e-12)
        np.testing.assert_allclose(m(vf, vb).numpy(), out, atol=1e-12)
        cos = (out * vb.numpy()).sum(1)  # both unit norm
        assert m.phase1_loss(vf, vb).item() == pytest.approx(float(np.mean(1 - cos)), abs=1e-12)


def test_phase1_loss_decreases_when_training_heads():
    torch.manual_seed(0)
    b, cf, cb = 32, 6, 10
    g = torch.Generator().manual_seed(2)
    vf = unit(torch.randn(b, cf, dtype=DT, generator=g))
    w = torch.randn(cf, cb, dtype=DT, generator=g)
    vb = unit(torch.tanh(vf @ w))  # the back vectors are a function of the front ones
    m = MultiHeadGraph(cf, cb, num_heads=4).to(DT).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = m.phase1_loss(vf, vb)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_freeze_uses_running_stats_and_passes_gradients_to_inputs():
    m = make()
    vf, vb = vectors(b=6)
    m.train()
    m(vf, vb)  # one training step's worth of running statistics
    parent = nn.ModuleDict({"heads": m})
    assert m.freeze() is m and m.frozen
    parent.train()
    assert not m.training and not any(mod.training for mod in m.modules())
    assert all(not p.requires_grad for p in m.parameters())
    # inference-mode batch norm: a sample's graph logits do not depend on the rest of the batch
    full = m.logits(vf, vb)
    sub = m.logits(vf[:3], vb[:3])
    torch.testing.assert_close(sub, full[:, :3, :3])
    # phase 2: gradients flow through the frozen heads into the student's vectors
    vs_f, vs_b = vf.clone().requires_grad_(True), vb.clone().requires_grad_(True)
    gt = m.graphs(*vectors(b=6, seed=9), smooth=True)
    mf.transfer_loss(m.graphs(vs_f, vs_b, smooth=True), gt).backward()
    assert vs_f.grad is not None and torch.isfinite(vs_f.grad).all() and vs_f.grad.abs().sum() > 0
    assert vs_b.grad is not None and vs_b.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.parameters())
    m.unfreeze()
    parent.train()
    assert m.training and all(p.requires_grad for p in m.parameters())


def test_end_to_end_transfer_gradient_reaches_student_features():
    """Teacher/student feature maps → compression → frozen heads → transfer loss → finite gradients."""
    g = torch.Generator().manual_seed(3)
    m = make(c_front=4, c_back=6, heads=2).eval().freeze()
    tf_, tb = torch.randn(5, 4, 3, 3, dtype=DT, generator=g), torch.randn(5, 6, 2, 2, dtype=DT, generator=g)
    sf = torch.randn(5, 4, 3, 3, dtype=DT, generator=g).requires_grad_(True)
    sb = torch.randn(5, 6, 2, 2, dtype=DT, generator=g).requires_grad_(True)
    with torch.no_grad():
        vtf, vtb = mf.teacher_vectors(tf_), mf.teacher_vectors(tb)
        gt = m.graphs(vtf, vtb, smooth=True)
    vsf, vsb = mf.student_vectors(sf, vtf), mf.student_vectors(sb, vtb)
    loss = mf.transfer_loss(m.graphs(vsf, vsb, smooth=True), gt)
    loss.backward()
    assert loss.item() >= 0
    for x in (sf, sb):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_head_dropout_only_in_training():
    m = make(head_dropout=True)
    vf, vb = vectors()
    torch.manual_seed(0)
    a = m(vf, vb)
    b = m(vf, vb)
    assert not torch.allclose(a, b)  # a fresh head mask per call
    m.eval()
    torch.testing.assert_close(m(vf, vb), m(vf, vb))
    m2 = make(head_dropout=False)
    torch.testing.assert_close(m2(vf, vb), m2(vf, vb))


def test_bad_shapes_raise_model_error():
    m = make()
    vf, vb = vectors()
    with pytest.raises(ModelError, match="front vectors"):
        m.graphs(vb, vb, False)
    with pytest.raises(ModelError, match="back vectors"):
        m.graphs(vf, vf, False)
    with pytest.raises(ModelError, match="graphs must be"):
        m.estimate(vf, torch.ones(2, 5, 5, dtype=DT))
    with pytest.raises(ModelError):
        MultiHeadGraph(0, 4)
