"""MHGD's student-side losses: the graph-transfer loss through the frozen heads, and the
per-parameter clipped combination of cross-entropy and transfer gradients (paper eq. 8–9)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mike_ray.errors import ModelError
from mike_ray.mhgd.attention import MultiHeadGraph
from mike_ray.mhgd.functional import clip_transfer_grads, stable_sigmoid, student_vectors, transfer_loss


def mhgd_transfer_loss(heads: Sequence[MultiHeadGraph], student_feats: Sequence[Tensor],
                       teacher_vecs: Sequence[Tensor], num_candidates: int = 4,
                       teacher_graphs: Sequence[Tensor] | None = None) -> Tensor:
    """Phase-2 transfer loss ``Σ_m KL(G^S_m ‖ G^T_m)`` through the frozen heads (smoothed graphs).

    Args:
        heads: one frozen :class:`MultiHeadGraph` per module (L−1 of them).
        student_feats: the student's maps at the L sensing points (with gradient).
        teacher_vecs: :func:`teacher_targets` for the same batch.
        num_candidates: student singular vectors searched for each teacher vector (4).
        teacher_graphs: precomputed ``G^T_m`` (default: computed here without gradient).
    """
    if len(heads) != len(student_feats) - 1 or len(teacher_vecs) != len(student_feats):
        raise ModelError(f"mhgd: {len(student_feats)} student points, {len(teacher_vecs)} teacher vectors, "
                         f"{len(heads)} modules (need L, L and L−1)")
    vs = [student_vectors(f, v, num_candidates) for f, v in zip(student_feats, teacher_vecs)]
    total = student_feats[0].new_zeros(())
    for m, head in enumerate(heads):
        if teacher_graphs is None:
            with torch.no_grad():
                gt = head.graphs(teacher_vecs[m], teacher_vecs[m + 1], smooth=True)
        else:
            gt = teacher_graphs[m]
        total = total + transfer_loss(head.graphs(vs[m], vs[m + 1], smooth=True), gt)
    return total


def clipped_multitask_grads(ce: Tensor, transfer: Tensor, params: Sequence[Tensor], epoch: float,
                            phase1_epochs: float) -> tuple[list[Tensor | None], dict[str, float]]:
    """Per-parameter gradient ``∇CE + clip(∇transfer, ‖∇CE‖·sigmoid(epoch − phase1_epochs))``.

    Weight decay is left to the optimiser. Returns the gradients (None where neither loss reaches a
    parameter) and statistics: global norms ``ce_norm``, ``transfer_norm`` (raw), ``transfer_clipped_norm``,
    and ``clip_ratio_max`` = max over parameters of ‖clipped‖ / (‖∇CE‖·ramp) (≤ 1 up to rounding; 0
    where the bound is 0).
    """
    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    if transfer.requires_grad:
        g_tr = torch.autograd.grad(transfer, params, allow_unused=True)
    else:
        g_tr = tuple(None for _ in params)
    clipped = clip_transfer_grads(list(g_tr), list(g_ce), epoch, phase1_epochs)
    ramp = stable_sigmoid(float(epoch) - float(phase1_epochs))
    grads: list[Tensor | None] = []
    with torch.no_grad():
        zero = ce.new_zeros((), dtype=torch.float32)
        norm = lambda g: torch.linalg.vector_norm(g).float() if g is not None else zero  # noqa: E731
        rows = []
        for gc, gt, gk in zip(g_ce, g_tr, clipped):
            rows.append(torch.stack([norm(gc), norm(gt), norm(gk)]))
            if gc is None and gk is None:
                grads.append(None)
            elif gk is None:
                grads.append(gc)
            elif gc is None:
                grads.append(gk)
            else:
                grads.append(gc + gk)
        n = torch.stack(rows) if rows else zero.new_zeros((0, 3))  # [P, 3]: ‖∇CE‖, ‖∇transfer‖, ‖clipped‖
        bound = n[:, 0] * ramp
        ratio = torch.where(bound > 0, n[:, 2] / torch.where(bound > 0, bound, torch.ones_like(bound)),
                            torch.zeros_like(bound))
        # one device→host transfer per step
        ce_n, tr_n, cl_n, r = torch.stack([n[:, 0].square().sum().sqrt(), n[:, 1].square().sum().sqrt(),
                                           n[:, 2].square().sum().sqrt(),
                                           ratio.max() if len(rows) else zero]).tolist()
    stats = {"ce_norm": ce_n, "transfer_norm": tr_n, "transfer_clipped_norm": cl_n, "clip_ratio_max": r}
    return grads, stats


