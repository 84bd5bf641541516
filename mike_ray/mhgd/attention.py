"""The multi-head attention network (MHAN) of one MHGD module (paper §3.1, Fig. 2).

One module relates two consecutive sensing points, front F (C_F channels) and back B (C_B channels),
each compressed to one unit vector per sample (``V^F`` ``[B, C_F]``, ``V^B`` ``[B, C_B]``).

* Attention heads: θ on V^B and φ on V^F, each a bias-free linear layer + BatchNorm1d producing
  A heads of width D = (C_F + C_B) // 2; ``S_a[i, j] = θ_a(v_i^B) · φ_a(v_j^F)``; G_a = softmax_j(S_a)
  in phase 1, softmax_j(tanh(S_a)) in phase 2.
* Estimator (phase 1 only): ``V̄^B = f2(G · f1(V^F))``, f1 = linear (no bias) + BN + ReLU to width D,
  shared by the heads; the A aggregated copies are concatenated (``[B, A·D]``); f2 = linear with bias
  to C_B, then L2 normalisation.

Phase 1 trains all of it on the teacher's vectors (:meth:`MultiHeadGraph.phase1_loss`). Phase 2 calls
:meth:`MultiHeadGraph.freeze`: parameters stop requiring gradients and batch norm uses the running
statistics of phase 1, even if a parent module is switched to training mode; student and teacher graphs
then come from the same frozen heads (:meth:`MultiHeadGraph.graphs` with ``smooth=True``).

Layer details taken from the authors' code (``KD_methods_with_TF/nets/Relation.py`` under the
``ResNet_arg_scope``): fully connected layers have no bias except the estimator's last; batch norm is
affine with decay 0.9 / eps 1e-5 (PyTorch's defaults momentum 0.1 / eps 1e-5 are the same). Weights use
PyTorch's default initialisation rather than the authors' fan-out He init.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mike_ray.errors import ModelError
from mike_ray.mhgd.functional import (
    attend,
    attention_graph,
    attention_logits,
    drop_heads_mask,
    phase1_loss,
)

__all__ = ["MultiHeadGraph"]


class MultiHeadGraph(nn.Module):
    """Attention heads + estimator of one MHGD module (front point F → back point B).

    Args:
        c_front: C_F, channels (vector length) at the front sensing point.
        c_back: C_B, channels at the back sensing point.
        num_heads: A (8 in the paper and the authors' code).
        head_dropout: apply the authors' random head dropout (:func:`~mike_ray.mhgd.functional.drop_heads_mask`)
            to the graphs inside the estimator during phase-1 training. Off by default: DESIGN.md and the
            paper do not include it.

    Attributes:
        head_dim: D = (C_F + C_B) // 2.
        theta: θ, ``[B, C_B] → [B, A·D]`` (linear, no bias, + BN).
        phi: φ, ``[B, C_F] → [B, A·D]``.
        f1: ``[B, C_F] → [B, D]`` (linear, no bias, + BN + ReLU).
        f2: ``[B, A·D] → [B, C_B]`` (linear with bias; L2 normalisation is applied in :meth:`estimate`).
    """

    def __init__(self, c_front: int, c_back: int, num_heads: int = 8, head_dropout: bool = False) -> None:
        super().__init__()
        if c_front < 1 or c_back < 1 or num_heads < 1:
            raise ModelError(f"MultiHeadGraph: channel counts and num_heads must be >= 1, "
                             f"got c_front={c_front}, c_back={c_back}, num_heads={num_heads}")
        self.c_front = int(c_front)
        self.c_back = int(c_back)
        self.num_heads = int(num_heads)
        self.head_dim = (self.c_front + self.c_back) // 2
        self.head_dropout = bool(head_dropout)
        width = self.num_heads * self.head_dim
        self.theta = nn.Sequential(nn.Linear(self.c_back, width, bias=False), nn.BatchNorm1d(width))
        self.phi = nn.Sequential(nn.Linear(self.c_front, width, bias=False), nn.BatchNorm1d(width))
        self.f1 = nn.Sequential(nn.Linear(self.c_front, self.head_dim, bias=False),
                                nn.BatchNorm1d(self.head_dim), nn.ReLU())
        self.f2 = nn.Linear(width, self.c_back, bias=True)
        nn.init.zeros_(self.f2.bias)  # the authors' zeros_initializer
        self._frozen = False

    # ------------------------------------------------------------------ mode handling

    @property
    def frozen(self) -> bool:
        """True after :meth:`freeze`: inference-mode batch norm and no parameter gradients."""
        return self._frozen

    def freeze(self) -> "MultiHeadGraph":
        """Phase 2: fix the heads. Parameters stop requiring grad; batch norm uses running statistics.

        Gradients still flow through the heads to their *inputs* (the student's vectors). The module
        stays in eval mode even when a parent calls ``.train()``. Returns ``self``.
        """
        self._frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def unfreeze(self) -> "MultiHeadGraph":
        """Undo :meth:`freeze` (parameters trainable again, mode follows ``.train()``). Returns ``self``."""
        self._frozen = False
        self.requires_grad_(True)
        return self

    def train(self, mode: bool = True) -> "MultiHeadGraph":
        """``nn.Module.train``, except that a frozen module stays in eval mode."""
        return super().train(False if self._frozen else mode)

    # ------------------------------------------------------------------ computation

    def _check(self, vf: Tensor, vb: Tensor | None = None) -> None:
        if vf.dim() != 2 or vf.shape[1] != self.c_front:
            raise ModelError(f"MultiHeadGraph: front vectors must be [B, {self.c_front}], got {tuple(vf.shape)}")
        if vb is not None and (vb.dim() != 2 or vb.shape[1] != self.c_back or vb.shape[0] != vf.shape[0]):
            raise ModelError(f"MultiHeadGraph: back vectors must be [{vf.shape[0]}, {self.c_back}], "
                             f"got {tuple(vb.shape)}")

    def embed(self, vf: Tensor, vb: Tensor) -> tuple[Tensor, Tensor]:
        """Head embeddings: ``(θ(V^B), φ(V^F))``, each ``[B, A, D]``.

        Args:
            vf: ``[B, C_F]`` front vectors V^F.
            vb: ``[B, C_B]`` back vectors V^B.
        """
        self._check(vf, vb)
        b = vf.shape[0]
        return (self.theta(vb).view(b, self.num_heads, self.head_dim),
                self.phi(vf).view(b, self.num_heads, self.head_dim))

    def logits(self, vf: Tensor, vb: Tensor) -> Tensor:
        """Similarity maps ``S`` ``[A, B, B]``: ``S[a, i, j] = θ_a(v_i^B) · φ_a(v_j^F)``."""
        theta_b, phi_f = self.embed(vf, vb)
        return attention_logits(theta_b, phi_f)

    def graphs(self, vf: Tensor, vb: Tensor, smooth: bool) -> Tensor:
        """Attention graphs ``G`` ``[A, B, B]`` (rows sum to 1).

        Args:
            vf: ``[B, C_F]`` front vectors; vb: ``[B, C_B]`` back vectors.
            smooth: False → softmax_j(S) (phase 1); True → softmax_j(tanh S) (phase 2 transfer).
        """
        return attention_graph(self.logits(vf, vb), smooth)

    def estimate(self, vf: Tensor, g: Tensor) -> Tensor:
        """Estimator: ``V̄^B = f2(G · f1(V^F))``, L2-normalised, ``[B, C_B]``.

        Args:
            vf: ``[B, C_F]`` front vectors.
            g: ``[A, B, B]`` graphs (phase 1: ``graphs(vf, vb, smooth=False)``).
        """
        self._check(vf)
        if g.shape != (self.num_heads, vf.shape[0], vf.shape[0]):
            raise ModelError(f"MultiHeadGraph: graphs must be [{self.num_heads}, {vf.shape[0]}, {vf.shape[0]}], "
                             f"got {tuple(g.shape)}")
        if self.head_dropout and self.training:
            g = g * drop_heads_mask(self.num_heads, vf.shape[0], device=g.device, dtype=g.dtype)
        return F.normalize(self.f2(attend(g, self.f1(vf))), dim=-1)

    def forward(self, vf: Tensor, vb: Tensor) -> Tensor:
        """Phase-1 prediction of V^B from V^F through the (unsmoothed) graphs: ``[B, C_B]``."""
        return self.estimate(vf, self.graphs(vf, vb, smooth=False))

    def phase1_loss(self, vf: Tensor, vb: Tensor) -> Tensor:
        """Phase-1 loss of this module on the teacher's vectors: ``mean(1 − cos(V̄^B, V^B))`` (scalar).

        Weight decay (5e-4 on all MHAN weights, BN scales and biases in the authors' code) is the
        optimiser's job; the caller sums this over modules.
        """
        return phase1_loss(self(vf, vb), vb)

    def extra_repr(self) -> str:
        return (f"c_front={self.c_front}, c_back={self.c_back}, num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}, head_dropout={self.head_dropout}, frozen={self._frozen}")
