"""MIKE: multi-teacher knowledge transfer into an autoencoder (paper: shared/papers/mike.txt).

This package's pure parts are re-exported here: the loss (eq. 1 with query masking,
:mod:`mike_ray.mike.loss`) and the layer-weight schedules (:mod:`mike_ray.mike.schedules`).
Neither imports Ray.
"""
from mike_ray.mike.loss import (
    TapTerm,
    masked_sample_mean,
    pixel_loss,
    tap_term,
    task_mask,
    teacher_loss,
)
from mike_ray.mike.schedules import (
    AdaptiveSchedule,
    Schedule,
    ScheduleConfig,
    Weights,
    make_schedule,
    progress_at,
)

__all__ = [
    "AdaptiveSchedule",
    "Schedule",
    "ScheduleConfig",
    "TapTerm",
    "Weights",
    "make_schedule",
    "masked_sample_mean",
    "pixel_loss",
    "progress_at",
    "tap_term",
    "task_mask",
    "teacher_loss",
]
