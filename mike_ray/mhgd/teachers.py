"""MHGD's teacher side: frozen classifiers tapped at their sensing points, and what they return.

No gradient and small outputs: per batch a teacher contributes its compressed vectors (or logits,
FSP matrices, activation signs for the baselines) — what a teacher shard ships back
(:mod:`mike_ray.mhgd.shard`). The student side never needs the teacher's weights.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mike_ray.errors import ConfigError, ModelError
from mike_ray.mhgd.config import METHODS, MHGDConfig
from mike_ray.mhgd.functional import fix_sign, fsp_matrix, svd_compress, teacher_vectors
from mike_ray.models.taps import TappedModel


class FrozenTeacher(nn.Module):
    """A trained classifier, frozen (eval mode, no parameter gradients), tapped at its sensing points.

    Args:
        model: the teacher (modified in place: ``eval()`` and ``requires_grad_(False)``).
        points: sensing-point module paths (may be empty for soft-logits only).
        logits_tap: module path of the logits; tapped only when ``with_logits``.
        with_logits: also return the logits.

    ``forward(x)`` returns ``(features [B,C_k,H_k,W_k] per point, logits or None)`` under ``no_grad``.
    The module stays in eval mode even if a parent calls ``.train()``.
    """

    def __init__(self, model: nn.Module, points: Sequence[str], logits_tap: str = "fc",
                 with_logits: bool = False) -> None:
        super().__init__()
        model.eval()
        model.requires_grad_(False)
        self.points = list(points)
        self.logits_tap = logits_tap
        self.with_logits = bool(with_logits)
        taps = self.points + ([logits_tap] if with_logits else [])
        if not taps:
            raise ModelError("teacher: nothing to tap (no sensing points and no logits)")
        self.tapped = TappedModel(model, taps, name="teacher")
        self.tapped.eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor | None]:
        out = self.tapped(x)
        feats = [out[p] for p in self.points]
        return feats, (out[self.logits_tap] if self.with_logits else None)


@dataclass
class TeacherTargets:
    """What the student needs from the teacher for one batch (all detached, small).

    Attributes:
        vectors: ``[B, C_k]`` per sensing point: top right singular vector, sign fixed (mhgd, kdsvd).
        sigmas: ``[B, 1]`` per point: the matching singular value (kdsvd).
        logits: ``[B, num_classes]`` (soft_logits).
        fsp: ``[B, C_m, C_{m+1}]`` per consecutive pair (fsp).
        on: ``[B, C_k, H_k, W_k]`` bool per point: teacher neuron active (ab).
    """

    vectors: list[Tensor] = field(default_factory=list)
    sigmas: list[Tensor] = field(default_factory=list)
    logits: Tensor | None = None
    fsp: list[Tensor] = field(default_factory=list)
    on: list[Tensor] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "TeacherTargets":
        """A copy with every tensor on ``device``."""
        mv = lambda ts: [t.to(device, non_blocking=True) for t in ts]  # noqa: E731
        return TeacherTargets(mv(self.vectors), mv(self.sigmas),
                              None if self.logits is None else self.logits.to(device), mv(self.fsp), mv(self.on))


@torch.no_grad()
def teacher_targets(teacher: FrozenTeacher, x: Tensor) -> list[Tensor]:
    """MHGD's teacher side: ``[V_1, …, V_L]``, each ``[B, C_k]`` (k = 1, sign fixed), no gradient.

    Module m relates ``V^F = V_m`` and ``V^B = V_{m+1}``.
    """
    feats, _ = teacher(x)
    return [teacher_vectors(f) for f in feats]


@torch.no_grad()
def teacher_outputs(teacher: FrozenTeacher, x: Tensor, method: str) -> TeacherTargets:
    """The teacher's targets of ``method`` for batch ``x`` (see :class:`TeacherTargets`), no gradient."""
    if method == "mhgd":
        return TeacherTargets(vectors=teacher_targets(teacher, x))
    feats, logits = teacher(x)
    if method == "soft_logits":
        if logits is None:
            raise ModelError("teacher: soft_logits needs the teacher's logits (with_logits=True)")
        return TeacherTargets(logits=logits)
    if method == "kdsvd":
        vs, ss = [], []
        for f in feats:
            sigma, v = svd_compress(f, 1)
            vs.append(fix_sign(v[:, 0]))
            ss.append(sigma)
        return TeacherTargets(vectors=vs, sigmas=ss)
    if method == "fsp":
        return TeacherTargets(fsp=[fsp_matrix(feats[m], feats[m + 1]) for m in range(len(feats) - 1)])
    if method == "ab":
        return TeacherTargets(on=[f > 0 for f in feats])
    if method == "student":
        return TeacherTargets()
    raise ConfigError(f"method: unknown method {method!r} (known: {', '.join(METHODS)})")


class TeacherSet:
    """The teachers as the student's loop sees them: a batch in, one :class:`TeacherTargets` per teacher out.

    :class:`LocalTeachers` runs them in this process; :class:`mike_ray.mhgd.shard.MHGDShardPool` on Ray
    actors (each shard returns its teachers' targets, no gradient). With several teachers every
    transfer loss is the **sum** over teachers (one set of phase-1 heads, AB connectors, … per teacher),
    like MIKE's sum over teachers: each teacher adds its own relational constraint at the same weight.
    """

    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def outputs(self, x: Tensor, method: str) -> list[TeacherTargets]:
        """Per teacher, :func:`teacher_outputs` of ``method`` for batch ``x`` ``[B,3,S,S]``."""
        raise NotImplementedError

    def probe(self, x: Tensor) -> list[tuple[list[Tensor], Tensor | None]]:
        """Per teacher, ``(features per sensing point, logits or None)`` of a small batch (shape checks)."""
        raise NotImplementedError


class LocalTeachers(TeacherSet):
    """Frozen teachers in this process (on the student's device)."""

    def __init__(self, teachers: Sequence[FrozenTeacher], names: Sequence[str] | None = None) -> None:
        if not teachers:
            raise ModelError("teachers: at least one teacher is required")
        self.teachers = list(teachers)
        self.names = list(names) if names is not None else [f"teacher{i}" for i in range(len(self.teachers))]

    def outputs(self, x: Tensor, method: str) -> list[TeacherTargets]:
        return [teacher_outputs(t, x, method) for t in self.teachers]

    @torch.no_grad()
    def probe(self, x: Tensor) -> list[tuple[list[Tensor], Tensor | None]]:
        return [t(x) for t in self.teachers]


def frozen_teacher(cfg: "MHGDConfig", model: nn.Module) -> FrozenTeacher:
    """``model`` frozen and tapped where ``cfg.method`` reads it (sensing points, or the logits)."""
    soft = cfg.method == "soft_logits"
    return FrozenTeacher(model, [] if soft else cfg.sensing_points, cfg.logits_tap, with_logits=soft)
