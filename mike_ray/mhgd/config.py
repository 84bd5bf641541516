"""MHGD's config sections as pydantic models — torch-free, so a sweep file validates without torch.

One MHGD (or baseline) run: :class:`MHGDConfig` and the method table; the classifier teachers
(:class:`ClassifierZooConfig`, built by :mod:`mike_ray.mhgd.zoo`). :mod:`mike_ray.mike.config` is MIKE's
counterpart."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from mike_ray.config_base import StrictModel
from mike_ray.models.spec import DEFAULT_STUDENT, DEFAULT_TEACHER, ModelSpec
from mike_ray.zoo import TeacherPlacement

Method = Literal["student", "soft_logits", "fsp", "ab", "kdsvd", "mhgd"]
METHODS: tuple[str, ...] = ("student", "soft_logits", "fsp", "ab", "kdsvd", "mhgd")
"""All methods, in the column order of the paper's table 1 (KD-SVDF is not implemented)."""
NEEDS_PAIRS = ("fsp", "kdsvd", "mhgd")        # relate consecutive points: >= 2 points, equal channels
CLIPPED = ("kdsvd", "mhgd")                    # multi-task with per-parameter clipped transfer gradients

class MHGDConfig(StrictModel):
    """One MHGD (or baseline) run: models, sensing points, both phases' optimisation, baseline weights.

    Defaults reproduce the paper's setting where it is known (8 heads, phase 1 = 40 epochs of SGD
    Nesterov 0.9 at lr 0.1 with the authors' Σw²·5e-4 penalty = weight decay 1e-3, T = 4; AB and FSP
    weights as in the authors' code) on the default WRN-16-4 → WRN-10-4 pair; the
    student schedule (200 epochs, lr 0.1 divided by 5 at 30/60/80 %) is the authors' CIFAR recipe.
    Small profiles override epochs, batch size and models.
    """

    method: Method = "mhgd"
    teacher: ModelSpec = Field(default_factory=lambda: ModelSpec(**DEFAULT_TEACHER),
                               description="teacher architecture (num_classes: taken from the data when unset)")
    student: ModelSpec = Field(default_factory=lambda: ModelSpec(**DEFAULT_STUDENT),
                               description="student architecture (num_classes: taken from the data when unset)")
    sensing_points: list[str] = Field(default_factory=lambda: ["stage1", "stage2", "stage3"], min_length=1,
                                      description="teacher module paths, consecutive stage outputs (post-activation)")
    student_points: list[str] | None = Field(None, description="student module paths (default: sensing_points)")
    logits_tap: str = Field("fc", min_length=1, description="module whose output is the logits (both models)")
    ab_student_points: list[str] | None = Field(
        None, description="AB: student pre-activation taps (default: '<point>.body' where it exists, else the point)")

    # phase 1 (MHGD attention heads) / initialisation stage (FSP, AB)
    num_heads: int = Field(8, ge=1, description="attention heads A per module")
    head_dropout: bool = Field(False, description="the authors' random head dropout in phase 1 (not in the paper)")
    svd_candidates: int = Field(4, ge=1, description="student singular vectors searched for the teacher's match")
    phase1_epochs: int = Field(40, ge=0, description="MHGD phase 1 (attention heads on the teacher)")
    phase1_lr: float = Field(0.1, gt=0)
    phase1_weight_decay: float = Field(1e-3, ge=0, description="SGD weight decay of the attention heads: the "
                                       "authors add Σw²·5e-4 to the loss (no ½), i.e. a decay of 1e-3·w")
    init_epochs: int | None = Field(None, ge=0, description="FSP/AB initialisation stage (default: phase1_epochs)")

    # student (and teacher) training
    epochs: int = Field(200, ge=1, description="student epochs (phase 2)")
    teacher_epochs: int = Field(200, ge=1, description="train_teacher_classifier epochs")
    batch_size: int = Field(128, ge=2, description="also N, the number of nodes of the attention graphs")
    eval_batch_size: int = Field(256, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    lr_milestones: list[float] = Field(default_factory=lambda: [0.3, 0.6, 0.8],
                                       description="fractions of the epochs where the lr is multiplied by lr_gamma")
    lr_gamma: float = Field(0.2, gt=0, le=1)

    # baselines
    temperature: float = Field(4.0, gt=0, description="soft_logits: T")
    soft_weight: float = Field(1.0, ge=0, description="soft_logits: weight of T²·KL next to CE")
    fsp_weight: float = Field(1e-3, ge=0, description="fsp: factor of the summed FSP losses")
    ab_weight: float = Field(3e-3, ge=0, description="ab: factor of the layer-weighted AB losses (the authors' 3e-3)")
    ab_layer_weights: Literal["authors", "repdistiller"] = Field(
        "authors", description="ab: point i of L weighs 2^i (the MHGD authors' code) or 2^(i-L+1) (RepDistiller)")
    ab_margin: float = Field(1.0, gt=0, description="ab: margin m")

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch intra-op threads (None: leave as is)")

    @model_validator(mode="after")
    def _check(self) -> "MHGDConfig":
        if self.student_points is not None and len(self.student_points) != len(self.sensing_points):
            raise ValueError(f"student_points: {len(self.student_points)} paths but sensing_points has "
                             f"{len(self.sensing_points)}")
        if self.method in NEEDS_PAIRS and len(self.sensing_points) < 2:
            raise ValueError(f"sensing_points: method '{self.method}' relates consecutive points and needs >= 2")
        if self.ab_student_points is not None and len(self.ab_student_points) != len(self.sensing_points):
            raise ValueError(f"ab_student_points: {len(self.ab_student_points)} paths but sensing_points has "
                             f"{len(self.sensing_points)}")
        if any(not 0 < f <= 1 for f in self.lr_milestones):
            raise ValueError(f"lr_milestones: fractions must lie in (0, 1], got {self.lr_milestones}")
        return self

    @property
    def student_sensing_points(self) -> list[str]:
        """The student's sensing points (``student_points`` or ``sensing_points``)."""
        return list(self.student_points or self.sensing_points)

    @property
    def init_stage_epochs(self) -> int:
        """FSP/AB initialisation epochs."""
        return self.phase1_epochs if self.init_epochs is None else self.init_epochs



def as_config(cfg: MHGDConfig | Mapping[str, Any]) -> MHGDConfig:
    """A config object from a config or its dict (validated with one-line errors)."""
    if isinstance(cfg, MHGDConfig):
        return cfg
    from mike_ray.config_base import validate

    return validate(MHGDConfig, dict(cfg), source="mhgd")


class ClassifierTrainConfig(StrictModel):
    """How every teacher classifier is trained (SGD Nesterov, step schedule: the authors' CIFAR recipe)."""

    epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lr_milestones: list[float] = Field(default_factory=lambda: [0.3, 0.6, 0.8])
    lr_gamma: float = Field(0.2, gt=0, le=1)
    seed: int = 0


class ClassifierZooConfig(TeacherPlacement):
    """MHGD's teachers as a named list of architectures (big_vision style), trained on the sweep's data."""

    teachers: dict[str, ModelSpec] = Field(default_factory=lambda: {"wrn16_4": ModelSpec(**DEFAULT_TEACHER)})
    train: ClassifierTrainConfig = Field(default_factory=ClassifierTrainConfig)

    @field_validator("teachers")
    @classmethod
    def _names(cls, v: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        import re

        if not v:
            raise ValueError("at least one teacher is required")
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"teacher name {name!r}: use letters, digits, '_', '.', '-' (it names a folder)")
        return v
