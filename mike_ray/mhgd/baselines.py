"""Distillation losses of the paper's comparison table, assembled over sensing points.

The per-pair math lives in :mod:`mike_ray.mhgd.functional`; this module sums it over the consecutive
pairs (or points) of a run and owns the one trainable extra, AB's connectors. Teacher-side inputs are
what :func:`mike_ray.mhgd.train.teacher_outputs` returns (no gradient); student-side inputs are the
student's tapped feature maps (with gradient).

=============  =====================================================================================
method         student loss (besides cross-entropy and weight decay)
=============  =====================================================================================
soft_logits    ``weight · T² · KL(softmax(t/T) ‖ softmax(s/T))`` (Hinton et al. 2015), every step
fsp            initialisation stage: ``weight · Σ_pairs ½‖G_T − G_S‖²`` (Yim et al. 2017), then CE only
ab             initialisation stage: ``weight · Σ_i 2^i · AB(connector_i(s_i), t_i)`` (Heo et al. 2019;
               2^i as in the MHGD authors' code, ``layer_weights="repdistiller"``: 2^(i−L+1)), then CE only
kdsvd          ``Σ_pairs (R_S − R_T)²`` of SVD-compressed points (Lee et al. 2018), gradient clipped
               per parameter to ‖∇CE‖·sigmoid(epoch) like MHGD's transfer loss
=============  =====================================================================================
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mike_ray.errors import ModelError
from mike_ray.mhgd.functional import ab_loss, align_student, fsp_loss, fsp_matrix, kdsvd_loss, svd_right_vectors

__all__ = ["ABConnectors", "ab_distill_loss", "fsp_distill_loss", "kdsvd_distill_loss"]


def fsp_distill_loss(student_feats: Sequence[Tensor], teacher_fsp: Sequence[Tensor], weight: float) -> Tensor:
    """``weight · Σ_m fsp_loss(G_S^m, G_T^m)`` over consecutive pairs of student sensing points.

    Args:
        student_feats: the student's ``[B, C_k, H_k, W_k]`` maps at the L sensing points.
        teacher_fsp: the teacher's L−1 :func:`~mike_ray.mhgd.functional.fsp_matrix` ``[B, C_m, C_{m+1}]``.
        weight: the authors' 1e-3.
    """
    if len(teacher_fsp) != len(student_feats) - 1:
        raise ModelError(f"fsp: {len(student_feats)} student points need {len(student_feats) - 1} teacher "
                         f"FSP matrices, got {len(teacher_fsp)}")
    total = student_feats[0].new_zeros(())
    for m, gt in enumerate(teacher_fsp):
        total = total + fsp_loss(fsp_matrix(student_feats[m], student_feats[m + 1]), gt)
    return weight * total


class ABConnectors(nn.Module):
    """AB's connectors: per sensing point a 1×1 conv (no bias) + batch norm from student to teacher channels.

    They map the student's pre-activation to the teacher's channel count; trained with the student
    during the initialisation stage and discarded after it.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ModelError(f"ab: {len(student_channels)} student points but {len(teacher_channels)} teacher points")
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))
            for cs, ct in zip(student_channels, teacher_channels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [conv(f) for conv, f in zip(self.convs, feats)]


def ab_distill_loss(connected: Sequence[Tensor], teacher_on: Sequence[Tensor], weight: float,
                    margin: float = 1.0, layer_weights: str = "authors") -> Tensor:
    """``weight · Σ_i c_i · ab_loss(connected_i, teacher_on_i)`` over the L points, i = 0 … L−1.

    Args:
        connected: the connectors' outputs ``[B, C_T, H, W]`` at the L points (student side).
        teacher_on: the teacher's neuron states at the same points: anything whose ``> 0`` is the
            teacher's "on" (its pre-activation, its post-ReLU output, or a 0/1 mask — only the sign is used).
        weight: overall factor (the authors' 3e-3).
        margin: AB's margin m.
        layer_weights: ``"authors"``: c_i = 2^i (the MHGD authors' code); ``"repdistiller"``:
            c_i = 2^(i−L+1) (RepDistiller's, the deepest point at 1).
    """
    if len(connected) != len(teacher_on):
        raise ModelError(f"ab: {len(connected)} student points but {len(teacher_on)} teacher points")
    if layer_weights not in ("authors", "repdistiller"):
        raise ModelError(f"ab: layer_weights must be 'authors' or 'repdistiller', got {layer_weights!r}")
    n = len(connected)
    total = connected[0].new_zeros(())
    for i, (s, t) in enumerate(zip(connected, teacher_on)):
        if s.shape != t.shape:
            raise ModelError(f"ab: point {i}: student (after its connector) {tuple(s.shape)} and teacher "
                             f"{tuple(t.shape)} differ in shape (sensing points must have equal resolution)")
        c = 2.0 ** i if layer_weights == "authors" else 2.0 ** (i - n + 1)
        total = total + c * ab_loss(s, t.to(s.dtype), margin)
    return weight * total


def kdsvd_distill_loss(student_feats: Sequence[Tensor], teacher_vectors: Sequence[Tensor],
                       teacher_sigmas: Sequence[Tensor], num_candidates: int = 4) -> Tensor:
    """KD-SVD over consecutive pairs: ``Σ_m kdsvd_loss(...)`` with the student's candidates aligned (k = 1).

    Args:
        student_feats: ``[B, C_k, H_k, W_k]`` at the L points.
        teacher_vectors: ``[B, C_k]`` the teacher's sign-fixed top right singular vectors.
        teacher_sigmas: ``[B, 1]`` the matching singular values.
        num_candidates: student singular vectors searched for the best match (4).
    """
    if not (len(student_feats) == len(teacher_vectors) == len(teacher_sigmas)):
        raise ModelError(f"kdsvd: {len(student_feats)} student points, {len(teacher_vectors)} teacher vectors, "
                         f"{len(teacher_sigmas)} singular values")
    vt = [v.unsqueeze(1) for v in teacher_vectors]  # [B, 1, C]
    vs = [align_student(svd_right_vectors(f, num_candidates), t) for f, t in zip(student_feats, vt)]
    total = student_feats[0].new_zeros(())
    for m in range(len(vt) - 1):
        total = total + kdsvd_loss(vs[m], vs[m + 1], vt[m], vt[m + 1], teacher_sigmas[m], teacher_sigmas[m + 1])
    return total
