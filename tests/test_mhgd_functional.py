"""Golden-value tests of mike_ray.mhgd.functional.

Every expected value is computed independently of the code under test: by hand, or by a plain
numpy re-computation (loops, numpy.linalg.svd) written out in this file.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mike_ray.mhgd import functional as mf

torch.set_num_threads(1)
DT = torch.float64


def t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def np_fix_sign(v: np.ndarray) -> np.ndarray:
    """Reference sign fix of one vector: largest-|entry| positive (first on ties)."""
    i = int(np.argmax(np.abs(v)))
    return v if v[i] >= 0 else -v


def feat_from_rows(x: np.ndarray) -> torch.Tensor:
    """An HW×C matrix (rows = pixels) as a [1, C, 1, HW] feature map."""
    return t(x.T[None, :, None, :])


# ------------------------------------------------------------------------------ compression


@pytest.mark.parametrize("shape,k", [((3, 4, 3, 2), 2), ((2, 5, 1, 2), 4), ((2, 3, 2, 2), 3)])
def test_svd_compress_matches_numpy_svd(shape, k):
    rng = np.random.default_rng(0)
    feat = rng.standard_normal(shape)
    b, c, h, w = shape
    sigma, v = mf.svd_compress(t(feat), k)
    k_eff = min(k, h * w, c)
    assert sigma.shape == (b, k_eff) and v.shape == (b, k_eff, c)
    for i in range(b):
        x = feat[i].reshape(c, h * w).T  # rows = pixels
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        np.testing.assert_allclose(sigma[i].numpy(), s[:k_eff], rtol=1e-10, atol=1e-12)
        for j in range(k_eff):
            np.testing.assert_allclose(mf.fix_sign(v[i, j]).numpy(), np_fix_sign(vt[j]), atol=1e-9)
            assert abs(np.linalg.norm(v[i, j].numpy()) - 1.0) < 1e-12


def test_svd_hand_example():
    # rows (pixels) (3, 0) and (0, 1): singular values 3, 1; right vectors ±e1, ±e2.
    sigma, v = mf.svd_compress(feat_from_rows(np.array([[3.0, 0.0], [0.0, 1.0]])), 2)
    np.testing.assert_allclose(sigma.numpy(), [[3.0, 1.0]], atol=1e-12)
    np.testing.assert_allclose(mf.fix_sign(v).numpy(), [[[1.0, 0.0], [0.0, 1.0]]], atol=1e-12)
    assert torch.equal(mf.svd_right_vectors(feat_from_rows(np.array([[3.0, 0.0], [0.0, 1.0]])), 1),
                       v[:, :1])


@pytest.mark.parametrize("shape,k", [((2, 4, 2, 3), 2), ((2, 5, 1, 2), 2)])
def test_svd_gradcheck_well_conditioned(shape, k):
    # Random matrices have well-separated singular values; fix_sign makes the output a function.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, dtype=DT, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: mf.fix_sign(mf.svd_right_vectors(f, k)), (x,))
    assert torch.autograd.gradcheck(lambda f: mf.svd_compress(f, k)[0], (x,))


def _repeated_rows() -> np.ndarray:
    """4×3 matrix with singular values exactly 2, 2, 1."""
    return np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [0, 0, 0]])


def test_torch_svd_backward_is_nonfinite_at_repeated_singular_values():
    x = t(_repeated_rows()).requires_grad_(True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    assert s[0].item() == s[1].item() == 2.0
    (vh[0] * t([0.3, -0.5, 0.7])).sum().backward()
    assert not torch.isfinite(x.grad).all()  # why svd_compress has its own backward


def test_svd_grad_finite_at_repeated_singular_values():
    w = t([0.3, -0.5, 0.7])
    # exactly repeated
    feat = feat_from_rows(_repeated_rows()).requires_grad_(True)
    (mf.svd_right_vectors(feat, 2)[0, 0] * w).sum().backward()
    assert torch.isfinite(feat.grad).all()
    # repeated up to rounding, in a rotated basis
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    r, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    x = q[:, :3] @ np.diag([2.0, 2.0, 1.0]) @ r.T
    feat = feat_from_rows(x).requires_grad_(True)
    sigma, v = mf.svd_compress(feat, 2)
    np.testing.assert_allclose(sigma.detach().numpy(), [[2.0, 2.0]], atol=1e-12)
    (v[0, 0] * w).sum().backward()
    assert torch.isfinite(feat.grad).all() and feat.grad.abs().max() < 10.0
    # a dead (all-zero) feature map: every singular value is 0
    feat = torch.zeros(2, 3, 2, 2, dtype=DT, requires_grad=True)
    s, v = mf.svd_compress(feat, 4)
    (v.sum() + s.sum()).backward()
    assert torch.isfinite(feat.grad).all()


def test_student_path_finite_at_repeated_singular_values():
    feat = feat_from_rows(_repeated_rows()).requires_grad_(True)
    vt = t([[0.6, 0.8, 0.0]])
    vs = mf.student_vectors(feat, vt)
    (1 - (vs * vt).sum()).backward()
    assert torch.isfinite(feat.grad).all()


def test_svd_half_precision_runs_in_float32():
    feat = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    sigma, v = mf.svd_compress(feat, 1)
    assert sigma.dtype == torch.float32 and v.dtype == torch.float32


def test_svd_rejects_bad_input():
    with pytest.raises(ValueError):
        mf.svd_compress(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError):
        mf.svd_compress(torch.zeros(2, 3, 2, 2), 0)


# ------------------------------------------------------------------------------ sign and alignment


def test_fix_sign_golden():
    v = t([[0.1, -0.9, 0.3], [0.5, 0.2, -0.4], [0.0, 0.0, 0.0], [-0.5, 0.5, 0.1]])
    expected = [[-0.1, 0.9, -0.3], [0.5, 0.2, -0.4], [0.0, 0.0, 0.0], [0.5, -0.5, -0.1]]  # tie → first
    np.testing.assert_array_equal(mf.fix_sign(v).numpy(), expected)
    assert mf.fix_sign(v.view(2, 2, 3)).shape == (2, 2, 3)


def test_teacher_vectors_sign_is_deterministic():
    feat = feat_from_rows(np.array([[3.0, -4.0], [0.3, -0.4]]))  # rank 1, direction ±(0.6, -0.8)
    np.testing.assert_allclose(mf.teacher_vectors(feat).numpy(), [[-0.6, 0.8]], atol=1e-12)
    np.testing.assert_allclose(mf.teacher_vectors(-feat).numpy(), [[-0.6, 0.8]], atol=1e-12)


def test_align_student_picks_candidate_and_sign():
    vs = t([[[1.0, 0.0], [0.6, 0.8], [0.0, -1.0], [-0.8, 0.6]],
            [[1.0, 0.0], [0.6, 0.8], [0.0, -1.0], [-0.8, 0.6]]])
    vt = t([[-0.6, -0.8],     # cos with candidate 1 = −1 → −candidate 1
            [0.1, -0.995]])   # cos with candidate 2 = 0.995 → +candidate 2
    out = mf.align_student(vs, vt)
    np.testing.assert_array_equal(out.numpy(), [[-0.6, -0.8], [0.0, -1.0]])
    # several teacher vectors per sample: [B, Kt, C] in, [B, Kt, C] out
    out2 = mf.align_student(vs, t([[[-0.6, -0.8], [0.8, -0.6]], [[0.1, -0.995], [1.0, 0.0]]]))
    np.testing.assert_array_equal(out2.numpy(), [[[-0.6, -0.8], [0.8, -0.6]], [[0.0, -1.0], [1.0, 0.0]]])


def test_align_student_gradient_goes_to_chosen_candidate():
    vs = t([[[1.0, 0.0], [0.6, 0.8]]]).requires_grad_(True)
    out = mf.align_student(vs, t([[-0.6, -0.8]]))
    out.sum().backward()
    np.testing.assert_array_equal(vs.grad.numpy(), [[[0.0, 0.0], [-1.0, -1.0]]])


# ------------------------------------------------------------------------------ attention graph


def test_attention_logits_golden():
    rng = np.random.default_rng(1)
    b, a, d = 3, 2, 4
    th, ph = rng.standard_normal((b, a, d)), rng.standard_normal((b, a, d))
    expected = np.zeros((a, b, b))
    for h in range(a):
        for i in range(b):
            for j in range(b):
                expected[h, i, j] = sum(th[i, h, e] * ph[j, h, e] for e in range(d))
    np.testing.assert_allclose(mf.attention_logits(t(th), t(ph)).numpy(), expected, atol=1e-12)


def test_attention_graph_golden():
    s = np.array([[[0.0, 1.0], [2.0, -1.0]]])
    plain = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    smooth = np.exp(np.tanh(s)) / np.exp(np.tanh(s)).sum(-1, keepdims=True)
    np.testing.assert_allclose(mf.attention_graph(t(s), smooth=False).numpy(), plain, atol=1e-12)
    np.testing.assert_allclose(mf.attention_graph(t(s), smooth=True).numpy(), smooth, atol=1e-12)
    # by hand: row [0, 1] → [1/(1+e), e/(1+e)]
    assert abs(mf.attention_graph(t(s), False)[0, 0, 0].item() - 1 / (1 + math.e)) < 1e-12


def test_attend_golden():
    rng = np.random.default_rng(2)
    a, b, d = 2, 3, 4
    g, h = rng.random((a, b, b)), rng.standard_normal((b, d))
    expected = np.zeros((b, a * d))
    for i in range(b):
        for hd in range(a):
            for e in range(d):
                expected[i, hd * d + e] = sum(g[hd, i, j] * h[j, e] for j in range(b))
    np.testing.assert_allclose(mf.attend(t(g), t(h)).numpy(), expected, atol=1e-12)


def test_drop_heads_mask():
    m = mf.drop_heads_mask(8, 5, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert m.shape == (8, 5, 1)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert (m.sum(0) >= 1).all()  # above-mean noise: at least one head per sample survives


# ------------------------------------------------------------------------------ losses


def test_phase1_loss_golden():
    # cos((1,0),(0,1)) = 0 → 1; cos((1,1),(2,2)) = 1 → 0; mean 0.5
    assert abs(mf.phase1_loss(t([[1.0, 0.0], [1.0, 1.0]]), t([[0.0, 1.0], [2.0, 2.0]])).item() - 0.5) < 1e-12
    rng = np.random.default_rng(4)
    p, q = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    expected = np.mean([1 - p[i] @ q[i] / np.linalg.norm(p[i]) / np.linalg.norm(q[i]) for i in range(5)])
    assert abs(mf.phase1_loss(t(p), t(q)).item() - expected) < 1e-12


def test_transfer_loss_golden():
    rng = np.random.default_rng(5)
    a, b = 2, 3
    gs = rng.random((a, b, b)); gs /= gs.sum(-1, keepdims=True)
    gt = rng.random((a, b, b)); gt /= gt.sum(-1, keepdims=True)
    expected = 0.0
    for h in range(a):
        for i in range(b):
            for j in range(b):
                expected += gs[h, i, j] * (math.log(gs[h, i, j]) - math.log(gt[h, i, j]))
    gs_t, gt_t = t(gs).requires_grad_(True), t(gt).requires_grad_(True)
    loss = mf.transfer_loss(gs_t, gt_t)
    assert abs(loss.item() - expected) < 1e-12 and loss.item() > 0
    loss.backward()
    assert gt_t.grad is None  # the teacher graph is a target
    assert mf.transfer_loss(t(gs), t(gs)).item() == pytest.approx(0.0, abs=1e-15)
    # two-point distributions by hand: KL([.5,.5] ‖ [.25,.75]) = .5 ln 2 + .5 ln(2/3)
    by_hand = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert mf.transfer_loss(t([[[0.5, 0.5]]]), t([[[0.25, 0.75]]])).item() == pytest.approx(by_hand, abs=1e-14)


def test_clip_transfer_grads_golden():
    ce = [t([3.0, 0.0]), t([0.0, 4.0]), None, t([1.0])]
    tr = [t([6.0, 8.0]), t([0.3, 0.4]), t([1.0, 1.0]), None]
    # epoch == phase-1 length → sigmoid(0) = 0.5: caps 1.5 and 2.0
    out = mf.clip_transfer_grads(tr, ce, epoch=40, phase1_epochs=40)
    np.testing.assert_allclose(out[0].numpy(), [0.9, 1.2], atol=1e-12)   # norm 10 → 1.5
    np.testing.assert_allclose(out[1].numpy(), [0.3, 0.4], atol=1e-12)   # norm 0.5 < 2: unchanged
    np.testing.assert_allclose(out[2].numpy(), [0.0, 0.0], atol=1e-12)   # no CE gradient → cap 0
    assert out[3] is None
    # one epoch later the cap is 3·sigmoid(1)
    cap = 3.0 / (1.0 + math.exp(-1.0))
    out = mf.clip_transfer_grads(tr[:1], ce[:1], epoch=41, phase1_epochs=40)
    np.testing.assert_allclose(out[0].numpy(), [0.6 * cap, 0.8 * cap], atol=1e-12)
    # long before: ~0, and no overflow for huge negative arguments
    out = mf.clip_transfer_grads(tr[:1], ce[:1], epoch=0, phase1_epochs=1e6)
    assert out[0].abs().max().item() == 0.0
    z = mf.clip_transfer_grads([torch.zeros(2, dtype=DT)], [torch.zeros(2, dtype=DT)], 50, 40)
    assert torch.equal(z[0], torch.zeros(2, dtype=DT))


def _np_rbf(vf: np.ndarray, vb: np.ndarray) -> np.ndarray:
    b, k, cf = vf.shape
    cb = vb.shape[2]
    r = np.zeros((b, k, cb, cf))
    for i in range(b):
        for j in range(k):
            for p in range(cb):
                for q in range(cf):
                    r[i, j, p, q] = math.exp(-((vb[i, j, p] - vf[i, j, q]) ** 2) / 8)
    return r


def test_kdsvd_rbf_and_loss_golden():
    rng = np.random.default_rng(6)
    b, k, cf, cb = 2, 2, 3, 4
    sf, sb = rng.standard_normal((b, k, cf)), rng.standard_normal((b, k, cb))
    tf_, tb = rng.standard_normal((b, k, cf)), rng.standard_normal((b, k, cb))
    sig_f, sig_b = rng.random((b, k)) + 0.5, rng.random((b, k)) + 0.5
    np.testing.assert_allclose(mf.kdsvd_rbf(t(sf), t(sb)).numpy(), _np_rbf(sf, sb), atol=1e-12)
    wf = sig_f / np.sqrt((sig_f ** 2).sum(1, keepdims=True))
    wb = sig_b / np.sqrt((sig_b ** 2).sum(1, keepdims=True))
    rs = _np_rbf(sf * wf[..., None], sb * wb[..., None])
    rt = _np_rbf(tf_ * wf[..., None], tb * wb[..., None])
    expected = ((rs - rt) ** 2).sum()
    got = mf.kdsvd_loss(t(sf), t(sb), t(tf_), t(tb), t(sig_f), t(sig_b))
    assert abs(got.item() - expected) < 1e-12
    # by hand, one entry each: exp(-(1-0)^2/8) vs exp(0) → (e^{-1/8} - 1)^2
    one = mf.kdsvd_loss(t([[[0.0]]]), t([[[1.0]]]), t([[[0.0]]]), t([[[0.0]]]), t([[2.0]]), t([[3.0]]))
    assert one.item() == pytest.approx((math.exp(-1 / 8) - 1) ** 2, abs=1e-14)


def test_fsp_golden():
    rng = np.random.default_rng(7)
    b, cf, cb = 2, 2, 3
    front, back = rng.standard_normal((b, cf, 4, 4)), rng.standard_normal((b, cb, 2, 2))
    pooled = np.zeros((b, cf, 2, 2))
    for i in range(b):
        for p in range(cf):
            for y in range(2):
                for x in range(2):
                    pooled[i, p, y, x] = front[i, p, 2 * y:2 * y + 2, 2 * x:2 * x + 2].max()
    expected = np.zeros((b, cf, cb))
    for i in range(b):
        for p in range(cf):
            for q in range(cb):
                expected[i, p, q] = (pooled[i, p] * back[i, q]).sum() / 4
    gs = mf.fsp_matrix(t(front), t(back))
    np.testing.assert_allclose(gs.numpy(), expected, atol=1e-12)
    gt = rng.standard_normal((b, cf, cb))
    loss_expected = np.mean([0.5 * ((gt[i] - expected[i]) ** 2).sum() for i in range(b)])
    assert abs(mf.fsp_loss(gs, t(gt)).item() - loss_expected) < 1e-12
    with pytest.raises(ValueError):
        mf.fsp_matrix(t(back), t(front))


def test_ab_loss_golden():
    s = t([[0.5, -0.5, 2.0, -2.0, 0.0, 0.0]])
    tch = t([[-1.0, -1.0, 1.0, 1.0, 1.0, -1.0]])
    # t≤0 & s>−1: (s+1)² → 2.25, 0.25 ; t>0 & s≤1: (s−1)² → (2.0: none), 9, 1 ; t≤0 & s=0: 1
    expected = 2.25 + 0.25 + 0.0 + 9.0 + 1.0 + 1.0
    assert mf.ab_loss(s, tch).item() == pytest.approx(expected, abs=1e-14)
    # batch mean of per-sample sums
    s2 = torch.cat([s, -3 * torch.ones(1, 6, dtype=DT)]).view(2, 1, 2, 3)
    tch2 = torch.cat([tch, -torch.ones(1, 6, dtype=DT)]).view(2, 1, 2, 3)
    assert mf.ab_loss(s2, tch2).item() == pytest.approx(expected / 2, abs=1e-14)


def test_soft_logits_golden():
    rng = np.random.default_rng(8)
    s, tl = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    temp = 4.0

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    kl = [sum(softmax(tl[i] / temp)[c] * (math.log(softmax(tl[i] / temp)[c]) - math.log(softmax(s[i] / temp)[c]))
              for c in range(5)) for i in range(3)]
    expected = temp ** 2 * np.mean(kl)
    assert mf.soft_logits_loss(t(s), t(tl), temp).item() == pytest.approx(expected, abs=1e-12)
    assert mf.soft_logits_loss(t(s), t(s), 2.0).item() == pytest.approx(0.0, abs=1e-14)


def test_ab_layer_weights_follow_the_authors_code_by_default() -> None:
    """Three points whose AB losses are 1, 10 and 100 (one element each, batch 1): the authors weigh
    point i by 2^i (× 3e-3 by default in MHGDConfig), RepDistiller by 2^(i−L+1)."""
    from mike_ray.mhgd.baselines import ab_distill_loss
    from mike_ray.mhgd.config import MHGDConfig

    # source s with the teacher off (t ≤ 0) and s > −m: loss (s + m)² with m = 1 → s = 0, 2.1623, 9
    s = [torch.tensor([[v]], dtype=torch.float64) for v in (0.0, 10 ** 0.5 - 1, 9.0)]
    t = [torch.zeros(1, 1, dtype=torch.float64)] * 3
    assert float(ab_distill_loss(s, t, 1.0)) == pytest.approx(1 * 1 + 2 * 10 + 4 * 100)
    assert float(ab_distill_loss(s, t, 1.0, layer_weights="repdistiller")) == pytest.approx(1 / 4 + 10 / 2 + 100)
    cfg = MHGDConfig()
    assert (cfg.ab_weight, cfg.ab_layer_weights, cfg.phase1_weight_decay) == (3e-3, "authors", 1e-3)
