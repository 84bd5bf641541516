"""Layer-weight schedules for MIKE (paper §3.2–3.3): training progress → per-tap loss weights.

A schedule maps the fraction of training done, ``progress`` ∈ [0, 1], to :class:`Weights`: a weight
w_l^n for every tap l of every teacher n, plus the weight of the pixel MSE loss. Use
:func:`progress_at` to turn a step counter into a progress (``step`` = number of optimizer steps
already taken). Progress rather than (step, total) keeps schedules independent of how a trainer
counts (steps, epochs, resumed runs) and lets one configuration serve runs of any length.

Phases, in order:

1. **Pixel pretraining** (``pretrain_fraction`` p, default 0): while progress < p, the pixel weight
   is 1 and every teacher weight is 0 — teacher weights then sum to **0**, not 1; a shard should
   not even run its teachers.
2. **Teacher loss**: teacher weights sum to 1 over all teachers and taps (paper eq. 1); the pixel
   weight is ``pixel_weight`` (default 0), added on top, not part of that sum. Schedules that move
   over time (``layerwise_progressive``) see the *post-pretraining* progress
   q = (progress − p) / (1 − p), so their phases divide the teacher-loss part of training evenly.

Schedules (``ScheduleConfig.name``):

- ``uniform``: every tap of every teacher gets 1 / (total number of taps) — the paper's
  "all-layer uniform"; a teacher with more taps thus carries more total weight, as in eq. 1.
- ``last_layer``: each teacher's last tap, teachers equal.
- ``layerwise_progressive``: each teacher puts all its weight on one tap at a time, moving deeper
  at regular intervals and ending on its last tap (the paper's "last-layer progressive"); teachers
  equal. With ``num_phases=None`` each teacher walks its own depth: a teacher with L taps is on
  tap ⌊q·L⌋ (so teachers with different tap counts switch at different times). With
  ``num_phases=P`` all teachers switch together at q = k/P, and phase k is mapped to each
  teacher's depth as tap round(k·(L−1)/(P−1)) (first phase → first tap, last phase → last tap;
  P = 1 → the last tap only).
- ``adaptive`` (the paper leaves it open; see :class:`AdaptiveSchedule`): w ∝ (EMA(term) + eps)^−power,
  which makes every tap contribute a comparable share of the loss.

``teacher_weights`` (teacher → relative weight, default 1) combine with any schedule: each
teacher's tap weights are multiplied by its relative weight and the teacher part is renormalised
to sum to 1.

Boundaries: a progress within 1e-9 below a phase boundary counts as on it, so
``progress_at(step, total)`` lands in the intended phase despite float rounding.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping, Sequence

from pydantic import Field

from mike_ray.config_base import StrictModel
from mike_ray.errors import ConfigError, ModelError

__all__ = [
    "AdaptiveSchedule",
    "Schedule",
    "ScheduleConfig",
    "Weights",
    "make_schedule",
    "progress_at",
]

# Tolerance for phase boundaries: step/total computed in floats may land a hair below k/P.
_BOUNDARY_EPS = 1e-9

NonNegFloat = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
TeacherTaps = Mapping[str, Sequence[str]]


class ScheduleConfig(StrictModel):
    """Which layer-weight schedule to use, and its settings (a ``schedule:`` section of a sweep).

    Settings that do not apply to the chosen ``name`` are ignored (so a search space may vary
    ``name`` while fixing the others).
    """

    name: Literal["uniform", "last_layer", "layerwise_progressive", "adaptive"] = "uniform"
    pretrain_fraction: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] = 0.0
    """Fraction of training (from the start) spent on the pixel loss alone."""
    pixel_weight: NonNegFloat = 0.0
    """Weight of the pixel loss after pretraining (added on top of the teacher weights' 1)."""
    num_phases: Annotated[int, Field(ge=1)] | None = None
    """layerwise_progressive: number of equal phases; None = each teacher's own tap count."""
    ema_momentum: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] = 0.9
    """adaptive: EMA(t) = m·EMA(t−1) + (1−m)·term(t); the first observation initialises it."""
    adaptive_eps: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1e-6
    """adaptive: floor added to the EMA so a vanished term cannot take all the weight."""
    adaptive_power: NonNegFloat = 1.0
    """adaptive: w ∝ (EMA+eps)^−power; 0 = uniform, 1 = equal contribution from every tap."""
    teacher_weights: dict[str, NonNegFloat] = Field(default_factory=dict)
    """Relative weight per teacher name (missing teachers: 1), multiplied in, then renormalised."""


