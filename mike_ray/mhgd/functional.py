"""MHGD math as small pure functions (no parameters, no state).

Notation (``shared/papers/mhgd.txt``, ``shared/DESIGN.md`` § MHGD):

* ``B``  batch size (``N`` in the paper: the graph relates the samples of one mini-batch),
* ``C``  channels at a sensing point (``C_F`` front, ``C_B`` back),
* ``K``  number of singular vectors kept per sample,
* ``A``  attention heads, ``D`` head width.

Contents:

* KD-SVD compression: :func:`svd_compress`, :func:`svd_right_vectors`, :func:`fix_sign`,
  :func:`align_student`, and the two conveniences :func:`teacher_vectors`, :func:`student_vectors`.
* Attention graph: :func:`attention_logits`, :func:`attention_graph`, :func:`attend`,
  :func:`drop_heads_mask`.
* Losses: :func:`phase1_loss` (MHAN training), :func:`transfer_loss` (phase 2),
  :func:`clip_transfer_grads` (the multi-task gradient rule).
* Baselines of the paper's tables 1–3: :func:`kdsvd_rbf` / :func:`kdsvd_loss`, :func:`fsp_matrix` /
  :func:`fsp_loss`, :func:`ab_loss`, :func:`soft_logits_loss`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_GAP_EPS",
    "svd_compress",
    "svd_right_vectors",
    "fix_sign",
    "align_student",
    "teacher_vectors",
    "student_vectors",
    "attention_logits",
    "attention_graph",
    "attend",
    "drop_heads_mask",
    "phase1_loss",
    "transfer_loss",
    "stable_sigmoid",
    "clip_transfer_grads",
    "kdsvd_rbf",
    "kdsvd_loss",
    "fsp_matrix",
    "fsp_loss",
    "ab_loss",
    "soft_logits_loss",
]

#: Relative eigenvalue gap below which two singular directions are treated as degenerate in the
#: backward pass of :func:`svd_compress`: the coupling term 1/(σ_i² − σ_j²) is dropped when
#: |σ_i² − σ_j²| <= DEFAULT_GAP_EPS · σ_max². In float32 the eigenvalues of the Gram matrix are only
#: accurate to ~1e-7 · σ_max², so smaller gaps are rounding noise, not geometry.
DEFAULT_GAP_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# KD-SVD compression
# --------------------------------------------------------------------------------------------


class _TopRightSingular(torch.autograd.Function):
    """Top-``k`` singular values and right singular vectors of a batch of matrices, with a safe backward.

    Forward: eigendecomposition of the C×C Gram matrix XᵀX (its eigenvectors are X's right singular
    vectors, its eigenvalues the squared singular values). The full eigenbasis — including the null
    space when M < C — is kept for the backward pass, so no 1/σ factor is ever needed for the vectors.

    Backward (first-order perturbation of a symmetric eigenproblem, G = XᵀX):
        dv_i = Σ_{j≠i} v_j (v_jᵀ dG v_i) / (λ_i − λ_j),    dσ_i = v_iᵀ dG v_i / (2σ_i)
    so  ∂L/∂G = V M Vᵀ  with  M_ji = (v_jᵀ ∂L/∂v_i) / (λ_i − λ_j)  (j≠i),  M_ii = ∂L/∂σ_i / (2σ_i),
    and ∂L/∂X = 2 X sym(∂L/∂G). Terms whose gap |λ_i − λ_j| is at most ``gap_eps``·λ_max are set to 0:
    within a (numerically) degenerate subspace the individual vectors are not defined, only the
    subspace is, and the masked gradient is the gradient of that subspace. ``torch.linalg.svd``'s own
    backward divides by these gaps and returns inf/NaN when singular values coincide
    (``tests/test_mhgd_functional.py`` shows both behaviours). The σ term is dropped where σ_i = 0.
    """

    @staticmethod
    def forward(ctx, x: Tensor, k: int, gap_eps: float) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        with torch.autocast(device_type=x.device.type, enabled=False):
            gram = x.transpose(-1, -2) @ x  # [B, C, C]
            evals, evecs = torch.linalg.eigh(gram)  # ascending
        lam = evals.flip(-1).clamp_min(0.0)  # [B, C] descending; tiny negatives are rounding
        vecs = evecs.flip(-1)  # [B, C, C], column i ↔ lam[..., i]
        sigma = lam[..., :k].sqrt()  # [B, k]
        v = vecs[..., :k].transpose(-1, -2).contiguous()  # [B, k, C]
        ctx.save_for_backward(x, lam, vecs)
        ctx.k = k
        ctx.gap_eps = gap_eps
        return sigma, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_sigma: Tensor, g_v: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        x, lam, vecs = ctx.saved_tensors
        k: int = ctx.k
        lam_k = lam[..., :k]  # [B, k]
        # Rows j (all C directions), columns i (the k kept ones): proj[j, i] = v_jᵀ ∂L/∂v_i.
        proj = vecs.transpose(-1, -2) @ g_v.transpose(-1, -2)  # [B, C, k]
        gap = lam_k.unsqueeze(-2) - lam.unsqueeze(-1)  # [B, C, k]: λ_i − λ_j
        thresh = ctx.gap_eps * lam[..., :1].unsqueeze(-1)  # [B, 1, 1]: relative to λ_max
        ok = gap.abs() > thresh  # also removes j == i (gap exactly 0)
        inv_gap = torch.where(ok, 1.0 / torch.where(ok, gap, torch.ones_like(gap)), torch.zeros_like(gap))
        m = inv_gap * proj  # [B, C, k]
        # σ_i = sqrt(λ_i): the diagonal entry M_ii = ∂L/∂σ_i / (2σ_i), dropped where σ_i = 0.
        sig = lam_k.sqrt()
        has_sig = sig > 0
        g_lam = torch.where(has_sig, g_sigma / (2.0 * torch.where(has_sig, sig, torch.ones_like(sig))),
                            torch.zeros_like(sig))  # [B, k]
        idx = torch.arange(k, device=x.device)
        m[..., idx, idx] = m[..., idx, idx] + g_lam
        g_gram = vecs @ m @ vecs[..., :k].transpose(-1, -2)  # [B, C, C]
        g_gram = 0.5 * (g_gram + g_gram.transpose(-1, -2))
        return 2.0 * (x @ g_gram), None, None


def svd_compress(feat: Tensor, k: int, gap_eps: float = DEFAULT_GAP_EPS) -> tuple[Tensor, Tensor]:
    """Top-``k`` singular values and right singular vectors of each sample's feature map.

    Args:
        feat: ``[B, C, H, W]`` feature map (or ``[B, M, C]`` already flattened: M rows, C columns).
            Each sample is viewed as the HW×C matrix whose row p is the C-vector at pixel p.
        k: singular vectors to keep; clipped to ``min(k, HW, C)`` as in the authors' code (beyond the
            rank only null-space directions, which carry nothing, would remain).
        gap_eps: relative gap under which the backward drops the 1/(σ_i² − σ_j²) coupling (see
            :class:`_TopRightSingular`).

    Returns:
        ``(sigma, v)``: ``sigma`` ``[B, K]`` singular values in descending order, ``v`` ``[B, K, C]``
        the matching right singular vectors, unit L2 norm, sign arbitrary (use :func:`fix_sign` or
        :func:`align_student`), with ``K = min(k, HW, C)``.

    Gradients flow to ``feat`` and stay finite for repeated or zero singular values. Half-precision
    input is computed in float32 (eigh has no half kernels) and returned as float32.
    """
    if feat.dim() == 4:
        x = feat.flatten(2).transpose(1, 2)  # [B, HW, C]
    elif feat.dim() == 3:
        x = feat
    else:
        raise ValueError(f"svd_compress: feat must be [B,C,H,W] or [B,M,C], got shape {tuple(feat.shape)}")
    if k < 1:
        raise ValueError(f"svd_compress: k must be >= 1, got {k}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"svd_compress: feat must be floating point, got {x.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    k_eff = min(k, x.shape[-2], x.shape[-1])
    sigma, v = _TopRightSingular.apply(x, k_eff, float(gap_eps))
    return sigma, v


def svd_right_vectors(feat: Tensor, k: int, gap_eps: float = DEFAULT_GAP_EPS) -> Tensor:
    """KD-SVD compression: ``[B, C, H, W]`` → top right singular vectors ``[B, K, C]`` (unit norm).

    ``K = min(k, HW, C)``; singular values are dropped. Signs are arbitrary: fix the teacher's with
    :func:`fix_sign` and align the student's to it with :func:`align_student`. See :func:`svd_compress`.
    """
    return svd_compress(feat, k, gap_eps)[1]


def fix_sign(v: Tensor) -> Tensor:
    """Make each vector's largest-magnitude entry positive (deterministic sign of a singular vector).

    Args:
        v: ``[..., C]`` vectors along the last axis.
    Returns:
        ``[..., C]``: ``v`` times ±1 per vector. Ties in magnitude go to the first index; an all-zero
        vector is left as is. The factor is piecewise constant, so gradients pass through unchanged
        up to the sign.
    """
    idx = v.abs().argmax(dim=-1, keepdim=True)
    s = torch.sign(torch.gather(v, -1, idx))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return v * s


def align_student(vs: Tensor, vt: Tensor) -> Tensor:
    """Pick, for each teacher vector, the student candidate most parallel to it, sign-matched.

    Args:
        vs: ``[B, Ks, C]`` student candidates (KD-SVD: the student's top-4 right singular vectors).
        vt: ``[B, C]`` one teacher vector per sample, or ``[B, Kt, C]`` several.
    Returns:
        Same shape as ``vt``: for teacher vector t, the candidate c maximising |cos(vs_c, vt_t)|,
        multiplied by sign(cos(vs_c, vt_t)) (a zero cosine counts as +). Ties go to the first candidate.
        The choice and the sign are constants for autograd; the gradient flows into the chosen candidate.
    """
    squeeze = vt.dim() == 2
    vt3 = vt.unsqueeze(1) if squeeze else vt
    if vs.dim() != 3 or vt3.dim() != 3 or vs.shape[0] != vt3.shape[0] or vs.shape[-1] != vt3.shape[-1]:
        raise ValueError(f"align_student: need vs [B,Ks,C] and vt [B,C] or [B,Kt,C] with equal B and C, "
                         f"got {tuple(vs.shape)} and {tuple(vt.shape)}")
    with torch.no_grad():
        cos = F.normalize(vs, dim=-1) @ F.normalize(vt3, dim=-1).transpose(-1, -2)  # [B, Ks, Kt]
        idx = cos.abs().argmax(dim=1)  # [B, Kt]
        s = torch.sign(torch.gather(cos, 1, idx.unsqueeze(1)).squeeze(1))  # [B, Kt]
        s = torch.where(s == 0, torch.ones_like(s), s)
    chosen = torch.gather(vs, 1, idx.unsqueeze(-1).expand(-1, -1, vs.shape[-1]))  # [B, Kt, C]
    out = chosen * s.unsqueeze(-1).to(chosen.dtype)
    return out.squeeze(1) if squeeze else out


def teacher_vectors(feat: Tensor, gap_eps: float = DEFAULT_GAP_EPS) -> Tensor:
    """Teacher side of MHGD: ``[B, C, H, W]`` → ``[B, C]``, top right singular vector, sign fixed."""
    return fix_sign(svd_right_vectors(feat, 1, gap_eps)[:, 0])


def student_vectors(feat: Tensor, vt: Tensor, num_candidates: int = 4,
                    gap_eps: float = DEFAULT_GAP_EPS) -> Tensor:
    """Student side of MHGD: ``[B, C, H, W]`` and teacher ``vt`` ``[B, C]`` → aligned ``[B, C]``.

    Keeps ``num_candidates`` (4 in the authors' code) right singular vectors and returns, per sample,
    the one most parallel to the teacher's vector with the teacher's orientation (:func:`align_student`).
    """
    return align_student(svd_right_vectors(feat, num_candidates, gap_eps), vt)


# --------------------------------------------------------------------------------------------
# Attention graph and estimator pieces
# --------------------------------------------------------------------------------------------


def attention_logits(theta_b: Tensor, phi_f: Tensor) -> Tensor:
    """Similarity maps S of all heads: ``S[a, i, j] = θ_a(v_i^B) · φ_a(v_j^F)`` (paper eq. 2).

    Args:
        theta_b: ``[B, A, D]`` embedded back vectors (queries, one per sample i).
        phi_f:   ``[B, A, D]`` embedded front vectors (keys, one per sample j).
    Returns:
        ``[A, B, B]``. No 1/√D scaling (as in the authors' code).
    """
    if theta_b.dim() != 3 or theta_b.shape != phi_f.shape:
        raise ValueError(f"attention_logits: need two [B,A,D] tensors of equal shape, "
                         f"got {tuple(theta_b.shape)} and {tuple(phi_f.shape)}")
    return torch.einsum("iad,jad->aij", theta_b, phi_f)


def attention_graph(s: Tensor, smooth: bool) -> Tensor:
    """Row-normalised graph G from logits S (``[..., B, B]`` → same shape, rows sum to 1).

    ``smooth=False``: softmax over j (paper eq. 4, phase 1). ``smooth=True``: softmax_j(tanh(S))
    (paper eq. 8, phase 2 — tanh saturates large similarities so the teacher graph is not an
    over-constraint).
    """
    return torch.softmax(torch.tanh(s) if smooth else s, dim=-1)


def attend(g: Tensor, h: Tensor) -> Tensor:
    """Aggregate per-sample values by each head's graph and concatenate heads: ``G · f1(V^F)``.

    Args:
        g: ``[A, B, B]`` graphs (row i weights the samples j).
        h: ``[B, D]`` values (the estimator's f1(V^F)).
    Returns:
        ``[B, A·D]``: row i is ``[Σ_j G_1[i,j] h_j, …, Σ_j G_A[i,j] h_j]`` (head-major blocks).
    """
    if g.dim() != 3 or h.dim() != 2 or g.shape[-1] != h.shape[0]:
        raise ValueError(f"attend: need g [A,B,B] and h [B,D], got {tuple(g.shape)} and {tuple(h.shape)}")
    out = g @ h  # [A, B, D]
    return out.transpose(0, 1).reshape(h.shape[0], -1)


def drop_heads_mask(num_heads: int, batch: int, *, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The authors' phase-1 head dropout (``drop_head`` in their ``Relation.py``): ``[A, B, 1]`` 0/1 mask.

    For each sample, Gaussian noise is drawn per head and the heads whose noise exceeds the mean over
    heads are kept — about half. Not described in the paper or DESIGN.md; the estimator applies it
    only when asked (``MultiHeadGraph(head_dropout=True)``) and only in training mode.
    """
    noise = torch.randn(num_heads, batch, 1, generator=generator, device=device, dtype=dtype)
    return (noise - noise.mean(dim=0, keepdim=True) > 0).to(dtype)


def phase1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """MHAN training loss for one module: ``mean_i (1 − cos(pred_i, target_i))`` (paper eq. 7).

    Args:
        pred:   ``[B, C_B]`` the estimator's prediction of V^B.
        target: ``[B, C_B]`` the teacher's V^B.
    Returns:
        Scalar in [0, 2]. The caller sums it over modules (and adds weight decay).
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"phase1_loss: need two [B,C] tensors of equal shape, "
                         f"got {tuple(pred.shape)} and {tuple(target.shape)}")
    return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()


def transfer_loss(gs: Tensor, gt: Tensor) -> Tensor:
    """Phase-2 transfer loss of one module: ``KL(G^S ‖ G^T)`` summed over heads, rows and columns.

    ``Σ_{a,i,j} G^S[a,i,j] · (log G^S[a,i,j] − log G^T[a,i,j])`` — exactly paper eq. 9, and the same
    direction as the authors' ``kld_loss(G_S, G_T) = Σ softmax(X)(log_softmax(X) − log_softmax(Y))``
    with X, Y the tanh-smoothed student/teacher logits. Note this is KL(student ‖ teacher), the
    reverse of Hinton's KL(teacher ‖ student); it is a sum, not a mean, so it grows with the batch
    size (the gradient clipping of :func:`clip_transfer_grads` bounds its effect).

    Args:
        gs: ``[A, B, B]`` student graphs (rows sum to 1, e.g. ``attention_graph(S, smooth=True)``).
        gt: ``[A, B, B]`` teacher graphs; treated as a constant target (detached).
    Returns:
        Scalar >= 0; the caller sums it over modules.
    """
    if gs.shape != gt.shape:
        raise ValueError(f"transfer_loss: graphs differ in shape: {tuple(gs.shape)} vs {tuple(gt.shape)}")
    tiny = torch.finfo(gs.dtype).tiny
    gt = gt.detach()
    return (gs * (gs.clamp_min(tiny).log() - gt.clamp_min(tiny).log())).sum()


def stable_sigmoid(x: float) -> float:
    """Logistic function of a Python float without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def clip_transfer_grads(transfer_grads: Sequence[Tensor | None], ce_grads: Sequence[Tensor | None],
                        epoch: float, phase1_epochs: float) -> list[Tensor | None]:
    """Clip each parameter's transfer-loss gradient to ‖∇CE‖ · sigmoid(epoch − phase1_epochs).

    The rule of the authors' ``Optimizer_w_MHGD`` (inherited from KD-SVD): the student's update is
    ``∇CE + ∇(weight decay) + clip_by_norm(∇transfer, ‖∇CE‖·sigmoid(epoch − init_epoch))``, applied
    **per parameter tensor** (each tensor's own norms, not a global norm). The sigmoid ramps the
    transfer task in over the first epochs of phase 2 (0.5 at its first epoch). The authors pass the
    integer epoch; pass ``floor`` of the fractional epoch to reproduce them exactly, or a fractional
    one for a smooth ramp.

    Args:
        transfer_grads: per-parameter gradients of the transfer loss (None: parameter not involved).
        ce_grads: per-parameter gradients of the cross-entropy, same order and shapes (None counts as
            a zero gradient, so the transfer gradient of that parameter is clipped to zero).
        epoch: current training epoch, counted from the start of phase 1 as in the authors' code.
        phase1_epochs: length of phase 1 (MHAN training), 40 in the reference schedule.
    Returns:
        The clipped transfer gradients: ``g · min(1, max_norm / ‖g‖)`` (unchanged when ‖g‖ = 0); the
        caller adds them to the CE and weight-decay gradients.
    """
    if len(transfer_grads) != len(ce_grads):
        raise ValueError(f"clip_transfer_grads: {len(transfer_grads)} transfer gradients but "
                         f"{len(ce_grads)} CE gradients")
    ramp = stable_sigmoid(float(epoch) - float(phase1_epochs))
    out: list[Tensor | None] = []
    for i, (gd, gc) in enumerate(zip(transfer_grads, ce_grads)):
        if gd is None:
            out.append(None)
            continue
        if gc is not None and gc.shape != gd.shape:
            raise ValueError(f"clip_transfer_grads: parameter {i}: shapes differ: {tuple(gd.shape)} vs {tuple(gc.shape)}")
        max_norm = (torch.linalg.vector_norm(gc) if gc is not None else gd.new_zeros(())) * ramp
        norm = torch.linalg.vector_norm(gd)
        scale = torch.where(norm > max_norm, max_norm / torch.where(norm > 0, norm, torch.ones_like(norm)),
                            torch.ones_like(norm))
        out.append(gd * scale.to(gd.dtype))
    return out


# --------------------------------------------------------------------------------------------
# Baselines (paper tables 1–3)
# --------------------------------------------------------------------------------------------


def kdsvd_rbf(v_front: Tensor, v_back: Tensor) -> Tensor:
    """KD-SVD's radial-basis relation between two consecutive sensing points.

    As in the authors' published code (``SSKD_SVD/nets/Distillation.py`` and
    ``KD_methods_with_TF/nets/Shared.py``), the RBF is taken between every *entry* of the back
    vector and every entry of the front vector, separately for each singular-vector index k:

        R[b, k, p, q] = exp(−(v_back[b, k, p] − v_front[b, k, q])² / 8)

    (not between whole vectors, which would need C_F = C_B).

    Args:
        v_front: ``[B, K, C_F]`` (singular-value-weighted) vectors at the front point.
        v_back:  ``[B, K, C_B]`` at the back point.
    Returns:
        ``[B, K, C_B, C_F]``.
    """
    if v_front.dim() != 3 or v_back.dim() != 3 or v_front.shape[:2] != v_back.shape[:2]:
        raise ValueError(f"kdsvd_rbf: need [B,K,C_F] and [B,K,C_B], got {tuple(v_front.shape)} and {tuple(v_back.shape)}")
    return torch.exp(-(v_back.unsqueeze(-1) - v_front.unsqueeze(-2)).square() / 8.0)


def kdsvd_loss(vs_front: Tensor, vs_back: Tensor, vt_front: Tensor, vt_back: Tensor,
               sigma_t_front: Tensor, sigma_t_back: Tensor) -> Tensor:
    """KD-SVD transfer loss of one pair of consecutive sensing points (Lee, Kim & Song, ECCV 2018).

    What is implemented (the form of ``KD_methods_with_TF/nets/Shared.py::KD_SVD``, the authors'
    code used for the MHGD comparison):

    1. each point's vectors — student (already aligned to the teacher, :func:`align_student`) and
       teacher alike — are multiplied by the teacher's singular values of that point, L2-normalised
       over the K kept values (``w = σ_t / ‖σ_t‖``), so that the dominant direction counts most;
    2. :func:`kdsvd_rbf` relates front and back for student and teacher;
    3. loss = Σ_{b,k,p,q} (R_S − R_T)², the teacher relation a constant target. A sum over the batch,
       as in the code; the per-parameter gradient clipping bounds its scale (the authors' KD-SVD runs
       use :func:`clip_transfer_grads` with ``phase1_epochs=0``: a ramp sigmoid(epoch) from the start).

    Differences from the code: the singular values are normalised with a plain L2 norm (the TF1
    code adds 1e-3 under the square root); the code's ``removenan`` guard is unnecessary because
    :func:`svd_compress` has finite gradients. The ECCV paper's 1/2·√K factor (in the older
    ``SSKD_SVD`` code) is not applied.

    Args:
        vs_front, vs_back: ``[B, K, C_F]``, ``[B, K, C_B]`` student vectors aligned to the teacher's.
        vt_front, vt_back: ``[B, K, C_F]``, ``[B, K, C_B]`` teacher vectors.
        sigma_t_front, sigma_t_back: ``[B, K]`` teacher singular values at the two points (raw).
    Returns:
        Scalar.
    """
    if vs_front.shape != vt_front.shape or vs_back.shape != vt_back.shape:
        raise ValueError(f"kdsvd_loss: student and teacher vectors differ in shape: "
                         f"{tuple(vs_front.shape)}/{tuple(vt_front.shape)}, {tuple(vs_back.shape)}/{tuple(vt_back.shape)}")
    if sigma_t_front.shape != vt_front.shape[:2] or sigma_t_back.shape != vt_back.shape[:2]:
        raise ValueError(f"kdsvd_loss: singular values must be [B,K], got {tuple(sigma_t_front.shape)} and "
                         f"{tuple(sigma_t_back.shape)} for vectors {tuple(vt_front.shape)} and {tuple(vt_back.shape)}")
    wf = F.normalize(sigma_t_front.detach(), dim=1).unsqueeze(-1)  # [B, K, 1]
    wb = F.normalize(sigma_t_back.detach(), dim=1).unsqueeze(-1)
    rs = kdsvd_rbf(vs_front * wf, vs_back * wb)
    rt = kdsvd_rbf(vt_front.detach() * wf, vt_back.detach() * wb)
    return (rs - rt).square().sum()


def fsp_matrix(front: Tensor, back: Tensor) -> Tensor:
    """FSP ("flow of solution procedure", Yim et al. 2017) Gram matrix of two consecutive feature maps.

    Args:
        front: ``[B, C_F, H_F, W_F]``; max-pooled to the back map's size when larger (the authors'
            code pools 2×2 once; adaptive pooling is the same for a factor of 2 and also covers others).
        back:  ``[B, C_B, H, W]``.
    Returns:
        ``[B, C_F, C_B]``: ``G[b, p, q] = Σ_{h,w} front[b,p,h,w] · back[b,q,h,w] / (H·W)``.
    """
    if front.dim() != 4 or back.dim() != 4 or front.shape[0] != back.shape[0]:
        raise ValueError(f"fsp_matrix: need [B,C,H,W] maps with equal B, got {tuple(front.shape)} and {tuple(back.shape)}")
    h, w = back.shape[-2:]
    if front.shape[-2] < h or front.shape[-1] < w:
        raise ValueError(f"fsp_matrix: front map {tuple(front.shape)} is smaller than back map {tuple(back.shape)}")
    if front.shape[-2:] != back.shape[-2:]:
        front = F.adaptive_max_pool2d(front, (h, w))
    return torch.einsum("bphw,bqhw->bpq", front, back) / (h * w)


def fsp_loss(gs: Tensor, gt: Tensor) -> Tensor:
    """FSP loss of one pair of points: ``mean_b ½ Σ_{p,q} (G_T − G_S)²`` (authors' code; teacher detached).

    Args:
        gs, gt: ``[B, C_F, C_B]`` student and teacher :func:`fsp_matrix`.
    Returns:
        Scalar. The authors sum it over pairs and scale by 1e-3; that is the caller's job.
    """
    if gs.shape != gt.shape:
        raise ValueError(f"fsp_loss: matrices differ in shape: {tuple(gs.shape)} vs {tuple(gt.shape)}")
    return 0.5 * (gt.detach() - gs).square().flatten(1).sum(1).mean()


def ab_loss(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """Activation-boundary loss (Heo et al., AAAI 2019), alternative-L2 form of the authors' code.

    Per element, with s the student's pre-activation (after the 1×1 conv + BN connector, which the
    caller owns) and t the teacher's pre-activation (only its sign is used):
        (s + m)² · [s > −m and t ≤ 0]  +  (s − m)² · [s ≤ m and t > 0]
    i.e. a squared hinge pushing s below −m where the teacher neuron is off and above +m where it is on.

    Args:
        source: ``[B, ...]`` student pre-activations.
        target: ``[B, ...]`` teacher pre-activations, same shape.
        margin: m.
    Returns:
        Scalar: per-sample sum over all non-batch axes, mean over the batch. (The authors weight layer
        i by 2^i and the total by 3e-3; that is the caller's job.)
    """
    if source.shape != target.shape:
        raise ValueError(f"ab_loss: source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
    t = target.detach()
    off = ((source > -margin) & (t <= 0)).to(source.dtype)
    on = ((source <= margin) & (t > 0)).to(source.dtype)
    per = (source + margin).square() * off + (source - margin).square() * on
    return per.flatten(1).sum(1).mean()


def soft_logits_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton's soft-logits loss: ``T² · mean_b KL(softmax(t/T) ‖ softmax(s/T))``.

    The T² factor keeps the gradient scale independent of T (Hinton et al. 2015). The authors' TF
    code uses T = 4 (the default here) and omits T².

    Args:
        student_logits, teacher_logits: ``[B, num_classes]``; the teacher's is detached.
        temperature: T > 0.
    Returns:
        Scalar >= 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"soft_logits_loss: logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"soft_logits_loss: temperature must be > 0, got {temperature}")
    log_pt = torch.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    log_ps = torch.log_softmax(student_logits / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return temperature ** 2 * kl.mean()
