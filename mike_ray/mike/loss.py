"""The MIKE loss (paper eq. 1) with query masking (paper §4.1). Pure torch, no Ray.

For one teacher n with taps l and weights w_l (from a layer-weight schedule)::

    loss_n = Σ_l w_l · masked_mean_i( mean_e (tanh φ_l(x)_ie − tanh φ_l(x̄)_ie)² )

where i runs over the samples of the batch, e over the elements of one sample's activation
(channels × height × width), and the masked mean keeps only the samples of the teacher's own task.
A shard sums ``loss_n`` over its teachers; the trainer adds the pixel loss.

Two choices the paper leaves open, made here:

- **Per-element mean inside a sample.** Eq. 1 writes an unreduced square; summing the elements
  would make a 32×32×64 tap weigh 4× more than a 16×16×64 one purely by size, so the layer weights
  would no longer mean what they say. Averaging the elements of a sample makes every tap's term a
  number in [0, 4] (tanh is bounded), comparable across taps and teachers.
- **What a weight means when batches mix tasks** (docs/contracts.md, "Loss weights under masking").
  A step's loss is eq. 1 averaged over the *whole* batch, each sample scored only by the teachers
  of its own task::

      L = (1/B) Σ_i Σ_{n: task(i) = task(n)} Σ_l w_l^n · ℓ_l^n(i)
        = Σ_n share_n · Σ_l w_l^n · masked_mean_{i ∈ n}(ℓ_l^n(i)),   share_n = #{i ∈ n} / B

  so every *sample* weighs the same whatever its batch holds: a teacher with 1 sample in a batch
  of 64 contributes 1/64 of what it would with all 64, its expected per-step loss is
  ``w_l^n · p_n · E_n[ℓ]`` with ``p_n`` its task's share of the query set, and the expected step loss
  is eq. 1 over the query set. The pixel term (``w_pix · MSE`` over the batch) keeps a fixed
  balance against it. Without masking every teacher sees every sample (share 1).
  The per-tap *measurements* (logged, fed to the adaptive schedule) stay masked means over the
  teacher's own samples, counted with their sample counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TapTerm",
    "masked_sample_mean",
    "pixel_loss",
    "tap_term",
    "task_mask",
    "teacher_loss",
]


def _check_mask(mask: Tensor, batch: int, what: str) -> None:
    """Raise ``ValueError`` unless ``mask`` is a 1-D bool tensor of length ``batch``."""
    if mask.dtype != torch.bool:
        raise ValueError(f"{what}: mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != (batch,):
        raise ValueError(f"{what}: mask must have shape ({batch},), got {tuple(mask.shape)}")


def masked_sample_mean(per_sample: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``per_sample`` over the samples where ``mask`` is true.

    Args:
        per_sample: ``[B]`` float, one value per sample of the batch.
        mask: ``[B]`` bool, which samples count (see :func:`task_mask`).

    Returns:
        A 0-d tensor: ``Σ_{i: mask_i} per_sample_i / #{i: mask_i}``. When no sample is selected it
        is exactly 0, still attached to ``per_sample``'s graph, with a zero (never NaN) gradient.
        Unselected entries never leak into the value, even when they are NaN/inf. Their gradient
        *through the ops before this one* can still be NaN (0 · NaN), which is why a shard never
        computes a teacher on other tasks' rows at all (it gathers its own rows first).
    """
    if per_sample.dim() != 1:
        raise ValueError(f"masked_sample_mean: per_sample must be 1-D [B], got shape {tuple(per_sample.shape)}")
    mask = mask.to(per_sample.device)
    _check_mask(mask, per_sample.shape[0], "masked_sample_mean")
    # where (not multiply): 0 · NaN would be NaN, and where's gradient is exactly 0 off the mask.
    selected = torch.where(mask, per_sample, torch.zeros((), dtype=per_sample.dtype, device=per_sample.device))
    # clamp(min=1): an empty selection divides 0 by 1 instead of 0 by 0.
    count = mask.sum().clamp(min=1).to(per_sample.dtype)
    return selected.sum() / count


def tap_term(a_x: Tensor, a_xbar: Tensor, mask: Tensor) -> Tensor:
    """One tap's unweighted term: masked sample mean of the per-sample mean squared tanh difference.

    Args:
        a_x: ``[B, ...]`` the tap's activation for the original batch x (the target; it is
            detached here, so no gradient flows to x even if the caller forgot ``no_grad``).
        a_xbar: ``[B, ...]`` the same tap's activation for the reconstruction x̄, same shape.
        mask: ``[B]`` bool, the samples of the teacher's task.

    Returns:
        A 0-d tensor ``masked_mean_i( mean_e (tanh a_x[i,e] − tanh a_xbar[i,e])² )``, in [0, 4];
        differentiable with respect to ``a_xbar``.
    """
    if a_x.shape != a_xbar.shape:
        raise ValueError(f"tap_term: activations of x and x̄ differ in shape: {tuple(a_x.shape)} vs {tuple(a_xbar.shape)}")
    if a_xbar.dim() == 0:
        raise ValueError("tap_term: activations need a batch dimension, got a 0-d tensor")
    return masked_sample_mean(per_sample_term(a_x, a_xbar), mask)