@dataclass(frozen=True)
class Weights:
    """The loss weights for one step.

    Attributes:
        teachers: teacher → tap → w_l^n, every tap of every teacher, in the taps' order. Sums to 1
            after pretraining, to 0 during it.
        pixel: weight of the pixel MSE loss (1 during pretraining, ``pixel_weight`` after).
        pretraining: whether this step is in the pixel-pretraining phase.
    """

    teachers: dict[str, dict[str, float]]
    pixel: float
    pretraining: bool = False

    def teacher_sum(self) -> float:
        """Σ over all teachers and taps (1 after pretraining, 0 during it)."""
        return math.fsum(w for taps in self.teachers.values() for w in taps.values())

    def active(self, teacher: str) -> dict[str, float]:
        """The taps of ``teacher`` with a nonzero weight (the only ones a shard must extract)."""
        return {tap: w for tap, w in self.teachers[teacher].items() if w != 0.0}

    def flat(self, prefix: str = "w") -> dict[str, float]:
        """Flat ``{"<prefix>/<teacher>/<tap>": w, "<prefix>/pixel": w}`` for metric logging."""
        out = {f"{prefix}/{t}/{tap}": w for t, taps in self.teachers.items() for tap, w in taps.items()}
        out[f"{prefix}/pixel"] = self.pixel
        return out


def progress_at(step: int, total_steps: int) -> float:
    """Fraction of training done before step ``step`` (0-based) of ``total_steps``: step / total."""
    if total_steps <= 0:
        raise ValueError(f"progress_at: total_steps must be > 0, got {total_steps}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"progress_at: step must be in [0, {total_steps}], got {step}")
    return step / total_steps


def _check_progress(progress: float) -> float:
    """Return ``progress`` as float, or raise ``ValueError`` if it is not a number in [0, 1]."""
    p = float(progress)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"schedule: progress must be in [0, 1], got {progress}")
    return p


def _phase(q: float, n: int) -> int:
    """Index of the phase that q ∈ [0, 1] falls in, of n equal phases (q = 1 → the last)."""
    return min(n - 1, math.floor(q * n + _BOUNDARY_EPS))


