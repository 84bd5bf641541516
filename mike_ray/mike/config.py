"""MIKE's config sections as pydantic models — torch-free, so a sweep file validates without torch.

The transfer run (:class:`TransferConfig`, read by :mod:`mike_ray.mike.train`), the downstream decoders
(:class:`DownstreamConfig`, :mod:`mike_ray.mike.downstream`) and the teacher zoo (:class:`ZooConfig`,
:mod:`mike_ray.mike.zoo`); :mod:`mike_ray.mhgd.config` is MHGD's counterpart.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from mike_ray.config_base import StrictModel
from mike_ray.data.tasks import TASK_CODES, TASKS
from mike_ray.mike.schedules import ScheduleConfig
from mike_ray.zoo import TeacherPlacement

__all__ = ["DownstreamConfig", "SegLoss", "TeacherTrainConfig", "TransferConfig", "ZooConfig"]

SegLoss = Literal["bce", "bce_dice"]
"""The downstream decoders' loss (``mike_ray.metrics.segmentation_loss``)."""


class TransferConfig(StrictModel):
    """What one transfer run trains and how (the worker's slice of a trial's config)."""

    method: Literal["mike", "pixel"] = "mike"
    model: dict[str, Any] = Field(default_factory=lambda: {"arch": "autoencoder", "width": 8, "embed_channels": 2})
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    masking: bool = True
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    threads: int = Field(1, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    val_batches: int | None = Field(None, gt=0)  # cap on validation batches (None: all)
    # how a trainer worker holds the query set: "mmap" maps a decoded cache (the workers of a node
    # share it in the page cache; a COCO-sized query set is ~12 GB), "ram" loads it into the worker
    query_memory: Literal["mmap", "ram"] = "mmap"


class DownstreamConfig(StrictModel):
    """How the decoder is retrained on each downstream task."""

    tasks: list[str] = Field(default_factory=lambda: list(TASK_CODES))
    epochs: int = Field(3, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    reinit_decoder: bool = False
    # bce_dice: BCE + soft Dice (see metrics.segmentation_loss); bce: what the teachers train with
    loss: SegLoss = "bce_dice"
    max_train_samples: int | None = Field(None, gt=0)
    cpus_per_task: float = Field(1.0, gt=0)
    gpus_per_task: float = Field(0.0, ge=0)
    threads: int = Field(1, gt=0)
    device: str = "auto"
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in TASKS]
        if bad or not v:
            raise ValueError(f"unknown task {bad[0]!r}" if bad else "at least one task is required")
        return v


class TeacherTrainConfig(StrictModel):
    """How each teacher segmenter is trained (same for every task)."""

    epochs: int = Field(6, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0
    max_train_samples: int | None = Field(None, gt=0)


class ZooConfig(TeacherPlacement):
    """The teacher zoo: which tasks, which architecture, how it is trained and placed."""

    tasks: list[str] = Field(default_factory=lambda: list(TASK_CODES))
    model: dict[str, Any] = Field(default_factory=lambda: {"arch": "segmenter", "width": 8})
    taps: str | list[str] = "blocks"
    train: TeacherTrainConfig = Field(default_factory=TeacherTrainConfig)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one task is required")
        unknown = [t for t in v if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r} (known: {', '.join(TASK_CODES)})")
        if len(set(v)) != len(v):
            raise ValueError("tasks repeat")
        return v
