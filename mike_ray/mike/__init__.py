"""MIKE: multi-teacher knowledge transfer into an autoencoder (paper: shared/papers/mike.txt).

This package's pure parts are re-exported here: the loss (eq. 1 with query masking,
:mod:`mike_ray.mike.loss`) and the layer-weight schedules (:mod:`mike_ray.mike.schedules`).
Neither imports Ray.
"""
from __future__ import annotations

from mike_ray.utils import lazy_exports

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

# name → submodule, imported on first use (utils.lazy_exports): the configs here stay torch-free
_EXPORTS = {
    "TapTerm": "loss",
    "masked_sample_mean": "loss",
    "pixel_loss": "loss",
    "tap_term": "loss",
    "task_mask": "loss",
    "teacher_loss": "loss",
    "AdaptiveSchedule": "schedules",
    "Schedule": "schedules",
    "ScheduleConfig": "schedules",
    "Weights": "schedules",
    "make_schedule": "schedules",
    "progress_at": "schedules",
}
__getattr__ = lazy_exports(__name__, _EXPORTS)