def _normalise(raw: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Scale nested nonnegative weights to sum to 1 (the caller guarantees a positive sum)."""
    s = math.fsum(w for taps in raw.values() for w in taps.values())
    return {t: {tap: w / s for tap, w in taps.items()} for t, taps in raw.items()}


class Schedule(ABC):
    """A layer-weight schedule for fixed teachers and taps. Stateless ones ignore ``update``.

    Every schedule offers ``update``/``state_dict``/``load_state_dict`` so a training loop can
    treat them alike (call ``update`` after each step, save ``state_dict`` in checkpoints).
    """

    def __init__(self, cfg: ScheduleConfig, taps: TeacherTaps) -> None:
        self.cfg = cfg
        self.taps: dict[str, tuple[str, ...]] = {t: tuple(names) for t, names in taps.items()}
        self._teacher_w = {t: float(cfg.teacher_weights.get(t, 1.0)) for t in self.taps}

    @abstractmethod
    def _raw(self, q: float) -> dict[str, dict[str, float]]:
        """Unnormalised teacher → tap → weight at post-pretraining progress q ∈ [0, 1]."""

    def weights(self, progress: float) -> Weights:
        """The weights at ``progress`` ∈ [0, 1] (fraction of training done; see :func:`progress_at`)."""
        p = _check_progress(progress)
        pre = self.cfg.pretrain_fraction
        if p < pre - _BOUNDARY_EPS:
            zeros = {t: {tap: 0.0 for tap in names} for t, names in self.taps.items()}
            return Weights(teachers=zeros, pixel=1.0, pretraining=True)
        q = min(1.0, max(0.0, (p - pre) / (1.0 - pre)))
        raw = self._raw(q)
        scaled = {t: {tap: w * self._teacher_w[t] for tap, w in taps.items()} for t, taps in raw.items()}
        return Weights(teachers=_normalise(scaled), pixel=float(self.cfg.pixel_weight), pretraining=False)

    def update(self, terms: Mapping[str, Mapping[str, float]]) -> None:
        """Feed the step's unweighted tap terms (teacher → tap → value). No-op unless adaptive."""

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (empty for stateless schedules)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (nothing to restore for stateless schedules)."""


class UniformSchedule(Schedule):
    """Every tap of every teacher equal (before teacher weights)."""

    def _raw(self, q: float) -> dict[str, dict[str, float]]:
        return {t: {tap: 1.0 for tap in names} for t, names in self.taps.items()}


class LastLayerSchedule(Schedule):
    """Each teacher's last tap, teachers equal (before teacher weights)."""

    def _raw(self, q: float) -> dict[str, dict[str, float]]:
        return {t: {tap: (1.0 if i == len(names) - 1 else 0.0) for i, tap in enumerate(names)}
                for t, names in self.taps.items()}


class LayerwiseProgressiveSchedule(Schedule):
    """All of a teacher's weight on one tap, moving deeper at regular intervals (module docstring)."""

    def tap_index(self, teacher: str, q: float) -> int:
        """Index of ``teacher``'s active tap at post-pretraining progress q."""
        n_taps = len(self.taps[teacher])
        phases = self.cfg.num_phases
        if phases is None:
            return _phase(q, n_taps)
        if phases == 1:
            return n_taps - 1
        k = _phase(q, phases)
        # round-half-up of k·(L−1)/(P−1) in integers: exact, pins phase 0 → tap 0, phase P−1 → last.
        return (2 * k * (n_taps - 1) + (phases - 1)) // (2 * (phases - 1))

    def _raw(self, q: float) -> dict[str, dict[str, float]]:
        out = {}
        for t, names in self.taps.items():
            idx = self.tap_index(t, q)
            out[t] = {tap: (1.0 if i == idx else 0.0) for i, tap in enumerate(names)}
        return out


class AdaptiveSchedule(Schedule):
    """w_l^n ∝ (EMA(term_l^n) + eps)^−power, normalised; uniform until the first update.

    Why this rule: tanh bounds every term to [0, 4], but taps still differ widely in how large
    their mismatch is (sparse deep ReLU maps vs dense early ones), so with equal weights the
    largest terms dominate the gradient and the others are barely learned. Weighting each term by
    the inverse of its running magnitude makes w·term roughly equal for every tap (power = 1): each
    tap gets a comparable share of the loss, the idea behind loss-magnitude balancing in
    multi-task learning. The EMA smooths batch-to-batch noise (masked terms are means over few
    samples); ``eps`` keeps an already-matched tap (term → 0) from taking all the weight; ``power``
    interpolates between uniform (0) and full equalisation (1). Weights are plain numbers fixed for
    a step, so no gradient flows through them.

    A tap not yet observed (e.g. its teacher's task was absent from the batches so far) gets the
    mean inverse score of the observed taps, i.e. it is treated as average.

    Under data-parallel training, feed ``update`` the terms averaged over workers (all-reduced) so
    every worker holds the same state and computes the same weights.
    """

    def __init__(self, cfg: ScheduleConfig, taps: TeacherTaps) -> None:
        super().__init__(cfg, taps)
        self.ema: dict[str, dict[str, float]] = {t: {} for t in self.taps}
        self.num_updates = 0

    def update(self, terms: Mapping[str, Mapping[str, float]]) -> None:
        """Fold one step's unweighted terms (teacher → tap → value ≥ 0) into the EMAs.

        Pass only terms that were measured: leave out a teacher whose mask selected no sample
        this step (its term is 0 by construction, not a measurement). Taps left out keep their EMA.
        """
        m = self.cfg.ema_momentum
        checked: list[tuple[str, str, float]] = []
        for t, tap_terms in terms.items():
            if t not in self.taps:
                raise ValueError(f"adaptive schedule: unknown teacher '{t}'")
            for tap, value in tap_terms.items():
                if tap not in self.taps[t]:
                    raise ValueError(f"adaptive schedule: unknown tap '{tap}' of teacher '{t}'")
                v = float(value)
                if not (math.isfinite(v) and v >= 0.0):
                    raise ValueError(f"adaptive schedule: teacher '{t}' tap '{tap}': term must be finite and >= 0, got {v}")
                checked.append((t, tap, v))
        for t, tap, v in checked:  # validated first, so a bad value leaves the state untouched
            prev = self.ema[t].get(tap)
            self.ema[t][tap] = v if prev is None else m * prev + (1.0 - m) * v
        self.num_updates += 1

    def _raw(self, q: float) -> dict[str, dict[str, float]]:
        eps, power = self.cfg.adaptive_eps, self.cfg.adaptive_power
        score = {t: {tap: (e + eps) ** (-power) for tap, e in emas.items()} for t, emas in self.ema.items()}
        known = [s for taps in score.values() for s in taps.values()]
        fill = math.fsum(known) / len(known) if known else 1.0  # uniform until something is known
        return {t: {tap: score[t].get(tap, fill) for tap in names} for t, names in self.taps.items()}

    def state_dict(self) -> dict[str, Any]:
        """``{"ema": teacher → tap → float, "num_updates": int}`` (plain JSON-able values)."""
        return {"ema": {t: dict(e) for t, e in self.ema.items()}, "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; a checkpoint for other teachers/taps is a ModelError."""
        ema = state.get("ema")
        if not isinstance(ema, Mapping) or "num_updates" not in state:
            raise ModelError("adaptive schedule state: expected keys 'ema' and 'num_updates'")
        new: dict[str, dict[str, float]] = {t: {} for t in self.taps}
        for t, taps in ema.items():
            if t not in self.taps:
                raise ModelError(f"adaptive schedule state: unknown teacher '{t}' (known: {', '.join(self.taps)})")
            for tap, v in taps.items():
                if tap not in self.taps[t]:
                    raise ModelError(f"adaptive schedule state: unknown tap '{tap}' of teacher '{t}'")
                v = float(v)
                if not (math.isfinite(v) and v >= 0.0):
                    raise ModelError(f"adaptive schedule state: teacher '{t}' tap '{tap}': bad EMA {v}")
                new[t][tap] = v
        self.ema = new
        self.num_updates = int(state["num_updates"])


_SCHEDULES: dict[str, type[Schedule]] = {
    "uniform": UniformSchedule,
    "last_layer": LastLayerSchedule,
    "layerwise_progressive": LayerwiseProgressiveSchedule,
    "adaptive": AdaptiveSchedule,
}


def make_schedule(cfg: ScheduleConfig, taps: TeacherTaps, *, source: str = "schedule") -> Schedule:
    """Build the schedule ``cfg.name`` for ``taps`` (teacher name → its ordered tap names).

    ``source`` prefixes error messages (the config's field path). Raises :class:`ConfigError` for a
    teacher without taps, duplicate taps, ``teacher_weights`` naming an unknown teacher, or teacher
    weights that are all 0.
    """
    if not taps:
        raise ConfigError(f"{source}: no teachers")
    for t, names in taps.items():
        if isinstance(names, str):
            raise ConfigError(f"{source}: taps.{t}: expected a list of tap names, got a string")
        if len(names) == 0:
            raise ConfigError(f"{source}: taps.{t}: teacher has no taps")
        dup = sorted({n for n in names if list(names).count(n) > 1})
        if dup:
            raise ConfigError(f"{source}: taps.{t}: duplicate taps {dup}")
    unknown = [t for t in cfg.teacher_weights if t not in taps]
    if unknown:
        raise ConfigError(f"{source}.teacher_weights.{unknown[0]}: unknown teacher (known: {', '.join(taps)})")
    if all(cfg.teacher_weights.get(t, 1.0) == 0.0 for t in taps):
        raise ConfigError(f"{source}.teacher_weights: all teachers have weight 0")
    return _SCHEDULES[cfg.name](cfg, taps)