def per_sample_term(a_x: Tensor, a_xbar: Tensor) -> Tensor:
    """``[B]``: each sample's mean squared tanh difference ``mean_e (tanh a_x[i,e] − tanh a_xbar[i,e])²``
    (a_x detached) — the per-sample part of :func:`tap_term`, also used by a shard's grouped teachers."""
    diff = torch.tanh(a_x.detach()) - torch.tanh(a_xbar)
    return diff.pow(2).reshape(a_xbar.shape[0], -1).mean(dim=1)  # reshape also handles 1-D taps


@dataclass(frozen=True)
class TapTerm:
    """One tap's contribution to a teacher's loss, for logging and the adaptive schedule.

    Attributes:
        weight: the schedule's weight w_l for this tap.
        unweighted: 0-d tensor, :func:`tap_term` (detached: holding it for logging must not keep
            the teacher's activation graph alive).
        weighted: 0-d tensor, ``weight · unweighted`` (detached likewise).
    """

    weight: float
    unweighted: Tensor
    weighted: Tensor


def teacher_loss(
    feats_x: Mapping[str, Tensor],
    feats_xbar: Mapping[str, Tensor],
    weights: Mapping[str, float],
    mask: Tensor,
    *,
    share: float = 1.0,
) -> tuple[Tensor, dict[str, TapTerm]]:
    """One teacher's loss ``share · Σ_l w_l · tap_term(φ_l(x), φ_l(x̄), mask)``.

    Args:
        feats_x: tap name → ``[B, ...]`` activation for x (targets; need no gradient).
        feats_xbar: tap name → ``[B, ...]`` activation for x̄ (carry the graph to x̄).
        weights: tap name → w_l ≥ 0, the teacher's slice of the schedule's weights; its keys are
            the teacher's taps. Every tap with a nonzero weight must be in both feature maps;
            zero-weight taps may be missing there (a shard may skip extracting them).
        mask: ``[B]`` bool, the samples of the teacher's task (:func:`task_mask`).
        share: the teacher's samples' share of the whole query batch (``#{i ∈ n} / B``, in [0, 1]);
            it scales the total so that a step's loss is eq. 1 averaged over the batch (module
            docstring). 1 when the features are of the whole batch and every sample counts.

    Returns:
        ``(total, terms)``: ``total`` is a 0-d tensor attached to the graph of ``feats_xbar``;
        ``terms`` maps each computed tap (in ``weights`` order) to its :class:`TapTerm` (unweighted
        and weighted by ``w_l`` alone, without the share: measurements of this teacher). When no
        tap has a nonzero weight, ``total`` is a constant 0 that does not require grad — a caller
        should not run the teacher at all then (e.g. during pixel pretraining).
    """
    if not weights:
        raise ValueError("teacher_loss: no taps in weights")
    extra = [k for k in feats_xbar if k not in weights]
    if extra:
        raise ValueError(f"teacher_loss: features for taps without a weight: {extra}")
    if not (math.isfinite(share) and 0.0 <= share <= 1.0):
        raise ValueError(f"teacher_loss: share must be in [0, 1], got {share}")
    for tap, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"teacher_loss: tap '{tap}': weight must be finite and >= 0, got {w}")

    total: Tensor | None = None
    terms: dict[str, TapTerm] = {}
    for tap, w in weights.items():
        if w == 0.0:  # layerwise schedules leave most taps at 0: no tanh/difference tensors for them
            continue
        if tap not in feats_xbar or tap not in feats_x:
            raise ValueError(f"teacher_loss: tap '{tap}' has weight {w} but no activation")
        term = tap_term(feats_x[tap], feats_xbar[tap], mask)
        weighted = term * w
        total = weighted * share if total is None else total + weighted * share
        terms[tap] = TapTerm(weight=float(w), unweighted=term.detach(), weighted=weighted.detach())

    if total is None:
        ref = next(iter(feats_xbar.values()), None)
        total = torch.zeros((), dtype=ref.dtype if ref is not None else torch.get_default_dtype(),
                            device=ref.device if ref is not None else mask.device)
    return total, terms


def task_mask(task_ids: Tensor, teacher_task_id: int | None) -> Tensor:
    """Query mask for one teacher (paper §4.1).

    Args:
        task_ids: ``[B]`` int64, each sample's task id (its index in the data's task table).
        teacher_task_id: the task the teacher was trained on, or ``None`` to switch masking off.

    Returns:
        ``[B]`` bool on ``task_ids``' device: ``task_ids == teacher_task_id``, or all true for
        ``None``.
    """
    if task_ids.dim() != 1:
        raise ValueError(f"task_mask: task_ids must be 1-D [B], got shape {tuple(task_ids.shape)}")
    if task_ids.dtype.is_floating_point or task_ids.dtype == torch.bool:
        raise ValueError(f"task_mask: task_ids must be an integer tensor, got {task_ids.dtype}")
    if teacher_task_id is None:
        return torch.ones_like(task_ids, dtype=torch.bool)
    return task_ids == int(teacher_task_id)


def pixel_loss(x: Tensor, xbar: Tensor) -> Tensor:
    """Pixel reconstruction loss: mean over all elements of ``(x̄ − x)²``.

    Args:
        x: ``[B, 3, H, W]`` the original images (target; detached).
        xbar: ``[B, 3, H, W]`` the reconstruction.

    Returns:
        0-d tensor, differentiable with respect to ``xbar``.
    """
    if x.shape != xbar.shape:
        raise ValueError(f"pixel_loss: x and x̄ differ in shape: {tuple(x.shape)} vs {tuple(xbar.shape)}")
    return F.mse_loss(xbar, x.detach(), reduction="mean")
